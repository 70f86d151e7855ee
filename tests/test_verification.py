"""verification: the logit error and its verdict; full_fp32 (TF32 off inside, the caller's flags back after)."""

from __future__ import annotations

import pytest
import torch

from acnet_pl.deploy.verification import LOGIT_RTOL, LogitError, full_fp32, nonfinite_entries, output_error


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
