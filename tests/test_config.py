"""Every choice of every config group composes and builds (compose API, no data on disk)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from acnet_pl.blocks import ACBlock, list_blocks, register_block
from acnet_pl.blocks import registry as registry_module
from acnet_pl.cli.common import auto_precision
from acnet_pl.cli.train import block_hparams, build_callbacks
from acnet_pl.models import build_model, list_models
from acnet_pl.models.registry import LIBRARIES
from acnet_pl.reparam import count_blocks
from acnet_pl.training.loggers import build_loggers

CHOICES = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in (
        "model",
        "block",
        "data",
        "optimizer",
        "scheduler",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
        "precision",
    )
}


def _compose(tmp_path: Path, overrides: list[str] = (), hydra_cfg: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def _build(cfg: DictConfig, num_classes: int = 10) -> torch.nn.Module:
    """The network of `cfg` as ACNetModule builds it: build_model(**cfg.model) with the block's hyperparameters."""
    options = block_hparams(cfg.block)
    model = {**OmegaConf.to_container(cfg.model, resolve=True), "num_classes": num_classes}
    return build_model(**model, block=options.pop("name"), **options)


def test_every_group_has_the_documented_choices() -> None:
    assert CHOICES["model"] == sorted([*list_models(), *LIBRARIES])
    assert CHOICES["block"] == sorted(["base", "custom", *list_blocks()])
    assert CHOICES["data"] == [
        "cifar10",
        "cifar100",
        "digits",
        "fake",
        "imagefolder",
        "imagenet",
        "imagenet_dali",
    ]
    assert CHOICES["trainer"] == ["ddp", "default"]
    assert CHOICES["logger"] == ["csv", "none", "tensorboard", "wandb"]
    assert CHOICES["precision"] == ["fp32", "mixed"]
    assert CHOICES["scheduler"] == ["constant", "cosine", "multistep"]
    assert set(CHOICES["experiment"]) == {
        "cifar10_densenet40",
        "cifar10_resnet56",
        "cifar10_vgg16",
        "cifar10_wrn16_8",
        "cifar10_cifar_quick",
        "digits_finetune",
        "imagenet_resnet18",
        "imagenet_resnet34",
        "imagenet_resnet50",
        "quickstart",
    }


@pytest.mark.slow
def test_bare_config_is_the_imagenet_resnet18_acb_recipe(tmp_path: Path) -> None:
    cfg = _compose(tmp_path)
    assert (cfg.model.name, cfg.block.name, cfg.block.gamma_init) == ("resnet18", "acb", 1.0)
    assert cfg.data._target_ == "acnet_pl.data.ImageNetDataModule" and cfg.data.root == "imagenet_data"
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (256, 100)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 1e-4)
    assert cfg.param_groups.bias_lr_mult == 2.0 and cfg.scheduler.min_lr_ratio == 0.0
    assert cfg.model.num_classes is None and cfg.compile is False and cfg.ckpt_path is None


@pytest.mark.slow
@pytest.mark.parametrize("name", [*list_models(), "torchvision:resnet18", "timm:resnet10t"])
def test_model_choice_builds(tmp_path: Path, name: str) -> None:
    library, _, plain = name.rpartition(":")
    choice = [f"model={library}", f"model.name={plain}"] if library else [f"model={name}"]
    cfg = _compose(tmp_path, [*choice, "block=base"])
    # build_model's arguments, nothing else
    extra = {"library", "weights", "pretrained"} if library else set()
    assert set(cfg.model) == {"name", "num_classes", "init", *extra}
    model = _build(cfg, num_classes=7)
    size = (3, 32, 32) if plain not in ("resnet18", "resnet34", "resnet50") else (3, 64, 64)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, *size)).shape == (1, 7)


@pytest.mark.parametrize(("block", "expected_blocks"), [("base", 0), ("acb", 3), ("dbb", 3)])
def test_block_choice_converts(tmp_path: Path, block: str, expected_blocks: int) -> None:
    cfg = _compose(tmp_path, [f"block={block}", "model=cifar_quick"])
    assert count_blocks(_build(cfg)) == expected_blocks
    hparams = block_hparams(cfg.block)
    assert hparams["name"] == block and (hparams == {"name": "base"}) == (block == "base")


