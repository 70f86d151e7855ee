"""torchvision and timm models by name, pretrained weights from a file or the local cache, and ACB/DBB
conversions that start at exactly the pretrained model's function (block.preserve)."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
import torchvision

from acnet_pl.models import build_model, list_models
from acnet_pl.models.registry import _library_spec, check_input_size, default_input_size


def _same_state_dict_layout(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_model_by_name_is_the_library_model(name: str) -> None:
    model = build_model(name, num_classes=7, library="torchvision")
    _same_state_dict_layout(model, torchvision.models.get_model(name, num_classes=7))
    assert f"torchvision:{name}" in list_models("torchvision")
    assert len(list_models("torchvision")) == len(torchvision.models.list_models(module=torchvision.models))
    assert default_input_size(f"torchvision:{name}") == (3, 224, 224)  # its weights' crop size


def test_timm_model_by_name_is_the_library_model() -> None:
    model = build_model("timm:efficientnet_b0", num_classes=7)
    _same_state_dict_layout(model, timm.create_model("efficientnet_b0", num_classes=7))
    assert len(list_models("timm")) == len(timm.list_models())
    assert default_input_size("timm:inception_v3") == (3, 299, 299)  # timm's pretrained_cfg


def test_unknown_names_suggest_the_library_own_names() -> None:
    with pytest.raises(
        ValueError, match=r"^unknown torchvision model 'mobilenetv2'; did you mean mobilenet_v2"
    ):
        build_model("mobilenetv2", library="torchvision")
    with pytest.raises(
        ValueError, match=r"^unknown timm model 'efficientnetb0'; did you mean efficientnet_b0"
    ):
        build_model("timm:efficientnetb0")
    with pytest.raises(ValueError, match="unknown model library 'keras'"):
        build_model("resnet", library="keras")
    with pytest.raises(ValueError) as info:
        build_model("ssd300_vgg16", library="torchvision")  # a detection model: not a classifier
    assert "\n" not in str(info.value)


def test_timm_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    _library_spec.cache_clear()
    with pytest.raises(
        ValueError, match=r"^timm models need timm, which is not installed: pip install timm$"
    ):
        build_model("timm:resnet10t")
    _library_spec.cache_clear()
    assert build_model("torchvision:resnet18", 3).fc.out_features == 3  # torchvision needs no timm


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_input_size_check_on_library_models(library: str) -> None:
    """timm's builders read tensors (drop-path rates): the meta-device check builds them on the CPU then."""
    check_input_size(f"{library}:efficientnet_b0", (3, 8, 8))  # stride-2 convs with padding take 1 px
    with pytest.raises(
        ValueError, match=rf"^images of 8x8 are too small for {library}:vgg11: it needs at least 32x32"
    ):
        check_input_size(f"{library}:vgg11", (3, 8, 8))  # five max-pools: 32 px at least
