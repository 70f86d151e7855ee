"""Shared test helpers: the repo root, an environment that cannot see real W&B credentials, train.py runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

#: A train.py run of a few seconds on CPU: tiny synthetic data, two training batches, no progress bar.
TINY_RUN = [
    "data=fake",
    "data.image_size=16",
    "data.train_size=32",
    "data.val_size=16",
    "data.batch_size=16",
    "data.num_classes=4",
    "data.num_workers=0",
    "model=cifar_quick",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
    # its figures and end-of-fit passes cost seconds per run; tests/test_diagnostics.py runs it
    "~callbacks.diagnostics",
]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, split the cores between the workers (torch and the train.py runs they start)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = threads  # inherited by subprocesses (isolated_env copies os.environ)
        torch.set_num_threads(int(threads))


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """os.environ without W&B settings or credentials, HOME/netrc/W&B dirs under `home`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        NETRC=str(home / ".netrc"),
        WANDB_DIR=str(home / "wandb"),
        WANDB_CONFIG_DIR=str(home / "wandb_config"),
        WANDB_CACHE_DIR=str(home / "wandb_cache"),
        WANDB_DATA_DIR=str(home / "wandb_data"),
        WANDB_SILENT="true",
        PYTHONWARNINGS="ignore",
    )
    env.pop("LOCAL_RANK", None)
    env.pop("NODE_RANK", None)
    env.update(extra)
    return env


def run_train(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    start_new_session: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python train.py *args` from `cwd` (so stray output dirs would show up there); capture output.

    start_new_session: its own process group, so a signal sent to that group reaches nothing else.
    """
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=cwd,
        env=env if env is not None else isolated_env(cwd / "home"),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=start_new_session,
    )


@pytest.fixture
def wandb_free_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process tests: no W&B variables, HOME and netrc in tmp; returns that HOME."""
    home = tmp_path / "home"
    for key, value in isolated_env(home).items():
        if key not in os.environ or os.environ[key] != value:
            monkeypatch.setenv(key, value)
    for key in list(os.environ):
        if key.startswith("WANDB_") and key not in isolated_env(home):
            monkeypatch.delenv(key)
    return home


def fit_tiny(
    root: Path,
    block: str | dict = "acb",
    callbacks: Sequence = (),
    max_epochs: int = 1,
    limit_train_batches: int = 2,
    model: str = "cifar_quick",
    **module_kwargs,
):
    """Fit a tiny ACNetModule in-process on fake 16 px data (CPU, seconds); returns (trainer, module, data)."""
    import lightning as L

    from acnet_pl.data import FakeDataModule
    from acnet_pl.training.module import ACNetModule

    L.seed_everything(0, verbose=False)
    data = FakeDataModule(
        num_classes=4, image_size=16, train_size=32, val_size=16, batch_size=16, num_workers=0
    )
    module = ACNetModule(
        model={"name": model, "num_classes": data.num_classes},
        block={"name": block} if isinstance(block, str) else block,
        data={
            "input_size": list(data.input_size),
            "mean": list(data.mean),
            "std": list(data.std),
            "class_names": None,
        },
        **module_kwargs,
    )
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer, module, data


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many tiny tensor ops on one thread (on a busy 2-core machine the fastest)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(y, ref) -> float:
    """Norm-wise relative error ||y - ref|| / ||ref||."""
    return ((y - ref).norm() / ref.norm()).item()


def assert_rel(y, ref, tol: float, what: str = "") -> None:
    """Norm-wise relative error of y against ref within tol (a short message instead of tensor dumps)."""
    err = rel_err(y, ref)
    assert err <= tol, f"{what} relative error {err:.3g} > {tol:g}".strip()
