"""Fuse a trained checkpoint and write verified deploy files: `python deploy.py ckpt_path=<run>/checkpoints/last.ckpt`.

Options: acnet_pl/deploy/config.py (output_dir, fold_bn, onnx, torchscript, verify.*, quantize=int8), composed by conf/deploy.yaml.
"""

import sys
from pathlib import Path

import hydra

from acnet_pl.cli.common import exit_on_user_error, imports_without_collection, skip_shutdown_collection
from acnet_pl.deploy.config import DeployOptions, check_quantize_overrides  # registers the options with Hydra
from acnet_pl.launch.overrides import check_overrides

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="deploy", version_base="1.3")
@exit_on_user_error
def main(cfg: DeployOptions) -> None:
    """Entry point of deploy.py (``cfg``: the composed DeployOptions, a DictConfig)."""
    # Imported here so config errors and --help answer before torch loads.
    with imports_without_collection():
        from acnet_pl.cli.deploy import deploy

    deploy(cfg)


if __name__ == "__main__":
    skip_shutdown_collection()
    # A config mistake on the command line: one line and exit 2, instead of Hydra's many lines.
    exit_on_user_error(check_quantize_overrides)(sys.argv[1:])
    exit_on_user_error(check_overrides)("deploy", CONFIG_DIR)
    main()
