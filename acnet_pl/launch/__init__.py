"""Workarounds for Lightning and Hydra internals, each in a module named for what it works around.

Everything acnet_pl takes from a private or undocumented part of Lightning, Hydra or W&B's Lightning
logger lives here, so that one place says what to re-check when those libraries change:

- `ddp`: DDP inside a Hydra app (and multirun): Lightning's private `_SubprocessScriptLauncher`, swapped
  in as `trainer.strategy._launcher`; Hydra's basic launcher class path.
- `ema`: `callbacks=ema`'s foreach update of Lightning's EMAWeightAveraging: its private `_average_model`
  (the AveragedModel every hook of it reads), given a `ForeachEMAModel` class after Lightning's setup.
- `model_summary`: Lightning's model summary without metric rows, FLOPs per image: the callback's
  `_summary` hook and `_max_depth`.
- `overrides`: the pre-check of command-line overrides: `hydra._internal.utils.get_args_parser` and the
  texts of Hydra's composition errors.
- `preemption`: stop signals and SLURM requeue on top of Lightning's signal handling (its SIGTERM
  handler, `SIGTERMException`, the `hpc_ckpt_<n>.ckpt` name).
- `wandb_logger`: the `anonymous` argument Lightning's `WandbLogger` keeps in its private `_wandb_init`.

Pinned in pyproject.toml to the minor versions the tests cover (lightning 2.6, hydra-core 1.3).
tests/test_launch.py (and tests/test_preemption.py for the signal behaviours) fail, saying what to
re-check, when an installed version is outside those pins or one of these internals changed.
"""
