"""CIFAR networks used in the ACNet paper: plain nn.Modules plus builder functions, torchvision style.

Every KxK conv here is followed directly by its BatchNorm2d (bias-free conv), which is the pattern
`acnet_pl.reparam.convert` looks for; nothing in this file knows about ACB.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarQuick",
    "CifarResNet",
    "CifarVGG",
    "cifar_quick",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg16",
    "wrn16_8",
]


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is a conv1x1+BN projection whenever the stride or the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride=stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """Three-stage ResNet for 32x32 inputs (He et al. 2016, Sec. 4.2) with projection shortcuts.

    Args:
        blocks_per_stage: number of basic blocks in each of the three stages.
        widths: output channels of the three stages.
        stem_width: output channels of the stem conv3x3.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != 3 or len(widths) != 3:
            raise ValueError(
                f"CifarResNet has three stages; got blocks_per_stage={tuple(blocks_per_stage)}, "
                f"widths={tuple(widths)}"
            )
        self.conv1 = nn.Conv2d(3, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        in_channels = stem_width
        stages = []
        for stage_index, (num_blocks, width) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlock(in_channels, width, stride if block_index == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# Channel plan of the 13 conv3x3 layers; "M" is a 2x2 max pool.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class CifarVGG(nn.Module):
    """VGG with BN for CIFAR: conv3x3+BN+ReLU stack, global average pool, 512-unit hidden Linear."""

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
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

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
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            *_conv_bn(3, c1, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            *_conv_bn(c1, c2, 5),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=3, stride=2),
            *_conv_bn(c2, c3, 5),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(3)
        self.classifier = nn.Sequential(
            nn.Linear(c3 * 3 * 3, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def _cifar_resnet(depth: int, num_classes: int) -> CifarResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...); got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (3 blocks per stage, ~0.27M parameters)."""
    return _cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (5 blocks per stage, ~0.46M parameters)."""
    return _cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (7 blocks per stage, ~0.66M parameters)."""
    return _cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (9 blocks per stage, ~0.85M parameters)."""
    return _cifar_resnet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for CIFAR (18 blocks per stage, ~1.7M parameters)."""
    return _cifar_resnet(110, num_classes)


def wrn16_8(num_classes: int = 10) -> CifarResNet:
    """Wide ResNet 16-8 for CIFAR: 2 post-activation blocks per stage, widths 128/256/512, stem 16.

    The original ACNet's WRN is pre-activation (BN-ReLU-conv), where half the convs feed an addition
    rather than a BN; conv-BN-ReLU blocks let ``convert`` give every 3x3 conv an ACB.
    """
    return CifarResNet((2, 2, 2), widths=(128, 256, 512), stem_width=16, num_classes=num_classes)


def vgg16(num_classes: int = 10) -> CifarVGG:
    """VGG-16 with BN for CIFAR (13 conv3x3 layers, 512-unit hidden Linear)."""
    return CifarVGG(VGG16_CFG, num_classes=num_classes)


def cifar_quick(num_classes: int = 10) -> CifarQuick:
    """Cifar-quick with BN (three conv5x5 layers, 32/32/64 channels)."""
    return CifarQuick(num_classes=num_classes)
