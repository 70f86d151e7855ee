"""INT8 deployment: ONNX Runtime static quantization (QDQ) of deploy.onnx, and what it costs layer by layer.

Per layer (Conv, Gemm): the sensitivity (that layer alone quantized with the INT8 model's scales) and the
kernel statistics that predict it; ``keep_float`` keeps the most sensitive layers in float until the top-1
drop is within budget. The pipeline verifies the file read back like every other one.
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acnet_pl.deploy.config import QUANT_METHODS, QuantizeOptions
from acnet_pl.deploy.exporters import load_onnx, quiet
from acnet_pl.deploy.verification import output_error
from acnet_pl.utils.files import atomic_write

INT8_FILE = "deploy.int8.onnx"
FIGURE_FILE = "quantization.png"
MISSING = "quantize=int8 needs onnx and onnxruntime: pip install 'acnet-pl[onnx]'"
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _ort() -> Any:
    try:
        import onnx  # noqa: F401 - needed by onnxruntime.quantization
        import onnxruntime
        import onnxruntime.quantization
    except ImportError:
        raise ValueError(MISSING) from None
    return onnxruntime


def calibration_images(datamodule: Any, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` training images of ``datamodule`` (a seeded draw) through its evaluation transform."""
    dataset = datamodule.build_train_dataset()
    transform = getattr(datamodule, "val_transform", None)
    if transform is None or not hasattr(dataset, "transform"):
        raise ValueError(
            f"quantize=int8: {type(datamodule).__name__} gives no training set with an evaluation transform "
            "to calibrate on"
        )
    dataset.transform = transform  # the same images the validation set would be: no augmentation
    if len(dataset) < count:
        raise ValueError(
            f"quantize.calibration_images={count} but the training set holds {len(dataset)} images; "
            f"give quantize.calibration_images<={len(dataset)}"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in order]).float()


def quantize_onnx(
    fp32_path: Path,
    out_path: Path,
    images: torch.Tensor,
    options: QuantizeOptions,
    exclude: Sequence[str] = (),
) -> Path:
    """Static QDQ quantization of ``fp32_path`` into ``out_path`` (atomically), calibrated on ``images``;
    ``exclude``: node names kept in float. ValueError (one line) when ONNX Runtime cannot do it."""
    q = _ort().quantization
    batches = [{"input": images[i : i + 32].numpy()} for i in range(0, len(images), 32)]

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    def write(tmp: str) -> None:
        with quiet():
            q.quantize_static(
                str(fp32_path),
                tmp,
                Reader(),
                quant_format=q.QuantFormat.QDQ,
                per_channel=options.per_channel,
                calibrate_method=getattr(q.CalibrationMethod, QUANT_METHODS[options.method]),
                nodes_to_exclude=list(exclude),
            )

    try:
        return atomic_write(out_path, write)
    except Exception as err:  # noqa: BLE001 - any failure of the quantizer is the model's or opset's
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(
            f"ONNX Runtime could not quantize {fp32_path.name} ({type(err).__name__}: {message}); "
            "deploy without quantize=int8, or with another opset/model"
        ) from None


def kernel_stats(weight: np.ndarray) -> dict[str, float]:
    """What predicts a conv's int8 weight error: per output channel max|w|/std (mean and max: a peaky
    kernel wastes the int8 grid on one value), the weight range, and the spread of the per-channel ranges
    (largest / median max|w|: what one per-tensor scale has to cover)."""
    w = weight.reshape(len(weight), -1).astype(np.float64)  # Conv (out, in, k, k), Gemm (out, in)
    peak = np.abs(w).max(1)
    ratio = peak / np.maximum(w.std(1), 1e-12)
    return {
        "max_over_std_mean": float(ratio.mean()),
        "max_over_std_max": float(ratio.max()),
        "range": float(w.max() - w.min()),
        "channel_range_spread": float(peak.max() / max(float(np.median(peak)), 1e-12)),
    }


def _alone(float_model: Any, int8_model: Any, node_name: str) -> Any:
    """The fp32 model with only node ``node_name`` quantized: its Q/DQ inputs (weight, bias, input activation)
    copied from the INT8 model, so with the scales the full calibration chose."""
    import onnx

    producers = {out: n for n in int8_model.graph.node for out in n.output}
    initializers = {i.name: i for i in int8_model.graph.initializer}
    quantized = next(n for n in int8_model.graph.node if n.name == node_name)
    nodes: list[Any] = []
    needed: set[str] = set()

    def walk(tensor: str) -> None:
        node = producers.get(tensor)
        if node is None or node.op_type not in _QDQ or node in nodes:
            return
        for name in node.input:
            walk(name)
            if name in initializers:
                needed.add(name)
        nodes.append(node)

    for tensor in quantized.input:
        walk(tensor)
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    graph = model.graph
    made = {out for node in nodes for out in node.output}  # e.g. the bias, now the output of its DQ node
    kept = [i for i in graph.initializer if i.name not in made]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    have = {i.name for i in graph.initializer}
    graph.initializer.extend(initializers[name] for name in sorted(needed - have))
    index = next(i for i, n in enumerate(graph.node) if n.name == node_name)
    del graph.node[index].input[:]
    graph.node[index].input.extend(quantized.input)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    del model.opset_import[:]
    model.opset_import.extend(int8_model.opset_import)
    return model


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # topk as the verification engine counts it: INT8 logits tie often, and argmax may break a tie otherwise
    return float((logits.topk(1, dim=1).indices[:, 0] == labels).double().mean())


