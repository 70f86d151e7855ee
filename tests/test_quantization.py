"""quantize=int8: deploy.int8.onnx from ONNX Runtime static quantization, verified against a top-1 budget on
the validation set, explained per conv, refused in one line when over budget or when its inputs are bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import pytest
import torch
import yaml

from acnet_pl.cli.common import exit_on_user_error
from acnet_pl.cli.deploy import deploy
from acnet_pl.data import DigitsDataModule
from acnet_pl.deploy.config import QuantizeOptions, check_quantize_overrides
from acnet_pl.deploy.quantization import INT8_FILE, kernel_stats, quantize_onnx
from acnet_pl.training.callbacks import FuseCallback
from acnet_pl.training.module import ACNetModule

DIGITS = {
    "_target_": "acnet_pl.data.DigitsDataModule",
    "image_size": 16,
    "batch_size": 64,
    "num_workers": 0,
    "pin_memory": False,
    "persistent_workers": False,
}
FAST = {"calibration_images": 128, "max_top1_drop": 1.0}  # 1 point: the acceptance, 3 of 360 samples


def _fit(root: Path, callbacks=(), epochs: int = 2) -> ACNetModule:
    """cifar_quick (ACB) fitted on digits at 16 px: ~90% top-1 after 1-2 epochs, seconds on a CPU."""
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(**{k: v for k, v in DIGITS.items() if k != "_target_"})
    module = ACNetModule(
        model={"name": "cifar_quick", "num_classes": 10},
        block={"name": "acb"},
        data={"input_size": list(data.input_size), "mean": list(data.mean), "std": list(data.std)},
        optimizer={
            "_target_": "torch.optim.SGD",
            "_partial_": True,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 1e-4,
        },
    )
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "checkpoints" / "last.ckpt")
    (root / ".hydra").mkdir(exist_ok=True)
    (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": DIGITS, "seed": 0}))
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("digits")
    _fit(run)
    return run


@pytest.fixture(scope="module")
def deployed(run_dir) -> dict:
    return deploy({"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"), "quantize": FAST})


@pytest.mark.slow
def test_int8_file_within_budget_with_the_report_fields(deployed, run_dir):
    out = run_dir / "deploy" / "last"
    assert deployed["ok"] and deployed["files"]["int8"] == INT8_FILE
    assert {"deploy.pt", "deploy.onnx", INT8_FILE, "quantization.png", "report.json"} <= {
        p.name for p in out.iterdir()
    }
    q = json.loads((out / "report.json").read_text())["quantization"]
    assert q["method"] == "minmax" and q["per_channel"] and q["calibration_images"] == 128
    assert q["validation_samples"] == 360  # the whole digits validation split
    assert q["top1"]["fp32"] > 0.8 and abs(q["top1"]["drop_points"]) <= 1.0
    # the file read back by the verification engine: the same top-1 as quantize_int8 measured
    val = deployed["errors"]["int8"]
    assert val["max_rel"] < 0.2  # int8 logits: percent-level error, not fp32 rounding
    # three convs and two Linear (Gemm), each with its sensitivity and kernel statistics
    assert [layer["weight"].split(".")[0] for layer in q["layers"]] == ["features"] * 3 + ["classifier"] * 2
    for layer in q["layers"]:
        assert layer["alone_logit_rel_error"] > 0 and set(layer["kernel"]) == {
            "max_over_std_mean",
            "max_over_std_max",
            "range",
            "channel_range_spread",
        }
    assert 3.0 < q["bytes"]["ratio"] < 4.2  # int8 weights: about a quarter of the fp32 file
    assert q["latency_ms"]["fp32"] > 0 and q["latency_ms"]["int8"] > 0
    assert q["kept_float"] == [] and q["keep_float_tries"] == []


@pytest.mark.slow
def test_over_budget_is_one_line_exit_2_and_leaves_no_int8_file(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = {"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"), "output_dir": str(out)}
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(deploy)({**cfg, "quantize": {**FAST, "max_top1_drop": -1}})
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "above quantize.max_top1_drop=-1" in lines[0]
    assert not out.exists()  # nothing written, not even the folder


def _outlier_checkpoint(run_dir: Path, tmp_path: Path) -> Path:
    """The run's checkpoint with one conv made hard to quantize per tensor and the function unchanged: a
    channel of the second conv 100x larger, its output zeroed by the third conv's weights."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    second = next(
        k for k in state if k.startswith("model.features.4") and k.endswith("weight") and state[k].dim() == 4
    )
    third = [
        k for k in state if k.startswith("model.features.8") and k.endswith("weight") and state[k].dim() == 4
    ]
    state[second][0] *= 100.0
    for key in third:
        state[key][:, 0] = 0.0
    root = tmp_path / "outlier"
    (root / "checkpoints").mkdir(parents=True)
    (root / ".hydra").mkdir()
    (root / ".hydra" / "config.yaml").write_text((run_dir / ".hydra" / "config.yaml").read_text())
    torch.save(ckpt, root / "checkpoints" / "last.ckpt")
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_keep_float_keeps_the_sensitive_convs_until_the_budget_holds(run_dir, tmp_path, capsys):
    path = _outlier_checkpoint(run_dir, tmp_path)
    hard = {**FAST, "per_channel": False, "max_top1_drop": 1.0}
    with pytest.raises(SystemExit):
        exit_on_user_error(deploy)({"ckpt_path": str(path), "quantize": hard})
    assert "above quantize.max_top1_drop=1" in capsys.readouterr().err
    report = deploy({"ckpt_path": str(path), "quantize": {**hard, "keep_float": True}})
    q = report["quantization"]
    assert report["ok"] and q["top1"]["drop_points"] <= 1.0 and q["kept_float"]
    # the ranking's first: the conv whose quantization alone costs most, the one with the outlier channel,
    # which its kernel statistics single out (largest / median channel max|w|: ~25 against <= 3)
    worst = max(q["layers"], key=lambda r: r["alone_top1_drop"])
    assert worst["weight"] == "features.4.weight" == q["kept_float"][0]["weight"]
    assert (
        worst["kernel"]["channel_range_spread"]
        > 10
        > max(r["kernel"]["channel_range_spread"] for r in q["layers"] if r is not worst)
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", ["too few", "more than the training set", "no validation data"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if case == "too few":
        quantize, expected = {"calibration_images": 4}, "quantize.calibration_images=4 is too few"
    elif case == "more than the training set":
        quantize, expected = {"calibration_images": 100000}, "the training set holds 1437 images"
    else:  # a checkpoint away from its run folder and without a stored data config
        raw = torch.load(ckpt, weights_only=True)
        raw["hyper_parameters"].pop("data", None)
        ckpt = tmp_path / "alone.ckpt"
        torch.save(raw, ckpt)
        quantize, expected = FAST, "quantize=int8 needs the run's labelled validation data"
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(deploy)({"ckpt_path": str(ckpt), "output_dir": str(out), "quantize": quantize})
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()


def test_a_model_the_quantizer_cannot_handle_is_one_line(tmp_path):
    # A conv followed by an op of a domain ONNX Runtime does not know: its calibration session cannot start.
    weight = onnx.numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["input", "w"], ["y"], name="conv"),
            onnx.helper.make_node("Mystery", ["y"], ["logits"], name="mystery", domain="example.custom"),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 2, 4, 4])],
        [weight],
    )
    opsets = [onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("example.custom", 1)]
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets), tmp_path / "odd.onnx")
    with pytest.raises(ValueError, match="ONNX Runtime could not quantize odd.onnx") as err:
        quantize_onnx(tmp_path / "odd.onnx", tmp_path / "q.onnx", torch.randn(16, 3, 4, 4), QuantizeOptions())
    assert "\n" not in str(err.value) and "Mystery" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.onnx"]  # no half-written file


