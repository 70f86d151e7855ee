"""deploy.py: checkpoint -> fused, verified deploy.pt / ONNX / TorchScript + report.json; bad input refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
import yaml
from conftest import TINY_RUN, isolated_env, run_train
from torch import nn

from acnet_pl.cli.common import exit_on_user_error
from acnet_pl.cli.deploy import default_output_dir, deploy
from acnet_pl.cli.sweep_table import collect_runs, format_sweep_table
from acnet_pl.cli.sweep_table import main as sweep_table_main
from acnet_pl.data import FakeDataModule
from acnet_pl.deploy import checkpoint
from acnet_pl.deploy.checkpoint import net_from_checkpoint
from acnet_pl.deploy.config import DeployOptions, VerifyOptions, deploy_options
from acnet_pl.deploy.exporters import EXPORTERS, load_onnx
from acnet_pl.deploy.record import load_deployed, make_deploy_record, read_deploy_record
from acnet_pl.deploy.report import REPORT_FORMAT, REPORT_VERSION, format_deploy_report
from acnet_pl.deploy.verification import LOGIT_RTOL, output_error
from acnet_pl.models import build_model
from acnet_pl.training.callbacks import FuseCallback
from acnet_pl.training.loggers import previous_wandb_run_id
from acnet_pl.training.module import ACNetModule
from acnet_pl.utils.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
FAKE_DATA = {
    "_target_": "acnet_pl.data.FakeDataModule",
    "num_classes": 4,
    "image_size": SIZE,
    "train_size": 32,
    "val_size": 16,
    "batch_size": 16,
    "num_workers": 0,
    "pin_memory": False,
    "persistent_workers": False,
}


def _data_meta(size: int = SIZE) -> dict:
    return {"input_size": [3, size, size], "mean": [0.0] * 3, "std": [1.0] * 3, "class_names": None}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as train.py leaves it: checkpoints/last.ckpt from a real Lightning fit, the fuse
    callback's deploy/ (deploy.pt + report.json) and .hydra/config.yaml + overrides.yaml."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    module = ACNetModule(
        model={"name": "resnet20", "num_classes": 4},
        block={"name": "acb", "gamma_init": 1 / 3},
        data=_data_meta(),
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run,
        callbacks=[FuseCallback(dirpath="deploy")],
    )
    trainer.fit(module, datamodule=FakeDataModule(**{k: v for k, v in FAKE_DATA.items() if k != "_target_"}))
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": FAKE_DATA, "seed": 0}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["block=acb", "seed=0"]))
    return run


@pytest.fixture(scope="module")
def callback_files(run_dir) -> dict[str, bytes]:
    """The fuse callback's files in <run>/deploy/ as they were before deploy.py ran."""
    return _files(run_dir / "deploy")


