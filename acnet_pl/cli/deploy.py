"""What ``deploy.py`` does: training checkpoint -> fused model -> verified deploy files.

The deploy files are the fused model (``deploy.pt``, optionally also ``deploy.onnx`` / ``deploy.ts``)
and its ``report.json`` (``acnet_pl.deploy.report``, the format the fuse callback writes too).

The checkpoint is read with ``torch.load(weights_only=True)`` only; the model is rebuilt from the
hyperparameters stored in it (``module_from_checkpoint``), fused with ``acnet_pl.reparam.fuse`` and
compared with the training form before anything is written. All files are first written to a hidden
staging folder inside ``output_dir`` and renamed into place only once every check has passed, so a
failed run leaves no finished-looking file behind and never touches other files in ``output_dir``.
By default the files go to ``<run>/deploy/<checkpoint name>/``, beside (never over) the fuse callback's
``<run>/deploy/deploy.pt`` and ``report.json``, whose validation accuracy is what the sweep report reads.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig, OmegaConf
from torch import nn

from acnet_pl.deploy.exporters import (
    export_onnx,
    export_torchscript,
    onnxruntime_available,
    run_onnx,
    run_torchscript,
)
from acnet_pl.deploy.record import (
    DEPLOY_FORMAT,
    check_deploy_record,
    data_meta,
    load_deployed,
    make_deploy_record,
    model_from_record,
)
from acnet_pl.deploy.report import (
    DEPLOY_COMMAND,
    REPORT_NAME,
    file_entries,
    format_deploy_report,
    is_fuse_callback_report,
    new_report,
    verification_entry,
    write_report,
)
from acnet_pl.deploy.verification import LOGIT_RTOL, LogitError, nonfinite_entries, nonfinite_message
from acnet_pl.reparam import added_biases, fuse
from acnet_pl.training.module import ACNetModule
from acnet_pl.utils.files import sha256_file
from acnet_pl.utils.flops import model_stats
from acnet_pl.utils.loading import load_weights_only, state_dict_error

CKPT_HINT = "give ckpt_path=<run>/checkpoints/<name>.ckpt written by train.py, or a deploy.pt to re-deploy"
#: The entry of a checkpoint's ``data`` hyperparameters that holds its datamodule's Hydra config (train.py).
DATA_CONFIG_KEY = "datamodule"

DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,
    "output_dir": None,
    "fold_bn": False,
    "onnx": False,
    "torchscript": False,
    "verify": {"batches": 2, "batch_size": 8, "logit_rtol": LOGIT_RTOL, "use_data": True, "seed": 0},
}


class VerificationError(ValueError):
    """A deployed form disagrees with the trained model beyond the tolerance."""


@dataclass
class Source:
    """A model read from disk with what the deploy files record about it."""

    path: Path
    kind: str  # "checkpoint" or "deploy"
    model: nn.Module  # training form (or a deploy file's layout), eval mode, float32, CPU
    model_name: str
    num_classes: int
    block: dict[str, Any]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    class_names: list[str] | None
    folded: bool = False  # BN already folded (a fold_bn deploy.pt)
    added_biases: list[str] = field(default_factory=list)  # convs whose fused form gains a bias
    data_config: dict[str, Any] | None = None
    data_config_origin: str = "no data config stored with the checkpoint"
    epoch: int | None = None  # of a checkpoint: when it was saved
    global_step: int | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# reading


def _describe_bare_state_dict(obj: Mapping) -> str | None:
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        first = next(iter(obj))
        return f"a bare state dict ({len(obj)} tensors, first {first!r})"
    return None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint or a (checked) deploy.pt with ``weights_only=True``; ValueError when neither."""
    path = Path(path)
    obj = load_weights_only(path, what="checkpoint", hint=CKPT_HINT)
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: not a checkpoint written by train.py (it holds a {type(obj).__name__}); {CKPT_HINT}"
        )
    if obj.get("format") == DEPLOY_FORMAT:
        return check_deploy_record(obj, path)
    bare = _describe_bare_state_dict(obj)
    if bare is not None:
        raise ValueError(
            f"{path}: {bare}, not a checkpoint written by train.py: it has no hyperparameters to rebuild "
            f"the model from; {CKPT_HINT}"
        )
    hparams = obj.get("hyper_parameters")
    if not isinstance(obj.get("state_dict"), dict) or not isinstance(hparams, dict):
        raise ValueError(
            f"{path}: not a checkpoint written by train.py (no 'state_dict' and 'hyper_parameters' "
            f"entries; found {sorted(map(str, obj))[:6]}); {CKPT_HINT}"
        )
    model = hparams.get("model")
    if not isinstance(model, dict) or "name" not in model or "num_classes" not in model:
        raise ValueError(
            f"{path}: checkpoint hyperparameters have no model={{'name', 'num_classes'}}: not written by "
            f"acnet-pl's train.py; {CKPT_HINT}"
        )
    return obj


