"""ACNetModule: parameter groups, schedule, loss, metrics and checkpoints that load without extra arguments."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_tiny
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from acnet_pl.blocks import ACBlock
from acnet_pl.deploy.checkpoint import net_from_checkpoint
from acnet_pl.models import build_model
from acnet_pl.reparam import convert
from acnet_pl.training.module import DEFAULT_SCHEDULER, ACNetModule, parameter_groups, warmup_cosine


def test_parameter_groups_follow_the_original_recipe() -> None:
    model = build_model("resnet20", 10, block="acb")
    groups = {g["name"]: g for g in parameter_groups(model, lr=0.1, weight_decay=1e-4)}
    assert set(groups) == {"weights", "norm_weights", "biases"}
    assert groups["biases"]["lr"] == pytest.approx(0.2)  # bias lr x2
    assert groups["weights"]["lr"] == groups["norm_weights"]["lr"] == pytest.approx(0.1)
    assert {g["weight_decay"] for g in groups.values()} == {1e-4}  # decay on every parameter
    # every trainable parameter exactly once
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert (
        len(groups["biases"]["params"]) == 1 + sum(3 for m in model.modules() if isinstance(m, ACBlock)) + 2
    )


def test_parameter_groups_weight_decay_options() -> None:
    model = build_model("cifar_quick", 10)
    groups = {
        g["name"]: g
        for g in parameter_groups(
            model, 0.1, 1e-4, bias_lr_mult=1.0, bias_weight_decay=0.0, norm_weight_decay=0.0
        )
    }
    assert (groups["biases"]["lr"], groups["biases"]["weight_decay"]) == (0.1, 0.0)
    assert groups["norm_weights"]["weight_decay"] == 0.0 and groups["weights"]["weight_decay"] == 1e-4


def _closed_form(step: int, total: int, warmup: int, base_lr: float, floor: float = 0.0) -> float:
    """The original's per-iteration schedule: linear warmup, then cosine from `base_lr` to `floor`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("total", "steps_per_epoch", "warmup_epochs", "min_lr_ratio"),
    [(100, 10, 1, 0.0), (100, 10, 0, 0.0), (10, 10, 1, 0.0), (10, 5, 0.2, 0.0), (391 * 30, 391, 5, 0.1)],
)
def test_warmup_cosine_is_the_closed_form(
    total: int, steps_per_epoch: int, warmup_epochs: float, min_lr_ratio: float
) -> None:
    """torch's LinearLR + CosineAnnealingLR give the original's schedule within 1e-12, for every group."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.2}], lr=0.1)
    scheduler = warmup_cosine(optimizer, total, steps_per_epoch, warmup_epochs, min_lr_ratio)
    warmup = round(warmup_epochs * steps_per_epoch)
    for step in range(total + 1):
        for group, base_lr in zip(optimizer.param_groups, (0.1, 0.2), strict=True):
            expected = _closed_form(step, total, warmup, base_lr, floor=min_lr_ratio * 0.1)
            assert group["lr"] == pytest.approx(expected, abs=1e-12, rel=0)
        optimizer.step()
        scheduler.step()
    assert warmup == total or expected == pytest.approx(min_lr_ratio * 0.1, abs=1e-12)  # ends at the floor


@pytest.mark.slow
def test_schedule_of_a_run_resumed_mid_way_is_the_closed_form(tmp_path: Path) -> None:
    """A fit of 4 epochs x 4 steps (1 warmup epoch), stopped after 2 and resumed from its checkpoint
    (scheduler state included): every step's lr of both groups is the closed form within 1e-12."""
    import lightning as L

    from acnet_pl.data import FakeDataModule

    class RecordLR(L.Callback):
        def __init__(self, stop_after: int = 0) -> None:
            self.lrs: list[list[float]] = []
            self.stop_after = stop_after

        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups if g["params"]])

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.should_stop = trainer.current_epoch + 1 == self.stop_after

    def fit(record: RecordLR, ckpt_path: str | None = None) -> None:
        L.seed_everything(0, verbose=False)
        data = FakeDataModule(
            num_classes=4, image_size=16, train_size=64, val_size=16, batch_size=16, num_workers=0
        )
        module = ACNetModule(
            model={"name": "cifar_quick", "num_classes": 4},
            scheduler={**DEFAULT_SCHEDULER, "warmup_epochs": 1},
            optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9},
        )
        checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            accelerator="cpu",
            max_epochs=4,
            logger=False,
            callbacks=[record, checkpoint],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)

    first, second = RecordLR(stop_after=2), RecordLR()
    fit(first)
    fit(second, ckpt_path=str(tmp_path / "last.ckpt"))
    lrs = first.lrs + second.lrs
    assert (len(first.lrs), len(lrs)) == (8, 16)
    expected = [_closed_form(step, 16, 4, lr) for step in range(16) for lr in (0.1, 0.1, 0.2)]
    assert sum(lrs, []) == pytest.approx(expected, abs=1e-12, rel=0)


