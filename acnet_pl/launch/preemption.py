"""Stop signals and SLURM preemption, on top of Lightning's own signal handling (lightning 2.6, pinned).

The one module that relies on how Lightning treats signals; tests/test_preemption.py pins each of
these behaviours and fails when Lightning changes them (tests/test_launch.py: the installed version):

- During `fit`, Lightning's SIGTERM handler sets `trainer.received_sigterm`; the loops then raise
  `SIGTERMException` at the next batch end, after the callbacks' `on_exception` ran. It is a SystemExit
  without a code: the process would exit 0, as if training had finished.
- SIGINT raises KeyboardInterrupt wherever the process is (also in the middle of an optimizer step);
  Lightning then exits 1.
- Under SLURM (`SLURMEnvironment`, auto_requeue on) SIGUSR1 saves `<default_root_dir>/hpc_ckpt_<n>.ckpt`
  and runs `scontrol requeue <job>`; a SIGTERM follows when the job is requeued.

What this module adds:
- `StopSignals`: SIGINT goes Lightning's SIGTERM way (stop at the next batch end, `LastCheckpoint` saves),
  a second SIGINT stops at once, and the run exits 128 + signal (SIGTERM 143, SIGINT 130).
- `run_id()`: the run-dir name, `slurm-<job id>[_<array task>]-<hash of the overrides>` in a SLURM batch
  job (the same after a requeue, so the job finds its checkpoints) and `<date>_<time>.<ms>_<pid>`
  elsewhere (never shared).
- `resume_candidates()`: what a run dir holds to resume from (`last*.ckpt`, Lightning's `hpc_ckpt_*`).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

#: SLURM_JOB_NAME of an interactive allocation: Lightning does not treat those as SLURM-managed jobs.
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")
#: Lightning's name of its SLURM requeue checkpoints: `<default_root_dir>/hpc_ckpt_<n>.ckpt`.
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


def slurm_job_name() -> str | None:
    """`slurm-<job id>` (`slurm-<array job>_<task>` for an array task) in a SLURM batch job, else None.

    A job keeps its id when it is requeued. Same rule as Lightning's `SLURMEnvironment.detect()`:
    SLURM_NTASKS set and not an interactive allocation (job name bash/interactive).
    """
    env = os.environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in _INTERACTIVE_JOB_NAMES:
        return None
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"slurm-{array_job}_{array_task}"
    job = env.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def run_id(overrides: str = "") -> str:
    """Name of a run dir: in a SLURM batch job `<slurm_job_name>-<hash of overrides>`, else time (ms) + pid.

    The `acnet.run_id` resolver of conf/hydra/default.yaml, given Hydra's `override_dirname`. A requeued
    job runs the same command again, so it finds its dir; two `train.py` calls with other overrides in
    one job script (`for seed in 0 1 2`) get dirs of their own instead of resuming each other. Outside
    SLURM, two runs started in the same second on one machine differ by pid; the tasks of one SLURM job
    (DDP ranks started by srun) share the job's dir.
    """
    job = slurm_job_name()
    if job is not None:
        return f"{job}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"
    now = datetime.datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S}.{now.microsecond // 1000:03d}_{os.getpid()}"


def resume_candidates(checkpoint_dirs: list[str | os.PathLike], root_dir: str | os.PathLike) -> list[Path]:
    """The files a run dir holds to resume from: `last*.ckpt` in `checkpoint_dirs`, `hpc_ckpt_*` in `root_dir`."""
    found: list[Path] = []
    for folder in checkpoint_dirs:
        found += sorted(Path(folder).glob("last*.ckpt"))
    found += sorted(Path(root_dir).glob(HPC_CHECKPOINT_GLOB))
    return found


class StopSignals:
    """Context around `trainer.fit`: SIGINT stops like SIGTERM; `exit_status()` is 128 + the signal.

    Inside `fit` Lightning has installed its SIGTERM handler; a first SIGINT calls it (training stops at
    the next batch end and `LastCheckpoint` saves), a second one raises KeyboardInterrupt at once.
    Outside `fit` (no Lightning handler) SIGINT raises KeyboardInterrupt as usual.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.SIGINT
        # The next Ctrl+C is for stopping now.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sigterm_handler = signal.getsignal(signal.SIGTERM)
        # Lightning's handler (installed for the duration of fit) stops at the batch end; any other
        # SIGTERM handler (e.g. submitit's, which ignores SIGTERM) would not stop anything.
        if callable(sigterm_handler) and type(sigterm_handler).__module__.startswith("lightning."):
            log.warning(
                "SIGINT: stopping at the end of this batch after saving last.ckpt (Ctrl+C again: now)"
            )
            sigterm_handler(signal.SIGTERM, frame)
        else:
            raise KeyboardInterrupt

    def exit_status(self) -> int:
        """128 + the signal that stopped training: 130 for SIGINT, 143 for SIGTERM (the shell's convention)."""
        return 128 + int(self.received if self.received is not None else signal.SIGTERM)

    def signal_name(self) -> str:
        """SIGINT or SIGTERM."""
        return signal.Signals(self.exit_status() - 128).name


def is_stop_exception(error: BaseException) -> bool:
    """True for Lightning's SIGTERMException (training stopped by a signal at a batch end)."""
    # Not at the top: cli.py imports this module (run_id) before a CLI loads Lightning.
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(error, SIGTERMException)


def stopped(stop: StopSignals, trainer: Any, checkpoints: list[Path]) -> SystemExit:
    """Log where a stopped run left its state; the SystemExit with the signal's exit status to raise."""
    saved = [p for p in checkpoints if p.is_file()]
    if saved:
        run_dir = saved[0].parent.parent if saved[0].parent.name == "checkpoints" else saved[0].parent
        where = (
            f"{saved[0]} holds it: rerun with hydra.run.dir={run_dir} (or ckpt_path={saved[0]}) to resume; "
            "a requeued SLURM job resumes by itself"
        )
    else:
        where = "no LastCheckpoint callback is configured, nothing was saved"
    log.warning(
        f"{stop.signal_name()}: training stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; "
        f"{where}"
    )
    return SystemExit(stop.exit_status())
