"""Checking deployed forms against the trained model: the comparison engine, the logit error, full fp32.

One measure and one tolerance for every check: ``LogitError`` (max |out - ref| / max |ref| over all
logits) judged against ``LOGIT_RTOL`` (``config.py`` says why 1e-3). ``Comparison`` runs the trained
model and its candidates (the fused model, every file written and read back) over the same batches; the
deploy pipeline (fuse callback and deploy.py) judges them with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from acnet_pl.deploy.config import LOGIT_RTOL

#: What the error entries of a report measure, in words (report.json's ``verification.measure``).
MEASURE = "max |out - ref| / max |ref| over all logits (float64)"


class LogitError:
    """The error of some logits against reference logits, over any number of batches, and its verdict.

    ``max_abs`` = max |out - ref|, ``logit_scale`` = max |ref|, ``max_rel`` = their ratio, all over every
    logit seen. The error is relative to the largest reference logit, not element-wise, so logits near
    zero do not blow it up. A NaN/Inf (or a batch whose shape differs) makes the error unknown (None),
    which never passes.

    Args:
        rtol: the largest accepted ``max_rel`` (``LOGIT_RTOL`` says why 1e-3).
    """

    def __init__(self, rtol: float = LOGIT_RTOL) -> None:
        self.rtol = float(rtol)
        self._diff = torch.zeros((), dtype=torch.float64)
        self._scale = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, reference: torch.Tensor, output: torch.Tensor) -> None:
        """Add one batch of logits and its reference (any device; compared in float64)."""
        ref = torch.as_tensor(reference).detach().double()
        out = torch.as_tensor(output).detach().double()
        if ref.shape != out.shape:
            self._diff = torch.tensor(float("inf"), dtype=torch.float64)
            return
        if ref.numel() == 0:
            return
        # torch.maximum keeps a NaN (Python's max(0.0, nan) is 0.0 and would hide it)
        self._diff = torch.maximum(self._diff, (out - ref).abs().max().cpu())
        self._scale = torch.maximum(self._scale, ref.abs().max().cpu())

    def summary(self) -> dict[str, float | None]:
        """``{"max_abs", "max_rel", "logit_scale"}``, each None when a logit was NaN/Inf."""
        diff, scale = float(self._diff), float(self._scale)
        if not (torch.isfinite(self._diff) and torch.isfinite(self._scale)):
            return {"max_abs": None, "max_rel": None, "logit_scale": None}
        return {"max_abs": diff, "max_rel": diff / scale if scale > 0 else diff, "logit_scale": scale}

    def problem(self, what: str, tolerance_name: str = "rtol") -> str | None:
        """Why the outputs fail the check (one sentence starting with ``what``), or None when they pass.

        Args:
            tolerance_name: the setting that holds ``rtol``, named in the message so it can be changed.
        """
        errors = self.summary()
        if errors["max_rel"] is None:
            return f"{what}: outputs NaN/Inf logits (or logits of another shape)"
        if not errors["max_rel"] <= self.rtol:
            return (
                f"{what}: max relative error {errors['max_rel']:.3e} (max |logit diff| {errors['max_abs']:.3e}, "
                f"logit scale {errors['logit_scale']:.3g}) is above {tolerance_name}={self.rtol:g}"
            )
        return None


def output_error(reference: torch.Tensor, output: torch.Tensor) -> dict[str, Any]:
    """``LogitError(...).summary()`` of one pair of logit tensors: max_abs, max_rel, logit_scale."""
    error = LogitError()
    error.update(reference, output)
    return error.summary()


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


#: The name of the model every candidate is compared with, by default: the trained one.
REFERENCE = "trained"


@dataclass(frozen=True)
class Candidate:
    """A form of the model that must reproduce another one's logits: the fused model, a file read back.

    A further form (e.g. a quantised ONNX file) is one more candidate; its top-1/top-5 are counted when
    the batches carry labels.

    Args:
        name: its key in the deploy report's ``errors`` (``fused``, ``deploy_pt``, ``onnx``, ...).
        label: how messages name it (``fused model``, ``deploy.onnx (onnxruntime)``).
        forward: a batch of inputs (on the comparison's device) -> logits (any device).
        against: the name of the model it is compared with (``REFERENCE``, or another candidate's).
    """

    name: str
    label: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    against: str = REFERENCE


def _rank_gaps(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the smaller of (1st - 2nd) and (5th - 6th) largest logit (inf where a rank is missing)."""
    k = min(6, logits.shape[1])
    top = logits.topk(k, dim=1).values
    gap = torch.full((logits.shape[0],), float("inf"), dtype=logits.dtype)
    if k >= 2:
        gap = torch.minimum(gap, top[:, 0] - top[:, 1])
    if k >= 6:
        gap = torch.minimum(gap, top[:, 4] - top[:, 5])
    return gap


class Comparison:
    """The trained model and its candidates run over the same batches, everything counted in float64.

    Per candidate: its ``LogitError`` against the model it must reproduce, samples with NaN/Inf logits,
    top-1 agreement; with labels also top-1/top-5 of every model, the samples whose top-1 / top-5 hit
    changed (flips) and the near-ties where rounding within tolerance may flip one (``LOGIT_RTOL``).

    Args:
        reference: the trained model (or any callable giving logits).
        candidates: what must reproduce it, in the order their problems are reported.
        rtol: the tolerance of every candidate's logit error.
    """

    def __init__(
        self,
        reference: Callable[[torch.Tensor], torch.Tensor],
        candidates: Sequence[Candidate],
        rtol: float = LOGIT_RTOL,
    ) -> None:
        self.candidates = list(candidates)
        self.forwards = {REFERENCE: reference, **{c.name: c.forward for c in self.candidates}}
        self.rtol = float(rtol)
        self.errors = {c.name: LogitError(rtol) for c in self.candidates}
        self.samples = 0
        self.labelled = False
        self.nonfinite = dict.fromkeys(self.forwards, 0)
        self.correct = {name: [0, 0] for name in self.forwards}  # top-1, top-5
        self.same_top1 = dict.fromkeys(self.errors, 0)
        self.flips = {name: [0, 0] for name in self.errors}
        self._gaps: dict[str, list[torch.Tensor]] = {c.against: [] for c in self.candidates}

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Run every model on one batch ``x`` and count (``labels``: the classes, or None)."""
        logits = {name: forward(x).detach().double().cpu() for name, forward in self.forwards.items()}
        hits = {}
        for name, out in logits.items():
            self.nonfinite[name] += int((~torch.isfinite(out)).any(dim=1).sum())
            if labels is not None:
                top = out.topk(min(5, out.shape[1]), dim=1).indices == labels.cpu()[:, None]
                hits[name] = (top[:, 0], top.any(dim=1))
                self.correct[name][0] += int(hits[name][0].sum())
                self.correct[name][1] += int(hits[name][1].sum())
        for c in self.candidates:
            ref, out = logits[c.against], logits[c.name]
            self.errors[c.name].update(ref, out)
            if ref.shape == out.shape:
                self.same_top1[c.name] += int((ref.argmax(1) == out.argmax(1)).sum())
            if labels is not None:
                for k in (0, 1):
                    self.flips[c.name][k] += int((hits[c.against][k] != hits[c.name][k]).sum())
        if labels is not None:  # near-ties matter only where a hit can flip
            for against, gaps in self._gaps.items():
                gaps.append(_rank_gaps(logits[against]))
        self.labelled = self.labelled or labels is not None
        self.samples += len(x)

    def run(
        self, batches: Iterable[Any], device: torch.device | str = "cpu", limit_batches: int | None = None
    ) -> Comparison:
        """``update`` on every batch (``x`` or ``(x, labels, ...)``) up to ``limit_batches``, on ``device``,
        in float32 with autocast off."""
        device = torch.device(device)
        with torch.autocast(device_type=device.type, enabled=False):
            for index, batch in enumerate(batches):
                if limit_batches is not None and index >= limit_batches:
                    break
                x, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                self.update(x.to(device, dtype=torch.float32), labels)
        return self

    def problem(self, tolerance_name: str = "rtol") -> str | None:
        """Why a candidate fails (one sentence, the first failure in candidate order), or None.

        Args:
            tolerance_name: the setting that holds ``rtol``, named in the message so it can be changed.
        """
        if self.samples == 0:
            return "no samples to verify the fused model on (the validation set is empty)"
        labels = {REFERENCE: "trained model", **{c.name: c.label for c in self.candidates}}
        for name, count in self.nonfinite.items():
            if count:
                return f"the {labels[name]} outputs NaN/Inf logits on {count} of {self.samples} samples"
        for c in self.candidates:
            problem = self.errors[c.name].problem(c.label, tolerance_name)
            if problem is not None:
                return problem
        return None

    def accuracy(self, name: str) -> dict[str, Any]:
        """``{top1, top5, correct_top1, correct_top5}`` of one model (counts of labelled batches)."""
        top1, top5 = self.correct[name]
        n = max(self.samples, 1)
        return {"top1": top1 / n, "top5": top5 / n, "correct_top1": top1, "correct_top5": top5}

    def val(self, name: str = "fused") -> dict[str, Any] | None:
        """The deploy report's ``val`` of candidate ``name`` against its model, None without labels.

        ``before`` / ``after``: top-1/top-5 of the two; ``top1_agreement``: the share of samples with the
        same top-1 class; ``top1_flips`` / ``top5_flips``: samples whose hit changed; ``near_ties``:
        samples whose 1st/2nd or 5th/6th logits are within 2 x rtol x the logit scale.
        """
        if not self.labelled:
            return None
        against = next(c.against for c in self.candidates if c.name == name)
        scale = self.errors[name].summary()["logit_scale"]
        gaps = self._gaps[against]
        near = int((torch.cat(gaps) <= 2 * self.rtol * scale).sum()) if gaps and scale is not None else 0
        return {
            "samples": self.samples,
            "before": self.accuracy(against),
            "after": self.accuracy(name),
            "nonfinite_samples": {"before": self.nonfinite[against], "after": self.nonfinite[name]},
            "top1_agreement": self.same_top1[name] / max(self.samples, 1),
            "top1_flips": self.flips[name][0],
            "top5_flips": self.flips[name][1],
            "near_ties": near,
        }
