"""CIFAR networks of the ACNet paper (and DenseNet-40): plain nn.Modules whose defaults are the named nets.

Post-activation nets (CifarResNet, CifarVGG, CifarQuick): every KxK conv feeds its own BatchNorm2d, the
conv -> BN pattern `acnet_pl.reparam.convert` looks for. Pre-activation nets (PreActWideResNet,
CifarDenseNet): BN-ReLU-conv units whose convs feed an addition or a concatenation; ``convert`` reaches
them with ``bare_convs``. Nothing in this file knows about ACB. Every layer keeps PyTorch's default
initialisation (``reset_parameters``), as the original ACNet code; ``build_model(init=...)`` chooses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


def _three_stages(
    net: str, block: Callable, in_channels: int, blocks_per_stage: Sequence[int], widths: Sequence[int]
) -> tuple[list[nn.Sequential], int]:
    """Three stages of ``block``: stride 1 then 2, 2; the first block of each stage changes the width."""
    if len(blocks_per_stage) != 3 or len(widths) != 3:
        raise ValueError(
            f"{net} has three stages; got blocks_per_stage={tuple(blocks_per_stage)}, widths={tuple(widths)}"
        )
    stages = []
    for stage_index, (num_blocks, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
        blocks = []
        for block_index in range(num_blocks):
            stride = 2 if stage_index > 0 and block_index == 0 else 1
            blocks.append(block(in_channels, width, stride))
            in_channels = width
        stages.append(nn.Sequential(*blocks))
    return stages, in_channels


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [_conv(in_channels, out_channels, kernel_size, stride), nn.BatchNorm2d(out_channels)]


def _classifier(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
    )


def _basic_block(in_channels: int, out_channels: int, stride: int = 1) -> BasicBlock:
    """torchvision's post-activation basic block, its projection shortcut (conv1x1+BN) where the stride or
    the width changes; set after the block's convs, so default init draws them in the same order."""
    block = BasicBlock(in_channels, out_channels, stride)
    if stride != 1 or in_channels != out_channels:
        block.downsample = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride=stride))
    return block


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 inputs (He et al. 2016, Sec. 4.2) with projection shortcuts."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(3, stem_width, 3)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_channels = _three_stages("CifarResNet", _basic_block, stem_width, blocks_per_stage, widths)
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# Channel plan of the 13 conv3x3 layers; "M" is a 2x2 max pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG with BN for CIFAR: conv3x3+BN+ReLU stack, global average pool, 512-unit hidden Linear (VGG-16)."""

    def __init__(
        self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10, hidden: int = 512
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [*_conv_bn(in_channels, int(item), 3), nn.ReLU(inplace=True)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _classifier(in_channels, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


class CifarQuick(nn.Module):
    """Cifar-quick with BN: three conv5x5+BN+ReLU (32/32/64) with 3x3/2 pools, then 64-unit hidden Linear.

    Pools follow the ACNet reference: max, avg, avg (32 -> 15 -> 7 -> 3). The final adaptive pool
    to 3x3 is the identity at 32x32 and keeps the 576-input hidden layer valid for other sizes.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (32, 32, 64), hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        pools = (nn.MaxPool2d, nn.AvgPool2d, nn.AvgPool2d)
        for cin, cout, pool in zip((3, *widths[:2]), widths, pools, strict=True):
            layers += [*_conv_bn(cin, cout, 5), nn.ReLU(inplace=True), pool(kernel_size=3, stride=2)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(3)
        self.classifier = _classifier(widths[2] * 3 * 3, hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def _bn_relu_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        _conv(in_channels, out_channels, kernel_size, stride),
    )


class PreActBlock(nn.Module):
    """Pre-activation wide-ResNet block as the original ACNet's ``WRNCifarBlock`` (no dropout).

    ``conv1`` and ``conv2`` are BN-ReLU-conv3x3 units; the projection shortcut, where the stride or the
    width changes, is a BN-ReLU-conv1x1 unit of its own (its own BN on the block's input); no ReLU after
    the addition.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _bn_relu_conv(in_channels, out_channels, 3, stride)
        self.conv2 = _bn_relu_conv(out_channels, out_channels, 3)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _bn_relu_conv(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x)) + identity


class PreActWideResNet(nn.Module):
    """Pre-activation Wide ResNet for 32x32 inputs, laid out as the original ACNet's ``WRNCifarNet``;
    the defaults make its WRN-16-8 (widths 16-128-256-512, ~11.0M parameters).

    A bare conv3x3 stem (no BN after it), three stages of ``PreActBlock`` (the first block of each
    stage projects), a final BN (no ReLU, as the original) before global average pooling and the Linear.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int] = (2, 2, 2),
        widths: Sequence[int] = (128, 256, 512),
        stem_width: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(3, stem_width, 3)
        stages, in_channels = _three_stages(
            "PreActWideResNet", PreActBlock, stem_width, blocks_per_stage, widths
        )
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = torch.flatten(self.avgpool(self.bn(x)), 1)
        return self.fc(x)


class _DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth_rate`` maps, concatenated to its input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = _conv(in_channels, growth_rate, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class CifarDenseNet(nn.Module):
    """DenseNet for CIFAR (Huang et al. 2017, Sec. 3 and 4.1), without bottleneck or compression; the
    defaults make DenseNet-40 (growth 12, three dense blocks of 12 layers, ~1.0M parameters).

    A conv3x3 stem to 16 channels, three dense blocks of (depth - 4) / 3 BN-ReLU-conv3x3 layers
    (``growth_rate`` channels each), BN-ReLU-conv1x1 + 2x2 average-pool transitions between them, then
    BN-ReLU, global average pooling and a Linear. No dropout (the paper drops out only without augmentation).
    """

    def __init__(
        self, depth: int = 40, growth_rate: int = 12, stem_width: int = 16, num_classes: int = 10
    ) -> None:
        super().__init__()
        if (depth - 4) % 3 != 0 or depth < 7:
            raise ValueError(f"CIFAR DenseNet depth must be 3n+4 (40, 100, ...); got {depth}")
        layers_per_block = (depth - 4) // 3
        self.conv1 = _conv(3, stem_width, 3)
        channels = stem_width
        features: list[nn.Module] = []
        for block_index in range(3):
            layers = [_DenseLayer(channels + i * growth_rate, growth_rate) for i in range(layers_per_block)]
            features.append(nn.Sequential(*layers))
            channels += layers_per_block * growth_rate
            if block_index < 2:
                features.append(nn.Sequential(*_bn_relu_conv(channels, channels, 1), nn.AvgPool2d(2)))
        self.features = nn.Sequential(*features)
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.features(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """ResNet-``depth`` for CIFAR (depth 6n+2: n blocks per stage; ResNet-20 ~0.27M parameters, -110 ~1.7M)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...); got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes)