def _files(folder: Path) -> dict[str, bytes]:
    """The files (not the folders) in ``folder``, by name."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def deployed(run_dir, callback_files) -> tuple[dict, Path]:
    """deploy.py's work on the run, with ONNX and TorchScript, and a file of the user's already in its folder."""
    out = run_dir / "deploy" / "last"  # the default for checkpoints/last.ckpt
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    report = deploy(
        {"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"), "onnx": True, "torchscript": True}
    )
    return report, out


def _trained_logits(ckpt_path: Path, x: torch.Tensor) -> torch.Tensor:
    net = net_from_checkpoint(torch.load(ckpt_path, weights_only=True))
    with torch.no_grad():
        return net(x)


def _handmade_checkpoint(
    path: Path, name: str, num_classes: int, size: int, data: dict | None = None
) -> tuple[Path, nn.Module]:
    """A checkpoint as Lightning writes it (state_dict + hyper_parameters), BN statistics made non-trivial."""
    torch.manual_seed(0)
    module = ACNetModule(
        model={"name": name, "num_classes": num_classes},
        block={"name": "acb"},
        data={**_data_meta(size), **(data or {})},
    )
    g = torch.Generator().manual_seed(1)
    for m in module.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path, module.model.eval()


# -- the happy path -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deploy_writes_verified_files_and_report(deployed, run_dir):
    report, out = deployed
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in out.iterdir()) == [
        "deploy.onnx",
        "deploy.pt",
        "deploy.ts",
        "notes.txt",
        "report.json",
    ]
    assert (out / "notes.txt").read_text() == "mine\n"  # the user's file is untouched
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (on_disk["format"], on_disk["version"], on_disk["tool"]) == (
        REPORT_FORMAT,
        REPORT_VERSION,
        "deploy.py",
    )
    assert on_disk["ok"] is True and on_disk["source"] == str(ckpt.resolve())
    assert (on_disk["epoch"], on_disk["global_step"]) == (1, 2)  # from the checkpoint: 1 epoch of 2 steps
    assert on_disk["source_sha256"] == sha256_file(ckpt)
    assert on_disk["model"] == {"name": "resnet20", "num_classes": 4}
    assert on_disk["block"]["name"] == "acb" and on_disk["fold_bn"] is False
    for name in ("deploy.pt", "deploy.onnx", "deploy.ts"):
        assert on_disk["written"][name]["sha256"] == sha256_file(out / name)
    assert on_disk["files"] == {
        "deploy": "deploy.pt",
        "onnx": "deploy.onnx",
        "torchscript": "deploy.ts",
        "int8": None,
        "report": "report.json",
    }
    # Verified on the run's validation data (found through .hydra/config.yaml), 2 batches of 8.
    assert "validation data (FakeDataModule: 2 batches, 16 samples" in on_disk["verification"]["input"]
    errors = on_disk["errors"]
    assert 0.0 < errors["fused"]["max_rel"] <= 1e-5  # the fusion changed the maths, within float32 noise
    assert on_disk["verification"]["tolerance"] == LOGIT_RTOL  # the fuse callback's tolerance
    assert errors["deploy_pt"]["max_rel"] == 0.0
    assert errors["onnx"]["max_rel"] <= 1e-4 and errors["torchscript"]["max_rel"] <= 1e-6
    # ACB's extra branches are gone: 3x3+3x1+1x3 convs and 3 BNs per block -> one 3x3 conv + BN.
    before, after = on_disk["train_model"], on_disk["deploy_model"]
    assert after["params"] == sum(p.numel() for p in build_model("resnet20", 4).parameters())
    assert before["params"] > after["params"] and 0.55 < after["flops"] / before["flops"] < 0.65
    table = format_deploy_report(report)  # what deploy.py prints last
    assert f"{before['params']:,} -> {after['params']:,}" in table and "deploy.onnx" in table


@pytest.mark.slow
def test_deploy_leaves_the_callback_files_and_the_sweep_table_alone(deployed, run_dir, callback_files):
    """deploy.py on a run writes <run>/deploy/last/; the callback's files stay, so the sweep table still works."""
    report, out = deployed
    assert Path(report["output_dir"]) == (run_dir / "deploy" / "last").resolve()
    assert sorted(callback_files) == ["deploy.pt", "report.json"]
    assert _files(run_dir / "deploy") == callback_files
    callback_report = json.loads(callback_files["report.json"])
    assert callback_report["format"] == REPORT_FORMAT and callback_report["tool"] == "FuseCallback"
    (run,) = collect_runs(run_dir)
    assert run["left_out"] is None and (run["model"], run["block"]) == ("resnet20", "acb")
    assert run["top1"] == callback_report["val"]["after"]["top1"]
    lines = format_sweep_table([run]).splitlines()
    assert len(lines) == 3 and lines[2].split()[:4] == ["fake", "resnet20", "acb", "1"]
    assert lines[2].split()[4:] == [f"{100 * run['top1']:.2f}", "+-", "0.00"]


