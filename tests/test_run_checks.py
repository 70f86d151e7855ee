"""train(cfg) refuses in one line, before training: unusable resume files, unwritable checkpoint dirs,
several devices without a GPU, a block that converts nothing, images too small for the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, TINY_RUN
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from acnet_pl.cli.common import USER_ERROR_EXIT_CODE, exit_on_user_error
from acnet_pl.cli.train import train


def _cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_RUN, "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def _one_line_error(cfg: DictConfig, capsys: pytest.CaptureFixture) -> str:
    """Run train(cfg) as train.py does: the user error must be one `error:` line and exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(train)(cfg)
    assert exit_info.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not Path(cfg.paths.output_dir).exists()  # refused before anything was written
    return err[0]


@pytest.mark.parametrize("save_top_k", [1, -1])
def test_unwritable_checkpoints_dir_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, wandb_free_env: Path, save_top_k: int
) -> None:
    """A checkpoints dir that cannot be created: one line, exit 2, nothing trained (also save_top_k=-1)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the checkpoints dir should be")
    cfg = _cfg(
        tmp_path,
        f"callbacks.model_checkpoint.dirpath={blocker}/checkpoints",
        f"callbacks.last_checkpoint.dirpath={blocker}/checkpoints",
        f"callbacks.model_checkpoint.save_top_k={save_top_k}",
    )
    line = _one_line_error(cfg, capsys)
    assert f"cannot write checkpoint {blocker}/checkpoints/last.ckpt" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"PK\x03\x04 cut short", "corrupt or truncated checkpoint"),
        (None, "a deploy file"),
    ],
)
def test_ckpt_path_is_checked_like_deploy(
    tmp_path: Path, capsys: pytest.CaptureFixture, wandb_free_env: Path, content: bytes | None, expected: str
) -> None:
    """train.py ckpt_path= on a truncated file or a deploy.pt: one line naming the file, exit 2."""
    from acnet_pl.deploy.record import DEPLOY_FORMAT

    path = tmp_path / "given.ckpt"
    if content is None:
        torch.save({"format": DEPLOY_FORMAT}, path)
    else:
        path.write_bytes(content)
    line = _one_line_error(_cfg(tmp_path, f"ckpt_path={path}"), capsys)
    assert str(path) in line and expected in line


def test_several_devices_without_gpu_ask_for_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trainer.devices=8 with accelerator=auto and no GPU: one line asking for trainer.accelerator=cpu."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_line_error(_cfg(tmp_path, "trainer.accelerator=auto", "trainer.devices=8"), capsys)
    assert "trainer.devices=8 but no GPU is visible: add trainer.accelerator=cpu" in line


def test_block_that_converts_nothing_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """block.kernel_sizes=[2] on cifar_quick (5x5 convs): one line naming the kernels the model has."""
    line = _one_line_error(_cfg(tmp_path, "block=acb", "+block.kernel_sizes=[2]"), capsys)
    assert "converts none of cifar_quick's convs" in line and "block.kernel_sizes=[5]" in line


@pytest.mark.parametrize(("model", "size", "minimum"), [("cifar_quick", 7, 15), ("vgg16", 16, 32)])
def test_too_small_images_name_the_models_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture, model: str, size: int, minimum: int
) -> None:
    """data.image_size below what the model takes: one line with the smallest size that works."""
    line = _one_line_error(_cfg(tmp_path, f"model={model}", f"data.image_size={size}"), capsys)
    assert f"needs at least {minimum}x{minimum}" in line and f"data.image_size={minimum}" in line


def test_check_input_size_minimum_is_the_smallest_that_runs() -> None:
    """The named minimum is exact: a real forward pass works at it and fails one pixel below."""
    from acnet_pl.models import build_model
    from acnet_pl.models.registry import check_input_size

    model = build_model("cifar_quick", num_classes=2).eval()
    check_input_size("cifar_quick", (3, 15, 15))
    model(torch.zeros(2, 3, 15, 15))
    with pytest.raises(RuntimeError):
        model(torch.zeros(2, 3, 14, 14))
    with pytest.raises(ValueError, match="at least 15x15"):
        check_input_size("cifar_quick", (3, 14, 14))
