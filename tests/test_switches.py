"""Every switch with every other, with the defaults: a covering array of tiny runs, and the refusals.

Each row of ROWS is one `train(cfg)` in-process (Hydra's compose API, as train.py composes) on tiny data,
with every default callback on (model summary, checkpoints, random state, epoch log, fuse, divergence, and
diagnostics whenever a logger is), that sets several switches at once. Together the rows take every option
of every config group and switch at least once (`test_rows_cover_every_option` checks it), and these pairs
of groups that act on each other (row names in brackets):

- augmentation x data kind: presets and lists on in-memory tensors [quick_mix_ema, device_batches_mix,
  csv_tb_base_ema, wandb_dbb_bf16, r18_ema_imagenet, r34_base_adamw] and on image files through each decoder
  [folder_*]
- augmentation / random erasing x `data.device_batches` (true: crop/flip only) and x `data.decoder=device`
  (no random erasing) [device_batches_mix, csv_tb_base_ema, folder_device_randaug]; refusals below
- MixUp / CutMix x the model summary's example input (default callbacks), x EMA, x device batches, x the
  device decoder, x debug=overfit [quick_mix_ema, device_batches_mix, folder_device_randaug,
  folder_pil_trivial, r110_overfit_cutmix]
- EMA x block (acb, dbb, base, custom) x fuse (fold_bn) x diagnostics [quick_mix_ema, fdr_ema_dbb,
  csv_tb_base_ema, folder_tv_custom_ema, r18_ema_imagenet]
- logger x diagnostics x block [csv_tb_base_ema (base), wandb_dbb_bf16 (dbb); acb with W&B and TensorBoard:
  tests/test_diagnostics.py], debug x logger [fdr_ema_dbb: debug=fdr logger=csv]
- precision x block implementation [device_batches_mix fp32, wandb_dbb_bf16 bf16-mixed, r56_stacked_patterns,
  wrn_bare_all fp32]
- scheduler x optimizer x debug limits [quick_mix_ema, device_batches_mix, vgg_base_warmup,
  folder_limit_imagenet]
- debug x callbacks / data [fdr_ema_dbb, folder_limit_imagenet, r50_profiler, r110_overfit_cutmix]
- block options x model (bare convs on pre-activation nets, 7x7 kernels on resnet18's stem, overlapping
  gamma_init patterns, include) [dense_dbb_bare, wrn_bare_all, r18_ema_imagenet, r56_stacked_patterns]

Each run must end as documented: finite metrics, last.ckpt, a verified deploy.pt (report.json ok), the
diagnostics files exactly when a logger is on; debug=fdr and callbacks=none write no deploy or checkpoint
file. A combination that cannot work refuses before anything is written: one `error:` line, exit 2
(REFUSALS). Rows marked slow are the expensive part (deep models, loggers with diagnostics).
Not here: data=cifar10/cifar100/imagenet (files; tests/test_data.py), data=imagenet_dali (a GPU; its
refusal is here), trainer=ddp (2-rank runs: tests/test_ddp_*.py, tests/test_preemption.py),
hparams_search and experiment/ (tests/test_config.py, tests/test_recipes.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from acnet_pl.cli.common import USER_ERROR_EXIT_CODE, exit_on_user_error
from acnet_pl.cli.train import train
from acnet_pl.data.augment import PRESETS
from acnet_pl.data.imagefolder import DECODERS
from acnet_pl.deploy.verification import LOGIT_RTOL

#: The tiny data sets (the image tree's root is filled in by the `image_tree` fixture).
FAKE = ["data=fake", "data.train_size=8", "data.val_size=4", "data.batch_size=4", "data.num_classes=3"]
DATA = {
    "fake8": [*FAKE, "data.image_size=8"],
    "fake16": [*FAKE, "data.image_size=16"],
    "fake32": [*FAKE, "data.image_size=32"],
    "digits": [
        "data=digits",
        "data.image_size=16",
        "data.batch_size=4",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1",
    ],
    "folder": ["data=imagefolder", "data.image_size=16", "data.batch_size=4", "data.num_workers=0"],
    "dali": ["data=imagenet_dali", "data.image_size=16", "data.batch_size=4", "data.num_workers=0"],
}
#: What every row shares: one CPU epoch (fake: 2 steps; digits: limited to 2), end-of-fit diagnostics
#: passes on one validation batch (callbacks.diagnostics.limit_batches, a documented setting).
COMMON = ["trainer.accelerator=cpu", "trainer.max_epochs=1"]
DIAGNOSTICS_LIMIT = "callbacks.diagnostics.limit_batches=1"


@dataclass(frozen=True)
class Row:
    """One run: a data set of DATA, overrides (each names its logger), what it must leave behind."""

    name: str
    data: str
    overrides: tuple[str, ...]
    writes: str = "deploy"  # "deploy": checkpoints + verified deploy.pt; "nothing": neither
    slow: bool = False

    @property
    def logger(self) -> str:
        chosen = [o.split("=", 1)[1] for o in self.overrides if o.startswith("logger=")]
        debug = any(o.startswith("debug=") for o in self.overrides)
        return chosen[-1] if chosen else ("none" if debug else "wandb")


ROWS = [
    Row(
        "quick_mix_ema",
        "fake16",
        (
            "model=cifar_quick",
            "callbacks=ema",
            "block.gamma_init=null",
            "data.mixup_alpha=0.2",
            "data.cutmix_alpha=1.0",
            "label_smoothing=0.1",
            "optimizer=adamw",
            "scheduler=multistep",
            "logger=none",
        ),
    ),
    Row(
        "device_batches_mix",
        "digits",
        (
            "model=cifar_quick",
            "data.device_batches=true",
            "data.augment=cifar",
            "data.mixup_alpha=0.2",
            "data.cutmix_alpha=1.0",
            "scheduler=constant",
            "precision=fp32",
            "block.branches=[hor]",
            "block.branch_bn=false",
            "logger=none",
        ),
    ),
    Row(
        "fdr_ema_dbb",
        "fake16",
        ("model=cifar_quick", "debug=fdr", "callbacks=ema", "block=dbb", "logger=csv"),
        writes="nothing",
    ),
    Row(
        "callbacks_none",
        "fake16",
        ("model=cifar_quick", "callbacks=none", "block=base", "logger=csv"),
        writes="nothing",
    ),
    Row(
        "folder_device_randaug",
        "folder",
        (
            "model=resnet20",
            "data.decoder=device",
            "data.augment=randaugment",
            "data.mixup_alpha=0.4",
            "data.skip_bad_images=true",
            "block.kernel_sizes=[3]",
            "scheduler.warmup_epochs=1",
            "logger=none",
        ),
    ),
    Row(
        "csv_tb_base_ema",
        "fake16",
        (
            "model=cifar_quick",
            "block=base",
            "callbacks=ema",
            "callbacks.fuse.fold_bn=true",
            "data.augment=[crop,{_target_:torchvision.transforms.v2.ColorJitter,brightness:0.4}]",
            "data.random_erasing=0.5",
            "data.device_batches=false",
            "logger=[csv,tensorboard]",
            DIAGNOSTICS_LIMIT,
        ),
        slow=True,
    ),
    Row(
        "wandb_dbb_bf16",
        "digits",
        (
            "model=cifar_quick",
            "block=dbb",
            "trainer.precision=bf16-mixed",
            "data.augment=trivialaugment",
            "logger=wandb",
            DIAGNOSTICS_LIMIT,
        ),
        slow=True,
    ),
    Row(
        "folder_pil_trivial",
        "folder",
        (
            "model=resnet32",
            "block=dbb",
            "data.decoder=pil",
            "data.augment=trivialaugment",
            "data.random_erasing=0.5",
            "data.cutmix_alpha=1.0",
            "logger=none",
        ),
        slow=True,
    ),
    Row(
        "folder_tv_custom_ema",
        "folder",
        (
            "model=resnet44",
            "block=custom",
            "block.name=acnet_pl.blocks.acb:ACBlock",
            "data.decoder=torchvision",
            "data.augment=none",
            "callbacks=ema",
            "logger=none",
        ),
        slow=True,
    ),
    Row(
        "folder_limit_imagenet",
        "folder",
        ("model=cifar_quick", "debug=limit", "data.augment=imagenet", "model.init=kaiming"),
        slow=True,
    ),
    Row(
        "folder_pil_cifar_base",
        "folder",
        ("model=resnet20", "block=base", "data.decoder=pil", "data.augment=cifar", "logger=none"),
        slow=True,
    ),
    Row(
        "r56_stacked_patterns",
        "fake8",
        (
            "model=resnet56",
            "block.impl=stacked",
            "block.gamma_init={layer1.0.*:0.5,layer1.*:0.25}",
            "block.include=[layer1.*,layer3.*]",
            "logger=none",
        ),
        slow=True,
    ),
    Row(
        "r110_overfit_cutmix",
        "fake8",
        ("model=resnet110", "block=base", "debug=overfit", "data.cutmix_alpha=1.0"),
        slow=True,
    ),
    Row("r50_profiler", "fake8", ("model=resnet50", "block=base", "debug=profiler"), slow=True),
    Row(
        "r34_base_adamw",
        "fake8",
        ("model=resnet34", "block=base", "optimizer=adamw", "data.augment=crop", "logger=none"),
        slow=True,
    ),
    Row(
        "r18_ema_imagenet",
        "fake8",
        (
            "model=resnet18",
            "block.kernel_sizes=[3,5,7]",
            "callbacks=ema",
            "data.augment=imagenet",
            "logger=none",
        ),
        slow=True,
    ),
    Row(
        "vgg_base_warmup",
        "fake32",
        ("model=vgg16", "block=base", "scheduler.warmup_epochs=1", "logger=none"),
        slow=True,
    ),
    Row(
        "wrn_bare_all",
        "fake8",
        (
            "model=wrn16_8",
            "block.bare_convs=all",
            "block.gamma_init={conv1:0.333}",
            "precision=fp32",
            "logger=none",
        ),
        slow=True,
    ),
    Row(
        "dense_dbb_bare",
        "fake8",
        ("model=densenet40", "block=dbb", "block.bare_convs=true", "logger=none"),
        slow=True,
    ),
    Row(
        "torchvision_dbb",
        "fake16",
        ("model=torchvision", "model.name=mobilenet_v3_small", "block=dbb", "logger=none"),
        slow=True,
    ),
    Row(
        "timm_preserve",
        "digits",
        ("model=timm", "model.name=resnet10t", "block.preserve=true", "logger=none"),
        slow=True,
    ),
]

#: Combinations that cannot work: (name, data, overrides, the one line's pattern). Each refuses before
#: anything is written (no logger run, no run dir).
REFUSALS = [
    (
        "device_batches_randaugment",
        "fake16",
        ("data.device_batches=true", "data.augment=randaugment", "logger=wandb"),
        r"data\.device_batches=true but the training data cannot be batched on the device \(RandAugment\)",
    ),
    (
        "device_batches_random_erasing",
        "digits",
        ("data.device_batches=true", "data.random_erasing=0.5", "logger=wandb"),
        r"data\.device_batches=true but .*\(random erasing\).*set data\.device_batches=auto or false",
    ),
    (
        "device_batches_on_image_files",
        "folder",
        ("+data.device_batches=true",),
        r"data\.device_batches: ImageFolderDataModule takes no option 'device_batches'; remove it "
        r"\(~data\.device_batches on the command line\)",
    ),
    (
        "decoder_on_tensors",
        "digits",
        ("+data.decoder=pil",),
        r"data\.decoder: DigitsDataModule takes no option 'decoder'",
    ),
    (
        "device_decoder_random_erasing",
        "folder",
        ("data.decoder=device", "data.random_erasing=0.5"),
        r"data\.random_erasing needs data\.decoder=torchvision or pil, not device",
    ),
    (
        "dali_randaugment",
        "dali",
        ("data.augment=randaugment", "logger=wandb"),
        r"data=imagenet_dali offers data\.augment=imagenet only",
    ),
    ("dbb_stacked", "fake16", ("block=dbb", "+block.impl=stacked"), r"block dbb takes no option impl"),
    (
        "base_with_block_options",
        "fake16",
        ("block=base", "+block.kernel_sizes=[3]"),
        r"block=base converts nothing and has no option block\.kernel_sizes",
    ),
    (
        "acb_unknown_branch",
        "fake16",
        ("block.branches=[diagonal]",),
        r"ACBlock branches must be a non-empty list of distinct 1D branches",
    ),
    (
        "densenet_without_bare_convs",
        "fake8",
        ("model=densenet40",),
        r"block=acb converts none of densenet40's convs .*block\.bare_convs=true",
    ),
    (
        "vgg16_on_8px",
        "fake8",
        ("model=vgg16",),
        r"images of 8x8 are too small for vgg16: it needs at least 32x32",
    ),
]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with 3 classes of JPEGs and PNGs of several sizes, one CMYK JPEG among them."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 2)):
        for c, name in enumerate(("cat", "dog", "fox")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(20 + 4 * i, 24 + 2 * c, 3), dtype=np.uint8)
                suffix = "png" if i == 1 else "jpg"
                Image.fromarray(pixels).save(root / split / name / f"{i}.{suffix}")
    cmyk = rng.integers(0, 256, size=(22, 26, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(root / "train" / "dog" / "0.jpg")
    return root


def _compose(data: str, overrides: tuple[str, ...], out: Path, tree: Path) -> DictConfig:
    data_overrides = [*DATA[data], *([f"data.root={tree}"] if data in ("folder", "dali") else [])]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*data_overrides, *COMMON, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture
def offline_wandb(wandb_free_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B runs offline (no credentials here), as a user without an account gets them."""
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.mark.usefixtures("one_thread", "offline_wandb")
@pytest.mark.parametrize(
    "row", [pytest.param(r, id=r.name, marks=[pytest.mark.slow] if r.slow else []) for r in ROWS]
)
def test_switches_with_the_defaults(row: Row, tmp_path: Path, image_tree: Path) -> None:
    """One row: trains, every metric finite, and leaves exactly the documented files."""
    run = tmp_path / "run"
    cfg = _compose(row.data, row.overrides, run, image_tree)
    metrics = train(cfg)
    assert metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    assert 0.0 <= metrics["val/acc_top1"] <= 1.0 and metrics["train/loss"] > 0
    checkpoints = sorted(p.name for p in run.rglob("*.ckpt"))
    if row.writes == "deploy":
        report = json.loads((run / "deploy" / "report.json").read_text())
        assert (report["ok"], report["status"]) == (True, "deployed"), report["error"]
        assert report["verification"]["tolerance"] == LOGIT_RTOL and report["verification"]["samples"] > 0
        assert (run / "deploy" / "deploy.pt").is_file() and "last.ckpt" in checkpoints
    else:
        assert not (run / "deploy" / "deploy.pt").exists() and checkpoints == []
    diagnostics = run / "diagnostics"
    if row.logger == "none" or "callbacks=none" in row.overrides or "debug=fdr" in row.overrides:
        assert not diagnostics.exists()  # active only when a logger is (and not in a fast dev run)
    else:
        assert {"diagnostics.json", "kernel_maps.png", "robustness.png"} <= {
            p.name for p in diagnostics.iterdir()
        }


