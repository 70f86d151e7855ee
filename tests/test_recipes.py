"""The recipes: fp32 with TF32 off (set for real), DenseNet's multi-step schedule, smoke runs of the
pre-activation recipes through train.py ending in a deploy checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, isolated_env, run_train
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from acnet_pl.deploy.record import load_deployed
from acnet_pl.models import build_model
from acnet_pl.training.module import ACNetModule, multistep_lr

AUTO_PRECISION = "${acnet.precision:${trainer.accelerator}}"


def _compose(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def _numerics(cfg: DictConfig) -> tuple[str, bool, bool]:
    """(unresolved trainer.precision, channels_last, tf32) of a composed config."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    return raw["trainer"]["precision"], raw["channels_last"], raw["tf32"]


@pytest.mark.slow
def test_recipes_train_in_fp32_and_mixed_is_one_override_away() -> None:
    """Every recipe is fp32 (test_config.test_experiment_combines_with_block checks each); bare and quickstart are fast."""
    assert _numerics(_compose(["experiment=cifar10_resnet56"])) == ("32-true", False, False)
    # one override away: bf16-mixed autocast on a GPU, channels-last, TF32 for what stays fp32
    mixed = _compose(["experiment=cifar10_resnet56", "precision=mixed"])
    assert _numerics(mixed) == (AUTO_PRECISION, True, True)
    assert _numerics(_compose([])) == _numerics(_compose(["experiment=quickstart"])) == _numerics(mixed)


@pytest.mark.slow
def test_train_sets_the_tf32_flags_from_the_config(tmp_path: Path, wandb_free_env: Path) -> None:
    """train(cfg) of a recipe turns torch.backends' TF32 flags (cuDNN convs, cuBLAS matmuls) off."""
    from acnet_pl.cli.train import set_tf32, train

    tiny = [
        "data=fake",
        "data.image_size=16",
        "data.train_size=8",
        "data.val_size=8",
        "data.batch_size=8",
        "data.num_classes=2",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "logger=none",
        "callbacks=none",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "++trainer.enable_checkpointing=false",
    ]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        train(_compose(["experiment=cifar10_cifar_quick", *tiny], tmp_path / "fp32"))
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        set_tf32(True)  # what precision=mixed (tf32: true) has train() do
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# DenseNet-40: DenseNet's own CIFAR recipe


def test_densenet40_experiment_is_densenets_published_recipe() -> None:
    cfg = _compose(["experiment=cifar10_densenet40"])
    assert (cfg.model.name, cfg.block.name, cfg.model.init) == ("densenet40", "acb", "default")
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (64, 300)
    opt = cfg.optimizer
    assert (opt._target_, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (
        "torch.optim.SGD",
        0.1,
        0.9,
        True,
        1e-4,
    )
    assert OmegaConf.to_container(cfg.param_groups) == {
        "bias_lr_mult": 1.0,
        "bias_weight_decay": None,
        "norm_weight_decay": None,
    }
    sched = cfg.scheduler
    assert (sched._target_, list(sched.milestones), sched.gamma) == (
        "acnet_pl.training.module.multistep_lr",
        [0.5, 0.75],
        0.1,
    )


def test_multistep_divides_the_lr_by_ten_at_epochs_150_and_225_of_300() -> None:
    steps_per_epoch = 782  # ceil(50000 / 64)
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params, "lr": 0.1}, {"params": [], "lr": 0.2}], lr=0.1)
    scheduler = multistep_lr(optimizer, total_steps=300 * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) and scheduler.gamma == 0.1
    assert sorted(scheduler.milestones) == [150 * steps_per_epoch, 225 * steps_per_epoch]  # epoch starts
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.2]  # each group from its own lr
    steps_per_epoch = 3  # every step of a short copy: lr / 10 at the first step of epochs 150 and 225
    scheduler = multistep_lr(optimizer, total_steps=300 * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    lrs = []
    for step in range(300 * steps_per_epoch):
        if step in (
            0,
            150 * steps_per_epoch - 1,
            150 * steps_per_epoch,
            225 * steps_per_epoch,
            300 * steps_per_epoch - 1,
        ):
            lrs += [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    expected = [0.1, 0.2, 0.1, 0.2, 0.01, 0.02, 0.001, 0.002, 0.001, 0.002]
    assert lrs == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="fractions of the training in"):
        multistep_lr(optimizer, total_steps=10, steps_per_epoch=5, milestones=(150, 225))


# --------------------------------------------------------------------------------------------------
# slow: the pre-activation recipes through train.py on tiny fake data, ending in a deploy checkpoint

TINY_RECIPE = [
    "data=fake",
    "data.image_size=8",
    "data.train_size=8",
    "data.val_size=8",
    "data.batch_size=8",
    "data.num_classes=4",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "logger=none",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
    "hydra.run.dir=run",
]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["cifar10_wrn16_8", "cifar10_densenet40"])
def test_preactivation_recipe_smoke_run_ends_in_a_deploy_checkpoint(tmp_path: Path, experiment: str) -> None:
    env = isolated_env(tmp_path / "home", OMP_NUM_THREADS="1")  # two cores shared: no thread oversubscription
    proc = run_train([f"experiment={experiment}", *TINY_RECIPE], tmp_path, env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = tmp_path / "run"
    report = json.loads((run / "deploy" / "report.json").read_text())
    assert report["ok"] is True and report["error"] is None
    assert report["val"]["samples"] == 8 and report["val"]["before"] == report["val"]["after"]
    assert report["deploy_model"]["params"] < report["train_model"]["params"]
    record = torch.load(run / "deploy" / "deploy.pt", map_location="cpu", weights_only=True)
    name = experiment.split("_", 1)[1]
    assert record["model"] == {"name": name, "num_classes": 4}
    # the base architecture plus a bias on exactly its 3x3 convs (all bare ACBs), rebuilt by load_deployed
    base = build_model(name, num_classes=4)
    threes = [
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert record["added_biases"] == threes and len(threes) == {"wrn16_8": 13, "densenet40": 37}[name]
    deployed = load_deployed(run / "deploy" / "deploy.pt")
    trained = ACNetModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = trained.model.eval()(x)
        assert ((deployed(x) - y).norm() / y.norm()).item() <= 1e-5