def test_kernel_stats_of_a_peaky_kernel():
    flat = np.tile(np.linspace(-1.0, 1.0, 9, dtype=np.float32), (2, 1))  # max|w|/std = 1.55
    peaky = flat.copy()
    peaky[1, 4] = 10.0
    assert kernel_stats(peaky.reshape(2, 1, 3, 3))["max_over_std_max"] == pytest.approx(
        10.0 / peaky[1].astype(np.float64).std(), rel=1e-6
    )
    assert kernel_stats(flat)["channel_range_spread"] == pytest.approx(1.0)


@pytest.mark.slow
def test_fuse_callback_switch_writes_the_int8_file(tmp_path):
    _fit(tmp_path, callbacks=[FuseCallback(quantize={**FAST, "max_top1_drop": 2.0})], epochs=1)
    report = json.loads((tmp_path / "deploy" / "report.json").read_text())
    assert (
        report["ok"] and report["files"]["int8"] == INT8_FILE and (tmp_path / "deploy" / INT8_FILE).is_file()
    )
    assert report["quantization"]["validation_samples"] == 360


def test_quantize_int8_on_the_command_line_takes_the_defaults():
    from acnet_pl.deploy.config import deploy_options

    assert deploy_options({"quantize": "int8"}).quantize == QuantizeOptions()
    assert deploy_options({}).quantize is None
    with pytest.raises(ValueError, match="quantize.calibration_images=4 is too few"):
        deploy_options({"quantize": {"calibration_images": 4}})
    with pytest.raises(ValueError, match="quantize.method='kl': choose one of minmax, entropy, percentile"):
        deploy_options({"quantize": {"method": "kl"}})
    # on the command line an option without the group would be Hydra's traceback: one line instead
    with pytest.raises(ValueError, match="quantize.method is an INT8 option: add quantize=int8"):
        check_quantize_overrides(["ckpt_path=x", "quantize.method=entropy"])
    check_quantize_overrides(["quantize=int8", "quantize.method=entropy"])


@pytest.mark.slow
def test_analyze_shows_int8_side_by_side(deployed, run_dir, tmp_path, capsys):
    from acnet_pl.cli.analyze import main as analyze_main

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)  # a second run: the same numbers under another label
    assert analyze_main([str(run_dir), str(other), "-o", str(tmp_path / "out"), "--limit-batches", "1"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("INT8 (the run's deploy report") :].splitlines()
    q = deployed["quantization"]
    assert "int8 top-1" in table[1] and len([line for line in table if line.startswith("acb (")]) == 2
    assert f"{100 * q['top1']['int8']:.3f}" in table[3]
    assert (tmp_path / "out" / "quantization.png").stat().st_size > 10_000
    runs = json.loads((tmp_path / "out" / "analysis.json").read_text())["runs"]
    assert runs[0]["quantization"]["layers"] == q["layers"]