def test_rows_cover_every_option() -> None:
    """Every choice of every config group (but those documented above) and every value switch is in a row."""
    groups = {
        "model": set(),
        "block": set(),
        "optimizer": set(),
        "scheduler": set(),
        "precision": set(),
        "logger": set(),
        "debug": set(),
        "callbacks": set(),
        "data": set(),
    }
    defaults = {"block": "acb", "optimizer": "sgd", "scheduler": "cosine", "precision": "mixed"}
    defaults |= {"callbacks": "default", "logger": "wandb"}
    for row in ROWS:
        chosen = dict(o.split("=", 1) for o in row.overrides + tuple(DATA[row.data]) if "=" in o)
        for group, seen in groups.items():
            value = chosen.get(group, defaults.get(group))
            if value is not None:
                seen.update(value.strip("[]").split(","))  # logger=[csv,tensorboard]: both
    expected = {group: {p.stem for p in (CONF_DIR / group).glob("*.yaml")} for group in groups}
    # The single-callback files are the pieces of callbacks=default/ema, all on in every such row.
    expected["callbacks"] = {"default", "ema", "none"}
    expected["debug"] -= {"default"}  # the base of the others
    expected["data"] -= {"cifar10", "cifar100", "imagenet", "imagenet_dali"}  # files or a GPU (see above)
    assert groups == expected
    text = " ".join(" ".join(r.overrides) for r in ROWS)
    switches = [f"data.augment={p}" for p in PRESETS if p not in ("none",)]
    switches += ["data.augment=[", "data.random_erasing=", "data.mixup_alpha=", "data.cutmix_alpha="]
    switches += [f"data.decoder={d}" for d in DECODERS] + [
        "data.device_batches=true",
        "data.device_batches=false",
    ]
    switches += ["block.impl=stacked", "block.branches=", "block.branch_bn=false", "block.kernel_sizes="]
    switches += [
        "block.bare_convs=true",
        "block.bare_convs=all",
        "block.gamma_init={",
        "block.gamma_init=null",
    ]
    switches += ["block.include=", "callbacks.fuse.fold_bn=true", "trainer.precision=bf16-mixed"]
    switches += ["data.augment=none", "block.preserve=true"]
    assert [s for s in switches if s not in text] == []


@pytest.mark.parametrize(("name", "data", "overrides", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_combination_that_cannot_work_refuses_in_one_line(
    name: str,
    data: str,
    overrides: tuple[str, ...],
    message: str,
    tmp_path: Path,
    image_tree: Path,
    capsys: pytest.CaptureFixture,
    offline_wandb: None,
) -> None:
    """Before anything is written: `error: <what and the fix>` on one line, exit 2 (train.py's wrapper)."""
    run = tmp_path / "run"
    cfg = _compose(data, ("model=cifar_quick", *overrides), run, image_tree)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(train)(cfg)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not run.exists()  # no logger run, no checkpoint dir: refused before anything started
