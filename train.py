"""Train a model with Hydra + Lightning: `python train.py experiment=quickstart` (see conf/train.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from acnet_pl.cli import exit_on_user_error, log_lightning_once, register_resolvers

register_resolvers()


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return `cfg.optimized_metric` for Hydra sweepers (Optuna)."""
    # Imported here so config errors and --help answer before torch and Lightning load.
    from acnet_pl.train import optimized_metric, train

    log_lightning_once()
    return optimized_metric(cfg, train(cfg))


if __name__ == "__main__":
    main()
