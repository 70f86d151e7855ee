"""SLURM preemption and run dirs: where a requeued or rerun job finds what to resume from.

Relied on: Lightning's name of its SLURM requeue checkpoints (pinned by tests/test_preemption.py).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

#: SLURM_JOB_NAME of an interactive allocation: Lightning does not treat those as SLURM-managed jobs.
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")
#: Lightning's name of its SLURM requeue checkpoints: `<default_root_dir>/hpc_ckpt_<n>.ckpt`.
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


def slurm_job_name() -> str | None:
    """`slurm-<job id>` (`slurm-<array job>_<task>` for an array task) in a SLURM batch job, else None.

    Kept when the job is requeued. Lightning's rule (`SLURMEnvironment.detect()`): SLURM_NTASKS set, and
    not an interactive allocation."""
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
    job runs the same command again, so it finds its dir; `for seed in 0 1 2` in one job script gets a
    dir per seed; the tasks of one SLURM job (DDP ranks started by srun) share the job's dir.
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
