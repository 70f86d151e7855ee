"""callbacks=ema's foreach update: Lightning's EMAWeightAveraging's averages, with no host read per step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from acnet_pl.data import FakeDataModule
from acnet_pl.launch.ema import EMA, ForeachEMAModel
from acnet_pl.models import build_model
from acnet_pl.training.module import ACNetModule


def _averaged(model: torch.nn.Module, decay: float, use_buffers: bool, foreach: bool) -> AveragedModel:
    average = AveragedModel(model, avg_fn=None if foreach else get_ema_avg_fn(decay), use_buffers=use_buffers)
    if foreach:
        average.__class__ = ForeachEMAModel
        average.decay = decay
    return average


@pytest.mark.parametrize("use_buffers", [True, False])
def test_same_averages_as_torchs_ema_avg_fn(use_buffers: bool) -> None:
    """ResNet-20 ACB, 4 updates of perturbed weights and BN counts: every tensor of the state (n_averaged
    too) within 1e-6 of AveragedModel with get_ema_avg_fn (what EMAWeightAveraging uses), integers equal."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, block="acb")
    lightning, ours = (_averaged(model, 0.7, use_buffers, foreach) for foreach in (False, True))
    for _ in range(4):
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.add_(torch.randn_like(t)) if t.is_floating_point() else t.add_(3)
        lightning.update_parameters(model)
        ours.update_parameters(model)
    a, b = lightning.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and int(b["n_averaged"]) == 4
    ints = [k for k, v in b.items() if not v.is_floating_point()]
    assert len(ints) > 1 and all(torch.equal(a[k], b[k]) for k in ints)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_lightning_updates_the_foreach_average(tmp_path: Path) -> None:
    """Through a Trainer, next to Lightning's own EMAWeightAveraging (no validation: both would swap the
    weights): the same average after 4 steps; Lightning still keeps it in `_average_model`."""
    lightning, ours = EMAWeightAveraging(decay=0.7), EMA(decay=0.7)
    L.seed_everything(0, verbose=False)
    data = FakeDataModule(
        num_classes=4, image_size=16, train_size=64, val_size=16, batch_size=16, num_workers=0
    )
    module = ACNetModule(
        model={"name": "cifar_quick", "num_classes": 4},
        block={"name": "acb"},
        data={"input_size": [3, 16, 16], "mean": list(data.mean), "std": list(data.std), "class_names": None},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        callbacks=[lightning, ours],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    assert isinstance(ours._average_model, ForeachEMAModel)  # fails when Lightning renames or rebuilds it
    a, b = lightning._average_model.state_dict(), ours._average_model.state_dict()
    assert int(b["n_averaged"]) == 4
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_update_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """After its first update (which reads n_averaged once), an update calls no tensor -> Python conversion."""
    model = build_model("resnet20", 10, block="acb")
    average = _averaged(model, 0.9, True, foreach=True)
    average.update_parameters(model)
    for name in ("__bool__", "__int__", "__float__", "item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, n=name: pytest.fail(f"host read: Tensor.{n}"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update_parameters(model)
    monkeypatch.undo()
    first = next(model.parameters())
    torch.testing.assert_close(next(average.module.parameters()), first - 0.9, rtol=0, atol=1e-6)
    assert int(average.n_averaged) == 2


def test_warmup_decay_follows_the_num_updates_rule() -> None:
    """warmup=True: update n (after the first copy) mixes with min(decay, (1+n)/(10+n)); checked by hand on
    a parameter moved by 1 each step (1e-6). Without warm-up decay 0.9998 barely leaves the first weights."""
    model = torch.nn.Linear(3, 2)
    warm, cold = (_averaged(model, 0.9998, True, foreach=True) for _ in range(2))
    warm.warmup = True
    expected = next(model.parameters()).detach().clone()
    for _ in range(3):
        warm.update_parameters(model)
        cold.update_parameters(model)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
    current = expected.clone()  # the updates were n = 0 (a copy of W0), 1 (W0 + 1), 2 (W0 + 2)
    for n, shift in ((1, 1.0), (2, 2.0)):
        decay = min(0.9998, (1 + n) / (10 + n))
        current = decay * current + (1 - decay) * (expected + shift)
    torch.testing.assert_close(next(warm.module.parameters()), current, rtol=0, atol=1e-6)
    assert float((next(warm.module.parameters()) - expected).mean()) > 1.5  # moved by 1.70
    assert float((next(cold.module.parameters()) - expected).abs().max()) < 1e-3
