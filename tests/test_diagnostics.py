"""The diagnostics callback and `python -m acnet_pl.cli.analyze` on the outputs of a real train.py run.

One tiny train.py run (W&B offline + TensorBoard) feeds both: the callback's files and dashboard entries,
and the CLI's figures and numbers, which must agree with the deploy report of the same run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_RUN, fit_tiny, isolated_env, run_train

from acnet_pl.cli.analyze import main as analyze_main
from acnet_pl.models import build_model
from acnet_pl.reparam import fuse
from acnet_pl.training.callbacks import DiagnosticsCallback
from acnet_pl.training.callbacks.diagnostics import FUSION_ERROR_IMAGES, fusion_errors


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train.py run (cifar_quick, ACB, fake 16 px data, 2 epochs, diagnostics every 2nd) logging to W&B
    (offline) and TensorBoard."""
    root = tmp_path_factory.mktemp("diagnostics")
    proc = run_train(
        [
            *(a for a in TINY_RUN if a != "~callbacks.diagnostics"),
            "block=acb",
            "trainer.max_epochs=2",
            "callbacks.diagnostics.every_n_epochs=2",
            "logger=[wandb,tensorboard]",
            "hydra.run.dir=run",
        ],
        root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_callback_writes_files_and_dashboard_entries(trained_run: Path) -> None:
    diag = trained_run / "diagnostics"
    assert {p.name for p in diag.iterdir()} >= {
        "kernel_maps.png",
        "robustness.png",
        "pruning.png",
        "diagnostics.json",
        "epochs.jsonl",
    }
    epochs = [json.loads(line) for line in (diag / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1]  # every 2nd validation epoch, no sanity check
    report = json.loads((diag / "diagnostics.json").read_text())
    assert sorted(report["branch_gamma"]) == ["features.0", "features.4", "features.8"]
    assert set(report["robustness"]) == {"original", "flip_lr", "flip_ud", "rot90", "rot180", "rot270"}
    assert max(report["fusion_error"].values()) <= 1e-5
    assert report["conversion"]["converted"] == ["features.0", "features.4", "features.8"]
    # the last epoch's scalars are those of the final weights
    final_share = report["kernels"]["average"]["5"]["skeleton_share"]
    assert epochs[-1]["diagnostics/skeleton_share_5x5"] == pytest.approx(final_share, abs=1e-12)
    # the fused model's accuracy (fuse callback) is the robustness "original" and the unpruned top-1
    deploy = json.loads((trained_run / "deploy" / "report.json").read_text())
    top1 = deploy["val"]["after"]["top1"]
    assert report["robustness"]["original"] == pytest.approx(top1, abs=1e-9)
    assert report["pruning"]["none"] == pytest.approx(top1, abs=1e-9)

    # TensorBoard: the map image of epoch 1 and at the end, the scalars, the tables as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert len(events.Images("diagnostics/kernel_maps")) == 2
    assert {"diagnostics/gamma_ver", "diagnostics/robustness_flip_lr", "diagnostics/fusion_error_max"} <= set(
        tags["scalars"]
    )
    assert "diagnostics/conversion/text_summary" in tags["tensors"]
    # W&B (offline): images and tables in the run's media folder
    media = next((trained_run / "wandb").glob("offline-run-*")) / "files" / "media"
    tables = {p.name.split("_")[0] for p in (media / "table" / "diagnostics").glob("*.table.json")}
    assert {"robustness", "pruning", "conversion", "branch", "fusion", "skeleton"} <= tables
    assert list((media / "images" / "diagnostics").glob("kernel_maps_*.png"))


@pytest.mark.slow
def test_analyze_cli_on_a_run_dir(trained_run: Path, tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-m", "acnet_pl.cli.analyze", str(trained_run), "-o", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skeleton share" in proc.stdout and "flip_lr" in proc.stdout and "corners" in proc.stdout
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "overview.png",
        "kernel_maps.png",
        "robustness.png",
        "pruning.png",
        "analysis.json",
    }
    result = json.loads((out / "analysis.json").read_text())
    (run,) = result["runs"]
    assert run["kind"] == "checkpoint" and run["label"] == "acb"
    # the checkpoint and its validation data, rebuilt from the run dir, give the callback's numbers
    diag = json.loads((trained_run / "diagnostics" / "diagnostics.json").read_text())
    assert run["robustness"] == pytest.approx(diag["robustness"], abs=1e-9)
    assert run["pruning"] == pytest.approx(diag["pruning"], abs=1e-9)
    assert run["kernels"]["average"]["5"]["skeleton_share"] == pytest.approx(
        diag["kernels"]["average"]["5"]["skeleton_share"], abs=1e-9
    )
    # its deploy file (the fused model, no gammas) gives the same maps and accuracies
    assert analyze_main([str(trained_run / "deploy" / "deploy.pt"), "-o", str(tmp_path / "deploy")]) == 0
    (deployed,) = json.loads((tmp_path / "deploy" / "analysis.json").read_text())["runs"]
    assert deployed["kind"] == "deploy" and deployed["branch_gamma"] is None
    assert deployed["robustness"] == pytest.approx(run["robustness"], abs=1e-9)
    for layer, values in run["kernels"]["layers"].items():
        assert torch.allclose(
            torch.tensor(values["map"]), torch.tensor(deployed["kernels"]["layers"][layer]["map"]), atol=1e-6
        )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["missing_run"], "no such file or folder"),
        (["{empty}"], "no run found"),
        (["{text}"], "not a checkpoint"),
        (["{empty}", "--limit-batches", "0"], "--limit-batches must be >= 1"),
    ],
)
def test_analyze_cli_errors_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], fragment: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    args = [a.format(empty=tmp_path / "empty", text=tmp_path / "notes.ckpt") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        analyze_main([*args, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_callback_does_nothing_without_a_logger(tmp_path: Path) -> None:
    fit_tiny(tmp_path, callbacks=[DiagnosticsCallback()])
    assert not (tmp_path / "diagnostics").exists()


@pytest.mark.slow
def test_fast_dev_run_computes_but_writes_no_file(tmp_path: Path) -> None:
    """debug=fdr with a logger: the diagnostics run on the one batch, but nothing that looks like a result
    is written (as the fuse callback in a fast dev run)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from acnet_pl.data import FakeDataModule
    from acnet_pl.training.module import ACNetModule

    data = FakeDataModule(
        num_classes=4, image_size=16, train_size=16, val_size=16, batch_size=12, num_workers=0
    )
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4}, block={"name": "acb"})
    callback = DiagnosticsCallback()

    class Snapshot(L.Callback):  # the trained model as the diagnostics get it (they analyse it, no copy)
        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.modes = [m.training for m in pl_module.modules()]

    snapshot = Snapshot()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        fast_dev_run=True,
        logger=CSVLogger(tmp_path),
        callbacks=[snapshot, callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    # the trained model is left as it was: weights, BN statistics and modes
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in snapshot.state.items())
    assert [m.training for m in module.modules()] == snapshot.modes
    assert callback.report is not None and set(callback.report["fusion_error"]) == {
        "features.0",
        "features.4",
        "features.8",
    }
    # measured on the first FUSION_ERROR_IMAGES images of the first validation batch
    images = next(iter(data.val_dataloader()))[0][:FUSION_ERROR_IMAGES]
    assert callback.report["fusion_error"] == pytest.approx(
        fusion_errors(module.model.eval(), images), rel=1e-9
    )
    assert not (tmp_path / "diagnostics").exists()


def test_end_of_fit_loader_is_bounded_with_a_worker_per_core() -> None:
    """The end-of-fit passes read the first limit_batches batches with a worker per core (the rank's own
    loader has cores / devices); a loader without workers (in-memory data) is used as it is."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from acnet_pl.training.callbacks.diagnostics import _val_loader

    data = TensorDataset(torch.arange(100.0), torch.zeros(100))
    for workers in (0, 1):
        loader = DataLoader(data, batch_size=8, num_workers=workers)
        trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataloader=lambda loader=loader: loader))
        bounded = _val_loader(trainer, limit_batches=3)
        if workers == 0:
            assert bounded is loader
            continue
        assert bounded.num_workers == max(1, len(os.sched_getaffinity(0))) and bounded.persistent_workers
        assert [b[0].tolist() for b in bounded] == [list(map(float, range(i, i + 8))) for i in (0, 8, 16)]
        assert len(_val_loader(trainer, limit_batches=None).dataset) == 100


@torch.no_grad()
def test_fusion_errors_per_block() -> None:
    model = build_model("cifar_quick", num_classes=4, block="acb").eval()
    x = torch.randn(2, 3, 16, 16)
    errors = fusion_errors(model, x)
    assert sorted(errors) == ["features.0", "features.4", "features.8"]
    assert max(errors.values()) <= 1e-5
    # the callback's way: the convs of the model fused once in float64 (for the kernel maps), then float32
    fused = fuse(copy.deepcopy(model).double(), fold_bn=True, inplace=True).float()
    assert fusion_errors(model, x, fused) == errors


def test_fusion_errors_of_a_model_in_training_mode_leave_it_as_it_was() -> None:
    """The callback passes the trained model itself (no copy): its BNs must use and keep their running
    statistics, and the model must stay in training mode."""
    torch.manual_seed(0)
    model = build_model("cifar_quick", num_classes=4, block="acb")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics far from a batch's own
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    errors = fusion_errors(model, torch.randn(4, 3, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert max(errors.values()) <= 1e-5  # it was 0.3-0.8 when the blocks ran on batch statistics
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
