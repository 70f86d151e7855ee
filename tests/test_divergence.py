"""A diverged run stops at once: one line, exit status 3, report.json says diverged, no deploy.pt, no NaN checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN, fit_tiny, run_train

from acnet_pl.deploy.verification import nonfinite_entries
from acnet_pl.training.callbacks import DivergenceCallback, FuseCallback, TrainingDiverged
from acnet_pl.training.module import ACNetModule

#: lr 1e30: the first step is taken on a finite loss and blows the weights up; the next loss is NaN.
EXPLODING_SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1e30, "momentum": 0.9}


@pytest.mark.slow
def test_nan_loss_stops_before_the_step_and_leaves_no_deploy_file(tmp_path: Path) -> None:
    """check_every_n_steps=1: the NaN loss of step 1 stops the run before its backward pass."""
    losses = []

    class RecordLoss(DivergenceCallback):
        def on_before_backward(self, trainer, pl_module, loss):
            losses.append(loss.item())
            super().on_before_backward(trainer, pl_module, loss)

    module_seen = {}

    class KeepModule(FuseCallback):
        def on_fit_start(self, trainer, pl_module):
            module_seen["module"] = pl_module
            super().on_fit_start(trainer, pl_module)

    fuse = KeepModule(dirpath="deploy")
    with pytest.raises(
        TrainingDiverged, match=r"training diverged: the training loss is nan at epoch 0, step 1"
    ):
        fit_tiny(
            tmp_path,
            callbacks=[fuse, RecordLoss(check_every_n_steps=1)],
            limit_train_batches=2,
            optimizer=EXPLODING_SGD,
        )
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses[0])) and losses[1] != losses[1]
    # stopped before the NaN loss was back-propagated: the parameters are those after the finite step
    assert not nonfinite_entries(dict(module_seen["module"].named_parameters()))
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert (report["ok"], report["status"], report["files"]["deploy"]) == (False, "diverged", None)
    assert report["error"].startswith("training diverged: the training loss is nan")
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["report.json"]
    assert TrainingDiverged.exit_code == 3


@pytest.mark.slow
def test_inf_loss_stops_the_run_like_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss that overflows to +Inf (finite weights, e.g. a logit at fp16's limit) stops the run as NaN does."""
    training_step = ACNetModule.training_step

    def overflow_at_step_1(self: ACNetModule, batch, batch_idx: int) -> torch.Tensor:
        loss = training_step(self, batch, batch_idx)
        return loss * float("inf") if self.global_step == 1 else loss  # cross-entropy > 0: +Inf

    monkeypatch.setattr(ACNetModule, "training_step", overflow_at_step_1)
    seen = {}

    class KeepModule(FuseCallback):
        def on_fit_start(self, trainer, pl_module):
            seen["module"] = pl_module
            super().on_fit_start(trainer, pl_module)

    with pytest.raises(
        TrainingDiverged, match=r"training diverged: the training loss is inf at epoch 0, step 1"
    ):
        fit_tiny(
            tmp_path,
            callbacks=[KeepModule(dirpath="deploy"), DivergenceCallback(check_every_n_steps=1)],
            limit_train_batches=3,
        )
    assert seen["module"].global_step == 1  # the Inf loss was never back-propagated or stepped
    assert not nonfinite_entries(dict(seen["module"].named_parameters()))
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert (report["ok"], report["status"], report["files"]["deploy"]) == (False, "diverged", None)


def test_default_reads_the_device_mark_every_50_steps_and_at_the_epoch_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default configuration: step 1 reads nothing back to the host (no sync); the NaN loss of step 1
    stops the run after the epoch's last step, before validation and checkpoints, naming step 1."""
    host_reads = []

    class NoHostRead(DivergenceCallback):
        def on_before_backward(self, trainer, pl_module, loss):
            if trainer.global_step == 0:
                return super().on_before_backward(trainer, pl_module, loss)  # step 0: the check
            with monkeypatch.context() as m:
                for name in ("__bool__", "__int__", "__float__", "item"):
                    m.setattr(torch.Tensor, name, lambda *a, n=name: host_reads.append(n) or pytest.fail(n))
                super().on_before_backward(trainer, pl_module, loss)

    fuse = FuseCallback(dirpath="deploy")
    with pytest.raises(
        TrainingDiverged,
        match=r"the training loss is nan at step 1 \(found at epoch 0, step 2; checked every 50 steps\);",
    ):
        fit_tiny(tmp_path, callbacks=[fuse, NoHostRead()], limit_train_batches=2, optimizer=EXPLODING_SGD)
    assert host_reads == []
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert (report["status"], report["files"]["deploy"]) == ("diverged", None)