@pytest.mark.slow
def test_both_writers_write_one_report_format(deployed, run_dir, callback_files, tmp_path):
    """The fuse callback's and deploy.py's report.json: the same keys; what one cannot measure is null."""
    _, out = deployed
    ours = json.loads((out / "report.json").read_text())
    callback = json.loads(callback_files["report.json"])
    assert (ours["format"], ours["version"]) == (callback["format"], callback["version"])
    assert list(ours) == list(callback)
    for key in ("model", "errors", "files", "verification", "train_model", "deploy_model"):
        assert list(ours[key]) == list(callback[key]), key
    assert ours["model"] == callback["model"] and ours["block"] == callback["block"]
    # Only the callback has the labelled validation set at hand; both read their deploy.pt back (one
    # pipeline), only deploy.py was asked for ONNX and TorchScript.
    assert ours["val"] is None and callback["val"]["after"]["top1"] is not None
    assert callback["errors"]["deploy_pt"]["max_rel"] == ours["errors"]["deploy_pt"]["max_rel"] == 0.0
    assert callback["errors"]["onnx"] is callback["errors"]["torchscript"] is None
    assert ours["errors"]["onnx"]["max_rel"] <= 1e-4
    # One measure, one tolerance: the fused model's error of both is max |out - ref| / max |ref| <= 1e-3.
    assert ours["verification"]["measure"] == callback["verification"]["measure"]
    assert ours["verification"]["tolerance"] == callback["verification"]["tolerance"] == LOGIT_RTOL
    assert (
        0 < callback["errors"]["fused"]["max_rel"] <= 1e-5 and 0 < ours["errors"]["fused"]["max_rel"] <= 1e-5
    )
    assert callback["written"]["deploy.pt"]["sha256"] == sha256_file(run_dir / "deploy" / "deploy.pt")
    # The sweep table reads accuracy from the callback's report and names why deploy.py's has none.
    (tmp_path / "job" / "deploy").mkdir(parents=True)
    (tmp_path / "job" / "deploy" / "report.json").write_text((out / "report.json").read_text())
    (run,) = collect_runs(tmp_path)
    assert run["top1"] is None and run["left_out"].startswith(
        "deploy/report.json holds no validation accuracy (written by deploy.py"
    )


@pytest.mark.slow
def test_deploy_pt_loads_strict_into_base_model_with_trained_logits(deployed, run_dir):
    _, out = deployed
    record = read_deploy_record(out / "deploy.pt")
    assert record["input_size"] == [3, SIZE, SIZE] and record["fold_bn"] is False
    base = build_model("resnet20", num_classes=4, block="base")
    base.load_state_dict(record["state_dict"], strict=True)
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = base.eval()(x)
    assert output_error(_trained_logits(run_dir / "checkpoints" / "last.ckpt", x), logits)["max_rel"] <= 1e-5
    # The ONNX file has a dynamic batch axis and gives the same logits in onnxruntime.
    assert output_error(logits, load_onnx(out / "deploy.onnx")(x))["max_rel"] <= 1e-4


