"""Model zoo: names, shapes, parameter counts, torchvision compatibility, the conv->BN pattern convert needs."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torchvision
from conftest import assert_rel
from test_reparam import randomize_bns
from torch import nn

from acnet_pl.blocks import ACBlock
from acnet_pl.models import build_model, default_input_size, init_weights, is_torchvision_model, list_models
from acnet_pl.models import registry as registry_module
from acnet_pl.models.cifar import BasicBlock, PreActBlock
from acnet_pl.reparam import ConversionReport, add_conv_biases, added_biases, fuse

IMAGENET = ["resnet18", "resnet34", "resnet50"]
CIFAR = [
    "cifar_quick",
    "densenet40",
    "resnet110",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "vgg16",
    "wrn16_8",
]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_is_sorted_and_complete():
    assert list_models() == sorted(IMAGENET + CIFAR)


@pytest.mark.slow
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


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: Trainable parameters (base, ACB) of the original ACNet code's own models (DingXiaoH/ACNet at 748fb0c,
#: built by its ConvBuilder / ACNetBuilder): src56, src110, vc, wrnc16plain, cfqkbnc.
ORIGINAL_COUNTS = {
    "resnet56": (855_770, 1_429_434),
    "resnet110": (1_730_714, 2_893_050),
    "vgg16": (14_986_698, 24_810_570),
    "wrn16_8": (10_962_170, 18_172_538),
    "cifar_quick": (117_034, 149_226),
}


#: The ACB options of each recipe (conf/experiment): the pre-activation nets convert every KxK conv bare.
RECIPE_ACB = {
    "wrn16_8": {"bare_convs": "all", "gamma_init": {"conv1": 1 / 3}},
    "densenet40": {"bare_convs": "all"},
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(ORIGINAL_COUNTS))
def test_parameter_counts_are_the_originals(name):
    """Base and ACB: the ACB count differs by one BN per unit if a unit's BN went into the block before it."""
    assert _trainable(build_model(name, num_classes=10)) == ORIGINAL_COUNTS[name][0]
    acb = build_model(name, num_classes=10, block="acb", **RECIPE_ACB.get(name, {}))
    assert _trainable(acb) == ORIGINAL_COUNTS[name][1]


@pytest.mark.usefixtures("one_thread")
def test_wrn16_8_acb_is_the_originals_acnet_wrn():
    """Every 3x3 conv an ACB (stem included), 1x1 projections stay, the units' BNs stay; gammas 1/3 and 1."""
    report = ConversionReport()
    model = build_model("wrn16_8", num_classes=10, block="acb", report=report, **RECIPE_ACB["wrn16_8"])
    units = [f"layer{s}.{b}.conv{c}.2" for s in (1, 2, 3) for b in (0, 1) for c in (1, 2)]
    assert report.bare == ["conv1", *units] and report.converted == []
    assert [n for n, _ in report.skipped] == [f"layer{s}.0.shortcut.2" for s in (1, 2, 3)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13 * 3 + 12 + 3 + 1
    for name, m in model.named_modules():
        if isinstance(m, ACBlock):
            gamma = 1 / 3 if name == "conv1" else 1.0
            for bn in (m.square_bn, m.ver_bn, m.hor_bn):
                assert torch.all(bn.weight == torch.tensor(gamma)), name


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["wrn16_8", "densenet40"])
def test_preactivation_recipe_acb_round_trips(name):
    """convert as the recipe -> random BNs -> fuse -> strict load into base + added biases: equal in fp32.

    Norm-wise relative error <= 1e-5 (eval mode, float32); the fused layout is the base one plus a bias
    on every converted (bare) conv, and load_deployed's record says so.
    """
    torch.manual_seed(0)
    acnet = randomize_bns(build_model(name, num_classes=10, block="acb", **RECIPE_ACB[name])).eval()
    biased = added_biases(acnet)
    threes = [
        n
        for n, m in build_model(name, 10).named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert biased == threes
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = acnet(x)
        base = add_conv_biases(build_model(name, num_classes=10), biased).eval()
        base.load_state_dict(fuse(acnet).state_dict(), strict=True)
        assert_rel(base(x), y, 1e-5, name)


def test_wrn16_8_is_the_originals_pre_activation_layout():
    model = build_model("wrn16_8", num_classes=10)
    # a bare stem conv (no BN after it); BN-ReLU-conv units; a final BN (no ReLU) before pooling
    assert isinstance(model.conv1, nn.Conv2d) and (model.conv1.in_channels, model.conv1.out_channels) == (
        3,
        16,
    )
    assert isinstance(model.bn, nn.BatchNorm2d) and model.bn.num_features == 512
    stages = (model.layer1, model.layer2, model.layer3)
    for stage, width, stride in zip(stages, (128, 256, 512), (1, 2, 2), strict=True):
        assert len(stage) == 2 and all(isinstance(b, PreActBlock) for b in stage)
        first, second = stage
        # the first block of every stage projects (stage 1 too: 16 -> 128), as a BN-ReLU-conv1x1 unit
        assert [type(m) for m in first.shortcut] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
        assert first.shortcut[2].kernel_size == (1, 1) and first.shortcut[2].stride == (stride, stride)
        assert second.shortcut is None
        for unit in (first.conv1, first.conv2, second.conv1, second.conv2):
            assert [type(m) for m in unit] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
            assert unit[2].kernel_size == (3, 3) and unit[2].bias is None
        assert first.conv1[2].stride == (stride, stride) and second.conv2[2].out_channels == width
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    # no ReLU after the addition: each sum goes on into BNs (the next units', the final one) and sums
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target.__name__ in ("add", "iadd")]
    users = [u for a in adds for u in a.users]
    assert len(adds) == 6 and users
    assert all(u in adds or isinstance(modules.get(u.target), nn.BatchNorm2d) for u in users)