@pytest.mark.slow
@pytest.mark.parametrize("block", ["acb", "dbb"])
def test_pre_activation_recipe_converts_every_3x3_conv_with_either_block(tmp_path: Path, block: str) -> None:
    """The recipe's bare-conv rule is the block's too: base vs ACB vs DBB compare the same convs."""
    cfg = _compose(tmp_path, ["experiment=cifar10_densenet40", f"block={block}"])
    assert count_blocks(_build(cfg)) == 37  # every 3x3 conv of DenseNet-40 (the 1x1 transitions stay)


def _image_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    return root


@pytest.mark.parametrize(
    ("name", "num_classes"),
    [("cifar10", 10), ("cifar100", 100), ("digits", 10), ("fake", 10), ("imagefolder", 2), ("imagenet", 2)],
)
def test_data_choice_instantiates(tmp_path: Path, name: str, num_classes: int) -> None:
    overrides = [f"data={name}"]
    if name in ("imagefolder", "imagenet"):
        overrides.append(f"data.root={_image_tree(tmp_path / 'tree')}")
    if name.startswith("cifar"):
        overrides += [f"data.root={tmp_path / 'cifar'}", "data.download=false"]
    dm = instantiate(_compose(tmp_path, overrides).data)
    assert isinstance(dm, L.LightningDataModule)
    assert dm.num_classes == num_classes and len(dm.input_size) == 3


def test_missing_imagenet_is_a_file_not_found_naming_the_fix(tmp_path: Path) -> None:
    dm = instantiate(_compose(tmp_path, [f"data.root={tmp_path / 'none'}"]).data)
    with pytest.raises(FileNotFoundError, match="ln -s"):
        _ = dm.num_classes


@pytest.mark.parametrize("name", CHOICES["optimizer"])
def test_optimizer_choice_takes_param_groups(tmp_path: Path, name: str) -> None:
    cfg = _compose(tmp_path, [f"optimizer={name}"])
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer)(params=[{"params": params, "lr": 2 * cfg.optimizer.lr}])
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2 * cfg.optimizer.lr)


@pytest.mark.parametrize("name", CHOICES["scheduler"])
def test_scheduler_choice_is_called_with_steps(tmp_path: Path, name: str) -> None:
    cfg = _compose(tmp_path, [f"scheduler={name}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=10, steps_per_epoch=5)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    # multistep: 2 epochs of 5 steps, lr / 10 from epoch 1 (50%) and again from step 10 (75% -> epoch 2)
    expected = {"cosine": 0.0, "constant": 0.1, "multistep": 0.001}[name]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", CHOICES["trainer"])
def test_trainer_choice_instantiates_on_cpu(tmp_path: Path, name: str) -> None:
    cfg = _compose(tmp_path, [f"trainer={name}", "trainer.accelerator=cpu", "trainer.devices=1"])
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.precision == "32-true"  # the resolver's choice on CPU
    if name == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"


def test_trainer_accepts_any_trainer_argument(tmp_path: Path) -> None:
    cfg = _compose(
        tmp_path, ["trainer.accelerator=cpu", "++trainer.limit_train_batches=3", "trainer.max_epochs=2"]
    )
    trainer = instantiate(cfg.trainer, logger=False)
    assert (trainer.limit_train_batches, trainer.max_epochs) == (3, 2)


def test_auto_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_precision("auto") == auto_precision("gpu") == "bf16-mixed"
    assert auto_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_precision("cuda") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_precision("auto") == "32-true"


@pytest.mark.parametrize(
    ("name", "with_logger", "expected"),
    [
        (
            "default",
            True,
            [
                "ModelCheckpoint",
                "LastCheckpoint",
                "RandomState",
                "LearningRateMonitor",
                "RichProgressBar",
                "EpochLog",
                "ModelSummary",
                "FuseCallback",
                "DiagnosticsCallback",
                "DivergenceCallback",
            ],
        ),
        # DiagnosticsCallback is kept and does nothing without a logger (tests/test_diagnostics.py)
        (
            "default",
            False,
            [
                "ModelCheckpoint",
                "LastCheckpoint",
                "RandomState",
                "RichProgressBar",
                "EpochLog",
                "ModelSummary",
                "FuseCallback",
                "DiagnosticsCallback",
                "DivergenceCallback",
            ],
        ),
        ("none", True, []),
    ],
)
def test_callbacks_choice(tmp_path: Path, name: str, with_logger: bool, expected: list[str]) -> None:
    cfg = _compose(tmp_path, [f"callbacks={name}"])
    callbacks = build_callbacks(cfg, with_logger=with_logger)
    assert [type(c).__name__ for c in callbacks] == expected
    # callbacks=none: Lightning's own checkpoint callback is off too (it would write <logger dir>/checkpoints/)
    assert cfg.trainer.get("enable_checkpointing", True) is (name != "none")
    if name == "default":
        checkpoint, last = callbacks[0], callbacks[1]
        # The best by top-1; last.ckpt is LastCheckpoint's (every epoch), not ModelCheckpoint's save_last.
        assert not checkpoint.save_last and checkpoint.monitor == "val/acc_top1" and checkpoint.mode == "max"
        assert last.monitor is None and last.filename == "last" and last.save_top_k == 1
        assert Path(checkpoint.dirpath) == Path(last.dirpath) == tmp_path / "run" / "checkpoints"


def test_quickstart_bounds_its_diagnostics_and_combines_with_any_callbacks_choice(tmp_path: Path) -> None:
    """The quickstart's end-of-fit analyses read 2 validation batches; its setting neither revives a callback
    that `callbacks=none` or `~callbacks.diagnostics` dropped nor breaks building the others."""
    (diagnostics,) = [
        c
        for c in build_callbacks(_compose(tmp_path, ["experiment=quickstart"]), with_logger=True)
        if type(c).__name__ == "DiagnosticsCallback"
    ]
    assert diagnostics.limit_batches == 2
    assert build_callbacks(_compose(tmp_path, ["experiment=quickstart", "callbacks=none"]), True) == []
    names = [
        type(c).__name__
        for c in build_callbacks(
            _compose(tmp_path, ["experiment=quickstart", "~callbacks.diagnostics"]), with_logger=True
        )
    ]
    assert "DiagnosticsCallback" not in names and "FuseCallback" in names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wandb", ["WandbLogger"]),
        ("csv", ["CSVLogger"]),
        ("tensorboard", ["TensorBoardLogger"]),
        ("none", []),
    ],
)
def test_logger_choice_instantiates(
    tmp_path: Path, wandb_free_env: Path, name: str, expected: list[str]
) -> None:
    cfg = _compose(tmp_path, [f"logger={name}", "experiment=cifar10_resnet56", "block=base", "seed=3"])
    loggers = build_loggers(cfg)
    assert [type(lg).__name__ for lg in loggers] == expected
    if name == "wandb":
        init = loggers[0]._wandb_init
        # without Hydra's run dir the group is the task; job_type the block; no credentials -> offline
        assert (init["group"], init["name"], init["job_type"], init["mode"]) == (
            "cifar10_resnet56",
            "resnet56-base-seed3",
            "base",
            "offline",
        )
        assert init["settings"] == {"silent": True}  # wandb's own offline notices: log_run_end says it once


