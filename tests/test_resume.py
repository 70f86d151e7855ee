"""Checkpoints a run resumes from: last.ckpt every epoch, random states, atomic writes, resume-file checks."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from acnet_pl.data import FakeDataModule
from acnet_pl.deploy.record import DEPLOY_FORMAT
from acnet_pl.training.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    LastCheckpoint,
    RandomState,
    check_resume_checkpoint,
    check_writable,
)
from acnet_pl.training.module import ACNetModule
from acnet_pl.utils.files import atomic_torch_save


class _Killed(RuntimeError):
    """Stands for kill -9: training ends here, and nothing more is saved (LastCheckpoint saves on stop signals only)."""


class _Probe(Callback):
    """Uses numpy's and python's generators every batch, records all generator states when epoch 1 starts.

    Reads the states without drawing, at the first batch of epoch 1; `kill_at` (epoch, batch) ends the run.
    """

    def __init__(self, kill_at: tuple[int, int] | None = None) -> None:
        self.kill_at = kill_at
        self.states: dict[str, object] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == self.kill_at:
            raise _Killed
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.states = {
                "torch": torch.get_rng_state().clone(),
                "numpy": np.random.get_state()[1].copy(),
                "python": random.getstate(),
                "batch": batch[1].clone(),
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        np.random.rand()
        random.random()


def _fit(
    root: Path,
    *,
    kill_at=None,
    ckpt_path=None,
    random_state: bool = True,
    block: str = "base",
    max_epochs: int = 2,
) -> tuple[ACNetModule, _Probe]:
    """Two epochs of 4 shuffled batches, deterministic CPU, seeded like train.py (seed, then build)."""
    L.seed_everything(0, workers=True, verbose=False)
    # The per-sample loader, whose shuffle draws from the generators RandomState restores (device batches'
    # order is a function of seed and epoch alone: tests/test_device_batches.py).
    data = FakeDataModule(
        num_classes=4,
        image_size=16,
        train_size=64,
        val_size=16,
        batch_size=16,
        num_workers=0,
        device_batches=False,
    )
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, block={"name": block})
    probe = _Probe(kill_at)
    callbacks = [LastCheckpoint(root / "checkpoints"), probe] + ([RandomState()] if random_state else [])
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=max_epochs,
        deterministic=True,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
    with contextlib.suppress(_Killed):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, probe


def _max_rel_diff(a: ACNetModule, b: ACNetModule) -> float:
    diffs = [
        ((x - y).norm() / y.norm().clamp_min(1e-12)).item()
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
        if x.is_floating_point()
    ]
    return max(diffs)


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path: Path, one_thread) -> None:
    """Killed in epoch 1 after last.ckpt of epoch 0: resume gives the uninterrupted weights (<= 1e-6 relative).

    The same resume without the random states replays epoch 0's shuffle: weights > 1e-3 apart (the test
    would notice the states missing). Numpy's and python's generators are restored too.
    """
    straight, straight_probe = _fit(tmp_path / "straight")
    _fit(tmp_path / "killed", kill_at=(1, 2))
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 4)  # written at the end of epoch 0, not at the kill
    assert set(ckpt["callbacks"]["RandomState"]) == {"torch", "cuda", "numpy", "python"}

    resumed, resumed_probe = _fit(tmp_path / "resumed", ckpt_path=last)
    assert torch.equal(resumed_probe.states["batch"], straight_probe.states["batch"])  # same shuffle
    assert torch.equal(resumed_probe.states["torch"], straight_probe.states["torch"])
    assert np.array_equal(resumed_probe.states["numpy"], straight_probe.states["numpy"])
    assert resumed_probe.states["python"] == straight_probe.states["python"]
    assert _max_rel_diff(resumed, straight) <= 1e-6

    without, without_probe = _fit(tmp_path / "without", ckpt_path=last, random_state=False)
    assert not torch.equal(without_probe.states["batch"], straight_probe.states["batch"])
    assert _max_rel_diff(without, straight) > 1e-3


def test_last_ckpt_is_rewritten_every_epoch_without_a_new_best(tmp_path: Path, one_thread) -> None:
    """Lightning's save_last=True only rewrites last.ckpt with a new top-k file; LastCheckpoint every epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    data = FakeDataModule(
        num_classes=4, image_size=16, train_size=32, val_size=16, batch_size=16, num_workers=0
    )
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, block={"name": "base"})
    # With lr=0 val top-1 never improves after epoch 0: only the first epoch is a new best.
    best = ModelCheckpoint(
        tmp_path / "best", monitor="val/acc_top1", mode="max", save_top_k=1, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        callbacks=[best, LastCheckpoint(tmp_path / "checkpoints")],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.hparams.optimizer["lr"] = 0.0
    trainer.fit(module, datamodule=data)
    ours = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    lightnings = torch.load(tmp_path / "best" / "last.ckpt", weights_only=True)
    assert ours["global_step"] == 6 and ours["epoch"] == 2
    assert lightnings["global_step"] < 6  # pins Lightning's behaviour that LastCheckpoint works around


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed write (disk full at fsync) raises CheckpointWriteError naming the file; old file intact, no temp."""
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        CheckpointWriteError, match=r"cannot write checkpoint .*last\.ckpt: No space left on device"
    ):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_unwritable_checkpoint_dir_is_one_line(tmp_path: Path) -> None:
    """A checkpoints dir that cannot be created (a file in the way; root ignores chmod) fails before training."""
    (tmp_path / "run").write_text("a file where the run dir should be")
    with pytest.raises(CheckpointWriteError) as error:
        check_writable(tmp_path / "run" / "checkpoints")
    message = str(error.value)
    assert "\n" not in message and "cannot write checkpoint" in message and "dirpath=" in message
    with pytest.raises(CheckpointWriteError):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "run" / "checkpoints" / "x.ckpt")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ACNetModule]:
    """A real last.ckpt of a one-epoch cifar_quick/acb fit, and its module."""
    root = tmp_path_factory.mktemp("trained")
    module, _ = _fit(root, block="acb", max_epochs=1)
    return root / "checkpoints" / "last.ckpt", module


def _bad_file(tmp_path: Path, ckpt: Path, case: str) -> Path:
    path = tmp_path / f"{case}.ckpt"
    if case == "truncated":
        path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif case == "deploy":
        atomic_torch_save({"format": DEPLOY_FORMAT, "state_dict": {}}, path)
    elif case == "weights_only":
        full = torch.load(ckpt, weights_only=True)
        atomic_torch_save({k: full[k] for k in ("state_dict", "hyper_parameters")}, path)
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated", "corrupt or truncated checkpoint"),
        ("deploy", "a deploy file (fused weights only), not a training checkpoint"),
        ("weights_only", "not a resumable training checkpoint"),
    ],
)
def test_resume_checks_the_file(tmp_path: Path, trained, case: str, expected: str) -> None:
    """The files deploy.py refuses in one line, train.py's ckpt_path refuses too (ValueError -> exit 2)."""
    ckpt, module = trained
    with pytest.raises(ValueError, match=re.escape(expected)) as error:
        check_resume_checkpoint(_bad_file(tmp_path, ckpt, case), module)
    assert "\n" not in str(error.value) and "last.ckpt" in str(error.value)  # the fix names the file to give


def test_resume_checks_the_model(trained) -> None:
    """Another model's, block's or class count's checkpoint: one line naming both; its own passes."""
    ckpt, module = trained
    check_resume_checkpoint(ckpt, module)
    for model, block in [("resnet20", "acb"), ("cifar_quick", "base")]:
        other = ACNetModule(model={"name": model, "num_classes": 4}, block={"name": block})
        with pytest.raises(
            ValueError,
            match=rf"a checkpoint of cifar_quick with block acb, 4 classes, but this run builds {model} with block {block}",
        ):
            check_resume_checkpoint(ckpt, other)
    ten = ACNetModule(model={"name": "cifar_quick", "num_classes": 10}, block={"name": "acb"})
    with pytest.raises(ValueError, match="10 classes"):
        check_resume_checkpoint(ckpt, ten)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """kill -9 in the middle of AtomicCheckpointIO.save_checkpoint: last.ckpt is the previous one, whole; the
    temp file left beside it is removed by the next run's LastCheckpoint (remove_partial_writes)."""
    import subprocess
    import sys

    from acnet_pl.training.checkpointing import remove_partial_writes

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)
    # Pickling the second checkpoint kills the process: the temp file exists, the rename never happens.
    code = (
        "import os, signal, torch\n"
        "from acnet_pl.training.checkpointing import AtomicCheckpointIO\n"
        "class Kill:\n"
        "    def __reduce__(self):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"AtomicCheckpointIO().save_checkpoint({{'step': torch.tensor(2), 'x': Kill()}}, {str(path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(path, weights_only=True)["step"].item() == 1
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")
    assert [p.name for p in remove_partial_writes(path.parent)] == leftovers
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
