"""Deploy files: the ``deploy.pt`` format, ONNX and TorchScript exports, their verification, safe loading.

Everything read from disk goes through ``torch.load(..., weights_only=True)``: a file that needs more
than tensors and plain containers to load is refused, never executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEPLOY_FORMAT = "acnet-pl-deploy"
#: Version 2 added ``added_biases`` (convs of the base model that carry a bias in the deploy file).
DEPLOY_VERSION = 2
#: ``report.json`` of FuseCallback, in ``<run>/deploy/`` at the end of training: validation top-1/top-5
#: before and after fusing. The only report ``python -m acnet_pl.report`` reads.
FUSE_REPORT_FORMAT = "acnet-pl-fuse-report"
FUSE_REPORT_VERSION = 1
#: ``report.json`` of deploy.py, beside its files (``<run>/export/`` by default): output errors, no accuracy.
DEPLOY_REPORT_FORMAT = "acnet-pl-deploy-report"
DEPLOY_REPORT_VERSION = 1
#: ONNX opset of ``export_onnx`` (the torch.export-based exporter's default).
ONNX_OPSET = 18


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which other threads could observe.
_UMASK = _read_umask()


def _fsync_dir(path: Path) -> None:
    # Makes a rename itself durable; some filesystems cannot open a directory for that, which is fine.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, fsync it, then rename it into place.

    A kill or a failed write leaves the previous ``path`` whole and at most a hidden
    ``.<name>.<random>.tmp`` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    return _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def model_stats(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """Parameter count and FLOPs (2 per multiply-add, torch's FlopCounterMode) of one eval forward pass.

    Args:
        input_size: (C, H, W) of one sample.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    ref = next(model.parameters(), None)
    x = torch.zeros(
        1,
        *input_size,
        device=ref.device if ref is not None else "cpu",
        dtype=ref.dtype if ref is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


def make_deploy_record(
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str,
    num_classes: int,
    block: dict[str, Any],
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    source: str | None = None,
    fold_bn: bool = False,
    added_biases: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``deploy.pt`` payload: plain containers and CPU tensors, loadable with ``weights_only=True``.

    Args:
        added_biases: convs that carry a bias the base model's conv has not (``reparam.added_biases``
            of the trained model: bare convs converted with ``bare_convs=True``).
    """
    added_biases = [str(name) for name in added_biases]
    layout = "conv+bias (BN folded)" if fold_bn else "base model (conv + BatchNorm)"
    if added_biases:
        layout += f", plus a bias on {len(added_biases)} bare convs (listed in added_biases)"
    return {
        "format": DEPLOY_FORMAT,
        "version": DEPLOY_VERSION,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "model": {"name": str(model_name), "num_classes": int(num_classes)},
        "block": to_plain(block),
        "fold_bn": bool(fold_bn),
        "layout": layout,
        "added_biases": added_biases,
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "source": None if source is None else str(source),
    }


def data_meta(data: Mapping[str, Any] | None, model_name: str) -> dict[str, Any]:
    """The ``input_size``, ``mean``, ``std`` and ``class_names`` a deploy record stores, gaps filled.

    Args:
        data: what is known (e.g. the ``data`` hyperparameters of a checkpoint, or a deploy record);
            a missing input size is the model's default, missing normalisation is mean 0 / std 1.
        model_name: the model of ``build_model``, for its default input size.
    """
    from acnet_pl.models import default_input_size

    data = dict(data or {})
    input_size = [int(v) for v in (data.get("input_size") or default_input_size(model_name))]
    channels = input_size[0]
    return {
        "input_size": input_size,
        "mean": list(data.get("mean") or [0.0] * channels),
        "std": list(data.get("std") or [1.0] * channels),
        "class_names": data.get("class_names"),
    }


def to_plain(value: Any) -> Any:
    """OmegaConf containers, tuples and mappings -> plain dict/list/scalars (what ``weights_only`` loads)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# loading: weights_only, one line per problem

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = b"\x80"


def _first_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return first.split(". ", 1)[0][:limit]  # torch's messages go on with advice that does not apply


def state_dict_error(error: BaseException, limit: int = 300) -> str:
    """One line out of ``load_state_dict``'s multi-line RuntimeError (missing / unexpected / size mismatch)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text[:limit] + ("..." if len(text) > limit else "")


def _unsafe_reason(message: str) -> str:
    """What a refused pickle asked for, from torch's weights_only error text."""
    found = re.search(r"GLOBAL ([\w.<>]+)", message)
    if found:
        return f"it needs {found.group(1)}, which is not a tensor or plain container"
    found = re.search(r"(Unsupported operand [^\n.]*)", message)
    if found:
        return f"it uses pickle instructions torch's safe loader does not allow ({found.group(1).strip()})"
    return "it needs objects other than tensors and plain containers"


def load_weights_only(path: str | os.PathLike, *, what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` to CPU; FileNotFoundError / ValueError name the file and problem.

    A pickle that needs anything beyond tensors and plain containers (custom classes, ``os.system``, ...)
    is refused by torch's restricted unpickler before anything in it runs; the message says so.

    Args:
        what: what the file should be, for messages ("checkpoint", "deploy file").
        hint: the fix appended to every message.
    """
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file{tail}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what} file{tail}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{path}: empty file, not a {what}{tail}")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOL_OPCODE)):
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
        raise ValueError(f"{path}: not a {what} (it holds {kind}, not a PyTorch file){tail}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every load failure is a bad file for the user
        message = str(err)
        if "Weights only load failed" in message or "weights_only" in message.split("\n", 1)[0]:
            raise ValueError(
                f"{path}: refused as unsafe: {_unsafe_reason(message)}; it was not loaded and nothing in "
                f"it was run (only tensors and plain containers are read, torch.load weights_only=True){tail}"
            ) from None
        raise ValueError(f"{path}: corrupt or truncated {what} ({_first_line(err)}){tail}") from None


_DEPLOY_HINT = "give the path of a deploy.pt written by train.py or deploy.py"


def check_deploy_record(record: Any, path: str | os.PathLike = "deploy record") -> dict[str, Any]:
    """``record`` when it is a deploy record this acnet-pl reads; ValueError (naming ``path``) otherwise."""
    if not isinstance(record, dict) or record.get("format") != DEPLOY_FORMAT:
        raise ValueError(f"{path}: not an acnet-pl deploy file (no format={DEPLOY_FORMAT!r} entry)")
    version = record.get("version", 0)
    if not isinstance(version, int) or version > DEPLOY_VERSION:
        raise ValueError(f"{path}: deploy format version {version!r} is newer than this acnet-pl reads")
    model = record.get("model")
    if (
        not isinstance(model, dict)
        or not isinstance(model.get("name"), str)
        or isinstance(model.get("num_classes"), bool)
        or not isinstance(model.get("num_classes"), int)
    ):
        raise ValueError(
            f"{path}: deploy file has no valid 'model' entry {{'name': str, 'num_classes': int}}"
        )
    state_dict = record.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: deploy file has no 'state_dict' of tensors")
    added = record.get("added_biases", [])
    if not isinstance(added, list) or not all(isinstance(name, str) for name in added):
        raise ValueError(f"{path}: deploy file's 'added_biases' is not a list of conv names")
    return record


def read_deploy_record(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a ``deploy.pt``; FileNotFoundError / ValueError say what is wrong with it."""
    return check_deploy_record(load_weights_only(path, what="deploy file", hint=_DEPLOY_HINT), path)


def build_deploy_model(record: dict[str, Any]) -> nn.Module:
    """The base architecture a deploy record's state dict belongs to: a bias added on the convs of its
    ``added_biases``, BN folded when the record says so."""
    from acnet_pl.models import build_model
    from acnet_pl.reparam import add_conv_biases, fuse

    model = build_model(record["model"]["name"], num_classes=record["model"]["num_classes"], block="base")
    add_conv_biases(model, record.get("added_biases", []))
    if record.get("fold_bn"):
        model = fuse(model, fold_bn=True, inplace=True)
    return model


def model_from_record(record: dict[str, Any], path: str | os.PathLike = "deploy record") -> nn.Module:
    """The ready ``nn.Module`` (eval mode, CPU) of a checked deploy record; ValueError names ``path``.

    Weights holding NaN/Inf (a diverged training) are refused: such a model outputs NaN.
    """
    from acnet_pl.verification import nonfinite_entries, nonfinite_message

    bad = nonfinite_entries(record["state_dict"])
    if bad:
        raise ValueError(
            f"{path}: weights are not finite, {nonfinite_message(bad, len(record['state_dict']))}: "
            "the model outputs NaN (its training diverged); deploy a checkpoint from before the divergence"
        )
    try:
        model = build_deploy_model(record)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit model {record['model']['name']!r} "
            f"(num_classes={record['model']['num_classes']}): {state_dict_error(err)}"
        ) from None
    return model.eval()


def load_deployed(path: str | os.PathLike) -> nn.Module:
    """The ready ``nn.Module`` (eval mode, CPU) of a ``deploy.pt`` written by train.py or deploy.py.

    Works for both layouts: the base model's (conv + BN) and ``fold_bn`` (conv with bias), with the
    bias the record's ``added_biases`` lists on bare convs (``bare_convs=True``).
    """
    return model_from_record(read_deploy_record(path), path)


# --------------------------------------------------------------------------------------------------
# verification helpers


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_error(reference: torch.Tensor, output: torch.Tensor) -> dict[str, float]:
    """Max absolute error and max relative error (max |out - ref| / max |ref|), in float64.

    The relative error is scaled by the largest reference magnitude, not element-wise, so logits near
    zero do not blow it up. Shape mismatch or non-finite values give ``inf``.
    """
    ref = torch.as_tensor(reference).detach().double().cpu()
    out = torch.as_tensor(output).detach().double().cpu()
    if ref.shape != out.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf")}
    if ref.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0}
    diff = (out - ref).abs().max().item()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        diff = float("inf")
    scale = ref.abs().max().item()
    return {"max_abs": float(diff), "max_rel": float(diff / scale) if scale > 0 else float(diff)}


def _example_input(model: nn.Module, input_size: Sequence[int], batch: int) -> torch.Tensor:
    ref = next(model.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *[int(v) for v in input_size], generator=generator)
    return x.to(device=ref.device, dtype=ref.dtype) if ref is not None else x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporters print progress and deprecation notes; the deploy command prints its own summary.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------------
# ONNX


def export_onnx(
    model: nn.Module, path: str | os.PathLike, input_size: Sequence[int], *, opset: int = ONNX_OPSET
) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with a dynamic batch axis, then check it.

    Uses the torch.export-based exporter (torch's default, deterministic, offline); input ``"input"``
    (N, C, H, W), output ``"logits"``. The file is written atomically and only after
    ``onnx.checker.check_model`` accepted it.
    """
    import onnx

    x = _example_input(model, input_size, batch=2)  # batch 1 would be specialised away
    was_training = model.training
    model.eval()

    def write(tmp: str) -> None:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                (x,),
                tmp,
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(tmp, full_check=True)

    try:
        return _atomic_write(path, write)
    finally:
        model.train(was_training)


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported (ONNX files are then run, not only checked)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def run_onnx(path: str | os.PathLike, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of an ONNX file from ``export_onnx`` on ``inputs`` with onnxruntime (CPU, float32)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (logits,) = session.run(None, {name: inputs.detach().float().cpu().numpy()})
    return torch.from_numpy(logits)


# --------------------------------------------------------------------------------------------------
# TorchScript


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> Path:
    """Trace ``model`` (eval mode) with ``torch.jit.trace`` and save it atomically; any batch size runs."""
    x = _example_input(model, input_size, batch=2)
    was_training = model.training
    model.eval()

    def write(tmp: str) -> None:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, x, check_trace=False)
            torch.jit.save(traced, tmp)

    try:
        return _atomic_write(path, write)
    finally:
        model.train(was_training)


def run_torchscript(path: str | os.PathLike, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of a TorchScript file on ``inputs`` (CPU).

    ``torch.jit.load`` is not a restricted loader: use it on files this tool wrote, not on downloads.
    """
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    with torch.no_grad():
        return module(inputs.detach().cpu())
