"""Lightning's `WandbLogger` passes `anonymous=None` to `wandb.init`; wandb >= 0.19 warns about it every run.

Relied on: the private `WandbLogger._wandb_init` (the keyword arguments for `wandb.init`). tests/test_launch.py
fails when it is gone or Lightning stops adding `anonymous` (then this module can go).
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.loggers import Logger, WandbLogger


def drop_anonymous_argument(loggers: Iterable[Logger]) -> None:
    """Remove `anonymous` from the `wandb.init` arguments of every `WandbLogger`, before its run starts."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger._wandb_init.pop("anonymous", None)