def _network_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``model.`` entries of a LightningModule state dict, without that prefix (nor torch.compile's)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model."):
            out[key[len("model.") :].replace("_orig_mod.", "")] = value
    return out


def module_from_checkpoint(ckpt: Mapping[str, Any], *, path: str | os.PathLike = "checkpoint") -> nn.Module:
    """The ``ACNetModule`` of a checkpoint dict (from ``load_checkpoint``), weights loaded, eval mode, CPU.

    The one way a network is rebuilt from a checkpoint: ``ACNetModule(**hyper_parameters)`` (which
    builds the model with ``build_model(name, num_classes, block, **options)``), then the ``model.*``
    weights loaded with ``strict=True``. ValueError names ``path`` when they do not fit.
    """
    hparams = dict(ckpt["hyper_parameters"])
    try:
        module = ACNetModule(**hparams)
    except (TypeError, ValueError, KeyError) as err:
        message = " ".join(str(err).split())
        raise ValueError(
            f"{path}: its hyperparameters do not build a model: {message}; {CKPT_HINT}"
        ) from None
    weights = _network_state_dict(ckpt["state_dict"])
    bad = nonfinite_entries(weights)
    if bad:
        raise ValueError(
            f"{path}: weights are not finite, {nonfinite_message(bad, len(weights))}: training had diverged "
            "when this checkpoint was saved; give a checkpoint from before the divergence"
        )
    try:
        module.model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit {hparams['model']['name']!r} with block "
            f"{(hparams.get('block') or {}).get('name', 'base')!r}: {state_dict_error(err)}"
        ) from None
    return module.eval()


