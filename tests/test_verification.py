"""verification: the comparison engine, the logit error and its verdict; full_fp32 (TF32 off inside, the
caller's flags back after)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from torch import nn

from acnet_pl.deploy.verification import (
    LOGIT_RTOL,
    Candidate,
    Comparison,
    LogitError,
    full_fp32,
    nonfinite_entries,
    output_error,
)


def _flags() -> tuple[str, str]:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_full_fp32_turns_tf32_off_and_restores_the_flags() -> None:
    # Pins torch's flag API (torch >= 2.9): if it moves, this test says so.
    saved = _flags()
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with full_fp32():
            assert _flags() == ("ieee", "ieee")
        assert _flags() == ("tf32", "tf32")
        with pytest.raises(RuntimeError), full_fp32():
            raise RuntimeError("boom")
        assert _flags() == ("tf32", "tf32")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_nonfinite_entries_names_float_tensors_only() -> None:
    tensors = {
        "a": torch.ones(2),
        "b": torch.tensor([1.0, float("nan")]),
        "c": torch.tensor([float("-inf")]),
        "steps": torch.tensor(3),
    }
    assert nonfinite_entries(tensors) == ["b", "c"]
    assert nonfinite_entries({"steps": torch.tensor(3)}) == [] and nonfinite_entries({}) == []
    # tensors of every floating dtype and shape, in the order given
    mixed = {"d": torch.zeros(0), "e": torch.tensor(float("inf"), dtype=torch.float64), "f": torch.ones(2, 2)}
    mixed["g"] = torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)
    assert nonfinite_entries(mixed) == ["e", "g"]


def test_output_error_numbers():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.0]], dtype=torch.float64)
    errors = output_error(ref, ref + torch.tensor([[0.0, 0.0], [0.0, 0.002]], dtype=torch.float64))
    assert errors["max_abs"] == pytest.approx(0.002, rel=1e-9)
    assert errors["max_rel"] == pytest.approx(0.002 / 4.0, rel=1e-9)  # scaled by max |ref|, not element-wise
    assert errors["logit_scale"] == 4.0
    # Another shape or a NaN: the error is unknown (None), never a pass.
    assert output_error(ref, ref[:1])["max_rel"] is None
    assert output_error(ref, torch.full_like(ref, float("nan")))["max_rel"] is None


def test_logit_error_over_batches_and_its_verdict():
    """The one check of the fuse callback and deploy.py: maxima over all batches, judged against rtol."""
    assert LOGIT_RTOL == 1e-3
    error = LogitError()
    ref = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    error.update(ref, ref + 1e-4)  # 1e-4 off, scale 2
    error.update(10 * ref, 10 * ref + 5e-3)  # 5e-3 off, scale 20: max_rel = 5e-3 / 20 = 2.5e-4
    summary = error.summary()
    assert summary["max_abs"] == pytest.approx(5e-3, rel=1e-6) and summary["logit_scale"] == 20.0
    assert summary["max_rel"] == pytest.approx(2.5e-4, rel=1e-6)
    assert error.problem("fused model") is None  # 2.5e-4 <= 1e-3
    strict = LogitError(rtol=1e-4)
    strict.update(10 * ref, 10 * ref + 5e-3)
    assert strict.problem("fused model", "verify.logit_rtol") == (
        "fused model: max relative error 2.500e-04 (max |logit diff| 5.000e-03, logit scale 20) is above "
        "verify.logit_rtol=0.0001"
    )
    error.update(ref, torch.tensor([[float("nan"), 0.0]]))
    assert error.summary()["max_rel"] is None
    assert "outputs NaN/Inf logits" in error.problem("deploy.onnx")


# --------------------------------------------------------------------------------------------------
# the comparison engine: trained model vs candidates over the same batches


def _compare(trained: nn.Module, fused: nn.Module, batches: Iterable) -> Comparison:
    return Comparison(trained, [Candidate("fused", "fused model", fused)]).run(batches)


class FixedLogits(nn.Module):
    """Returns row `int(x[i])` of a fixed logit table: a 'model' whose outputs a test chooses exactly."""

    def __init__(self, logits: torch.Tensor, relative_noise: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        noise = torch.zeros_like(logits)
        if relative_noise:
            generator = torch.Generator().manual_seed(seed)
            uniform = torch.rand(logits.shape, generator=generator, dtype=logits.dtype)
            noise = (uniform * 2 - 1) * relative_noise
        self.table = logits * (1 + noise)  # not a buffer: no weights, whatever the logits hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()]


def _near_tied_logits(n: int, classes: int, gap: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of scale 10 whose 1st/2nd and 5th/6th places are within `gap`; labels at rank 1 or rank 5."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2).clamp(-9, 9)
    order = logits.argsort(dim=1, descending=True)
    rows = torch.arange(n)

    def within_gap() -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64) * gap

    logits[rows, order[:, 0]] = 10.0
    logits[rows, order[:, 1]] = 10.0 - within_gap()
    logits[rows, order[:, 5]] = logits[rows, order[:, 4]] - within_gap()
    labels = torch.where(rows % 2 == 0, order[:, 0], order[:, 4])
    return logits, labels


def test_reduced_precision_rounding_on_near_ties_is_accepted() -> None:
    """TF32-like rounding (4e-4 relative on every logit) over 4000 near-tied samples: flips, yet accepted.

    Many top-1/top-5 hits flip (the old rule, counts within one sample, refused this), but every
    flip is at a near-tie and every logit is within tolerance.
    """
    logits, labels = _near_tied_logits(4000, 10, gap=2e-3)
    trained = FixedLogits(logits)
    fused = FixedLogits(logits, relative_noise=4e-4)
    index = torch.arange(len(labels), dtype=torch.float32)
    batches = [(index[i : i + 500], labels[i : i + 500]) for i in range(0, len(labels), 500)]
    comparison = _compare(trained, fused, batches)
    assert comparison.problem() is None
    assert (
        3.9e-4 < comparison.errors["fused"].summary()["max_rel"] <= 4e-4
    )  # the emulated rounding, at full size
    result = comparison.val()
    assert result["top1_flips"] > 100 and result["top5_flips"] > 50  # 531 and 66
    before, after = result["before"], result["after"]
    assert abs(before["correct_top1"] - after["correct_top1"]) > 1  # what the old rule refused
    assert result["top1_flips"] <= result["near_ties"] and result["top5_flips"] <= result["near_ties"]


@pytest.mark.parametrize("error", [2e-3, 1e-2])
def test_a_logit_error_beyond_rounding_is_refused(error: float) -> None:
    """The same set with one class's logit off by `error` x the scale (a wrong fusion): refused."""
    logits, labels = _near_tied_logits(4000, 10, gap=2e-3)
    wrong = logits.clone()
    wrong[:, 3] += error * logits.abs().max()
    trained, fused = FixedLogits(logits), FixedLogits(wrong)
    index = torch.arange(len(labels), dtype=torch.float32)
    comparison = _compare(trained, fused, [(index, labels)])
    assert comparison.errors["fused"].summary()["max_rel"] == pytest.approx(error, rel=1e-6)
    message = comparison.problem("logit_rtol")
    assert message is not None and message.startswith("fused model: max relative error")
    assert "above logit_rtol=0.001" in message


