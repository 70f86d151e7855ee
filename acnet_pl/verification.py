"""Checking a fused model against the trained one: full-fp32 arithmetic, the logit tolerance, NaN/Inf.

Used by the fuse callback (end of training, on the training device) and by ``load_deployed`` /
``deploy.py`` (which name non-finite weights as the reason a file is refused).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

#: Largest accepted |logit(fused) - logit(trained)|, relative to the logit scale (max |logit(trained)|
#: over the verification set). Fusing is exact in real arithmetic, so the whole difference is rounding:
#: - fp32 with TF32 off (what ``full_fp32`` sets): ~1e-6 of the scale (CPU: cifar_quick after a short fit
#:   4.1e-7; ResNet-18 ACB with random BN statistics 1.0e-6 norm-wise); the three branches and the
#:   fused conv round differently, that is all.
#: - reduced-precision convs, were a flag left on: TF32 (u = 2**-11 = 4.9e-4) gave 3.7e-4 of the scale
#:   on an H200 (issue 11); 1e-3 stays above that, so the check never fails on rounding.
#: - a wrong fusion moves the logits by a fraction of their size: the 1xK branch left out 0.55 of the
#:   scale (tests/test_fuse_callback.py), a sign error in a restored non-affine BN 1.42 (issue 11).
#: With every logit within tol x scale, a sample's top-1 can change only where its two best logits are
#: within 2 x tol x scale (top-5 only where the 5th and 6th are): such samples are counted as
#: `near_ties`; top-1/top-5 counts before and after are reported, not judged.
LOGIT_RTOL = 1e-3


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Run fp32 convolutions and matmuls in IEEE fp32 (TF32 off) on CUDA; the previous flags come back after.

    torch >= 2.9 keeps the choice in ``torch.backends.{cudnn.conv,cuda.matmul}.fp32_precision`` (reading
    the legacy ``allow_tf32`` flags after setting those raises), older torch in ``allow_tf32``.
    """
    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        saved = (conv.fp32_precision, backends.cuda.matmul.fp32_precision)
        conv.fp32_precision = backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, backends.cuda.matmul.fp32_precision = saved
        return
    saved = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32)  # pragma: no cover - torch < 2.9
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False  # pragma: no cover
    try:  # pragma: no cover
        yield
    finally:  # pragma: no cover
        backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32 = saved


def nonfinite_entries(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an Inf."""
    return [
        name
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def nonfinite_message(names: list[str], total: int) -> str:
    """`'3 of 22 tensors hold NaN/Inf (first: layer1.0.conv1.weight)'`, for error messages."""
    return f"{len(names)} of {total} tensors hold NaN/Inf (first: {names[0]})"