#: Per experiment, the recipe of the original ACNet code (github.com/DingXiaoH/ACNet, acnet/do_acnet.py:
#: src56, vc, wrnc16plain, cfqkbnc, sres18/34/50): global batch, lr, epochs, weight decay, ACB gamma_init.
ORIGINAL_RECIPES = {
    "cifar10_resnet56": (128, 0.2, 400, 1e-4, 1 / 3),
    "cifar10_vgg16": (128, 0.1, 400, 1e-4, 1 / 3),
    "cifar10_wrn16_8": (128, 0.1, 400, 5e-4, {"conv1": 1 / 3}),  # the stem; the BN-ReLU-conv units' ACBs: 1
    "cifar10_cifar_quick": (128, 0.1, 150, 1e-4, 1 / 3),
    "imagenet_resnet18": (256, 0.1, 100, 1e-4, 1.0),
    "imagenet_resnet34": (256, 0.1, 100, 1e-4, 1.0),
    "imagenet_resnet50": (256, 0.1, 100, 1e-4, 1.0),
}


def test_every_paper_experiment_has_a_recipe() -> None:
    assert set(CHOICES["experiment"]) == {
        *ORIGINAL_RECIPES,
        "cifar10_densenet40",
        "digits_finetune",
        "quickstart",
    }


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(ORIGINAL_RECIPES))
def test_experiment_carries_the_original_recipe(tmp_path: Path, experiment: str) -> None:
    batch, lr, epochs, weight_decay, gamma = ORIGINAL_RECIPES[experiment]
    cfg = _compose(tmp_path, [f"experiment={experiment}"])
    assert cfg.model.name == experiment.split("_", 1)[1] and cfg.block.name == "acb"
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (batch, epochs)
    block = OmegaConf.to_container(cfg.block, resolve=True)
    assert block["gamma_init"] == pytest.approx(gamma, abs=1e-12)
    # the original's builder converts every 3x3 conv of its pre-activation WRN as a bare ACB
    assert block["bare_convs"] == ("all" if experiment == "cifar10_wrn16_8" else False)
    # SGD, momentum 0.9, no Nesterov; every parameter decayed (null = the optimizer's), bias lr x2
    optimizer = cfg.optimizer
    assert (optimizer._target_, optimizer.momentum, optimizer.nesterov) == ("torch.optim.SGD", 0.9, False)
    assert optimizer.lr == pytest.approx(lr, abs=1e-12)
    assert optimizer.weight_decay == pytest.approx(weight_decay, abs=1e-12)
    assert OmegaConf.to_container(cfg.param_groups) == {
        "bias_lr_mult": 2.0,
        "bias_weight_decay": None,
        "norm_weight_decay": None,
    }
    # cosine from lr to 0 stepped every iteration (the module's `interval: step`), no warmup, no smoothing
    assert cfg.scheduler._target_ == "acnet_pl.training.module.warmup_cosine"
    assert (cfg.scheduler.warmup_epochs, cfg.scheduler.min_lr_ratio, cfg.label_smoothing) == (0, 0.0, 0.0)
    if not experiment.startswith("cifar10_"):
        assert (cfg.data._target_, cfg.data.image_size) == ("acnet_pl.data.ImageNetDataModule", 224)
        return
    # CIFAR augmentation as the original: pad 4 + random 32x32 crop, horizontal flip, mean = std = 0.5
    from torchvision.transforms import v2

    dm = instantiate(cfg.data, root=str(tmp_path / "cifar"), download=False)  # reads nothing yet
    assert dm.input_size == (3, 32, 32) and dm.mean == dm.std == (0.5, 0.5, 0.5)
    train_ops = {type(t): t for t in dm.train_transform.transforms}
    crop, flip = train_ops[v2.RandomCrop], train_ops[v2.RandomHorizontalFlip]
    assert (crop.size, crop.padding, crop.padding_mode, flip.p) == ((32, 32), [4, 4, 4, 4], "constant", 0.5)
    assert not {v2.RandomCrop, v2.RandomHorizontalFlip} & {type(t) for t in dm.val_transform.transforms}


