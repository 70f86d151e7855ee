"""Top-1/top-5 of a checkpoint or a deploy.pt on the validation set: `python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt`.

The config is train.py's (conf/train.yaml: `data=...`, `logger=...`); what it does: acnet_pl/cli/evaluate.py.
"""

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
def main(cfg: DictConfig) -> None:
    """Evaluate `cfg.ckpt_path`; top-1/top-5 and loss to the log, the loggers and `<run dir>/eval.json`."""
    # Imported here so config errors and --help answer before torch and Lightning load.
    with imports_without_collection():
        from acnet_pl.cli.evaluate import evaluate

    log_lightning_once()
    evaluate(cfg)


if __name__ == "__main__":
    skip_shutdown_collection()
    # A config mistake on the command line: one line and exit 2, instead of Hydra's many lines.
    exit_on_user_error(check_overrides)("train", CONFIG_DIR)
    main()