@pytest.mark.slow
def test_fold_bn_redeploy_of_deploy_pt_gives_same_logits(deployed, monkeypatch):
    _, out = deployed
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f).resolve())
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    report = deploy({"ckpt_path": str(out / "deploy.pt"), "fold_bn": True})
    assert reads.count((out / "deploy.pt").resolve()) == 1  # the input is read once
    redeployed = out / "redeploy"  # the default for a deploy.pt: never overwrite the input
    assert Path(report["output_dir"]) == redeployed.resolve()
    # deploy/last/deploy.pt belongs to the run: verified on its data (.hydra/config.yaml), not random input
    assert "validation data (FakeDataModule: 2 batches, 16 samples" in report["verification"]["input"]
    assert sorted(p.name for p in redeployed.iterdir()) == ["deploy.pt", "report.json"]
    assert report["source_kind"] == "deploy" and report["fold_bn"] is True
    assert report["deploy_model"]["params"] < report["train_model"]["params"]  # BN parameters folded away
    folded = load_deployed(redeployed / "deploy.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert output_error(load_deployed(out / "deploy.pt")(x), folded(x))["max_rel"] <= 1e-5


@pytest.mark.slow
def test_torchvision_resnet18_deploy_loads_into_torchvision(tmp_path):
    ckpt, trained = _handmade_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", "resnet18", 10, 32)
    report = deploy({"ckpt_path": str(ckpt), "verify": {"batches": 1, "batch_size": 4}})
    assert Path(report["output_dir"]) == (tmp_path / "run" / "deploy" / "last").resolve()
    assert "random normal input (1 batches of 4 x 3x32x32; no data config" in report["verification"]["input"]
    record = read_deploy_record(tmp_path / "run" / "deploy" / "last" / "deploy.pt")
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(record["state_dict"], strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert output_error(trained(x), model.eval()(x))["max_rel"] <= 1e-4


@pytest.mark.slow
def test_stored_data_config_naming_other_code_is_not_instantiated(tmp_path):
    marker = tmp_path / "PWNED"
    evil = {"_target_": "os.system", "command": f"touch {marker}"}
    ckpt, _ = _handmade_checkpoint(tmp_path / "c.ckpt", "cifar_quick", 3, SIZE, data={"datamodule": evil})
    report = deploy({"ckpt_path": str(ckpt), "output_dir": str(tmp_path / "out")})
    assert not marker.exists()
    assert "random normal input" in report["verification"]["input"]
    assert "only acnet_pl.data datamodules are instantiated" in report["verification"]["input"]


def test_conf_deploy_yaml_takes_its_options_from_the_one_dataclass():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        assert deploy_options(compose("deploy")) == DeployOptions() == deploy_options({})  # no second source
        cfg = compose("deploy", overrides=["ckpt_path=x.ckpt", "onnx=true", "verify.batches=3"])
    assert deploy_options(cfg) == DeployOptions(
        ckpt_path="x.ckpt", onnx=True, verify=VerifyOptions(batches=3)
    )
    assert deploy_options({"verify": {"seed": 4}}).verify == VerifyOptions(seed=4)  # a partial mapping
    assert DeployOptions().verify.logit_rtol == LOGIT_RTOL
    with pytest.raises(ValueError, match="verify.logit_rtol must be a number >= 0"):
        deploy_options({"verify": {"logit_rtol": -1}})
    with pytest.raises(ValueError, match="deploy option fold: Key 'fold' not in 'DeployOptions'"):
        deploy_options({"fold": True})
    with pytest.raises(ValueError, match="deploy option verify.batches: Value 'two'"):
        deploy_options({"verify": {"batches": "two"}})


def test_one_run_dir_rule_for_every_file_of_a_run(tmp_path):
    """run_dir: deploy.py's output, the stored data config, analyze's output and the W&B id on resume."""
    for given in (
        "r/checkpoints/last.ckpt",
        "r/deploy/deploy.pt",
        "r/deploy/last/deploy.pt",
        "r/hpc_ckpt_1.ckpt",
    ):
        assert checkpoint.run_dir(given) == Path("r"), given
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb_run_id").write_text("abc123\n")
    # Lightning's SLURM checkpoint sits in the run dir itself: its run's W&B id is found too
    assert previous_wandb_run_id(tmp_path / "run" / "hpc_ckpt_1.ckpt") == "abc123"
    assert previous_wandb_run_id(tmp_path / "run" / "checkpoints" / "last.ckpt") == "abc123"


def test_default_output_dir():
    # One folder per checkpoint under <run>/deploy/, never <run>/deploy itself (the fuse callback's files).
    assert default_output_dir("r/checkpoints/last.ckpt", "checkpoint") == Path("r/deploy/last")
    assert default_output_dir("r/checkpoints/epoch=3-step=40.ckpt", "checkpoint") == Path(
        "r/deploy/epoch=3-step=40"
    )
    assert default_output_dir("elsewhere/x.ckpt", "checkpoint") == Path("elsewhere/deploy/x")
    # A deploy.pt: beside it, never over it (nor over the callback's report.json beside it).
    assert default_output_dir("r/deploy/deploy.pt", "deploy") == Path("r/deploy/redeploy")


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------


class _MakesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def _bad_inputs(tmp: Path, ckpt: Path) -> dict[str, tuple[Path | None, str]]:
    """name -> (checkpoint path, what the one error line must say)."""
    raw = torch.load(ckpt, weights_only=True)
    cases: dict[str, tuple[Path | None, str]] = {"missing": (tmp / "nope.ckpt", "no such file")}
    (tmp / "text.ckpt").write_text("epoch,loss\n0,1.2\n")
    cases["text"] = (tmp / "text.ckpt", "not a checkpoint (it holds text")
    data = ckpt.read_bytes()
    (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp / "half.ckpt", "corrupt or truncated checkpoint")
    raw["hyper_parameters"]["model"]["name"] = "foo"
    torch.save(raw, tmp / "foo.ckpt")
    cases["unknown model"] = (tmp / "foo.ckpt", "unknown model 'foo'")
    torch.save(torchvision.models.resnet18().state_dict(), tmp / "tv.ckpt")
    cases["other program"] = (tmp / "tv.ckpt", "a bare state dict (122 tensors")
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _MakesMarker(tmp / "PWNED")}}, tmp / "evil.ckpt")
    cases["malicious pickle"] = (tmp / "evil.ckpt", "refused as unsafe: it needs posix.system")
    torch.save({"state_dict": {}, "hyper_parameters": {"model": _Custom()}}, tmp / "custom.ckpt")
    cases["custom class"] = (tmp / "custom.ckpt", "_Custom, which is not a tensor or plain container")
    cases["no ckpt_path"] = (None, "ckpt_path is missing")
    raw = torch.load(ckpt, weights_only=True)
    weight = next(k for k in raw["state_dict"] if k.startswith("model.") and k.endswith("weight"))
    raw["state_dict"][weight].view(-1)[0] = float("inf")
    torch.save(raw, tmp / "diverged.ckpt")
    cases["diverged"] = (tmp / "diverged.ckpt", "weights are not finite, 1 of ")
    raw["hyper_parameters"] = None
    record = make_deploy_record(
        _network_state(raw["state_dict"]),
        **{"model_name": "cifar_quick", "num_classes": 4, "block": {"name": "acb"}},
        **{k: v for k, v in _data_meta().items() if k != "class_names"},
    )
    torch.save(record, tmp / "nan_deploy.pt")
    cases["diverged deploy.pt"] = (tmp / "nan_deploy.pt", "hold NaN/Inf (first: ")
    return cases


