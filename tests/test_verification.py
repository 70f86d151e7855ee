"""verification.full_fp32: TF32 off inside, the caller's flags back after (also after an error)."""

from __future__ import annotations

import pytest
import torch

from acnet_pl.verification import full_fp32, nonfinite_entries


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
