"""Lightning's `WandbLogger` passes `anonymous=None` to `wandb.init`; wandb >= 0.19 warns about it every run.

Lightning internal relied on (lightning 2.6, pinned in pyproject.toml): `WandbLogger._wandb_init`
(private), the dict of keyword arguments the logger gives `wandb.init` when it starts the run.
tests/test_launch.py fails when that attribute is gone or Lightning stops adding `anonymous` (then
this module can go).
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.loggers import Logger, WandbLogger


def drop_anonymous_argument(loggers: Iterable[Logger]) -> None:
    """Remove the `anonymous` keyword from the `wandb.init` arguments of every `WandbLogger` in `loggers`.

    Call it before a logger's `experiment` is first used (the run starts then).
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger._wandb_init.pop("anonymous", None)