def test_checkpoint_with_nonfinite_weights_is_refused() -> None:
    """NaN/Inf in a weight or BN statistic: refused; a metric's -inf start value (MaxMetric) is not a weight."""
    module = ACNetModule(model={"name": "cifar_quick", "num_classes": 4})
    trainer = SimpleNamespace(current_epoch=4, global_step=40, global_rank=0, checkpoint_callback=None)
    state = module.state_dict()
    assert state["val_top1_best.max_value"].item() == float("-inf")
    DivergenceCallback().on_save_checkpoint(trainer, module, {"state_dict": state})  # a fresh module saves
    state["model.features.1.running_var"][3] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"weights hold NaN/Inf at epoch 4, step 40: 1 of \d+ tensors"):
        DivergenceCallback().on_save_checkpoint(trainer, module, {"state_dict": state})


@pytest.mark.slow
def test_train_py_diverged_run_is_one_line_exit_3(tmp_path: Path) -> None:
    """lr 1e30 through train.py: exit 3, one `error:` line, report.json status diverged, no deploy.pt,
    and no checkpoint (the first validation is already NaN, so nothing is saved)."""
    proc = run_train(
        [
            *TINY_RUN,
            "optimizer.lr=1e30",
            "logger=none",
            "hydra.run.dir=run",
            "++trainer.limit_train_batches=1",
        ],
        tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: training diverged: val/loss is nan after the validation of epoch 0")
    assert "Traceback" not in proc.stdout + proc.stderr
    run = tmp_path / "run"
    report = json.loads((run / "deploy" / "report.json").read_text())
    assert (report["ok"], report["status"]) == (False, "diverged")
    assert not (run / "deploy" / "deploy.pt").exists()
    assert not list(run.glob("checkpoints/*.ckpt"))
    assert "training diverged" in (run / "train.log").read_text()


def test_cli_prints_one_line_and_exits_3(capsys: pytest.CaptureFixture) -> None:
    from acnet_pl.cli.common import exit_on_user_error

    def diverging() -> None:
        raise TrainingDiverged("training diverged: the training loss is nan at epoch 2, step 7; stopped")

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(diverging)()
    assert exit_info.value.code == 3
    assert (
        capsys.readouterr().err
        == "error: training diverged: the training loss is nan at epoch 2, step 7; stopped\n"
    )


def test_in_a_multirun_the_job_fails_instead_of_exiting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Under -m the line is printed and JobFailed raised (Hydra records a failed job, the sweep goes on),
    not sys.exit(3); what Hydra prints when the sweep ends lists the failed jobs."""
    import acnet_pl.cli.common as cli

    monkeypatch.setattr(cli, "_in_multirun", lambda: True)
    monkeypatch.setattr(cli.JobFailed, "failed", [])
    monkeypatch.setattr(cli.HydraConfig.instance(), "cfg", None)  # no job (an earlier test may leave one)

    def diverging() -> None:
        raise TrainingDiverged("training diverged: the training loss is nan at epoch 0, step 3")

    with pytest.raises(cli.JobFailed) as failed:
        cli.exit_on_user_error(diverging)()
    assert failed.value.exit_code == 3
    assert (
        capsys.readouterr().err == "error: training diverged: the training loss is nan at epoch 0, step 3\n"
    )
    assert str(failed.value) == (
        "1 job(s) of this sweep failed: a job: exit 3, training diverged: the training loss is nan at epoch 0, step 3"
    )
