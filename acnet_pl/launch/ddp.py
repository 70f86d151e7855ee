"""DDP inside a Hydra app: start the other ranks of THIS job (not the whole command line) and supervise them.

Relied on (lightning 2.6, hydra-core 1.3; tests/test_launch.py fails when they change): the private
`_SubprocessScriptLauncher` (its constructor, attributes, `launch()` mirrored here without its observer,
which SIGKILLs this process, the Hydra process of a multirun, when any rank exits non-zero, and
`_call_children_scripts()` mirrored with another command line), `trainer.strategy._launcher` (replaced
here), the class path of Hydra's basic launcher and the run's `HydraConfig`.
"""

from __future__ import annotations

import _thread
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

import __main__

#: The job's Hydra overrides a rank does not take (it runs the job, in its dir, in run mode).
_NOT_FOR_RANKS = tuple(
    "hydra.mode hydra.run hydra.sweep hydra.sweeper hydra/sweeper hydra.launcher hydra/launcher "  # noqa: SIM905
    "hydra.job.name hydra.output_subdir".split()
)
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
#: The `_target_` of hydra/launcher=basic (runs jobs one after another in this process).
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
#: Seconds the other ranks get to end by themselves once one rank failed, before they are killed (`ddp_grace_s`).
GRACE_S = 60.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RankFailed(RuntimeError):
    """Another rank of this DDP job failed first; the job exits with that rank's status.

    `printed`: the rank printed its own error line (it exited with a status, not killed by a signal)."""

    def __init__(self, rank: int, returncode: int) -> None:
        self.rank = rank
        self.printed = returncode > 0
        self.exit_code = returncode if returncode > 0 else 128 - returncode
        how = (
            f"exited with status {returncode}; its error is above"
            if returncode > 0
            else f"was killed by {signal.Signals(-returncode).name}"
        )
        super().__init__(f"DDP rank {rank} {how}")