def _run_dir(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _has_nested_target(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "_target_" in value or any(_has_nested_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nested_target(v) for v in value)
    return False


def _checked_data_config(config: Any, where: str) -> dict[str, Any]:
    """``config`` when it names one of acnet_pl's datamodules; ValueError otherwise.

    A config could name any importable callable (``_target_: os.system``), and the checkpoint or run
    folder may come from someone else: only ``acnet_pl.data.*`` classes are ever instantiated.
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("_target_"), str):
        raise ValueError(f"{where} has no data config with a _target_")
    target = config["_target_"]
    if not target.startswith("acnet_pl.data.") or any(
        _has_nested_target(v) for k, v in config.items() if k != "_target_"
    ):
        raise ValueError(f"{where} names {target!r}; only acnet_pl.data datamodules are instantiated")
    return dict(config)


def stored_data_config(
    path: str | os.PathLike, hparams: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """The datamodule config a checkpoint was trained with, and where it came from (or why there is none).

    Looked for in the checkpoint's ``hyper_parameters["data"]["datamodule"]``, then in the run folder's
    ``.hydra/config.yaml`` (``data`` section) that train.py's Hydra wrote beside ``checkpoints/``.
    """
    data = hparams.get("data") or {}
    if isinstance(data, Mapping) and DATA_CONFIG_KEY in data:
        where = f"the checkpoint's hyperparameters (data.{DATA_CONFIG_KEY})"
        try:
            return _checked_data_config(data[DATA_CONFIG_KEY], where), where
        except ValueError as err:
            return None, str(err)
    run_config = _run_dir(Path(path)) / ".hydra" / "config.yaml"
    if not run_config.is_file():
        return None, f"no data config stored with the checkpoint (no {run_config})"
    try:
        config = OmegaConf.to_container(OmegaConf.load(run_config).data, resolve=True)
        return _checked_data_config(config, str(run_config)), str(run_config)
    except Exception as err:  # noqa: BLE001 - an unreadable run config only means: verify on random input
        return None, f"the data config in {run_config} could not be read: " + " ".join(str(err).split())[:200]


def load_source(path: str | os.PathLike) -> Source:
    """Read ``path`` (training checkpoint or deploy.pt) into a ``Source`` holding the unfused model."""
    path = Path(path)
    obj = load_checkpoint(path)  # the one read of the file
    if obj.get("format") == DEPLOY_FORMAT:
        return Source(
            path=path,
            kind="deploy",
            model=model_from_record(obj, path).float(),
            model_name=obj["model"]["name"],
            num_classes=int(obj["model"]["num_classes"]),
            block=dict(obj.get("block") or {"name": "base"}),
            folded=bool(obj.get("fold_bn")),
            added_biases=list(obj.get("added_biases", [])),
            **data_meta(obj, obj["model"]["name"]),
        )
    hparams = obj["hyper_parameters"]
    module = module_from_checkpoint(obj, path=path)
    meta = data_meta(hparams.get("data"), hparams["model"]["name"])
    data_config, origin = stored_data_config(path, hparams)
    return Source(
        path=path,
        kind="checkpoint",
        model=module.model.float().eval(),
        model_name=hparams["model"]["name"],
        num_classes=int(hparams["model"]["num_classes"]),
        block=dict(hparams.get("block") or {"name": "base"}),
        added_biases=added_biases(module.model),
        data_config=data_config,
        data_config_origin=origin,
        epoch=obj.get("epoch"),
        global_step=obj.get("global_step"),
        **meta,
    )


#: The sub-folder deploy.py writes a deploy.pt's re-deployment to (with fold_bn, onnx, ...), beside its input.
REDEPLOY_DIR = "redeploy"


def default_output_dir(path: str | os.PathLike, kind: str) -> Path:
    """Where deploy.py writes its deploy files when no output_dir is given.

    ``<run>/deploy/<name>/`` for ``<run>/checkpoints/<name>.ckpt`` (``<folder>/deploy/<name>/`` for a
    checkpoint elsewhere): one folder per checkpoint, beside the fuse callback's ``<run>/deploy/deploy.pt``
    and ``report.json``, never over them. ``<folder>/redeploy/`` for a deploy.pt, never over its input.
    """
    path = Path(path)
    if kind == "deploy":
        return path.parent / REDEPLOY_DIR
    return _run_dir(path) / "deploy" / path.stem


# --------------------------------------------------------------------------------------------------
# verification inputs


def _datamodule_class(target: str) -> type:
    module_name, _, attr = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
        raise ValueError(f"{target} is not a LightningDataModule")
    return cls


def _data_batches(
    config: dict[str, Any], origin: str, batches: int, batch_size: int
) -> tuple[list[torch.Tensor], str]:
    _datamodule_class(config["_target_"])
    config = {**config, "download": False} if "download" in config else dict(config)
    datamodule = instantiate(config)
    # Read what is on disk, in this process, in batches of verify.batch_size: no workers, no download.
    for attr, value in (
        ("val_batch_size", batch_size),
        ("num_workers", 0),
        ("persistent_workers", False),
        ("pin_memory", False),
    ):
        if hasattr(datamodule, attr):
            setattr(datamodule, attr, value)
    datamodule.setup("validate")
    out = []
    for batch in datamodule.val_dataloader():
        out.append(batch[0] if isinstance(batch, (list, tuple)) else batch)
        if len(out) >= batches:
            break
    if not out:
        raise ValueError("its validation set is empty")
    samples = sum(len(x) for x in out)
    name = type(datamodule).__name__
    return out, f"validation data ({name}: {len(out)} batches, {samples} samples; config from {origin})"


def verification_batches(source: Source, verify: Mapping[str, Any]) -> tuple[list[torch.Tensor], str]:
    """Validation batches from the checkpoint's stored data config when it loads, else seeded random input.

    Returns the batches and a sentence saying which they are (and why random, when random).
    """
    batches = int(verify["batches"])
    batch_size = int(verify["batch_size"])
    if batches < 1 or batch_size < 1:
        raise ValueError(f"verify.batches and verify.batch_size must be >= 1; got {batches} and {batch_size}")
    reason = source.data_config_origin
    if not verify.get("use_data", True):
        reason = "verify.use_data=false"
    elif source.data_config is not None:
        try:
            return _data_batches(source.data_config, source.data_config_origin, batches, batch_size)
        except Exception as err:  # noqa: BLE001 - any failure to read the data falls back to random input
            message = " ".join(str(err).split())[:200] or type(err).__name__
            reason = f"the data of {source.data_config_origin} did not load: {message}"
    generator = torch.Generator().manual_seed(int(verify.get("seed", 0)))
    out = [torch.randn(batch_size, *source.input_size, generator=generator) for _ in range(batches)]
    size = "x".join(str(v) for v in source.input_size)
    return out, f"random normal input ({batches} batches of {batch_size} x {size}; {reason})"


@torch.no_grad()
def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([model(x.float()) for x in batches])


# --------------------------------------------------------------------------------------------------
# the command


def deploy_options(cfg: Any) -> dict[str, Any]:
    """The options of ``conf/deploy.yaml`` as a plain dict, defaults filled in; ValueError on unknown keys."""
    given = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    given = {k: v for k, v in given.items() if k != "hydra"}
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown deploy option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    verify = {**DEFAULTS["verify"], **(given.get("verify") or {})}
    unknown = set(verify) - set(DEFAULTS["verify"])
    if unknown:
        raise ValueError(f"unknown verify option(s) {sorted(unknown)}; known: {sorted(DEFAULTS['verify'])}")
    tolerance = verify["logit_rtol"]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"verify.logit_rtol must be a number >= 0 (e.g. 1e-3), got {tolerance!r}")
    return {**DEFAULTS, **given, "verify": verify}


@dataclass
class _Check:
    """The verification inputs and the fused model's logits every written form is compared against."""

    batches: list[torch.Tensor]
    where: str
    reference: torch.Tensor
    tolerance: float
    errors: dict[str, dict[str, float | None] | None] = field(default_factory=dict)

    def run(self, name: str, key: str, output: torch.Tensor) -> None:
        """Record the error of ``output`` against the reference; VerificationError above tolerance."""
        error = LogitError(self.tolerance)
        error.update(self.reference, output)
        self.errors[key] = error.summary()
        problem = error.problem(name, "verify.logit_rtol")
        if problem is not None:
            raise VerificationError(f"{problem} on {self.where}; nothing was written")


def _write_staged(
    staging: Path,
    record: dict[str, Any],
    fused: nn.Module,
    source: Source,
    cfg: dict[str, Any],
    check: _Check,
) -> dict[str, str]:
    """Write and verify every requested file in ``staging``; return {kind: file name}."""
    torch.save(record, staging / "deploy.pt")
    files = {"deploy": "deploy.pt"}
    check.run("deploy.pt reloaded", "deploy_pt", _logits(load_deployed(staging / "deploy.pt"), check.batches))
    check.errors["onnx"] = None
    if cfg["onnx"]:
        export_onnx(fused, staging / "deploy.onnx", source.input_size)
        files["onnx"] = "deploy.onnx"
        if onnxruntime_available():
            logits = torch.cat([run_onnx(staging / "deploy.onnx", x) for x in check.batches])
            check.run("deploy.onnx (onnxruntime)", "onnx", logits)
        else:
            source.notes.append("onnxruntime is not installed: deploy.onnx was checked, not run")
    check.errors["torchscript"] = None
    if cfg["torchscript"]:
        export_torchscript(fused, staging / "deploy.ts", source.input_size)
        files["torchscript"] = "deploy.ts"
        logits = torch.cat([run_torchscript(staging / "deploy.ts", x) for x in check.batches])
        check.run("deploy.ts (torch.jit.load)", "torchscript", logits)
    return files


def _resolve_output_dir(cfg: dict[str, Any], ckpt_path: Path, kind: str) -> Path:
    given = cfg["output_dir"]
    output_dir = Path(str(given)).expanduser() if given else default_output_dir(ckpt_path, kind)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir={output_dir} is a file, not a folder; give another output_dir")
    if (output_dir / "deploy.pt").resolve() == ckpt_path.resolve():
        raise ValueError(
            f"output_dir={output_dir} would overwrite the input {ckpt_path}; give another output_dir"
        )
    if is_fuse_callback_report(output_dir / REPORT_NAME):
        raise ValueError(
            f"output_dir={output_dir} holds the fuse callback's deploy.pt and report.json (read by "
            f"python -m acnet_pl.cli.sweep_table); give another output_dir, e.g. {output_dir / ckpt_path.stem}"
        )
    return output_dir


def deploy(cfg: Any) -> dict[str, Any]:
    """Run ``deploy.py``: fuse and verify the checkpoint's model, write the deploy files; return the report.

    Args:
        cfg: the ``conf/deploy.yaml`` options (a DictConfig or a plain mapping; missing keys take defaults).
    """
    cfg = deploy_options(cfg)
    if not cfg["ckpt_path"]:
        raise ValueError(
            "ckpt_path is missing: run `python deploy.py ckpt_path=<run>/checkpoints/last.ckpt` "
            "(a checkpoint written by train.py, or a deploy.pt to re-deploy)"
        )
    ckpt_path = Path(str(cfg["ckpt_path"])).expanduser()
    source = load_source(ckpt_path)
    output_dir = _resolve_output_dir(cfg, ckpt_path, source.kind)

    fold_bn = bool(cfg["fold_bn"]) or source.folded
    if source.folded and not cfg["fold_bn"]:
        source.notes.append("the input deploy.pt already has BN folded; kept folded")
    fused = fuse(source.model, fold_bn=fold_bn).eval()

    batches, where = verification_batches(source, cfg["verify"])
    print(f"verifying on {where}", flush=True)
    trained = _logits(source.model, batches)
    fused_logits = _logits(fused, batches)
    check = _Check(batches, where, trained, float(cfg["verify"]["logit_rtol"]))
    try:
        check.run("fused model", "fused", fused_logits)
    finally:
        errors = check.errors["fused"]
        measured = (
            "NaN/Inf"
            if errors["max_rel"] is None
            else f"max abs error {errors['max_abs']:.3e}, max rel error {errors['max_rel']:.3e}"
        )
        against = "trained" if source.kind == "checkpoint" else "input"
        print(f"fused vs {against} model: {measured} (tolerance {check.tolerance:g})", flush=True)
    check.reference = fused_logits  # the written files must reproduce the fused model

    record = make_deploy_record(
        fused.state_dict(),
        model_name=source.model_name,
        num_classes=source.num_classes,
        block=source.block,
        input_size=source.input_size,
        mean=source.mean,
        std=source.std,
        class_names=source.class_names,
        source=str(ckpt_path.resolve()),
        fold_bn=fold_bn,
        added_biases=source.added_biases,
    )
    created = [
        folder for folder in (output_dir, *output_dir.parents) if not folder.exists()
    ]  # innermost first
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".deploy-staging-", dir=output_dir))
    try:
        files = _write_staged(staging, record, fused, source, cfg, check)
        report = new_report(
            tool=DEPLOY_COMMAND,
            model={"name": source.model_name, "num_classes": source.num_classes},
            block=source.block,
            fold_bn=fold_bn,
            source=str(ckpt_path.resolve()),
            source_kind=source.kind,
        )
        report.update(
            ok=True,
            status="deployed",
            layout=record["layout"],
            input_size=source.input_size,
            source_sha256=sha256_file(ckpt_path),
            epoch=source.epoch,
            global_step=source.global_step,
            train_model=model_stats(source.model, source.input_size),
            deploy_model=model_stats(fused, source.input_size),
            verification=verification_entry(where, int(trained.shape[0]), check.tolerance, "float32, CPU"),
            errors=check.errors,
            files={**report["files"], **files, "report": REPORT_NAME},
            written=file_entries(staging, list(files.values())),
            output_dir=str(output_dir.resolve()),
            notes=source.notes,
        )
        # Everything checked: move into place, the report last.
        for name in files.values():
            os.replace(staging / name, output_dir / name)
        write_report(report, output_dir / REPORT_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # a failed run leaves no empty folder behind
            if any(folder.iterdir()):
                break
            folder.rmdir()
    for note in source.notes:
        print(f"note: {note}")
    print(format_deploy_report(report), flush=True)
    return report


__all__ = [
    "CKPT_HINT",
    "Source",
    "VerificationError",
    "default_output_dir",
    "deploy",
    "deploy_options",
    "load_checkpoint",
    "load_source",
    "module_from_checkpoint",
    "stored_data_config",
    "verification_batches",
]
