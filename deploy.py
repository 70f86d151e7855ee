"""Fuse a trained checkpoint and write verified deploy files: `python deploy.py ckpt_path=<run>/checkpoints/last.ckpt`.

Options are in conf/deploy.yaml (output_dir, fold_bn, onnx, torchscript, verify.*).
"""

import hydra
from omegaconf import DictConfig

from acnet_pl.cli import exit_on_user_error
from acnet_pl.deploy import deploy


@hydra.main(config_path="conf", config_name="deploy", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    """Entry point of deploy.py (see conf/deploy.yaml)."""
    deploy(cfg)


if __name__ == "__main__":
    main()
