"""deploy.py's options and their defaults: the one source (``conf/deploy.yaml`` adds only Hydra's settings).

Imports neither torch nor Lightning: ``deploy.py`` checks its command line against this before they load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: Largest accepted max |logit(fused) - logit(trained)| / max |logit(trained)| (the logit scale), both
#: maxima over every logit of the verification set: the fuse callback's ``logit_rtol`` and deploy.py's
#: ``verify.logit_rtol``. Fusing is exact in real arithmetic, so the whole difference is rounding:
#: - fp32 with TF32 off (what ``verification.full_fp32`` sets): ~1e-6 of the scale (CPU: cifar_quick after
#:   a short fit 4.1e-7; ResNet-18 ACB with random BN statistics 1.0e-6 norm-wise).
#: - reduced-precision convs, were a flag left on: TF32 (u = 2**-11 = 4.9e-4) gave 3.7e-4 of the scale
#:   on an H200 (issue 11); 1e-3 stays above that, so the check never fails on rounding.
#: - a wrong fusion moves the logits by a fraction of their size: the 1xK branch left out 0.55 of the
#:   scale (tests/test_fuse_callback.py), a sign error in a restored non-affine BN 1.42 (issue 11).
#: With every logit within tol x scale, a sample's top-1 can change only where its two best logits are
#: within 2 x tol x scale (top-5 only where the 5th and 6th are): such samples are counted as
#: ``near_ties``; top-1/top-5 before and after are reported, not judged.
LOGIT_RTOL = 1e-3


@dataclass
class VerifyOptions:
    """What deploy.py verifies the fused model and the written files on, and how closely."""

    # Validation batches of the checkpoint's data config when its data are on disk, else random input.
    batches: int = 2
    batch_size: int = 8
    # Above this relative error (see LOGIT_RTOL) of the fused model or a file deploy.py writes nothing.
    logit_rtol: float = LOGIT_RTOL
    # false: always verify on seeded random input of the recorded input size.
    use_data: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.logit_rtol >= 0:
            raise ValueError(f"verify.logit_rtol must be a number >= 0 (e.g. 1e-3), got {self.logit_rtol!r}")
        if self.batches < 1 or self.batch_size < 1:
            raise ValueError(
                f"verify.batches and verify.batch_size must be >= 1; got {self.batches} and {self.batch_size}"
            )


@dataclass
class QuantizeOptions:
    """``quantize=int8``: ONNX Runtime static INT8 quantization (QDQ) of deploy.onnx -> deploy.int8.onnx."""

    # Training images (through the run's evaluation transform, a seeded draw) the activation ranges come from.
    calibration_images: int = 256
    # How activation ranges are chosen from the calibration outputs: minmax, entropy or percentile.
    method: str = "minmax"
    # One weight scale per output channel (false: one per tensor).
    per_channel: bool = True
    # Largest accepted drop of validation top-1, in points (fp32 fused model -> INT8); over it: refused.
    max_top1_drop: float = 0.5
    # Over budget: keep the most sensitive layers (Conv, Gemm) in float, by the report's sensitivity ranking,
    # until the budget holds.
    keep_float: bool = False
    # Validation batches the budget is measured on (null: the whole validation set).
    val_batches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantize.method={self.method!r}: choose one of {', '.join(QUANT_METHODS)}")
        if self.calibration_images < MIN_CALIBRATION_IMAGES:
            raise ValueError(
                f"quantize.calibration_images={self.calibration_images} is too few to estimate activation "
                f"ranges; give at least {MIN_CALIBRATION_IMAGES} (256 is usual)"
            )
        if self.val_batches is not None and self.val_batches < 1:
            raise ValueError(f"quantize.val_batches must be null (all) or >= 1, got {self.val_batches}")


#: ``quantize.method`` -> ONNX Runtime's ``CalibrationMethod`` member.
QUANT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
MIN_CALIBRATION_IMAGES = 8


@dataclass
class DeployOptions:
    """``python deploy.py ckpt_path=<run>/checkpoints/last.ckpt [output_dir=...] [fold_bn=true] [onnx=true] ...``"""

    # A checkpoint written by train.py, or a deploy.pt to re-deploy (e.g. with fold_bn=true or onnx=true).
    ckpt_path: str | None = None
    # null: <run>/deploy/<name>/ for <run>/checkpoints/<name>.ckpt, <its folder>/redeploy/ for a deploy.pt;
    # never the fuse callback's folder. The files are replaced only once every check has passed.
    output_dir: str | None = None
    # Fold every BatchNorm into its conv's bias: fastest inference, no longer the base model's layout.
    fold_bn: bool = False
    # Also write deploy.onnx (dynamic batch axis, checked with onnx.checker, run with onnxruntime if installed).
    onnx: bool = False
    # Also write deploy.ts (torch.jit.trace), loaded back and run.
    torchscript: bool = False
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    # quantize=int8: also write deploy.int8.onnx (with deploy.onnx), verified against a top-1 budget on
    # the validation set; quantize.<option>=... for QuantizeOptions.
    quantize: QuantizeOptions | None = None


ConfigStore.instance().store(name="deploy_options", node=DeployOptions)
ConfigStore.instance().store(group="quantize", name="int8", node=QuantizeOptions)


def quantize_options(value: Any) -> QuantizeOptions | None:
    """``quantize`` as given (None, ``"int8"`` or a mapping of QuantizeOptions fields)."""
    return None if value is None else deploy_options({"quantize": value}).quantize


def deploy_options(cfg: Mapping[str, Any] | DictConfig | None = None) -> DeployOptions:
    """``cfg`` (the composed conf/deploy.yaml, or any part of it) as ``DeployOptions``, defaults filled in."""
    given = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    if given.get("quantize") == "int8":  # from Python, as on the command line: the defaults
        given["quantize"] = {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DeployOptions), given)
    except OmegaConfBaseException as err:
        raise ValueError(
            f"deploy option {err.full_key}: {err.msg}; the options are in acnet_pl/deploy/config.py"
        ) from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def check_quantize_overrides(argv: Sequence[str]) -> None:
    """ValueError for ``quantize.<option>`` without ``quantize=int8`` (Hydra: a traceback)."""
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg]
    options = [key for key in keys if key.startswith("quantize.")]
    if options and "quantize" not in keys:
        raise ValueError(f"{options[0]} is an INT8 option: add quantize=int8 to the command line")
