"""DDP inside a Hydra app: start the other ranks of THIS job, not the whole command line again.

Lightning internals relied on (lightning 2.6, pinned in pyproject.toml; tests/test_launch.py fails when
they change):
- `lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher` (private): its
  `__init__(cluster_environment, num_processes, num_nodes)`, the attributes `cluster_environment`,
  `num_processes`, `num_nodes`, `procs`, and `launch()` calling `_call_children_scripts()` (mirrored
  here with another command line) and `_check_can_spawn_children()`.
- `trainer.strategy._launcher` (private): where the DDP strategy keeps its launcher; replaced here.
Hydra internals (hydra-core 1.3): the class path of the basic launcher, `BASIC_LAUNCHER`; the run's
`HydraConfig` (overrides, output dir, job name, mode, launcher).
"""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

import __main__

_HYDRA_KEYS_NOT_FOR_RANKS = (
    "hydra.mode",
    "hydra.run",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.job.name",
    "hydra.output_subdir",
)
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
#: The `_target_` of hydra/launcher=basic (runs jobs one after another in this process).
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _config_flags(argv: list[str]) -> list[str]:
    """The config-location flags of a Hydra command line (all that is kept besides the overrides)."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in _CONFIG_FLAGS:
            if "=" in arg:
                kept.append(arg)
            elif i + 1 < len(argv):
                kept += [arg, argv[i + 1]]
                i += 1
        i += 1
    return kept


def hydra_rank_command(local_rank: int) -> tuple[list[str], str]:
    """Command line (and cwd) that runs the current Hydra job again as DDP rank `local_rank`.

    Lightning's own launcher re-runs `sys.argv`; inside a multirun that is the whole sweep again
    (Lightning issue #11300). Here the job's own overrides are used instead, in run mode, writing into
    the job's output dir without a second `.hydra/` folder, so every rank sees the same config and no
    rank creates a run dir of its own.
    """
    hc = HydraConfig.get()
    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", spec.name]
    command += _config_flags(sys.argv[1:])
    command += list(hc.overrides.task)
    for override in hc.overrides.hydra:
        key = override.split("=", 1)[0].lstrip("+~")
        if not key.startswith(_HYDRA_KEYS_NOT_FOR_RANKS):
            command.append(override)
    command += [
        "hydra.mode=RUN",
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess DDP launcher, starting the other ranks with `hydra_rank_command`.

    Also undoes what the launch did to this process (environment, process group) in `cleanup()`, so the
    next job of a multirun starts its own ranks instead of believing it is one of them.
    """

    _ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")

    def __init__(self, launcher: _SubprocessScriptLauncher) -> None:
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self._saved_env = {key: os.environ.get(key) for key in self._ENV_KEYS}
        self._saved_threads = torch.get_num_threads()

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
            self.procs.append(subprocess.Popen(command, env=env_copy, cwd=cwd))

    def cleanup(self) -> None:
        """Wait for the other ranks, then restore this process's environment and drop the process group."""
        for proc in self.procs:
            proc.wait()
        self.procs = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(self._saved_threads)


def use_hydra_job_launcher(trainer: L.Trainer) -> HydraJobLauncher | None:
    """Swap in `HydraJobLauncher` when this process is about to start DDP ranks from inside a Hydra app.

    Raises ValueError at once when the Hydra launcher runs jobs where the ranks cannot be started
    (anything but the default launcher starting processes itself, e.g. joblib or submitit_local).
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
    hydra_launcher = HydraJobLauncher(launcher)
    trainer.strategy._launcher = hydra_launcher
    return hydra_launcher