def _network_state(state_dict: dict) -> dict:
    return {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}


BAD = [
    "missing",
    "text",
    "truncated",
    "unknown model",
    "other program",
    "malicious pickle",
    "custom class",
    "diverged",
    "diverged deploy.pt",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        *BAD,
        "no ckpt_path",
        "tolerance",
        "onnx mismatch",
        "overwrite input",
        "callback folder",
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "deploy.pt").write_bytes(b"earlier")  # a file of an earlier run, which must survive
    cfg: dict = {"output_dir": str(out)}
    if case == "tolerance":
        # Fusing changes float32 rounding (> 0 error): a zero tolerance must stop the run.
        cfg.update(ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"), onnx=True)
        cfg["verify"] = {"logit_rtol": 0.0}
        name, expected = "logit_rtol=0", "fused model: max relative error"
    elif case == "onnx mismatch":
        # Fails after deploy.pt was staged: the staging folder must go, deploy.pt must not appear.
        wrong = dataclasses.replace(
            EXPORTERS["onnx"],
            write=lambda model, record, path: Path(path).write_bytes(b"x"),
            load=lambda path: lambda x: torch.zeros(len(x), 4),
        )
        monkeypatch.setitem(EXPORTERS, "onnx", wrong)
        cfg.update(ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"), onnx=True)
        name, expected = "verify.logit_rtol=0.001", "deploy.onnx (onnxruntime): max relative error"
    elif case == "overwrite input":
        record = make_deploy_record(
            build_model("cifar_quick", 4).state_dict(),
            **{"model_name": "cifar_quick", "num_classes": 4, "block": {"name": "acb"}},
            **{k: v for k, v in _data_meta().items() if k != "class_names"},
        )
        torch.save(record, out / "deploy.pt")  # a real deploy.pt this time, re-deployed into its own folder
        cfg = {"ckpt_path": str(out / "deploy.pt"), "output_dir": str(out)}
        name, expected = "deploy.pt", "would overwrite the input"
    elif case == "callback folder":
        written = {"format": REPORT_FORMAT, "tool": "FuseCallback", "val": {}}
        (out / "report.json").write_text(json.dumps(written))
        cfg["ckpt_path"] = str(run_dir / "checkpoints" / "last.ckpt")
        name, expected = f"output_dir={out}", "holds the fuse callback's deploy.pt and report.json"
    else:
        path, expected = _bad_inputs(tmp_path, run_dir / "checkpoints" / "last.ckpt")[case]
        cfg["ckpt_path"] = None if path is None else str(path)
        name = "ckpt_path" if path is None else path.name
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(deploy)(cfg)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert name in lines[0] and expected in lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new, changed or staging files
    assert not (tmp_path / "PWNED").exists()


# -- the real command lines -----------------------------------------------------------------------------


def _run(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**isolated_env(cwd / "home"), "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.slow
def test_cli_refuses_malicious_pickle_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _MakesMarker(marker)}}, tmp_path / "evil.ckpt")
    result = _run([str(ROOT / "deploy.py"), "ckpt_path=evil.ckpt"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: evil.ckpt: refused as unsafe: it needs posix.system")
    assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "home"]  # no outputs/, .hydra/


@pytest.mark.slow
def test_train_then_deploy_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    train = run_train([*TINY_RUN, "block=acb", "logger=none", f"hydra.run.dir={run}"], tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    callback_files = _files(run / "deploy")
    assert sorted(callback_files) == ["deploy.pt", "report.json"]
    from_callback = load_deployed(run / "deploy" / "deploy.pt")  # FuseCallback's, at the end of training
    result = _run([str(ROOT / "deploy.py"), f"ckpt_path={run}/checkpoints/last.ckpt"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _files(run / "deploy") == callback_files  # untouched
    report = json.loads((run / "deploy" / "last" / "report.json").read_text())
    assert report["format"] == REPORT_FORMAT and report["tool"] == "deploy.py"
    assert report["model"] == {"name": "cifar_quick", "num_classes": 4}
    assert report["errors"]["fused"]["max_rel"] <= 1e-4
    assert "validation data (FakeDataModule" in report["verification"]["input"]
    assert "max error fused" in result.stdout and "deploy/last/deploy.pt" in result.stdout
    model = load_deployed(run / "deploy" / "last" / "deploy.pt")
    base = build_model("cifar_quick", num_classes=4)
    base.load_state_dict(read_deploy_record(run / "deploy" / "last" / "deploy.pt")["state_dict"], strict=True)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert output_error(base.eval()(x), model(x))["max_rel"] == 0.0
        # last.ckpt holds the final weights, so deploy.py and the callback deploy the same model.
        assert output_error(from_callback(x), model(x))["max_rel"] <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]  # deploy.py wrote nothing in its cwd
    # The sweep table still reads the callback's report.json: one run, its top-1, no traceback.
    top1 = 100 * json.loads(callback_files["report.json"])["val"]["after"]["top1"]
    assert sweep_table_main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].split() == [
        "fake",
        "cifar_quick",
        "acb",
        "1",
        f"{top1:.2f}",
        "+-",
        "0.00",
    ]
