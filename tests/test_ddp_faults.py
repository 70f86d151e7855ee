"""DDP under faults, through train.py with 2 CPU ranks (gloo): what a user sees when one rank fails or stops.

Faults come from tests/fault_callback.py (one rank, one step). Each run takes 20-40 s on 2 cores, so
each test combines its assertions on one or two runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_RUN, isolated_env, run_train

pytestmark = pytest.mark.slow

#: TINY_RUN on 2 ranks: 8 images per rank and batch, 2 batches per epoch, checkpoints in run/checkpoints.
DDP_RUN = [*TINY_RUN, "logger=none", "trainer.devices=2", "hydra.run.dir=run", "ddp_grace_s=20"]


def _fault(do: str, rank: int, step: int) -> list[str]:
    return [
        "+callbacks.fault._target_=fault_callback.Fault",
        f"+callbacks.fault.do={do}",
        f"+callbacks.fault.rank={rank}",
        f"+callbacks.fault.step={step}",
    ]


def _train(args: list[str], cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """train.py in a session of its own (a signal to its process group reaches nothing else); seconds taken."""
    tests = str(REPO_ROOT / "tests")
    env = isolated_env(cwd / "home", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    proc = run_train(args, cwd, env, timeout, start_new_session=True)
    return proc, time.monotonic() - start


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _running_in(folder: Path) -> list[str]:
    """Command lines of the processes still running with `folder` in them (orphaned ranks)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in text and "pytest" not in text:
            found.append(text)
    return found


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """Issue 16's finding 1 (tiny): job 0 (lr 1e9) diverges on its 2 ranks, job 1 runs to its deploy.pt; the
    sweep ends non-zero with one line naming job 0, the job's error line printed once with its rank, no rank
    left running."""
    args = [
        "-m",
        "experiment=quickstart",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "optimizer.lr=1e9,0.1",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=3",
        "++trainer.limit_val_batches=2",
        "~callbacks.diagnostics",
        "~callbacks.rich_progress_bar",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc, _ = _train(args, tmp_path)
    sweep = tmp_path / "sweep"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (sweep / "1" / "deploy" / "deploy.pt").is_file(), proc.stderr[-3000:]
    assert not (sweep / "0" / "deploy" / "deploy.pt").exists()
    (line,) = _error_lines(proc)
    assert line.startswith("error: [rank ") and "training diverged: the training loss is nan" in line
    (summary,) = [line for line in proc.stderr.splitlines() if "of this sweep failed" in line]
    assert summary.startswith("1 job(s) of this sweep failed: #0 (") and "exit 3, [rank " in summary
    assert "Traceback" not in proc.stderr
    assert _running_in(sweep) == []


def test_an_error_on_one_rank_ends_every_rank_with_its_line(tmp_path: Path) -> None:
    """A ValueError on rank 1 at step 1: rank 0 (in a collective) ends too, exit 2, one line naming rank 1;
    rank 1 killed by SIGKILL instead: exit 137, rank 0 names it."""
    proc, seconds = _train([*DDP_RUN, *_fault("raise", rank=1, step=1)], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _error_lines(proc) == ["error: [rank 1] injected fault on rank 1 at step 1"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "deploy" / "deploy.pt").exists()
    assert _running_in(tmp_path / "run") == []
    print(f"rank-1 error: {seconds:.0f} s")

    # A rank killed without a word (the OOM killer): the launching process says which, exit 128 + 9.
    proc, _ = _train([*DDP_RUN, "hydra.run.dir=killed", *_fault("SIGKILL", rank=1, step=1)], tmp_path)
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert _error_lines(proc) == ["error: DDP rank 1 was killed by SIGKILL"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_a_nan_loss_on_one_rank_stops_both_with_that_ranks_line(tmp_path: Path) -> None:
    """NaN inputs on rank 1 at step 1: both ranks stop at the divergence check, exit 3, one line naming rank 1."""
    proc, _ = _train([*DDP_RUN, *_fault("nan", rank=1, step=1)], tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert line.startswith("error: [rank 1] training diverged: the training loss is nan at step 1 ")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "deploy" / "deploy.pt").exists()


def test_a_checkpoint_write_failing_on_rank_0_ends_the_run_with_one_line(tmp_path: Path) -> None:
    """ENOSPC on rank 0's checkpoint writes (the other rank waits in a collective): exit 2 with rank 0's one
    line in under 2 minutes (the process-group timeout is 30 min), no checkpoint or deploy file left."""
    proc, seconds = _train([*DDP_RUN, *_fault("enospc", rank=0, step=0)], tmp_path, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert line.startswith("error: [rank 0] cannot write checkpoint") and "No space left on device" in line
    assert "Traceback" not in proc.stderr
    assert seconds < 120
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
    assert not (tmp_path / "run" / "deploy" / "deploy.pt").exists()
    assert _running_in(tmp_path / "run") == []
    print(f"rank-0 ENOSPC: {seconds:.0f} s to exit 2")


def _weights(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"global_step": ckpt["global_step"], **ckpt["state_dict"]}


def test_a_stop_signal_stops_every_rank_at_one_step_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGTERM to rank 1 only at step 2 (the end of epoch 0): both ranks stop there, one last.ckpt, exit 143; the rerun resumes and
    ends with the uninterrupted run's weights. SIGINT to the process group at step 1: exit 130, last.ckpt."""
    args = [*DDP_RUN, "trainer.max_epochs=2", "trainer.deterministic=true"]
    reference, _ = _train([*args, "hydra.run.dir=reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    stopped, seconds = _train([*args, *_fault("SIGTERM", rank=1, step=2)], tmp_path)
    run = tmp_path / "run"
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert _error_lines(stopped) == [] and "Traceback" not in stopped.stderr
    for log in ("train.log", "train_ddp_rank1.log"):
        assert "SIGTERM: training stopped at epoch 1, step 2" in (run / log).read_text(), log
    assert [p.name for p in (run / "checkpoints").glob("*last*")] == ["last.ckpt"]  # no temp file, no copy
    assert _weights(run)["global_step"] == 2
    assert not (run / "deploy" / "deploy.pt").exists()

    resumed, _ = _train(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in resumed.stdout
    ours, theirs = _weights(run), _weights(tmp_path / "reference")
    assert ours["global_step"] == theirs["global_step"] == 4
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.allclose(ours[key], value, rtol=1e-6, atol=1e-7), key
    assert (run / "deploy" / "deploy.pt").is_file()

    group, _ = _train([*args, "hydra.run.dir=group", *_fault("group:SIGINT", rank=0, step=1)], tmp_path)
    assert group.returncode == 130, group.stderr[-3000:]
    assert _weights(tmp_path / "group")["global_step"] == 1
    assert _running_in(tmp_path) == []
    print(f"rank-1 SIGTERM: {seconds:.0f} s to exit 143")