@pytest.mark.slow
@pytest.mark.parametrize("block", ["base", "acb"])
@pytest.mark.parametrize("experiment", CHOICES["experiment"])
def test_experiment_combines_with_block(tmp_path: Path, experiment: str, block: str) -> None:
    cfg = _compose(tmp_path, [f"experiment={experiment}", f"block={block}"])
    assert cfg.task_name == experiment and cfg.block.name == block
    # block=base gets no ACB options even though the experiment sets the ACB gamma
    options = block_hparams(cfg.block)
    if block == "base":
        assert options == {"name": "base"}
    # the recipes train as the original: fp32 (32-true), TF32 off, NCHW; the quickstart keeps the fast default
    raw = OmegaConf.to_container(cfg, resolve=False)
    numerics = (raw["trainer"]["precision"], raw["channels_last"], raw["tf32"])
    recipe = experiment.startswith(("cifar10_", "imagenet_"))
    assert numerics == (
        ("32-true", False, False) if recipe else ("${acnet.precision:${trainer.accelerator}}", True, True)
    )
    if experiment == "quickstart":
        assert (cfg.model.name, cfg.trainer.accelerator, cfg.data.image_size) == ("resnet20", "cpu", 16)
        assert list(cfg.logger) == ["csv"]
        return
    if experiment == "digits_finetune":  # model.weights is the run's to give
        with open_dict(cfg):
            cfg.model.weights = None
    if block == "acb" and experiment in ORIGINAL_RECIPES:
        assert options["gamma_init"] == pytest.approx(ORIGINAL_RECIPES[experiment][4])
    model = _build(cfg)
    assert (sum(isinstance(m, ACBlock) for m in model.modules()) > 0) == (block == "acb")


