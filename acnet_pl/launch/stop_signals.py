"""Stop signals under DDP: every rank acts on a signal at the same step (lightning 2.6, pinned).

Relied on (tests/test_launch.py pins the private parts; tests/test_preemption.py, test_ddp_faults.py the
behaviours): `trainer._signal_connector` (private `_SignalConnector`) installs the handlers for `fit`.
Its SIGTERM handler broadcasts from inside the handler and forwards SIGTERM to the ranks it launched, so
a signal to the process group makes collectives that do not match: a hang. Its SLURM requeue handler
(`_slurm_sigusr_handler_fn`) saves `hpc_ckpt_<n>.ckpt` (a collective too) and runs `scontrol requeue`.
The loops raise `SIGTERMException` (a SystemExit without a code: exit 0, as if training had finished)
at the batch end once `trainer.received_sigterm` is set. SIGINT raises KeyboardInterrupt wherever the
process is; Lightning then SIGKILLs the ranks it launched and exits 1. Here a signal is only noted; the
ranks agree at each batch end and act together; `stopped()` is the exit, 128 + signal.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from acnet_pl.utils.files import run_dir

log = logging.getLogger(__name__)


class AgreedStopSignals(_SignalConnector):
    """Lightning's signal connector for `fit`, with handlers that only note the signal; ranks act together.

    Noted: SIGTERM, SIGINT and, in a SLURM job with auto-requeue, the requeue signal. At every training
    batch end `agree()` all-reduces what each rank noted: the requeue signal runs Lightning's requeue
    handler once; SIGTERM/SIGINT set `received_sigterm`, so Lightning stops every rank at this batch end
    and `LastCheckpoint` writes `last.ckpt` once. A second SIGINT stops at once (KeyboardInterrupt).
    """

    def register_signal_handlers(self) -> None:
        """Note the stop signals until `teardown` restores the previous handlers."""
        self.received_sigterm = False
        self.noted: set[int] = set()
        self.stop_signal: int | None = None  # the agreed signal that stops training
        self.stop_noted_here = False  # that signal reached this process (not only another rank)
        self._original_handlers = self._get_current_signal_handlers()
        env = self.trainer._accelerator_connector.cluster_environment
        slurm = isinstance(env, SLURMEnvironment) and env.auto_requeue
        self._requeue = int(env.requeue_signal) if slurm and env.requeue_signal else 0
        self._requeued = False
        for signum in (signal.SIGTERM, signal.SIGINT, self._requeue):
            if signum:
                self._register_signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.noted:
            raise KeyboardInterrupt
        if signum != self._requeue:
            again = " (Ctrl+C again: now)" if signum == signal.SIGINT else ""
            log.warning(f"{signal.Signals(signum).name}: stopping after this batch, saving last.ckpt{again}")
        self.noted.add(signum)

    def agree(self) -> None:
        """Act on the signals any rank noted (every rank calls this at the same training batch end)."""
        signals = (signal.SIGTERM, signal.SIGINT, self._requeue)
        flags = [int(s in self.noted) for s in signals]
        if self.trainer.world_size > 1:
            # A host read per step, as Lightning's own per-step broadcast of its SIGTERM flag under DDP.
            strategy = self.trainer.strategy
            flags = strategy.reduce(
                torch.tensor(flags, device=strategy.root_device), reduce_op="max"
            ).tolist()
        agreed = {s for s, flag in zip(signals, flags, strict=True) if flag and s}
        if self._requeue in agreed and not self._requeued:
            self._requeued = True
            self._slurm_sigusr_handler_fn(self._requeue, None)  # saves (all ranks), requeues (rank 0)
        stop = next((s for s in (signal.SIGINT, signal.SIGTERM) if s in agreed), None)
        if stop is not None and not self.received_sigterm:
            self.stop_signal, self.stop_noted_here = int(stop), stop in self.noted
            self.received_sigterm = True


class StopAgreement(Callback):
    """Calls `AgreedStopSignals.agree()` at every training batch end (one all-reduce of 3 flags per step)."""

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        """Act on the noted stop signals, the same on every rank."""
        trainer._signal_connector.agree()


def agree_on_stop_signals(trainer: Any) -> AgreedStopSignals:
    """Swap in `AgreedStopSignals` as `trainer._signal_connector` and add `StopAgreement` to the callbacks."""
    trainer._signal_connector = AgreedStopSignals(trainer)
    trainer.callbacks.append(StopAgreement())
    return trainer._signal_connector


class StoppedElsewhere(RuntimeError):
    """Training stopped on a signal that reached another rank only: this job stops (in a multirun the
    sweep goes on), while a signal to the launching process stops everything (SystemExit)."""

    printed = True  # the stop was logged

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"stopped by {signal.Signals(exit_code - 128).name} sent to another DDP rank")


def is_stop_exception(error: BaseException) -> bool:
    """True for Lightning's SIGTERMException (training stopped by a signal at a batch end)."""
    return isinstance(error, SIGTERMException)


def stopped(signals: AgreedStopSignals, trainer: Any, checkpoints: list[Path]) -> BaseException:
    """Log where a stopped run left its state; the exception to raise: exit status 128 + the signal."""
    signum = signals.stop_signal or signal.SIGTERM
    saved = [p for p in checkpoints if p.is_file()]
    if saved:
        where = (
            f"{saved[0]} holds it: rerun with hydra.run.dir={run_dir(saved[0])} (or ckpt_path={saved[0]}) to resume; "
            "a requeued SLURM job resumes by itself"
        )
    else:
        where = "no LastCheckpoint callback is configured, nothing was saved"
    log.warning(
        f"{signal.Signals(signum).name}: training stopped at epoch {trainer.current_epoch}, "
        f"step {trainer.global_step}; {where}"
    )
    return SystemExit(128 + signum) if signals.stop_noted_here else StoppedElsewhere(128 + signum)
