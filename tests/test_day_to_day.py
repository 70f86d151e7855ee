"""Living with the app: a log line per epoch without a terminal, a quiet console, W&B organised by sweep."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import TINY_RUN, isolated_env, run_train
from wandb_records import read_records

from acnet_pl.training.callbacks.fuse import best_alias_due, deploy_artifact_name

#: Per epoch: "epoch 2/2  train loss 0.9767 top-1 71.88%  val top-1 50.00% top-5 100.00% (best 50.00%) ..."
EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+)  train loss [\d.]+ top-1 [\d.]+%  val top-1 [\d.]+% top-5 [\d.]+% \(best [\d.]+%\)"
    r"  lr [\d.e-]+  (\d+) img/s  \d+:\d\d:\d\d"
)
#: What the console must not show any more (issue 9): library tips, warnings and notices, metric rows.
NOISE = ("litlogger", "anonymous", "LeafSpec", "wandb:", "MulticlassAccuracy", "┏", "Total FLOPs: 0")


# --------------------------------------------------------------------------------------------------
# fast: the pieces, and the library internals they rely on


def test_deploy_artifact_name_and_best_alias() -> None:
    assert (
        deploy_artifact_name("cifar10_resnet56", "resnet56", "acb") == "deploy-cifar10_resnet56-resnet56-acb"
    )
    assert deploy_artifact_name("my task", "m/x", "acb") == "deploy-my_task-m_x-acb"
    assert best_alias_due(None, 0.5) and best_alias_due(0.5, 0.5) and best_alias_due(0.4, 0.5)
    assert not best_alias_due(0.51, 0.5)


# --------------------------------------------------------------------------------------------------
# slow: a 2-job sweep through train.py, stdout a pipe (no terminal), W&B offline


def _wandb_run(job_dir: Path) -> dict:
    """What a job's W&B run file holds: run header, config, saved files, metric summaries, artifacts."""
    (path,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    run: dict = {"config": {}, "files": [], "max": set(), "artifacts": [], "history": set()}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(group=record.run.run_group, job_type=record.run.job_type, name=record.run.display_name)
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
        elif kind == "metric" and record.metric.summary.max:
            run["max"].add(record.metric.name)
        elif kind == "history":
            run["history"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "artifact":
            run["artifacts"].append((record.artifact.name, sorted(record.artifact.aliases)))
    return run


@pytest.mark.slow
def test_sweep_without_terminal_logs_each_epoch_and_groups_wandb_runs(tmp_path: Path) -> None:
    """`-m block=base,acb` under a pipe: epoch lines with img/s in stdout and train.log; W&B by sweep."""
    env = isolated_env(tmp_path / "home", WANDB_MODE="offline")
    env.pop("WANDB_SILENT")  # what wandb prints by itself must be quiet without it
    args = [*TINY_RUN, "trainer.max_epochs=2", "logger=wandb", "logger.wandb.log_model=true"]
    args = [
        a for a in args if "progress_bar" not in a and "model_summary" not in a
    ]  # the defaults, as users run
    proc = run_train(["-m", *args, "block=base,acb", "hydra.sweep.dir=sweep"], tmp_path, env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in the output"
    sweep = tmp_path / "sweep"
    runs = {}
    for job, block in (("0", "base"), ("1", "acb")):
        job_dir = sweep / job
        log_lines = [m.groups() for m in EPOCH_LINE.finditer((job_dir / "train.log").read_text())]
        assert [(epoch, total) for epoch, total, _ in log_lines] == [("1", "2"), ("2", "2")]
        assert all(int(images_per_sec) > 0 for _, _, images_per_sec in log_lines)
        train_log = (job_dir / "train.log").read_text()
        assert f"run dir: {job_dir.resolve()}" in train_log
        assert f"model=cifar_quick block={block} data=fake" in train_log
        assert f"best checkpoint: {job_dir.resolve()}/checkpoints/best-epoch" in train_log
        assert f"deploy: {job_dir.resolve()}/deploy/deploy.pt" in train_log
        assert f"(group train-sweep, job_type {block}, name block={block})" in train_log
        assert re.search(r"\n[1-9][\d.]* M\s+Total Flops", train_log)  # the summary's FLOPs per image
        assert re.search(r"W&B: offline run \S+; upload it with: wandb sync ", train_log)
        runs[block] = _wandb_run(job_dir)
    assert len(EPOCH_LINE.findall(proc.stdout)) == 4  # the same lines on stdout, 2 jobs x 2 epochs
    base, acb = runs["base"], runs["acb"]
    assert base["group"] == acb["group"] == "train-sweep"
    assert (base["job_type"], acb["job_type"]) == ("base", "acb")
    assert (base["name"], acb["name"]) == ("block=base", "block=acb")
    for block, run in runs.items():
        hydra = run["config"]["hydra"]
        assert hydra["choices"]["block"] == block and f"block={block}" in hydra["overrides"]
        assert hydra["swept"] == ["block"]
        assert sorted(run["files"]) >= [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]
        assert {"val/acc_top1", "val/acc_top5"} <= run["max"]
        assert (f"deploy-train-cifar_quick-{block}", ["latest"]) in run["artifacts"]
        assert any(name.startswith("model-") and "best" in aliases for name, aliases in run["artifacts"])
        assert {"perf/images_per_sec", "perf/step_time"} <= run["history"]


# --------------------------------------------------------------------------------------------------
# debug configs, the fuse check's batch limit, EMA


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "trainer"),
    [
        ("default", {"max_epochs": 1, "detect_anomaly": True}),
        ("fdr", {"fast_dev_run": True}),
        ("overfit", {"max_epochs": 20, "overfit_batches": 3}),
        ("limit", {"max_epochs": 3, "limit_train_batches": 10, "limit_val_batches": 5}),
        ("profiler", {"max_epochs": 1, "profiler": "simple"}),
    ],
)
def test_debug_choice_composes_over_an_experiment(tmp_path: Path, name: str, trainer: dict) -> None:
    """`debug=<name>` (no "+"): applied after the experiment, own task name, no logger, main-process data."""
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=cifar10_resnet56", f"debug={name}"])
    assert cfg.task_name == "debug" and not cfg.logger and cfg.data.num_workers == 0
    assert {key: cfg.trainer[key] for key in trainer} == trainer
    assert cfg.model.name == "resnet56"  # the experiment's, untouched


def test_fuse_check_uses_the_trainers_validation_batches() -> None:
    from types import SimpleNamespace

    from acnet_pl.training.callbacks.fuse import trainer_val_batches

    loader = list(range(10))  # 10 batches
    cases = [(False, 1.0, None), (True, 1.0, 1), (3, 1.0, 3), (False, 4, 4), (False, 0.25, 2), (False, 0, 1)]
    for fast_dev_run, limit, expected in cases:
        trainer = SimpleNamespace(fast_dev_run=fast_dev_run, limit_val_batches=limit)
        assert trainer_val_batches(trainer, loader) == expected, (fast_dev_run, limit)


@pytest.mark.slow
def test_ema_deploy_file_holds_the_averaged_weights(
    tmp_path: Path, one_thread: None, wandb_free_env: Path
) -> None:
    """callbacks=ema through train(cfg), callbacks in the config's order (fuse before ema): deploy.pt =
    EMA of the weights after each step with the configured warm-up (update n: min(decay, (1+n)/(10+n))),
    computed by hand (float64, 1e-6)."""
    import copy

    import torch
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from record_weights import RecordWeights

    from acnet_pl.cli.train import train

    overrides = [
        *(a for a in TINY_RUN if "summary" not in a and "diagnostics" not in a and "progress_bar" not in a),
        "trainer.max_epochs=2",
        "block=base",
        "logger=none",
        "callbacks=ema",
        "+callbacks.record._target_=record_weights.RecordWeights",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    order = list(cfg.callbacks)
    # The configured order: fusing anywhere before EMA's on_train_end would deploy the raw weights.
    assert order.index("fuse") < order.index("ema") and "model_summary" in order
    train(cfg)
    states = RecordWeights.instances[-1].states
    assert len(states) == 4
    assert cfg.callbacks.ema.warmup and cfg.callbacks.ema.decay > 0.99
    average = copy.deepcopy(states[0])  # W_0 = the weights after the first step
    for n, state in enumerate(states[1:], start=1):
        decay = min(cfg.callbacks.ema.decay, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13: warm-up decides
        for key in average:
            average[key] = decay * average[key] + (1 - decay) * state[key]
    deployed = torch.load(tmp_path / "run" / "deploy" / "deploy.pt", weights_only=True)["state_dict"]
    last = states[-1]
    moved = max((average[k] - last[k]).abs().max().item() for k in average)
    assert moved > 1e-4  # the average differs from the last weights: the comparison below can fail
    for key in average:
        torch.testing.assert_close(deployed[key].double(), average[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_debug_fdr_runs_one_batch_and_writes_nothing_finished(tmp_path: Path) -> None:
    """`train.py debug=fdr` on 16 batches of data: one step, the fuse check on one batch, no files."""
    args = [a for a in TINY_RUN if "max_epochs" not in a and "limit_train" not in a]
    args += ["data.train_size=256", "data.val_size=64", "debug=fdr", "hydra.run.dir=run"]
    proc = run_train(args, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "deploy (fast_dev_run, no files written): fused model checked on 16 samples" in output
    assert len(EPOCH_LINE.findall(proc.stdout)) == 1
    run = tmp_path / "run"
    assert not list(run.rglob("*.ckpt")) and not (run / "deploy").exists()
    assert (run / ".hydra" / "config.yaml").is_file()


# --------------------------------------------------------------------------------------------------
# evaluation of a checkpoint or a deploy.pt


@pytest.mark.slow
def test_eval_gives_the_training_accuracy_of_checkpoint_and_deploy_file(
    tmp_path: Path, wandb_free_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train=false: the last checkpoint scores what training's last validation did, deploy.pt what the
    fuse check measured (same data, read back from the checkpoint); W&B runs with job_type=eval."""
    import wandb
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from acnet_pl.cli.evaluate import evaluate
    from acnet_pl.cli.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_RUN, "logger=none", "block=acb", "data.val_size=40"])
    run = tmp_path / "run"
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    trained = train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(
        cfg, run / ".hydra" / "config.yaml"
    )  # as Hydra writes it (deploy.pt: data config from here)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # the default data (ImageNet) on purpose: the data come from the checkpoint / its run dir
        eval_cfg = compose("train", overrides=["train=false", "logger=wandb", "trainer.accelerator=cpu"])
    results = {}
    for name, path in (("ckpt", run / "checkpoints" / "last.ckpt"), ("deploy", run / "deploy" / "deploy.pt")):
        with open_dict(eval_cfg):
            eval_cfg.ckpt_path = str(path)
            eval_cfg.paths.output_dir = str(tmp_path / f"eval_{name}")
            eval_cfg.logger.wandb.save_dir = eval_cfg.paths.output_dir
        results[name] = evaluate(eval_cfg)
        wandb.teardown()  # wandb's core writes the run file out when its service stops (at exit in train.py)
        report = json.loads((tmp_path / f"eval_{name}" / "eval.json").read_text())
        assert report["samples"] == 40 and report["top1"] == results[name]["val/acc_top1"]
        wandb_run = _wandb_run(tmp_path / f"eval_{name}")
        assert wandb_run["job_type"] == "eval" and wandb_run["name"].startswith("eval cifar_quick-")
    # 40 images: one image is 0.025; the same weights on the same images give the same counts
    assert results["ckpt"]["val/acc_top1"] == pytest.approx(trained["val/acc_top1"], abs=1e-6)
    assert results["ckpt"]["val/acc_top5"] == pytest.approx(trained["val/acc_top5"], abs=1e-6)
    assert results["deploy"]["val/acc_top1"] == pytest.approx(trained["deploy/val_top1_after"], abs=1e-6)
    assert results["deploy"]["val/acc_top5"] == pytest.approx(trained["deploy/val_top5_after"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_py_without_ckpt_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The root evaluate.py (the entry point the README names) answers a missing ckpt_path in one line."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate.py"), "logger=none"],
        cwd=tmp_path,
        env=isolated_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluation needs a model: give ckpt_path=")
    assert "Traceback" not in proc.stderr


def test_console_callbacks_follow_the_terminal_and_the_summary_flag() -> None:
    """No progress bar outside a terminal (pytest's stdout is not one); enable_model_summary=false: no summary."""
    from lightning.pytorch.callbacks import RichProgressBar

    from acnet_pl.launch.model_summary import ModelSummary
    from acnet_pl.training.callbacks import EpochLog
    from acnet_pl.training.console import console_callbacks

    callbacks = [RichProgressBar(), ModelSummary(), EpochLog()]
    kept, settings = console_callbacks(callbacks, {"enable_model_summary": False})
    assert [type(c).__name__ for c in kept] == ["EpochLog"] and settings == {"enable_progress_bar": False}
    kept, _ = console_callbacks(callbacks, {})
    assert [type(c).__name__ for c in kept] == ["ModelSummary", "EpochLog"]