def test_warmup_cosine_min_lr_ratio() -> None:
    """min_lr_ratio=0.1: the cosine ends at 0.1 x lr instead of 0, and goes through the mean half-way."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = warmup_cosine(optimizer, total_steps=100, steps_per_epoch=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[50] == pytest.approx(0.2 * (0.1 + 0.9 * 0.5))  # 0.11
    assert lrs[100] == pytest.approx(0.02) and min(lrs) == pytest.approx(0.02)


def test_module_schedule_ends_at_min_lr_ratio() -> None:
    """The module's scheduler config reaches warmup_cosine: after the last step every group is at 0.25 x lr."""
    scheduler = {**DEFAULT_SCHEDULER, "min_lr_ratio": 0.25}
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, scheduler=scheduler)
    module._trainer = SimpleNamespace(
        estimated_stepping_batches=8, num_training_batches=4, accumulate_grad_batches=1
    )
    config = module.configure_optimizers()
    optimizer, lr_scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(8):
        optimizer.step()
        lr_scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"weights": 0.025, "norm_weights": 0.025, "biases": 0.025})  # one floor


def test_top5_metric_with_ten_classes() -> None:
    """10 classes, the label at rank 1..10 in turn (twice): val top-1 = 2/20, top-5 = 10/20 exactly."""
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 10})
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(20, 1)  # class c ranks c+1

    class FixedLogits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[x[:, 0, 0, 0].long()]

    module.model = FixedLogits()
    images = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 3, 2, 2)
    labels = torch.arange(20) % 10
    module.log = lambda *args, **kwargs: None  # no trainer to log to
    module.validation_step((images[:7], labels[:7]), 0)
    module.validation_step((images[7:], labels[7:]), 1)
    assert module.val_top1.compute().item() == pytest.approx(2 / 20)
    assert module.val_top5.compute().item() == pytest.approx(10 / 20)
    module.val_top5.reset()
    ranks_2_to_6 = (labels >= 1) & (labels <= 5)
    module.validation_step((images[ranks_2_to_6], labels[ranks_2_to_6]), 2)
    assert module.val_top5.compute().item() == pytest.approx(8 / 10)  # ranks 2-5 hit, the 6th misses


def test_schedule_rejects_bad_settings() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="at least one training step"):
        warmup_cosine(optimizer, total_steps=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine(optimizer, total_steps=10, steps_per_epoch=1, min_lr_ratio=2.0)


@pytest.mark.slow
def test_loss_is_cross_entropy_with_label_smoothing() -> None:
    torch.manual_seed(0)
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, label_smoothing=0.2).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        module.model.classifier[-1].bias.copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))  # confident logits
        loss = module.training_step((x, y), 0)
        expected = F.cross_entropy(module(x), y, label_smoothing=0.2)
        plain = F.cross_entropy(module(x), y)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(loss.item() - plain.item()) > 1e-3  # smoothing changes the loss
    assert module.val_top5.top_k == 4  # top-5 capped at the number of classes


def test_bad_hyperparameters_name_the_fix() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ACNetModule(model={"name": "cifar_quick"})
    with pytest.raises(ValueError, match="unknown param_groups"):
        ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, param_groups={"bias_lr": 2})
    with pytest.raises(ValueError, match="unknown model"):
        ACNetModule(model={"name": "foo", "num_classes": 4})


