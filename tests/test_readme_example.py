"""The Python examples in README.md run as written (each block in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from acnet_pl.blocks import registry as registry_module

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8")) if README.exists() else []


def test_readme_has_a_python_example():
    assert python_blocks(), f"no ```python block in {README}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    # A block the example registers must not outlive it (tests/test_blocks_train.py registers it again).
    monkeypatch.setattr(registry_module, "_BLOCKS", dict(registry_module._BLOCKS))
    trained = None
    if "deploy/deploy.pt" in python_blocks()[index]:
        trained = _write_deploy_file(tmp_path / "deploy" / "deploy.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: on a busy 2-core machine one thread is the fastest
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    try:
        exec(compile(python_blocks()[index], f"README.md[python block {index}]", "exec"), namespace)
        if trained is not None:
            # The example compares the deploy file's two loaders with each other; here both are checked
            # against the trained (unfused) ACNet the file was made from: the fused model is that model.
            x = namespace["x"]
            with torch.no_grad():
                reference = trained(x)
                assert (
                    namespace["model"](x) - reference
                ).abs().max().item() <= 1e-5 * reference.abs().max().item()
                assert torch.equal(namespace["plain"](x), namespace["model"](x))
    finally:
        torch.set_num_threads(threads)


def _write_deploy_file(path: Path) -> torch.nn.Module:
    """A real deploy.pt of an ACNet ResNet-18 (10 classes) with random BN statistics; returns the ACNet."""
    from acnet_pl import convert, fuse
    from acnet_pl.deploy.record import make_deploy_record
    from acnet_pl.models import build_model
    from acnet_pl.utils.files import atomic_torch_save

    torch.manual_seed(0)
    acnet = convert(build_model("resnet18", num_classes=10), block="acb")
    for m in acnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    record = make_deploy_record(
        fuse(acnet.eval()).state_dict(),
        model_name="resnet18",
        num_classes=10,
        block={"name": "acb"},
        input_size=(3, 224, 224),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    atomic_torch_save(record, path)
    return acnet.eval()
