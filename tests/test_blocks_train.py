"""Blocks through train.py: block=dbb ends in a deploy.pt for the base model; the README's own block
("Add your own block"), registered from outside the package, fuses exactly and trains through train.py."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_RUN, assert_rel, isolated_env, run_train
from test_reparam import randomize_bns
from test_train_cli import _assert_deploy_matches_checkpoint, _assert_ok
from torch import nn

from acnet_pl import ConversionReport, convert, fuse
from acnet_pl.blocks import registry as registry_module
from acnet_pl.models import build_model

README_COMMAND = "python train.py block=custom block.name=mypkg.blocks:KxK1x1Block"


def _readme_block_package(root: Path) -> Path:
    """Write the README's "Add your own block" code as root/mypkg/blocks.py; returns root."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Add your own block") :]
    section = section[: section.index("\n## ", 1)]
    assert len(section.strip().splitlines()) < 30, "the README promises a block in under 30 lines"
    assert README_COMMAND in section
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "blocks.py").write_text(code)
    return root


@pytest.mark.slow
def test_readme_block_fuses_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(_readme_block_package(tmp_path)))
    # Its register_block("kxk_1x1") must not outlive this test (test_readme_example registers it again).
    monkeypatch.setattr(registry_module, "_BLOCKS", dict(registry_module._BLOCKS))
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg.blocks", raising=False)
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=10).double()
    report = ConversionReport()
    model = randomize_bns(convert(base, block="mypkg.blocks:KxK1x1Block", report=report)).eval()
    assert len(report.converted) == 19 and type(model.conv1).__name__ == "KxK1x1Block"
    assert "conv1.conv1.weight" in model.state_dict()  # the 1x1 branch is there to train
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        fused = fuse(model)
        base.load_state_dict(fused.state_dict(), strict=True)
        assert_rel(base.eval()(x), model(x), 1e-10, "float64 fused README block")
    # Once imported, its registered short name works too.
    assert type(
        convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), block="kxk_1x1")[0]
    ) is (type(model.conv1))


def _run_dir_checks(run: Path, block_name: str) -> dict:
    report = json.loads((run / "deploy" / "report.json").read_text())
    assert report["ok"] is True and report["block"]["name"] == block_name
    assert report["val"]["before"]["top1"] == report["val"]["after"]["top1"]
    assert report["deploy_model"]["params"] < report["train_model"]["params"]
    return report


@pytest.mark.slow
def test_readme_block_trains_through_train_py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package_root = _readme_block_package(tmp_path / "src")
    env = isolated_env(tmp_path / "home")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
    args = README_COMMAND.split()[2:]
    proc = run_train([*TINY_RUN, *args, "logger=none", "hydra.run.dir=run"], tmp_path, env)
    _assert_ok(proc)
    run = tmp_path / "run"
    _run_dir_checks(run, "mypkg.blocks:KxK1x1Block")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.endswith(".conv1.weight") for k in ckpt["state_dict"])  # the toy block trained
    monkeypatch.syspath_prepend(str(package_root))  # the checkpoint names the block by its import path
    _assert_deploy_matches_checkpoint(run)


@pytest.mark.slow
def test_dbb_trains_through_train_py(tmp_path: Path) -> None:
    """cifar_quick keeps it seconds; test_reparam's DBB round trip loads fused weights into torchvision's resnet18."""
    proc = run_train([*TINY_RUN, "block=dbb", "logger=none", "hydra.run.dir=run"], tmp_path)
    _assert_ok(proc)
    run = tmp_path / "run"
    _run_dir_checks(run, "dbb")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.endswith(".dbb_1x1_kxk.idconv1.weight") for k in ckpt["state_dict"])
    _assert_deploy_matches_checkpoint(run)  # deploy.pt loads strictly into the untouched base model