def test_compile_wraps_the_model_but_keeps_state_dict_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_compile(model):
        calls.append(model)
        return lambda x: model(x) * 0.0

    monkeypatch.setattr(torch, "compile", fake_compile)
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, compile=True).eval()
    keys = set(module.state_dict())
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module.configure_model()
    module.configure_model()
    assert calls == [module.model]  # compiled once
    assert set(module.state_dict()) == keys
    assert module(torch.randn(2, 3, 16, 16)).abs().max().item() == 0.0  # forward goes through it


@pytest.mark.slow
def test_checkpoint_is_plain_and_loads_without_arguments(tmp_path: Path) -> None:
    """OmegaConf inputs are stored as plain containers: weights_only load, load_from_checkpoint() bare, and
    the network alone (net_from_checkpoint) or passed as `net` gives the same logits."""
    block = OmegaConf.create({"name": "acb", "gamma_init": 0.5, "kernel_sizes": [3, 5]})
    optimizer = OmegaConf.create(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer, module, _ = fit_tiny(
        tmp_path, block=block, optimizer=optimizer, callbacks=[checkpoint], max_epochs=2
    )
    path = tmp_path / "checkpoints" / "last.ckpt"

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert set(hp) == {
        "model",
        "block",
        "optimizer",
        "scheduler",
        "param_groups",
        "label_smoothing",
        "compile",
        "channels_last",
        "data",
    }
    assert hp["model"] == {"name": "cifar_quick", "num_classes": 4}
    assert hp["block"] == {"name": "acb", "gamma_init": 0.5, "kernel_sizes": [3, 5]}
    assert type(hp["block"]) is dict and type(hp["optimizer"]) is dict
    assert hp["data"]["input_size"] == [3, 16, 16]

    loaded = ACNetModule.load_from_checkpoint(path, map_location="cpu")
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), module.eval()(x), atol=1e-6)

    # the network alone (deploy.py's reader), and a module around it (evaluation): no placeholder, no swap
    net = net_from_checkpoint(ckpt, path=path)
    around = ACNetModule(model=hp["model"], block=hp["block"], data=hp["data"], net=net)
    assert around.model is net and around.conversion_report is None and "net" not in around.hparams
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x)) and torch.equal(around.eval()(x), loaded(x))

    # the best val top-1 so far is part of the state, so it survives a resume
    assert loaded.val_top1_best.max_value.item() == pytest.approx(
        trainer.callback_metrics["val/acc_top1_best"].item()
    )
    assert trainer.callback_metrics["val/acc_top1_best"] >= trainer.callback_metrics["val/acc_top1"]


@pytest.mark.slow
def test_fit_uses_bias_lr_and_anneals_to_zero_per_step(tmp_path: Path) -> None:
    trainer, module, _ = fit_tiny(tmp_path, max_epochs=2, limit_train_batches=2)
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    base_lrs = dict(zip(groups, scheduler.base_lrs, strict=True))
    assert base_lrs == pytest.approx({"weights": 0.1, "norm_weights": 0.1, "biases": 0.2})
    assert trainer.global_step == 4
    # stepped per iteration: after the 4th and last step the cosine is at 0
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in groups.values())
    assert trainer.lr_scheduler_configs[0].interval == "step"
    for name in (
        "train/loss",
        "train/acc_top1",
        "train/acc_top5",
        "val/loss",
        "val/acc_top1",
        "val/acc_top5",
    ):
        assert math.isfinite(trainer.callback_metrics[name].item()), name


def _acnet_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("acnet_pl")]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("base", "cifar_quick: block=base, model left as it is"),
        ("acb", "cifar_quick: converted 3 of 3 convs to acb"),
    ],
)
def test_conversion_is_logged_once_and_on_rank_zero_only(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, block: str, expected: str
) -> None:
    model = {"name": "cifar_quick", "num_classes": 10}
    with caplog.at_level(logging.INFO, logger="acnet_pl"):
        ACNetModule(model=model, block={"name": block})
        assert _acnet_log_lines(caplog) == [expected]  # not also reparam.convert's own line
        caplog.clear()
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        ACNetModule(model=model, block={"name": block})
        assert _acnet_log_lines(caplog) == []
        # outside the module, convert still reports itself
        convert(build_model("cifar_quick", 10), "acb")
        assert _acnet_log_lines(caplog) == ["convert: converted 3 of 3 convs to acb"]
