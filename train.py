"""Train a model with Hydra + Lightning: `python train.py experiment=quickstart` (see conf/train.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from acnet_pl.cli.common import (
    exit_on_user_error,
    imports_without_collection,
    log_lightning_once,
    register_resolvers,
    skip_shutdown_collection,
)
from acnet_pl.launch.overrides import check_overrides

CONFIG_DIR = Path(__file__).resolve().parent / "conf"

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return `cfg.optimized_metric` for Hydra sweepers (Optuna)."""
    # Imported here so config errors and --help answer before torch and Lightning load.
    with imports_without_collection():
        from acnet_pl.cli.train import optimized_metric, train

    log_lightning_once()
    if not cfg.get("train", True):  # train=false ckpt_path=...: top-1/top-5 of a checkpoint or deploy.pt
        from acnet_pl.cli.evaluate import evaluate

        evaluate(cfg)
        return None
    return optimized_metric(cfg, train(cfg))


if __name__ == "__main__":
    skip_shutdown_collection()
    # A config mistake on the command line: one line and exit 2, instead of Hydra's many lines.
    exit_on_user_error(check_overrides)("train", CONFIG_DIR)
    main()
