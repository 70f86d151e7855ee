"""train.py end to end: single run, DDP, multirun + DDP, W&B offline + resume, one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF_DIR, REPO_ROOT, TINY_RUN, isolated_env, run_train

from acnet_pl.cli.common import exit_on_user_error, user_error_message
from acnet_pl.cli.sweep_table import collect_runs, summarize
from acnet_pl.cli.train import optimized_metric
from acnet_pl.models import build_model
from acnet_pl.training.module import ACNetModule

LOGIT_ATOL = 1e-4


def _output(proc) -> str:
    return proc.stdout + proc.stderr


def _assert_ok(proc) -> None:
    assert proc.returncode == 0, _output(proc)[-4000:]


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "deploy" / "report.json").read_text())


def _assert_deploy_matches_checkpoint(run_dir: Path) -> None:
    """deploy.pt loads (weights_only) strictly into the base model and equals the trained checkpoint's model."""
    record = torch.load(run_dir / "deploy" / "deploy.pt", map_location="cpu", weights_only=True)
    base = build_model(record["model"]["name"], num_classes=record["model"]["num_classes"], block="base")
    base.load_state_dict(record["state_dict"], strict=True)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]  # the layout deploy.py rebuilds the model from
    assert {k: hp["model"][k] for k in ("name", "num_classes")} == record["model"]
    assert hp["block"]["name"] == record["block"]["name"]
    assert hp["data"]["input_size"] == record["input_size"]
    assert hp["data"]["datamodule"]["_target_"] == "acnet_pl.data.FakeDataModule"
    trained = ACNetModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    x = torch.randn(8, *record["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (base.eval()(x) - trained.model.eval()(x)).abs().max().item()
    assert diff < LOGIT_ATOL


# --------------------------------------------------------------------------------------------------
# fast: the pieces the CLI is made of


def test_exit_on_user_error_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    @exit_on_user_error
    def failing() -> None:
        raise FileNotFoundError("data not found at x;\n set data.root=...")

    with pytest.raises(SystemExit) as exit_info:
        failing()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: data not found at x; set data.root=...\n"


def test_exit_on_user_error_keeps_tracebacks_of_bugs() -> None:
    @exit_on_user_error
    def buggy() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        buggy()


def test_user_error_message_unwraps_hydra_instantiation() -> None:
    from hydra.errors import InstantiationException

    try:
        try:
            raise FileNotFoundError("ImageNet not found at 'x'")
        except FileNotFoundError as cause:
            raise InstantiationException("Error in call to target\nfull_key: data") from cause
    except InstantiationException as wrapped:
        assert user_error_message(wrapped) == "ImageNet not found at 'x'"
    bug = InstantiationException("Error in call")
    bug.__cause__ = TypeError("bug")
    assert user_error_message(bug) is None
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    settings = InstantiationException("Error in call to target 'Trainer'")
    settings.__cause__ = MisconfigurationException("`enable_progress_bar=False` but found `RichProgressBar`")
    assert user_error_message(settings) == "`enable_progress_bar=False` but found `RichProgressBar`"


def test_a_config_key_the_class_does_not_take_is_one_line() -> None:
    """`+data.device_batches=true` on data=imagefolder (Hydra's TypeError of the constructor): the key and the fix."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"data": {"_target_": "acnet_pl.data.ImageFolderDataModule", "root": "x", "device_batches": True}}
    )
    with pytest.raises(Exception) as error:
        instantiate(cfg.data)
    assert user_error_message(error.value) == (
        "data.device_batches: ImageFolderDataModule takes no option 'device_batches'; "
        "remove it (~data.device_batches on the command line)"
    )


_CYCLE_AT_EXIT = """
import sys
from acnet_pl.cli.common import skip_shutdown_collection
class Cycle:
    def __del__(self):
        print("collected", flush=True)
c = Cycle()
c.self = c
if sys.argv[1] == "skip":
    skip_shutdown_collection()
"""


@pytest.mark.parametrize(("mode", "printed"), [("keep", "collected"), ("skip", "")])
def test_shutdown_skips_the_collection_of_what_is_alive(mode: str, printed: str) -> None:
    """The entry points' exit hook: what is alive at exit is not traversed by the interpreter's shutdown
    collections (a cycle is not collected; without the hook it is). This costs ~1 s after torch + Lightning
    imports; the test fails if CPython's shutdown stops honouring gc.freeze."""
    args = [sys.executable, "-c", _CYCLE_AT_EXIT, mode]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == printed


_IMPORTS_THEN_A_SECOND_JOB = """
import gc, weakref
from acnet_pl.cli.common import imports_without_collection
with imports_without_collection():
    collecting = gc.isenabled()
    import lightning.pytorch
frozen = gc.get_freeze_count()
class Cycle:
    pass
c = Cycle()
c.self = c
ref = weakref.ref(c)
del c  # garbage of a first multirun job
with imports_without_collection():  # the second job's imports: cached, no second freeze
    pass
gc.collect()
print(collecting, gc.isenabled(), frozen, gc.get_freeze_count() == frozen, ref() is None)
"""


def test_heavy_imports_run_without_collections_and_are_frozen_once() -> None:
    """The entry points import torch/Lightning with the collector off, then freeze what they left (later
    collections skip it); a second use in the same process (a multirun's next job) freezes nothing more,
    so a finished job's garbage is still collected."""
    args = [sys.executable, "-c", _IMPORTS_THEN_A_SECOND_JOB]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    collecting, enabled, frozen, once, collected = proc.stdout.split()
    assert (collecting, enabled, once, collected) == ("False", "True", "True", "True")
    assert int(frozen) > 100_000  # torch's and Lightning's objects


def test_optimized_metric_names_the_choices() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optimized_metric": "val/acc_top1_best"})
    assert optimized_metric(cfg, {"val/acc_top1_best": 0.5}) == 0.5
    with pytest.raises(ValueError, match="val/loss"):
        optimized_metric(cfg, {"val/loss": 1.0})
    assert optimized_metric(OmegaConf.create({"optimized_metric": None}), {}) is None


@pytest.mark.slow
def test_train_function_in_process(tmp_path: Path, wandb_free_env: Path) -> None:
    """train(cfg) from the compose API returns float metrics, deploy numbers included; the same again when
    the run dir holds the finished run."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from acnet_pl.cli.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_RUN, "logger=none", "block=acb"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics = train(cfg)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["deploy/val_top1_after"] == pytest.approx(metrics["deploy/val_top1_before"], abs=1 / 16)
    assert metrics["deploy/max_abs_logit_diff"] < LOGIT_ATOL
    assert 0.0 <= metrics["val/acc_top1_best"] <= 1.0
    assert (tmp_path / "run" / "deploy" / "deploy.pt").is_file()
    # run again in the same run dir (a requeued or resubmitted job that had finished): it resumes from
    # last.ckpt, trains nothing and reports the same numbers (a sweeper's objective included)
    again = train(cfg)
    assert again["val/acc_top1_best"] == metrics["val/acc_top1_best"]
    assert again["deploy/val_top1_after"] == metrics["deploy/val_top1_after"]


# --------------------------------------------------------------------------------------------------
# slow: train.py in a subprocess


@pytest.mark.slow
def test_single_run_writes_checkpoints_and_verified_deploy(tmp_path: Path) -> None:
    """One run with W&B forced offline by WANDB_MODE: checkpoints, deploy files, no credentials notice."""
    env = isolated_env(tmp_path / "home", WANDB_MODE="offline")
    proc = run_train([*TINY_RUN, "block=acb", "logger=wandb", "hydra.run.dir=run"], tmp_path, env)
    _assert_ok(proc)
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    report = _report(run)
    assert report["ok"] is True and report["error"] is None
    assert report["block"]["name"] == "acb"
    val = report["val"]
    assert val["samples"] == 16
    assert val["before"]["correct_top1"] == val["after"]["correct_top1"]
    assert val["before"]["top1"] == val["after"]["top1"]
    assert report["errors"]["fused"]["max_abs"] < LOGIT_ATOL
    # ACB trains more parameters than it deploys; the deployed model is the base architecture.
    assert report["deploy_model"]["params"] < report["train_model"]["params"]
    assert report["deploy_model"]["params"] == sum(
        p.numel() for p in build_model("cifar_quick", 4).parameters()
    )
    _assert_deploy_matches_checkpoint(run)
    # WANDB_MODE honoured: offline run, and no "no credentials" notice.
    assert list((run / "wandb").glob("offline-run-*"))
    assert "no credentials found" not in _output(proc)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run_dir(tmp_path: Path) -> None:
    """DDP over gloo with two processes: one run dir, one deploy dir, one set of checkpoints."""
    proc = run_train([*TINY_RUN, "logger=csv", "trainer.devices=2", "hydra.run.dir=run"], tmp_path)
    _assert_ok(proc)
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("deploy.pt")] == [Path("run/deploy/deploy.pt")]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("last.ckpt")] == [
        Path("run/checkpoints/last.ckpt")
    ]
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob(".hydra")] == [Path("run/.hydra")]
    assert (run / "train_ddp_rank1.log").is_file()  # the second rank ran, in the same run dir
    report = _report(run)
    assert report["val"]["samples"] == 16  # rank zero checks on the whole validation set
    # the resolved config is what the logger got (precision resolved for CPU)
    logged = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert (logged["task_name"], logged["trainer"]["precision"], logged["trainer"]["devices"]) == (
        "train",
        "32-true",
        2,
    )
    assert report["val"]["before"]["top1"] == report["val"]["after"]["top1"]


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_once(tmp_path: Path) -> None:
    """`-m block=base,acb` with 2 DDP processes per job: two job dirs, each with its own deploy files."""
    proc = run_train(
        ["-m", *TINY_RUN, "logger=csv", "trainer.devices=2", "block=base,acb", "hydra.sweep.dir=sweep"],
        tmp_path,
        timeout=300,
    )
    _assert_ok(proc)
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "sweep"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert sorted(str(p.relative_to(sweep)) for p in sweep.rglob("deploy.pt")) == [
        "0/deploy/deploy.pt",
        "1/deploy/deploy.pt",
    ]
    for job, block in (("0", "base"), ("1", "acb")):
        report = _report(sweep / job)
        assert report["block"]["name"] == block
        assert report["val"]["before"]["top1"] == report["val"]["after"]["top1"]
        assert (sweep / job / "train_ddp_rank1.log").is_file()
    groups, gains = summarize(collect_runs(sweep))
    assert [(g["block"], g["n"]) for g in groups] == [("base", 1), ("acb", 1)]
    assert len(gains) == 1


@pytest.mark.slow
def test_wandb_goes_offline_without_credentials_and_resume_keeps_the_run(tmp_path: Path) -> None:
    """No credentials, no WANDB_MODE: one notice line, offline run; a resume continues the same W&B run."""
    env = isolated_env(tmp_path / "home")
    first = run_train([*TINY_RUN, "logger=wandb", "hydra.run.dir=run1"], tmp_path, env)
    _assert_ok(first)
    notices = [line for line in _output(first).splitlines() if "no credentials found" in line]
    assert len(notices) == 1 and "wandb sync" in notices[0]
    run_id = (tmp_path / "run1" / "wandb_run_id").read_text().strip()
    assert list((tmp_path / "run1" / "wandb").glob(f"offline-run-*-{run_id}"))

    ckpt = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    second = run_train(
        [*TINY_RUN, "logger=wandb", "hydra.run.dir=run2", "trainer.max_epochs=2", f"ckpt_path={ckpt}"],
        tmp_path,
        env,
    )
    _assert_ok(second)
    assert (tmp_path / "run2" / "wandb_run_id").read_text().strip() == run_id
    assert list((tmp_path / "run2" / "wandb").glob(f"offline-run-*-{run_id}"))
    report = _report(tmp_path / "run2")
    assert (report["epoch"], report["global_step"]) == (2, 4)  # resumed after epoch 1: 2 more steps


def _assert_one_line_error(proc, expected: str) -> None:
    output = _output(proc)
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([*TINY_RUN, "model.name=foo"], "unknown model 'foo'"),
        (["data=imagefolder", "data.root=no/such/tree", "trainer.accelerator=cpu"], "image folder not found"),
        (
            [*TINY_RUN, "trainer.devices=2", "data.batch_size=15"],
            "data.batch_size=15 does not divide by the 2 processes",
        ),
    ],
    ids=["unknown-model", "missing-data-root", "batch-not-divisible"],
)
def test_user_errors_are_one_line_exit_2(
    tmp_path: Path, wandb_free_env: Path, capsys: pytest.CaptureFixture, overrides: list[str], expected: str
) -> None:
    """What train.py's main does (exit_on_user_error around train), in-process to save the start-up time."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from acnet_pl.cli.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(train)(cfg)
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_missing_data_stops_before_any_logger(
    tmp_path: Path, wandb_free_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Missing CIFAR with logger=wandb: the data error alone; no W&B run, no wandb_run_id, no W&B output."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from acnet_pl.cli.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [
        "data=cifar10",
        f"data.root={tmp_path / 'no_cifar'}",
        "data.download=false",
        "model=cifar_quick",
        "trainer.accelerator=cpu",
        "logger=wandb",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(train)(cfg)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: CIFAR-10 not found at"), errors
    assert "wandb" not in captured.out + captured.err
    assert not (tmp_path / "run").exists()  # no wandb/ dir, no wandb_run_id file
    assert not list(tmp_path.rglob("*wandb*")), list(tmp_path.rglob("*wandb*"))


@pytest.mark.slow
def test_bare_train_without_imagenet_is_one_line_exit_2(tmp_path: Path) -> None:
    """Bare `python train.py` = ResNet-18 ACB on ./imagenet_data; without it: the datamodule's message."""
    proc = run_train(["logger=none", "hydra.run.dir=run"], tmp_path)
    _assert_one_line_error(proc, "ImageNet not found at")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "expected", "not_imported"),
    [
        (
            "train.py",
            ["model=foo"],
            "model=foo: no such choice in conf/model; choose one of: cifar_quick, densenet40, resnet110,",
            "lightning",
        ),
        (
            "deploy.py",
            ["foo=1"],
            "foo=1: no such key in the config",
            "acnet_pl.cli.deploy",
        ),
    ],
    ids=["train-unknown-choice", "deploy-unknown-key"],
)
def test_config_mistake_is_one_line_exit_2_before_heavy_imports(
    tmp_path: Path, script: str, args: list[str], expected: str, not_imported: str
) -> None:
    """Checked before hydra.main: `error: ...` on one line, exit 2, and the job's modules never loaded."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / script), *args],
        cwd=tmp_path,
        env=isolated_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = [
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    ]
    stderr = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stdout + "\n".join(stderr)
    assert len(stderr) == 1 and stderr[0].startswith("error: ") and expected in stderr[0], stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert not_imported not in imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no run dir


@pytest.mark.slow
def test_help_is_fast_and_lists_groups(tmp_path: Path) -> None:
    proc = run_train(["--help"], tmp_path)
    _assert_ok(proc)
    for group in ("model:", "block:", "data:", "experiment:", "logger:", "trainer:"):
        assert group in proc.stdout