@pytest.mark.slow
@pytest.mark.parametrize("block", ["base", "acb", "dbb"])
def test_one_experiment_serves_every_block(tmp_path: Path, block: str) -> None:
    """An experiment's block.gamma_init / block.bare_convs reach whichever block converts; base drops them."""
    cfg = _compose(tmp_path, ["experiment=cifar10_wrn16_8", f"block={block}"])
    options = block_hparams(cfg.block)
    if block == "base":
        assert options == {"name": "base"}
    else:
        assert (options["name"], options["bare_convs"]) == (block, "all")
        assert options["gamma_init"] == {"conv1": pytest.approx(1 / 3, abs=1e-12)}
    model = _build(cfg)
    assert count_blocks(model) == (0 if block == "base" else 13)  # every 3x3 conv of WRN-16-8, bare
    if block != "base":  # the branch BNs of the stem start at 1/3 (ACB's three, DBB's four), a unit's at 1

        def at(name: str, gamma: float) -> tuple[int, int]:
            bns = [m for m in model.get_submodule(name).modules() if isinstance(m, nn.BatchNorm2d)]
            return sum((bn.weight.detach() - gamma).abs().max().item() <= 1e-7 for bn in bns), len(bns)

        assert at("conv1", 1 / 3)[0] == {"acb": 3, "dbb": 4}[block]
        unit_at_one, unit_bns = at("layer1.0.conv1.2", 1.0)
        assert unit_at_one == unit_bns >= 3


@pytest.mark.parametrize(("block", "expected"), [("acb", 0.5), ("dbb", 0.5), ("base", None)])
def test_gamma_init_override_on_the_command_line(tmp_path: Path, block: str, expected: float | None) -> None:
    """`block=acb block.gamma_init=0.5` (and `-m block=base,acb,dbb block.gamma_init=0.5`) compose as written."""
    options = block_hparams(_compose(tmp_path, [f"block={block}", "block.gamma_init=0.5"]).block)
    assert options.get("gamma_init") == expected and (options == {"name": "base"}) == (block == "base")


def test_base_takes_no_other_block_option(tmp_path: Path) -> None:
    """block=base drops only the recipe options; another option is a one-line error, not silently ignored."""
    cfg = _compose(tmp_path, ["block=base", "+block.kernel_sizes=[3]"])
    with pytest.raises(
        ValueError, match=r"^block=base converts nothing and has no option block\.kernel_sizes; drop"
    ):
        block_hparams(cfg.block)
    with pytest.raises(
        ValueError, match=r"needs a 'name' entry; .* block=custom block\.name=package\.module:ClassName"
    ):
        block_hparams({"gamma_init": 0.5})


class _NoOptionBlock(nn.Module):
    """A custom block whose from_conv_bn takes no options (unlike the README's, which takes **options)."""

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
        block = cls()
        block.conv, block.bn = conv, bn
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fused_conv_module(self) -> nn.Conv2d:
        raise NotImplementedError


@pytest.mark.slow
def test_option_a_custom_block_does_not_take_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An experiment's block.gamma_init reaches a custom block too: one that takes none says how to drop it."""
    monkeypatch.setattr(registry_module, "_BLOCKS", dict(registry_module._BLOCKS))
    register_block("no_option_test")(_NoOptionBlock)
    overrides = ["experiment=cifar10_resnet56", "block=custom", "block.name=no_option_test"]
    message = r"^block no_option_test takes no option gamma_init; remove it \(~block\.gamma_init on the command line\)$"
    with pytest.raises(ValueError, match=message):
        _build(_compose(tmp_path, overrides))
    assert type(_build(_compose(tmp_path, [*overrides, "~block.gamma_init"])).conv1) is _NoOptionBlock


def test_optuna_search_composes(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, ["hparams_search=optuna", "experiment=cifar10_resnet56"], hydra_cfg=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "block.gamma_init"}
    assert cfg.optimized_metric == "val/acc_top1_best" and cfg.hydra.mode == RunMode.MULTIRUN
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper  # importable as documented

    assert callable(OptunaSweeper)


def test_slurm_launcher_follows_the_trainer(tmp_path: Path) -> None:
    cfg = _compose(
        tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], True
    )
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    plugin_fields = set(SlurmQueueConf.__dataclass_fields__)
    assert plugin_fields <= set(launcher), sorted(plugin_fields - set(launcher))


def test_deploy_and_diagnostics_dirs_are_in_the_run_dir_also_for_a_relative_one(
    tmp_path, monkeypatch
) -> None:
    """A relative paths.output_dir (compose API, notebooks) gives <run>/deploy, not <run>/<run>/deploy."""
    monkeypatch.chdir(tmp_path)
    cfg = _compose(tmp_path, ["trainer.accelerator=cpu"])
    with open_dict(cfg):
        cfg.paths.output_dir = "runs/acb"
    trainer = L.Trainer(default_root_dir=cfg.trainer.default_root_dir, logger=False)
    for name, folder in (("fuse", "deploy"), ("diagnostics", "diagnostics")):
        callback = instantiate(cfg.callbacks[name])
        assert callback.output_dir(trainer) == Path("runs/acb") / folder
