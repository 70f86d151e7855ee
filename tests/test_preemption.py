"""Stop signals, SLURM requeue and run dirs (acnet_pl.launch.preemption), and the Lightning behaviours used.

The `test_lightning_*` tests pin what acnet_pl.launch.preemption and acnet_pl.training.checkpointing assume of
lightning 2.6: when one fails, Lightning changed and those modules must follow.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO_ROOT, TINY_RUN, isolated_env, run_train
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from acnet_pl.launch.preemption import HPC_CHECKPOINT_GLOB, run_id, slurm_job_name
from acnet_pl.launch.stop_signals import agree_on_stop_signals, stopped
from acnet_pl.training.checkpointing import LastCheckpoint

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


def test_lightning_sigterm_exception_exits_zero() -> None:
    """Lightning's stop exception is a SystemExit without a code: a stopped run would exit 0 without us."""
    assert issubclass(SIGTERMException, SystemExit) and SIGTERMException().code is None


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, None),
        (SLURM_ENV, "slurm-4242"),
        ({**SLURM_ENV, "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "7"}, "slurm-4200_7"),
        ({**SLURM_ENV, "SLURM_JOB_NAME": "interactive"}, None),
        ({**SLURM_ENV, "SLURM_JOB_NAME": "bash"}, None),
    ],
)
def test_slurm_job_dir_follows_lightnings_slurm_detection(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str | None
) -> None:
    """A run dir per SLURM batch job (array task), exactly where Lightning treats the job as SLURM-managed."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert slurm_job_name() == name
    assert SLURMEnvironment.detect() == (name is not None)
    if name is not None:
        # Same command (a requeue): same dir; other overrides in the same job script: another dir.
        assert re.fullmatch(rf"{name}-[0-9a-f]{{8}}", run_id("seed=1"))
        assert run_id("seed=1") == run_id("seed=1") != run_id("seed=2")
    else:
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{{3}}_{os.getpid()}", run_id())


def test_lightning_hpc_checkpoint_name(tmp_path: Path) -> None:
    """Lightning's SLURM requeue checkpoint is <default_root_dir>/hpc_ckpt_<n>.ckpt (what resume looks for)."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    path = Path(_CheckpointConnector.hpc_save_path(str(tmp_path)))
    assert path.parent == tmp_path and path.match(HPC_CHECKPOINT_GLOB)


@pytest.mark.slow
def test_runs_started_together_get_their_own_dirs(tmp_path: Path) -> None:
    """Two train.py started in the same instant resolve different run dirs (pid and milliseconds in the name)."""
    command = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "--cfg",
        "all",
        "--resolve",
        "-p",
        "hydra.run.dir",
    ]
    env = isolated_env(tmp_path / "home")
    procs = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    dirs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    pids = [str(proc.pid) for proc in procs]
    assert dirs[0] != dirs[1]
    for run_dir, pid in zip(dirs, pids, strict=True):
        assert re.fullmatch(rf"outputs/train/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{{3}}_{pid}", run_dir), (
            run_dir
        )


class _Interrupt(Callback):
    """Sends `signum` to this process at the end of the first batch."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_and_exits_with_the_signal(
    tmp_path: Path, one_thread, signum: int, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGINT/SIGTERM in the middle of an epoch: Lightning stops at that batch end, last.ckpt holds step 1.

    Pins Lightning's stop path (the connector's handlers are installed during fit; received_sigterm stops
    at the batch end, on_exception first); SIGINT takes the same path; exit status 128 + signal.
    """
    from acnet_pl.data import FakeDataModule
    from acnet_pl.training.module import ACNetModule

    L.seed_everything(0, verbose=False)
    data = FakeDataModule(
        num_classes=4, image_size=16, train_size=64, val_size=16, batch_size=16, num_workers=0
    )
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, block={"name": "base"})
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        callbacks=[LastCheckpoint(tmp_path / "checkpoints"), _Interrupt(signum)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    signals = agree_on_stop_signals(trainer)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SIGTERMException):
        trainer.fit(module, datamodule=data)
    assert signal.getsignal(signal.SIGINT) is before
    assert (signals.stop_signal, signals.stop_noted_here) == (signum, True)
    assert stopped(signals, trainer, []).code == status
    with caplog.at_level(logging.WARNING):
        stopped(signals, trainer, [tmp_path / "checkpoints" / "last.ckpt"])
    assert f"rerun with hydra.run.dir={tmp_path} (or ckpt_path=" in caplog.text  # the run dir to resume in
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 1)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 1


@pytest.mark.slow
def test_slurm_requeue_resumes_in_the_same_dir(tmp_path: Path) -> None:
    """SLURM simulated: SIGUSR1 at step 1 (Lightning saves hpc_ckpt_1 and calls scontrol requeue), SIGTERM at
    step 3 (mid epoch 1: last.ckpt, exit 143); the requeued run (same job id) resumes in the same dir from
    the newest checkpoint and ends like an uninterrupted run (4 steps, deploy.pt written)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(0o755)
    env = isolated_env(
        tmp_path / "home",
        **SLURM_ENV,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    # The requeued job runs the same command: its signal steps (1, 3) lie behind the resumed step.
    args = [
        *TINY_RUN,
        "logger=none",
        "block=base",
        "trainer.max_epochs=2",
        "+callbacks.signals._target_=signal_callback.SendSignals",
        "+callbacks.signals.at='1:SIGUSR1,3:SIGTERM'",
    ]
    first = run_train(args, tmp_path, env)
    output = first.stdout + first.stderr
    assert first.returncode == 143, output[-3000:]
    (run,) = (tmp_path / "outputs" / "train").glob("slurm-4242-*")
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (hpc["global_step"], last["global_step"]) == (1, 3)
    assert not (run / "deploy").exists()  # a stopped run leaves nothing that looks finished
    assert "SIGTERM: training stopped at epoch 1, step 3" in output

    second = run_train(args, tmp_path, env)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in output
    assert [p.name for p in (tmp_path / "outputs" / "train").iterdir()] == [run.name]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert (run / "deploy" / "deploy.pt").is_file()
    report = json.loads((run / "deploy" / "report.json").read_text())
    assert report["source"] == str(run / "checkpoints" / "last.ckpt") and report["global_step"] == 4
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]  # no second signal
