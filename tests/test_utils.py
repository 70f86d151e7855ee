"""acnet_pl.utils: safe loading (weights_only), atomic writes, sha256, parameter and FLOP counts."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat

import pytest
import torch
from torch import nn

from acnet_pl.utils.files import atomic_torch_save, atomic_write_text, sha256_file
from acnet_pl.utils.flops import model_stats
from acnet_pl.utils.loading import load_weights_only


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


def test_model_stats_counts_one_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    stats = model_stats(conv, (3, 10, 10))
    assert stats["params"] == 8 * 3 * 9 + 8
    assert stats["flops"] == 2 * 8 * 3 * 9 * 10 * 10  # 2 per multiply-add, bias not counted
