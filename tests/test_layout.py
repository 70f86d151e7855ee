"""The shape of the package: imports at the top (the few exceptions say why), layers that import downwards."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import acnet_pl

PACKAGE = Path(acnet_pl.__file__).parent

#: Imports that stay inside a function, each for a reason a top-level import cannot meet.
LOCAL_IMPORTS = {
    ("training/callbacks/fuse.py", "wandb"): "slow to import; only runs with a WandbLogger reach it",
    ("training/loggers.py", "wandb"): "slow to import; only runs with a WandbLogger reach it",
    ("cli/common.py", "torch"): "the CLIs' argument checks answer before torch loads",
    ("data/fast/dali.py", "nvidia.dali"): "optional dependency (the dali extra)",
    ("data/fast/dali.py", "nvidia.dali.plugin.pytorch"): "optional dependency (the dali extra)",
    ("data/digits.py", "sklearn.datasets"): "scikit-learn is slow to import; only data=digits needs it",
    (
        "data/digits.py",
        "sklearn.model_selection",
    ): "scikit-learn is slow to import; only data=digits needs it",
    ("deploy/exporters.py", "onnx"): "optional dependency, for onnx=true",
    ("models/weights.py", "timm"): "optional dependency (the timm extra), for model=timm",
    ("models/weights.py", "huggingface_hub"): "comes with timm; only timm's cached weights need it",
    ("models/weights.py", "safetensors.torch"): "comes with timm; only .safetensors weight files need it",
    ("deploy/exporters.py", "onnxruntime"): "optional dependency, for onnx=true",
    ("deploy/quantization.py", "onnx"): "optional dependency, for quantize=int8",
    ("deploy/quantization.py", "onnxruntime"): "optional dependency, for quantize=int8",
    ("deploy/quantization.py", "onnxruntime.quantization"): "optional dependency, for quantize=int8",
    ("deploy/pipeline.py", "acnet_pl.analysis.figures"): "matplotlib, for quantize=int8's figure only",
}

#: What each layer may import from acnet_pl (besides itself and utils/, which imports nothing back).
LAYERS = {
    "blocks": set(),
    "reparam": {"blocks"},
    "models": {"reparam", "blocks"},
    "analysis": {"reparam", "blocks", "models"},
    # a checkpoint is rebuilt by models.build_net, not by the training code; INT8's figure is analysis'
    "deploy": {"reparam", "blocks", "models", "analysis"},
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return []


@pytest.mark.slow
def test_imports_inside_functions_are_the_listed_exceptions() -> None:
    """No import hides in a function unless LOCAL_IMPORTS says why (no import cycle forces one)."""
    found = set()
    for path in _modules():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for name in _imported(node):
                        found.add((path.relative_to(PACKAGE).as_posix(), name))
    assert found - set(LOCAL_IMPORTS) == set(), "move these imports to the top of their module"
    assert set(LOCAL_IMPORTS) - found == set(), "LOCAL_IMPORTS lists imports that are gone"


def _layer(relative: str) -> str:
    return relative.split("/", 1)[0] if "/" in relative else relative


def test_lower_layers_do_not_import_upwards() -> None:
    """blocks -> reparam -> models -> analysis, deploy: each imports only the layers below it (and utils/)."""
    checked = 0
    for path in _modules():
        relative = path.relative_to(PACKAGE).as_posix()
        layer = _layer(relative)
        if layer not in LAYERS:
            continue
        checked += 1
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _imported(node):
                if not name.startswith("acnet_pl.") or name.startswith("acnet_pl.utils"):
                    continue
                target = name.removeprefix("acnet_pl.").split(".")[0]
                target = target + ".py" if (PACKAGE / f"{target}.py").is_file() else target
                assert target == layer or target in LAYERS[layer], f"{relative} imports {name}"
    assert checked >= 12


def test_the_fast_data_paths_are_used_through_their_package_only() -> None:
    """data/fast/ (device batches, nvJPEG, DALI) is apart: other modules import `acnet_pl.data.fast` itself."""
    for path in _modules():
        relative = path.relative_to(PACKAGE).as_posix()
        if not relative.startswith("data/fast/"):
            for node in ast.walk(ast.parse(path.read_text())):
                assert not any(n.startswith("acnet_pl.data.fast.") for n in _imported(node)), relative


@pytest.mark.slow
def test_importing_the_callbacks_leaves_the_matplotlib_backend_alone() -> None:
    """The figures draw on their own Agg canvas: a notebook's backend (here svg) stays what it was."""
    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import acnet_pl.training.callbacks, acnet_pl.cli.analyze\n"
        "from acnet_pl.analysis.figures import figure_to_array, robustness_figure\n"
        "runs = [{'label': 'acb', 'robustness': {'original': 0.9, 'flip_lr': 0.8}}]\n"
        "image = figure_to_array(robustness_figure(runs))\n"
        "print(matplotlib.get_backend(), image.shape[2], image.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "3", "uint8"]


def test_the_benchmarks_import_what_the_package_has() -> None:
    """benchmarks/ are scripts no test runs: every name they import from acnet_pl must still exist."""
    checked = 0
    for script in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acnet_pl"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{script.name} imports {node.module}.{alias.name}"
                    checked += 1
    assert checked >= 5