def lost_another_rank(error: BaseException | None) -> bool:
    """True for the error a collective raises when another rank has gone (gloo: connection closed/reset)."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and ("/gloo/" in str(error) or "NCCL" in str(error))


def _die_with_parent() -> None:
    # Runs in the new rank before exec: the kernel SIGKILLs it when the launching process dies (Linux),
    # so a killed launcher leaves no rank running on its own.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _config_flags(argv: list[str]) -> list[str]:
    """The config-location flags of a Hydra command line (all that is kept besides the overrides)."""
    kept = []
    for arg, after in zip(argv, [*argv[1:], None], strict=True):
        if arg.split("=", 1)[0] in _CONFIG_FLAGS and "=" in arg:
            kept.append(arg)
        elif arg in _CONFIG_FLAGS and after is not None:
            kept += [arg, after]
    return kept


def hydra_rank_command(local_rank: int) -> tuple[list[str], str]:
    """Command line (and cwd) that runs the current Hydra job again as DDP rank `local_rank`.

    Lightning's own launcher re-runs `sys.argv`; inside a multirun that is the whole sweep again
    (Lightning issue #11300). Here the job's own overrides run in run mode, in the job's output dir
    without a second `.hydra/`, so every rank sees the same config and no rank makes a run dir of its own.
    """
    hc = HydraConfig.get()
    spec = getattr(__main__, "__spec__", None)
    script = [to_absolute_path(sys.argv[0])] if spec is None else ["-m", spec.name]
    hydra = [o for o in hc.overrides.hydra if not o.split("=", 1)[0].lstrip("+~").startswith(_NOT_FOR_RANKS)]
    rank = [
        "hydra.mode=RUN",
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    command = [sys.executable, *script, *_config_flags(sys.argv[1:]), *hc.overrides.task, *hydra, *rank]
    return command, get_original_cwd()


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess DDP launcher, starting the other ranks with `hydra_rank_command`.

    It supervises them instead of Lightning's observer: once a rank exits non-zero, the others get
    `grace_s` seconds to end by themselves (with gloo they see the lost rank at their next collective);
    then they are killed and this one is interrupted (e.g. waiting in an NCCL collective). This process
    is never killed: in a multirun it runs the next job, after `cleanup()` undid what the launch did.
    """

    _ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")

    def __init__(self, launcher: _SubprocessScriptLauncher, grace_s: float = GRACE_S) -> None:
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self.grace_s = float(grace_s)
        self._saved_env = {key: os.environ.get(key) for key in self._ENV_KEYS}
        self._saved_threads = torch.get_num_threads()
        self._failure: tuple[int, int] | None = None  # (rank, returncode) of the first rank seen failing
        self._done = threading.Event()
        self._interrupted = False

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        """Start the other ranks and their supervisor, then run `function` as rank 0."""
        # Mirrors _SubprocessScriptLauncher.launch (pinned by tests/test_launch.py) with the supervisor
        # instead of _launch_process_observer; use_hydra_job_launcher only swaps in when this process
        # creates the ranks.
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        self._call_children_scripts()
        threading.Thread(target=self._supervise, daemon=True, name="ddp-rank-supervisor").start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _note_failures(self) -> None:
        if self._failure is None:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll():
                    self._failure = (rank, proc.returncode)
                    return

    def _supervise(self) -> None:
        while not self._done.wait(0.5):
            self._note_failures()
            if self._failure is not None:
                if not self._done.wait(self.grace_s):
                    self._stop_children()
                    self._interrupted = True
                    _thread.interrupt_main()  # KeyboardInterrupt once this rank is back in Python
                return

    def _wait_children(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            self._note_failures()
            time.sleep(0.2)
        self._note_failures()

    def _stop_children(self) -> None:
        """SIGTERM the ranks still running, SIGKILL those that are still there 5 s later."""
        running = [p for p in self.procs if p.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + 5
        for proc in running:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _call_children_scripts(self) -> None:
        # Mirrors lightning.pytorch's _SubprocessScriptLauncher._call_children_scripts (lightning 2.6; its
        # source is pinned by tests/test_launch.py), with the command line of this Hydra job.
        self._check_can_spawn_children()
        self.procs = []
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env_copy = os.environ.copy()
            env_copy["LOCAL_RANK"] = f"{local_rank}"
            if os.environ.get("PL_GLOBAL_SEED") is None and "PL_GLOBAL_SEED" in env_copy:
                del env_copy["PL_GLOBAL_SEED"]
            command, cwd = hydra_rank_command(local_rank)
            self.procs.append(subprocess.Popen(command, env=env_copy, cwd=cwd, preexec_fn=_die_with_parent))

    def cleanup(self, error: BaseException | None = None) -> None:
        """Wait for the other ranks (`grace_s`, then kill them) and restore this process; `RankFailed` when
        another rank failed first and ended this one's `error` (lost the rank, interrupted, or none)."""
        self._done.set()
        self._wait_children(min(5.0, self.grace_s))  # ranks that stop together with this one (a signal)
        if error is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Closes this rank's connections: the others' collectives fail now, not at the 30-min timeout.
            torch.distributed.destroy_process_group()
        self._wait_children(self.grace_s)
        self._stop_children()
        self.procs = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(self._saved_threads)
        ended_by_it = error is None or lost_another_rank(error) or self._interrupted
        if self._failure is not None and ended_by_it:
            raise RankFailed(*self._failure) from None


def use_hydra_job_launcher(trainer: L.Trainer, grace_s: float = GRACE_S) -> HydraJobLauncher | None:
    """Swap in `HydraJobLauncher` when this process is about to start DDP ranks from inside a Hydra app.

    ValueError at once under a Hydra launcher whose jobs cannot start ranks (joblib, submitit_local, ...).
    """
    launcher = getattr(trainer.strategy, "_launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.num_processes < 2:
        return None
    if launcher.cluster_environment.creates_processes_externally or not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and hc.launcher.get("_target_") != BASIC_LAUNCHER:
        raise ValueError(
            f"trainer.devices={launcher.num_processes} (DDP) cannot start its processes under "
            f"hydra/launcher={hc.runtime.choices.get('hydra/launcher')}; run the multirun with the default "
            f"launcher (jobs one after another, each with {launcher.num_processes} DDP processes) or with "
            f"hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml: one SLURM task per rank)"
        )
    hydra_launcher = HydraJobLauncher(launcher, grace_s)
    trainer.strategy._launcher = hydra_launcher
    return hydra_launcher