def test_densenet40_layout_and_parameter_count():
    model = build_model("densenet40", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    # stem 3 -> 16, 3 x 12 layers of growth 12, two BN-ReLU-conv1x1 transitions (160 and 304 channels)
    assert len(three) == 1 + 36 and len(one) == 2 and all(c.bias is None for c in convs)
    assert [c.out_channels for c in three[1:]] == [12] * 36
    assert [(c.in_channels, c.out_channels) for c in one] == [(160, 160), (304, 304)]
    assert model.fc.in_features == 448
    # written out: stem, 36 layers (BN + conv3x3), transitions (BN + conv1x1), final BN, fc
    expected = 3 * 16 * 9
    channels = 16
    for block in range(3):
        for _ in range(12):
            expected += 2 * channels + channels * 12 * 9
            channels += 12
        if block < 2:
            expected += 2 * channels + channels * channels
    expected += 2 * channels + channels * 10 + 10
    assert _trainable(model) == expected == 1_019_722  # the paper's "1.0M" (Huang et al. 2017, Table 2)


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


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "cifar_quick"])
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


@pytest.mark.parametrize("name", ["resnet56", "resnet18"])
def test_default_init_is_pytorchs(name):
    """Every conv and linear starts from reset_parameters (the original's), torchvision's ResNets too."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.numel() >= 4096:
            # kaiming_uniform(a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in), std = b/sqrt(3); 5% covers >= 4096 draws
            bound = 1 / (m.weight[0].numel() ** 0.5)
            assert m.weight.abs().max().item() <= bound
            assert m.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_kaiming_init_is_a_choice():
    torch.manual_seed(0)
    model = build_model("resnet56", num_classes=10, init="kaiming")
    conv = model.layer3[5].conv2  # 64 -> 64, 3x3: kaiming normal, fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.005)
    with pytest.raises(ValueError, match="unknown init 'xavier'; choose one of: default, kaiming"):
        build_model("resnet56", num_classes=10, init="xavier")
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(nn.Conv2d(1, 1, 3), "he")


def _square_to_1d_ratios(model: nn.Module) -> list[float]:
    """Per ACB, |square kernel|^2 / |Kx1 kernel|^2 and / |1xK kernel|^2."""
    ratios = []
    for m in model.modules():
        if isinstance(m, ACBlock):
            square = m.square_conv.weight.square().sum().item()
            ratios += [
                square / m.ver_conv.weight.square().sum().item(),
                square / m.hor_conv.weight.square().sum().item(),
            ]
    return ratios


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("name", "init"),
    [(name, "default") for name in IMAGENET + CIFAR] + [("resnet18", "kaiming"), ("resnet56", "kaiming")],
)
def test_acb_branches_start_by_the_square_kernels_rule(name, init):
    """Square and 1D kernels drawn by one rule: |square|^2 / |1D|^2 about 1 (the Kaiming zoo had about 6).

    Both norms are (out channels) x (a constant) in expectation; the smallest block here (3 -> 16 channels,
    144 weights per 1D kernel) gives the ratio a spread of about 10%, so each ratio within [0.6, 1.6] and
    their mean within 10% of 1.
    """
    torch.manual_seed(0)
    acnet = build_model(name, num_classes=10, block="acb", init=init, **RECIPE_ACB.get(name, {}))
    ratios = _square_to_1d_ratios(acnet)
    assert ratios, f"{name}: no ACB"
    assert all(0.6 <= r <= 1.6 for r in ratios), (min(ratios), max(ratios))
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)


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

    converted = nn.Linear(1, 1)

    def fake_convert(model, block, **options):
        calls.append((type(model).__name__, block, options))
        return converted

    monkeypatch.setattr(registry_module, "convert", fake_convert)

    assert isinstance(build_model("resnet20", num_classes=10), nn.Module)
    assert calls == []
    out = build_model("resnet20", num_classes=10, block="acb", kernel_sizes=(3,), gamma_init=1.0)
    assert out is converted
    assert calls == [("CifarResNet", "acb", {"kernel_sizes": (3,), "gamma_init": 1.0})]


def test_base_block_rejects_block_options():
    with pytest.raises(ValueError, match="block='base'"):
        build_model("resnet20", num_classes=10, kernel_sizes=(3,))
