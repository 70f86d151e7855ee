"""Model zoo: names, shapes, parameter counts, torchvision compatibility, the conv->BN pattern convert needs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from acnet_pl.models import build_model, default_input_size, is_torchvision_model, list_models
from acnet_pl.models.cifar import BasicBlock

IMAGENET = ["resnet18", "resnet34", "resnet50"]
CIFAR = ["cifar_quick", "resnet110", "resnet20", "resnet32", "resnet44", "resnet56", "vgg16", "wrn16_8"]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_is_sorted_and_complete():
    assert list_models() == sorted(IMAGENET + CIFAR)


@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_forward_shape(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    size = 64 if is_torchvision_model(name) else 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [16, 32, 224])
def test_cifar_quick_accepts_other_input_sizes(size):
    model = build_model("cifar_quick", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_default_input_size_and_source():
    for name in IMAGENET:
        assert default_input_size(name) == (3, 224, 224)
        assert is_torchvision_model(name)
    for name in CIFAR:
        assert default_input_size(name) == (3, 32, 32)
        assert not is_torchvision_model(name)


def _cifar_resnet_params(n: int, num_classes: int, widths=(16, 32, 64), stem=16) -> int:
    """Parameter count written out by hand: convs 3x3 (no bias), BN (2c), 1x1+BN projections, fc."""
    total = 3 * stem * 9 + 2 * stem
    c_in = stem
    for c in widths:
        for i in range(n):
            total += 9 * c_in * c + 9 * c * c + 4 * c
            if i == 0 and c_in != c:
                total += c_in * c + 2 * c
            c_in = c
    return total + c_in * num_classes + num_classes


@pytest.mark.parametrize(
    ("name", "n", "paper_count"),
    [("resnet20", 3, 0.27e6), ("resnet56", 9, 0.85e6), ("resnet110", 18, 1.7e6)],
)
def test_cifar_resnet_parameter_counts(name, n, paper_count):
    count = _num_params(build_model(name, num_classes=10))
    assert count == _cifar_resnet_params(n, 10)
    # He et al. 2016, Table 6 (their 0.27M/0.85M/1.7M use parameter-free shortcuts; projections add 2752).
    assert count == pytest.approx(paper_count, rel=0.02)


def test_wrn16_8_layout_and_parameter_count():
    model = build_model("wrn16_8", num_classes=10)
    assert _num_params(model) == _cifar_resnet_params(2, 10, widths=(128, 256, 512), stem=16)
    assert _num_params(model) == pytest.approx(
        10.96e6, rel=0.02
    )  # WRN-16-8 is ~11.0M (Zagoruyko & Komodakis)
    for stage, width in zip((model.layer1, model.layer2, model.layer3), (128, 256, 512), strict=True):
        assert len(stage) == 2
        assert stage[0].downsample is not None and stage[1].downsample is None
        assert stage[1].conv2.out_channels == width


def test_cifar_resnet_stage_layout():
    model = build_model("resnet56", num_classes=10)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [9, 9, 9]
    projections = [m for m in model.modules() if isinstance(m, BasicBlock) and m.downsample is not None]
    assert len(projections) == 2  # only where the shape changes (stages 2 and 3)
    assert projections[0].conv1.stride == (2, 2) and projections[0].downsample[0].kernel_size == (1, 1)
    assert model.fc.in_features == 64


def test_vgg16_and_cifar_quick_layout():
    vgg = build_model("vgg16", num_classes=10)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert [m.out_features for m in vgg.classifier if isinstance(m, nn.Linear)] == [512, 10]

    quick = build_model("cifar_quick", num_classes=10)
    convs = [m for m in quick.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (32, (5, 5)), (64, (5, 5))]
    pools = [type(m) for m in quick.features if isinstance(m, nn.MaxPool2d | nn.AvgPool2d)]
    assert pools == [nn.MaxPool2d, nn.AvgPool2d, nn.AvgPool2d]
    assert [m.out_features for m in quick.classifier if isinstance(m, nn.Linear)] == [64, 10]


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "wrn16_8", "cifar_quick"])
def test_every_cifar_conv_feeds_only_a_batchnorm(name):
    """The pattern reparam.convert relies on: each conv's output goes to exactly one BatchNorm2d."""
    model = build_model(name, num_classes=10)
    modules = dict(model.named_modules())
    graph = torch.fx.symbolic_trace(model).graph
    conv_nodes = [
        n for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)
    ]
    assert len(conv_nodes) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    for node in conv_nodes:
        users = list(node.users)
        assert len(users) == 1, node.target
        assert users[0].op == "call_module" and isinstance(modules[users[0].target], nn.BatchNorm2d), (
            node.target
        )
        assert modules[node.target].bias is None
        assert modules[users[0].target].num_features == modules[node.target].out_channels


def test_cifar_init():
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10)
    conv = model.layer3[5].conv2  # 64 -> 64, 3x3: kaiming normal, fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.005)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_resnet18_is_torchvision_resnet18():
    model = build_model("resnet18", num_classes=1000)
    reference = torchvision.models.resnet18()
    assert list(model.state_dict()) == list(reference.state_dict())
    result = reference.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert build_model("resnet18", num_classes=5).fc.out_features == 5


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'foo'; choose one of: ") as info:
        build_model("foo")
    assert all(name in str(info.value) for name in list_models())
    with pytest.raises(ValueError, match="unknown model"):
        default_input_size("resnet19")
    with pytest.raises(ValueError, match="unknown model"):
        is_torchvision_model("ResNet18")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        build_model("resnet20", num_classes=num_classes)


def test_block_goes_only_through_convert(monkeypatch):
    """block='base' never calls convert; any other block is handed to convert with its options, once."""
    calls = []

    def fake_convert(model, block, **options):
        calls.append((type(model).__name__, block, options))
        return "converted"

    fake = types.ModuleType("acnet_pl.reparam")
    fake.convert = fake_convert
    monkeypatch.setitem(sys.modules, "acnet_pl.reparam", fake)

    assert isinstance(build_model("resnet20", num_classes=10), nn.Module)
    assert calls == []
    out = build_model("resnet20", num_classes=10, block="acb", kernel_sizes=(3,), gamma_init=1.0)
    assert out == "converted"
    assert calls == [("CifarResNet", "acb", {"kernel_sizes": (3,), "gamma_init": 1.0})]


def test_base_block_rejects_block_options():
    with pytest.raises(ValueError, match="block='base'"):
        build_model("resnet20", num_classes=10, kernel_sizes=(3,))
