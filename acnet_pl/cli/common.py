"""What the command line entry points share: one-line user errors (exit 2), config resolvers, logging."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from acnet_pl.launch.preemption import run_id

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status of a run stopped by a problem the user can fix (argparse uses 2 for the same reason).
USER_ERROR_EXIT_CODE = 2


def auto_precision(accelerator: str = "auto") -> str:
    """Trainer precision for `accelerator`: bf16-mixed on a CUDA GPU (16-mixed without bf16), else 32-true."""
    import torch  # only when a config resolves it: the CLIs' argument checks answer before torch loads

    if str(accelerator) not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def register_resolvers() -> None:
    """OmegaConf resolvers of conf/: `${acnet.precision:${trainer.accelerator}}`, `${acnet.run_id:}` (the
    run-dir name, cached per config like Hydra's `now`: one value per run)."""
    OmegaConf.register_new_resolver("acnet.precision", auto_precision, replace=True)
    OmegaConf.register_new_resolver("acnet.run_id", run_id, use_cache=True, replace=True)


def log_lightning_once() -> None:
    """Drop the console handler `import lightning` adds when the root logger (Hydra's) already has handlers:
    Lightning's messages would reach the console twice."""
    if not logging.getLogger().hasHandlers():
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Lightning's settings errors (e.g. enable_progress_bar=false with a progress bar callback) and a
    # checkpoint that cannot be written (read-only or full disk); looked up, not imported, so that a CLI
    # that never loaded Lightning does not load it to report an error.
    loaded = (
        getattr(sys.modules.get(module), name, None)
        for module, name in (
            ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
            ("acnet_pl.training.checkpointing", "CheckpointWriteError"),
        )
    )
    return (ValueError, FileNotFoundError, OmegaConfBaseException, *(t for t in loaded if t is not None))


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user-caused error, or None when `error` is not one (a bug: keep the traceback).

    Hydra's `InstantiationException` is unwrapped: its cause is what the user needs to read.
    """
    user_types = _user_error_types()
    if isinstance(error, InstantiationException):
        cause = error.__cause__
        # A config key the instantiated class does not take (`+data.device_batches=true` on data=imagefolder):
        # Hydra reports it as a TypeError of the constructor under `full_key`.
        found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(cause))
        group = re.search(r"full_key: ([\w.]+)", str(error))
        if isinstance(cause, TypeError) and found is not None and group is not None:
            name, option = found.groups()
            key = f"{group.group(1)}.{option}"
            return f"{key}: {name} takes no option {option!r}; remove it (~{key} on the command line)"
        if cause is not None and not isinstance(cause, user_types):
            return None
        error = cause if cause is not None else error
    elif not isinstance(error, user_types):
        return None
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


class JobFailed(CompactHydraException):
    """A job of a multirun failed (its error line is printed): Hydra records it and runs the next job.

    At the end Hydra raises the first one and prints its text, which names every failed job of the sweep.
    """

    #: "#<job number> (<overrides>): exit <status>, <error>" of every failed job of this process's sweep.
    failed: ClassVar[list[str]] = []

    def __init__(self, exit_code: int, message: str) -> None:
        self.exit_code = exit_code
        job = HydraConfig.get().job if HydraConfig.initialized() else None
        name = f"#{job.num} ({job.override_dirname})" if job is not None else "a job"
        JobFailed.failed.append(f"{name}: exit {exit_code}, {message}")
        super().__init__(message)

    def __str__(self) -> str:
        return f"{len(JobFailed.failed)} job(s) of this sweep failed: " + "; ".join(JobFailed.failed)


def _failure(error: Exception) -> tuple[int, str, bool] | None:
    """(exit status, one-line message, printed already) of an error that ends a run, or None (a bug)."""
    # Looked up, not imported: a CLI that never loaded these modules cannot have raised their errors.
    divergence = sys.modules.get("acnet_pl.training.callbacks.divergence")
    ddp = sys.modules.get("acnet_pl.launch.ddp")
    if divergence is not None and isinstance(error, divergence.TrainingDiverged):
        return int(error.exit_code), " ".join(str(error).split()), bool(getattr(error, "quiet", False))
    stop_signals = sys.modules.get("acnet_pl.launch.stop_signals")
    if (ddp is not None and isinstance(error, ddp.RankFailed)) or (
        stop_signals is not None and isinstance(error, stop_signals.StoppedElsewhere)
    ):
        return error.exit_code, str(error), error.printed
    if ddp is not None and ddp.lost_another_rank(error) and not is_launching_process():
        # Another rank failed (its own line says why); the rank that started this one reports it.
        return 1, f"lost another DDP rank: {' '.join(str(error).split())[:200]}", True
    message = user_error_message(error)
    return None if message is None else (USER_ERROR_EXIT_CODE, message, False)


def skip_shutdown_collection() -> None:
    """At interpreter exit, let the garbage collector skip what is still alive (`gc.freeze` as an exit hook).

    CPython's shutdown runs full collections over every tracked object: after importing torch and Lightning,
    some 430,000 of them and about 1 s on 2 cores, once the command's work is done. Files, loggers and
    workers are closed explicitly before then (atexit hooks registered after this one run before it). Only
    for a command's process: within it, Hydra's multirun jobs still collect each other's garbage.
    """
    atexit.register(gc.freeze)


@contextlib.contextmanager
def imports_without_collection() -> Iterator[None]:
    """Import a command's heavy modules (torch, Lightning, ...) without the garbage collector's passes, then
    freeze what they left (`gc.freeze`): later collections do not traverse it.

    With collections on, importing them runs seven full collections, each over the growing set of their
    objects (about 1 s of a 5 s start on 2 cores), and the first one in the run traverses all ~450,000
    again (0.3 s). Their few cycles of garbage stay (about 9 MB). Once per process: a later multirun job
    imports nothing new, and a freeze then would also keep the previous job's garbage.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def is_launching_process() -> bool:
    """False in a DDP rank started by another process (Lightning, torchrun, srun; before the trainer sets
    ranks: LOCAL_RANK / NODE_RANK / SLURM_PROCID)."""
    return all(os.environ.get(key, "0") == "0" for key in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_user_error(fn: F) -> F:
    """Decorate a CLI entry point: an error that ends a run is one line `error: <message>` and an exit status.

    User errors exit 2, a diverged run 3, a DDP job with a failed rank that rank's status (only that rank
    prints, naming itself). In a multirun the job raises `JobFailed` instead and the sweep goes on. Bugs
    keep their traceback, as do user errors with HYDRA_FULL_ERROR=1.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            failure = _failure(error)
            multirun = _in_multirun()
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or (failure is None and not multirun):
                raise
            if failure is None:  # a bug in a multirun job: its traceback now, the sweep goes on
                traceback.print_exc()
                failure = (1, f"{type(error).__name__}: {error}", True)
            code, message, printed = failure
            rank = getattr(error, "ddp_rank", None)
            if rank is not None:
                message = f"[rank {rank}] {message}"
            sys.stdout.flush()
            if not printed:
                print(f"error: {message}", file=sys.stderr, flush=True)
            if multirun:
                raise JobFailed(code, message) from None
            sys.exit(code)

    return wrapper  # type: ignore[return-value]
