"""``convert``: every conv -> BN pair of a model (found from its data flow, so a torchvision or timm model
is converted as it is) becomes a block; what stays out of reach is reported in a ``ConversionReport``."""

from __future__ import annotations

import copy
import fnmatch
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from acnet_pl.blocks import get_block
from acnet_pl.reparam.graph import BN_TYPES, after_norm, conv_bn_flow, set_module
from acnet_pl.reparam.slots import BARE_CONV, BNSlot, NormActSlot, bn_config, conv_config

log = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What ``convert`` changed and what it left alone, and why."""

    block: str = "base"
    converted: list[str] = field(default_factory=list)  # conv -> BN pairs: fuse restores conv + BN
    bare: list[str] = field(default_factory=list)  # convs with no BN after them: fuse gives conv + bias
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs: counts and the reasons for skipping."""
        if self.block == "base":
            return "block=base: model left as it is"
        total = len(self.converted) + len(self.bare) + len(self.skipped)
        line = f"converted {len(self.converted) + len(self.bare)} of {total} convs to {self.block}"
        if self.bare:
            line += f" ({len(self.bare)} of them bare convs, fused into a conv with bias)"
        if self.skipped:
            reasons = Counter(reason for _, reason in self.skipped).most_common()
            line += "; skipped " + ", ".join(f"{n} ({reason})" for reason, n in reasons)
        if self.untraced:
            line += "; could not trace " + ", ".join(name or "<root>" for name, _ in self.untraced)
        return line


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _new_block(make: Callable[..., nn.Module], block: str, options: dict[str, Any], *args: Any) -> nn.Module:
    """``make(*args, **options)``; an option the block does not take (the TypeError of the call names it,
    also from a constructor ``**options`` are passed on to) is a ValueError naming the config key."""
    try:
        return make(*args, **options)
    except TypeError as err:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if found is None or found.group(1) not in options:
            raise
    key = found.group(1)
    raise ValueError(f"block {block} takes no option {key}; remove it (~block.{key} on the command line)")


def convert(
    model: nn.Module,
    block: str = "acb",
    *,
    kernel_sizes: Sequence[int] = (3, 5),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    inplace: bool = False,
    report: ConversionReport | None = None,
    bare_convs: bool | str = False,
    **block_options: Any,
) -> nn.Module:
    """Replace every eligible KxK conv that feeds a BatchNorm2d by ``block`` (``"base"``: no change).

    ``block`` is a name of ``list_blocks()`` or ``"package.module:ClassName"``; the BN becomes a
    ``BNSlot`` (``NormActSlot`` for a norm-act layer) that ``fuse`` restores.

    Args:
        kernel_sizes: square kernel sizes to convert (default: the original's rule 1 < K < 7, odd).
        include / exclude: fnmatch patterns on conv module names (``"layer1.*"``); include=None means all.
        inplace: modify ``model`` itself instead of a deep copy.
        report: a ``ConversionReport`` to fill (then the caller reports it; else the summary is logged).
        bare_convs: True also converts KxK convs whose output does not go only into a BatchNorm2d (the
            stem and BN-ReLU-conv units of pre-activation nets), as the original's builder does: fresh
            branch BNs, fused into a conv with bias (``added_biases``), listed in ``report.bare``.
            ``"all"``: every KxK conv becomes a bare block and every BN stays where it is (the original
            on pre-activation nets, where the BN after a conv is the next unit's: its WRN-16-8).
        block_options: the block's (ACB: ``impl``, ``branches``, ...). ``gamma_init`` sets every branch
            BN's weight, the one taking the model's BN included (for training from scratch, as the
            original; None keeps a pretrained weight); a mapping of conv-name patterns to values takes
            the first match, None for no match: ``{"conv1": 1/3}`` is the original's WRN.
    """
    block_cls = None if block == "base" else get_block(block)
    # A caller that passes a report reports it itself (e.g. once, on rank zero); otherwise log it here.
    log_summary = report is None
    report = report if report is not None else ConversionReport()
    report.block = block
    if not inplace:
        model = copy.deepcopy(model)
    if block == "base":
        if block_options:
            raise ValueError(f"block=base takes no block options, got {sorted(block_options)}")
        return model
    if bare_convs not in (False, True, "all"):
        raise ValueError(f"bare_convs must be false, true or 'all'; got {bare_convs!r}")
    gamma = block_options.get("gamma_init")
    for pattern, value in gamma.items() if isinstance(gamma, Mapping) else ():
        if not isinstance(pattern, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"gamma_init as a mapping takes conv name patterns to numbers, e.g. {{'conv1': 0.333}}; "
                f"got {pattern!r}: {value!r}"
            )
    unsupported_reason = getattr(block_cls, "unsupported_reason", None)
    kernel_sizes = tuple(int(k) for k in kernel_sizes)
    flow = conv_bn_flow(model)
    report.untraced.extend(flow.untraced)
    pairs = dict(flow.pairs)
    for name, m in model.named_modules():
        if type(m) is not nn.Conv2d:
            continue
        kh, kw = m.kernel_size
        bare = bool(bare_convs) and name in flow.seen and (name not in pairs or bare_convs == "all")
        if name not in pairs and not bare:
            reason = flow.not_paired.get(name, "output does not feed a BatchNorm2d")
        elif kh != kw:
            reason = "non-square kernel"
        elif kh not in kernel_sizes:
            reason = f"{kh}x{kw} kernel not in kernel_sizes {list(kernel_sizes)}"
        elif include is not None and not _matches(name, include):
            reason = "not matched by include"
        elif _matches(name, exclude):
            reason = "matched by exclude"
        else:
            reason = unsupported_reason(m) if unsupported_reason is not None else None
        if reason is None and bare and not callable(getattr(block_cls, "from_conv", None)):
            reason = f"no BatchNorm after it, and block {block!r} has no from_conv"
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        options = block_options
        if isinstance(gamma, Mapping):  # the first pattern that matches, None for none
            value = next((v for p, v in gamma.items() if fnmatch.fnmatchcase(name, p)), None)
            options = {**block_options, "gamma_init": value}
        if bare:
            new_block = _new_block(block_cls.from_conv, block, options, m)
            object.__setattr__(new_block, BARE_CONV, conv_config(m))
            report.bare.append(name)
        else:
            bn = model.get_submodule(pairs[name])
            after = after_norm(bn)
            if isinstance(after, str):
                report.skipped.append((name, f"its {type(bn).__name__} cannot be split: {after}"))
                continue
            new_block = _new_block(block_cls.from_conv_bn, block, options, m, bn)
            template = None if type(bn) in BN_TYPES else copy.deepcopy(bn)
            tail = None if isinstance(after, nn.Identity) else after  # a norm-act layer's act and drop
            slot_cls = BNSlot if tail is None else NormActSlot
            slot = slot_cls(new_block, conv_config(m), bn_config(bn), template, tail)
            set_module(model, pairs[name], slot.train(bn.training))
            report.converted.append(name)
        set_module(model, name, new_block.train(m.training))
    if log_summary:
        log.info("convert: %s", report.summary())
    return model