def _latency_ms(path: Path, x: torch.Tensor) -> float:
    """Median wall time (ms) of 20 ONNX Runtime CPU session runs of ``path`` on ``x``, after 3 warm-up runs."""
    run = load_onnx(path)
    for _ in range(3):
        run(x)
    return 1000 * statistics.median(timeit.repeat(lambda: run(x), repeat=20, number=1))


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    images: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    options: QuantizeOptions,
) -> dict[str, Any]:
    """Write ``out_path`` (INT8 of ``fp32_path``, calibrated on ``images``) and return the report's
    ``quantization`` section, measured on the labelled validation ``batches``."""
    import onnx

    ort = _ort()
    labels = torch.cat([y for _, y in batches])

    def logits_of(model: Any) -> torch.Tensor:  # an ONNX file or ModelProto, on every batch
        run = load_onnx(model)
        return torch.cat([run(x) for x, _ in batches]).double()

    reference = logits_of(fp32_path)
    fp32_top1 = _top1(reference, labels)
    float_model = onnx.load(str(fp32_path))
    # (node name, weight initializer name) of every Conv and Gemm (a Linear), in graph order
    nodes = [(n.name, n.input[1]) for n in float_model.graph.node if n.op_type in ("Conv", "Gemm")]
    quantize_onnx(fp32_path, out_path, images, options)
    int8_model = onnx.load(str(out_path))

    layers = []
    weights = {i.name: i for i in float_model.graph.initializer}
    for node, weight in nodes:
        logits = logits_of(_alone(float_model, int8_model, node))
        array = onnx.numpy_helper.to_array(weights[weight]) if weight in weights else None
        layers.append(
            {
                "node": node,
                "weight": weight,
                "shape": None if array is None else list(array.shape),
                "alone_logit_rel_error": output_error(reference, logits)["max_rel"],
                "alone_top1_drop": 100 * (fp32_top1 - _top1(logits, labels)),
                "kernel": None if array is None else kernel_stats(array),
            }
        )
    ranking = sorted(layers, key=lambda r: (-r["alone_top1_drop"], -(r["alone_logit_rel_error"] or 0.0)))

    int8_top1 = _top1(logits_of(out_path), labels)
    excluded: list[str] = []
    tries = []
    count = 1
    while (
        options.keep_float and 100 * (fp32_top1 - int8_top1) > options.max_top1_drop and count <= len(nodes)
    ):
        excluded = [r["node"] for r in ranking[:count]]  # 1, 2, 4, ... of the most sensitive layers
        quantize_onnx(fp32_path, out_path, images, options, exclude=excluded)
        int8_top1 = _top1(logits_of(out_path), labels)
        tries.append({"kept_float": len(excluded), "top1": int8_top1})
        count = len(nodes) if count < len(nodes) <= 2 * count else 2 * count

    x = batches[0][0]
    fp32_ms, int8_ms = _latency_ms(fp32_path, x), _latency_ms(out_path, x)
    fp32_bytes, int8_bytes = fp32_path.stat().st_size, out_path.stat().st_size
    return {
        "library": f"onnxruntime {ort.__version__} quantize_static",
        "format": "QDQ, int8 weights and activations",
        "method": options.method,
        "per_channel": options.per_channel,
        "calibration_images": len(images),
        "seed": options.seed,
        "validation_samples": len(labels),
        "top1": {"fp32": fp32_top1, "int8": int8_top1, "drop_points": 100 * (fp32_top1 - int8_top1)},
        "max_top1_drop": options.max_top1_drop,
        "keep_float": options.keep_float,
        "kept_float": [{"node": n, "weight": dict(nodes)[n]} for n in excluded],
        "keep_float_tries": tries,
        "latency_ms": {
            "fp32": fp32_ms,
            "int8": int8_ms,
            "speedup": fp32_ms / int8_ms,
            "batch": list(x.shape),
            "runtime": "onnxruntime CPUExecutionProvider, median of 20 runs",
        },
        "bytes": {"fp32": fp32_bytes, "int8": int8_bytes, "ratio": fp32_bytes / int8_bytes},
        "layers": layers,
        "sensitivity_measure": (
            "that layer alone quantized (its weight, bias and input Q/DQ from the INT8 model): max relative "
            "logit error and top-1 drop (points) vs the fp32 file, on the validation samples"
        ),
    }