def test_nan_logits_of_the_fused_model_are_counted_not_hidden() -> None:
    """One NaN logit in one sample: max |diff| is not a number (no max(0.0, nan) == 0.0) and it is refused."""
    logits, labels = _near_tied_logits(40, 10, gap=1e-3)
    broken = logits.clone()
    broken[7, 2] = float("nan")
    trained, fused = FixedLogits(logits), FixedLogits(broken)
    comparison = _compare(trained, fused, [(torch.arange(40, dtype=torch.float32), labels)])
    assert comparison.errors["fused"].summary() == {"max_abs": None, "max_rel": None, "logit_scale": None}
    assert comparison.val()["nonfinite_samples"] == {"before": 0, "after": 1}
    assert comparison.problem() == "the fused model outputs NaN/Inf logits on 1 of 40 samples"


def test_comparison_top5_with_ten_classes() -> None:
    """10 classes, the label at rank 1..10 in turn (twice): top-1 and top-5 counts are exact."""
    ranks = torch.arange(20) % 10  # label rank 0 (best) .. 9
    logits = torch.arange(10, 0, -1, dtype=torch.float32).repeat(20, 1)  # class c has logit 10 - c
    labels = ranks.clone()  # class r sits at rank r
    model = FixedLogits(logits)
    index = torch.arange(20, dtype=torch.float32)
    result = _compare(model, model, [(index[:7], labels[:7]), (index[7:], labels[7:])]).val()
    assert result["before"]["correct_top1"] == 2  # ranks 1 only
    assert result["before"]["correct_top5"] == 10  # ranks 1-5, twice
    assert result["before"]["top5"] == 0.5
    # the label at ranks 2nd-6th: top-1 misses all 5, top-5 hits ranks 2-5 (4), misses the 6th
    second_to_sixth = (ranks >= 1) & (ranks <= 5)
    result = _compare(model, model, [(index[second_to_sixth], labels[second_to_sixth])]).val()
    assert (result["before"]["correct_top1"], result["before"]["correct_top5"]) == (0, 8)


