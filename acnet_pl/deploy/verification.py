"""The one comparison engine: the trained model and its candidates (fused model, files read back) on the
same batches, one measure (``LogitError``) and one tolerance (``LOGIT_RTOL``) for every check."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from acnet_pl.deploy.config import LOGIT_RTOL

#: What the error entries of a report measure, in words (report.json's ``verification.measure``).
MEASURE = "max |out - ref| / max |ref| over all logits (float64)"


class LogitError:
    """max |out - ref| (``max_abs``) over max |ref| (``logit_scale``) = ``max_rel``, over every logit seen.

    Relative to the largest reference logit, not element-wise, so logits near zero do not blow it up.
    A NaN/Inf (or a batch of another shape) makes the error unknown (None), which never passes.
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
        """Why the outputs fail (one sentence starting with ``what``, naming ``tolerance_name``), or None."""
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
    """fp32 convolutions and matmuls in IEEE fp32 (TF32 off) on CUDA meanwhile.

    torch >= 2.9 keeps the choice in ``fp32_precision`` (reading the legacy ``allow_tf32`` after setting
    it raises), older torch in ``allow_tf32``.
    """
    b = torch.backends
    if hasattr(getattr(b.cudnn, "conv", None), "fp32_precision"):
        flags = [(b.cudnn.conv, "fp32_precision", "ieee"), (b.cuda.matmul, "fp32_precision", "ieee")]
    else:  # pragma: no cover - torch < 2.9
        flags = [(b.cudnn, "allow_tf32", False), (b.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved, strict=True):
            setattr(obj, name, value)


def nonfinite_entries(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an Inf.

    One host read per device, not one per tensor (a checkpoint of ResNet-20 ACB has ~300: on a GPU each
    read would wait for the device).
    """
    floats = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    by_device: dict[torch.device, list[str]] = {}
    for name, value in floats.items():
        by_device.setdefault(value.device, []).append(name)
    bad: set[str] = set()
    for names in by_device.values():
        finite = torch.stack([torch.isfinite(floats[name]).all() for name in names]).tolist()
        bad.update(name for name, ok in zip(names, finite, strict=True) if not ok)
    return [name for name in floats if name in bad]


def nonfinite_message(names: list[str], total: int) -> str:
    """`'3 of 22 tensors hold NaN/Inf (first: layer1.0.conv1.weight)'`, for error messages."""
    return f"{len(names)} of {total} tensors hold NaN/Inf (first: {names[0]})"


REFERENCE = "trained"


@dataclass(frozen=True)
class Candidate:
    """A form of the model (key ``name`` in the report's ``errors``, ``label`` in messages) that must reproduce
    ``against``'s logits; with ``max_top1_drop`` (INT8) judged by that drop of labelled top-1 in points."""

    name: str
    label: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    against: str = REFERENCE
    max_top1_drop: float | None = None

    def over_budget(self, val: dict[str, Any] | None) -> str | None:
        """Why ``val`` (``Comparison.val`` of this candidate) breaks the accuracy budget, or None."""
        if val is None:
            return f"{self.label}: its top-1 budget needs labelled validation data, and the batches had no labels"
        before, after = val["before"]["top1"], val["after"]["top1"]
        drop = 100 * (before - after)
        if drop > self.max_top1_drop:
            return (
                f"{self.label}: validation top-1 fell {drop:.2f} points ({100 * before:.2f}% -> {100 * after:.2f}%, "
                f"{val['samples']} samples), above quantize.max_top1_drop={self.max_top1_drop:g}; set "
                "quantize.keep_float=true to keep the most sensitive layers in float, or raise the budget"
            )
        return None


def _per_sample(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per row: NaN/Inf, top-1 class, top-1 hit, top-5 hit, and the smaller of the 1st-2nd and 5th-6th
    logit gaps (only there can rounding within tolerance flip a top-1 / top-5 hit)."""
    values, classes = logits.topk(min(6, logits.shape[1]), dim=1)
    gap = torch.full((len(logits),), float("inf"), dtype=torch.float64)
    for first in (0, 4):
        if values.shape[1] > first + 1:
            gap = torch.minimum(gap, values[:, first] - values[:, first + 1])
    hits = (
        torch.zeros(len(logits), 1, dtype=torch.bool) if labels is None else classes[:, :5] == labels[:, None]
    )
    columns = [(~torch.isfinite(logits)).any(1), classes[:, 0], hits[:, 0], hits.any(1), gap]
    return torch.stack([c.double() for c in columns], 1)


class Comparison:
    """The trained model (``reference``) and its candidates on the same batches, compared in float64:
    each candidate's ``LogitError``, the samples with NaN/Inf logits, with labels the report's ``val``."""

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
        self.samples, self.labelled = 0, False
        self._rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.forwards}

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Run every model on one batch ``x``; ``labels``: its classes, or None."""
        logits = {name: forward(x).detach().double().cpu() for name, forward in self.forwards.items()}
        for c in self.candidates:
            self.errors[c.name].update(logits[c.against], logits[c.name])
        labels = None if labels is None else labels.cpu()
        for name, out in logits.items():
            self._rows[name].append(_per_sample(out, labels))
        self.samples += len(x)
        self.labelled = self.labelled or labels is not None

    def run(
        self, batches: Iterable[Any], device: torch.device | str = "cpu", limit_batches: int | None = None
    ) -> Comparison:
        """``update`` on at most ``limit_batches`` batches (``x`` or ``(x, labels, ...)``), autocast off."""
        device = torch.device(device)
        with torch.autocast(device_type=device.type, enabled=False):
            for batch in itertools.islice(batches, limit_batches):
                x, labels = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                self.update(x.to(device, dtype=torch.float32), labels)
        return self

    def _samples_of(self, name: str) -> torch.Tensor:
        return torch.cat(self._rows[name]) if self._rows[name] else torch.zeros(0, 5, dtype=torch.float64)

    def problem(self, tolerance_name: str = "rtol") -> str | None:
        """Why a candidate fails (the first failure, one sentence), or None."""
        if self.samples == 0:
            return "no samples to verify the fused model on (the validation set is empty)"
        labels = {REFERENCE: "trained model", **{c.name: c.label for c in self.candidates}}
        for name in self.forwards:
            count = int(self._samples_of(name)[:, 0].sum())
            if count:
                return f"the {labels[name]} outputs NaN/Inf logits on {count} of {self.samples} samples"
        problems = (
            self.errors[c.name].problem(c.label, tolerance_name)
            if c.max_top1_drop is None
            else c.over_budget(self.val(c.name))
            for c in self.candidates
        )
        return next((problem for problem in problems if problem is not None), None)

    def val(self, name: str = "fused") -> dict[str, Any] | None:
        """The deploy report's ``val`` of candidate ``name`` against its model; None without labels.

        ``before`` / ``after``: top-1/top-5 of the two; ``top1_agreement``: share of samples with the same
        top-1 class; ``top1_flips`` / ``top5_flips``: samples whose hit changed; ``near_ties``: samples
        whose 1st/2nd or 5th/6th logits are within 2 x rtol x the logit scale.
        """
        if not self.labelled:
            return None
        against = next(c.against for c in self.candidates if c.name == name)
        ref, out = self._samples_of(against), self._samples_of(name)
        scale = self.errors[name].summary()["logit_scale"]
        n = max(self.samples, 1)

        def accuracy(rows: torch.Tensor) -> dict[str, Any]:
            top1, top5 = int(rows[:, 2].sum()), int(rows[:, 3].sum())
            return {"top1": top1 / n, "top5": top5 / n, "correct_top1": top1, "correct_top5": top5}

        return {
            "samples": self.samples,
            "before": accuracy(ref),
            "after": accuracy(out),
            "nonfinite_samples": {"before": int(ref[:, 0].sum()), "after": int(out[:, 0].sum())},
            "top1_agreement": int((ref[:, 1] == out[:, 1]).sum()) / n,
            "top1_flips": int((ref[:, 2] != out[:, 2]).sum()),
            "top5_flips": int((ref[:, 3] != out[:, 3]).sum()),
            "near_ties": 0 if scale is None else int((ref[:, 4] <= 2 * self.rtol * scale).sum()),
        }
