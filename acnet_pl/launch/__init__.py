"""Workarounds for Lightning and Hydra internals, each in a module named for what it works around.

Everything acnet_pl takes from a private or undocumented part of Lightning, Hydra or W&B's Lightning
logger lives here, so that one place says what to re-check when those libraries change:

- `ddp`: DDP inside a Hydra app (and multirun): Lightning's private `_SubprocessScriptLauncher`, swapped
  in as `trainer.strategy._launcher`, launching this job's ranks and supervising them (instead of
  Lightning's observer, which kills the launching process); Hydra's basic launcher class path.
- `overrides`: the pre-check of command-line overrides: `hydra._internal.utils.get_args_parser` and the
  texts of Hydra's composition errors.
- `preemption`: run dirs a requeued SLURM job finds again; Lightning's `hpc_ckpt_<n>.ckpt` name.
- `stop_signals`: SIGTERM, SIGINT and SLURM's requeue signal acted on at the same step by every rank:
  Lightning's private `_SignalConnector` (`trainer._signal_connector`) replaced, `SIGTERMException`.
- `wandb_logger`: the `anonymous` argument Lightning's `WandbLogger` keeps in its private `_wandb_init`.

Pinned in pyproject.toml to the minor versions the tests cover (lightning 2.6, hydra-core 1.3).
tests/test_launch.py (and tests/test_preemption.py for the signal behaviours) fail, saying what to
re-check, when an installed version is outside those pins or one of these internals changed.
"""