def test_comparison_counts_and_difference() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    shifted = nn.Linear(5, 3)
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        shifted.bias += 0.25
    x = torch.randn(10, 5)
    y = model(x).argmax(1)
    comparison = _compare(model, shifted, [(x[:6], y[:6]), (x[6:], y[6:])])
    result = comparison.val()
    assert result["samples"] == comparison.samples == 10
    assert result["before"]["correct_top1"] == 10 and result["before"]["top1"] == 1.0
    assert result["before"]["correct_top5"] == 10  # top-5 capped at 3 classes: always a hit
    assert result["after"] == result["before"]  # a constant shift keeps the ranking
    assert comparison.errors["fused"].summary()["max_abs"] == pytest.approx(0.25, abs=1e-6)


def test_every_candidate_against_its_own_reference_without_labels() -> None:
    """deploy.py's case: files compared with the fused model, no labels (no val), problems in order."""
    logits = torch.tensor([[4.0, -2.0, 1.0], [0.5, 3.0, -1.0]], dtype=torch.float64)
    trained, fused = FixedLogits(logits), FixedLogits(logits, relative_noise=1e-6)
    files = [
        Candidate("deploy_pt", "deploy.pt reloaded", FixedLogits(fused.table), against="fused"),
        Candidate("onnx", "deploy.onnx (onnxruntime)", lambda x: fused(x) + 0.01, against="fused"),
    ]
    candidates = [Candidate("fused", "fused model", fused), *files]
    comparison = Comparison(trained, candidates).run([torch.arange(2.0)])
    assert comparison.val() is None  # no labels: no accuracy
    assert comparison.errors["deploy_pt"].summary()["max_abs"] == 0.0  # the same logits as the fused model
    assert 0 < comparison.errors["fused"].summary()["max_rel"] <= 1e-6
    # against the fused logits (scale 4 x (1 +- 1e-6)), not the trained ones
    assert comparison.errors["onnx"].summary()["max_rel"] == pytest.approx(0.01 / 4.0, rel=2e-6)
    assert comparison.problem("verify.logit_rtol").startswith(
        "deploy.onnx (onnxruntime): max relative error 2.500e-03"
    )
    assert Comparison(trained, candidates).problem() == (
        "no samples to verify the fused model on (the validation set is empty)"
    )
