"""acnet_pl.utils: safe loading (weights_only), atomic writes, sha256, FLOP counts, text tables."""

from __future__ import annotations

import ast
import hashlib
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import acnet_pl.utils
from acnet_pl.utils.files import atomic_torch_save, atomic_write_text, sha256_file
from acnet_pl.utils.flops import model_stats
from acnet_pl.utils.loading import load_weights_only
from acnet_pl.utils.text import render_rows, render_table


class _MakesMarker:
    """Unpickling this would run ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_weights_only_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _MakesMarker(marker)}}, path)
    with pytest.raises(ValueError, match=r"evil\.ckpt: refused as unsafe: it needs posix\.system") as err:
        load_weights_only(path)
    assert "nothing in it was run" in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty file"),
        (b"epoch,loss\n1,0.5\n", "it holds text"),
        (b"\x00\x01\x02\x03garbage", "it holds binary data"),
    ],
)
def test_load_weights_only_names_not_a_checkpoint(tmp_path, content, expected):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        load_weights_only(path, hint="the fix")


def test_load_weights_only_truncated_missing_and_folder(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(4096)}, good)
    assert torch.equal(load_weights_only(good)["w"], torch.load(good, weights_only=True)["w"])
    half = tmp_path / "half.pt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"half\.pt: corrupt or truncated checkpoint \(.+\); fix$"):
        load_weights_only(half, hint="fix")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no such file"):
        load_weights_only(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="is a folder"):
        load_weights_only(tmp_path)


def test_atomic_writes_replace_and_leave_nothing_on_failure(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text("old\n", path)
    atomic_write_text("new\n", path)
    assert path.read_text() == "new\n"
    # A plain file's permissions (umask applied), not mkstemp's private 0600.
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # a local lambda cannot be pickled
        atomic_torch_save({"f": lambda: 0}, tmp_path / "sub" / "deploy.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    assert sha256_file(path) == hashlib.sha256(b"new\n").hexdigest()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
def test_a_full_disk_is_an_enospc_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    """torch.save's own "unexpected pos" RuntimeError on a full disk comes out as the OSError (ENOSPC), which
    AtomicCheckpointIO turns into its one line; the temp file is gone, the previous file untouched."""
    import builtins
    import errno

    import acnet_pl.utils.files as files
    from acnet_pl.training.checkpointing import AtomicCheckpointIO, CheckpointWriteError

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    full = lambda tmp, mode: builtins.open("/dev/full", mode)  # noqa: E731, SIM115 (the caller closes it)
    monkeypatch.setattr(files, "open", full, raising=False)
    with pytest.raises(OSError) as error:
        atomic_torch_save({"w": torch.ones(100_000)}, path)
    assert error.value.errno == errno.ENOSPC
    with pytest.raises(CheckpointWriteError, match=r"^cannot write checkpoint .*: No space left on device; "):
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(100_000)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))


def test_model_stats_counts_one_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    stats = model_stats(conv, (3, 10, 10))
    assert stats["params"] == 8 * 3 * 9 + 8
    assert stats["flops"] == 2 * 8 * 3 * 9 * 10 * 10  # 2 per multiply-add, bias not counted


def test_utils_are_leaves():
    """acnet_pl/utils/ imports nothing from acnet_pl: anything may use it, it uses nothing back."""
    folder = Path(acnet_pl.utils.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert {p.name for p in files} >= {"files.py", "loading.py", "config.py", "flops.py", "text.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["(relative)"]
            assert not [n for n in names if n.startswith("acnet_pl") or n == "(relative)"], path.name


def test_render_table_pads_columns_to_their_widest_cell():
    table = render_table(["run", "top-1"], [["base", "91.00"], ["acb", "9.50"]], "lr", rule=True)
    assert table.splitlines() == ["run   top-1", "-----------", "base  91.00", "acb    9.50"]
    assert render_table(["a"], [["1"]], "r", min_widths=[4]) == "   a\n   1"
    assert render_rows([("model", "x"), ("FLOPs", "1 -> 2")]) == "model  x\nFLOPs  1 -> 2"
    with pytest.raises(ValueError, match="align 'l' has 1 letters for 2 columns"):
        render_table(["a", "b"], [], "l")
