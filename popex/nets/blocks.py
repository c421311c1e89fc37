"""Named blocks that a spec may use as one layer.

Attribute names follow torchvision (``conv1``, ``bn1``, ``downsample``;
``conv`` with ``Conv2dNormActivation``-style ``0/1/2`` children) because they
become state-dict keys: a torchvision checkpoint of the same backbone loads
into a POPEX spec that names its layers the same way.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ConvBNActivation", "InvertedResidual"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class ConvBNActivation(nn.Sequential):
    """Conv, BatchNorm, activation: torchvision's ``Conv2dNormActivation`` (children 0, 1, 2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = "relu6",
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation == "relu6":
            layers.append(nn.ReLU6(inplace=True))
        elif activation == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif activation is not None:
            raise ValueError(f"activation must be 'relu', 'relu6' or None, got {activation!r}")
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic residual block; a projection shortcut appears when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual: expand (1x1), depthwise (3x3), project (1x1, linear)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, expand_ratio: int = 6) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if expand_ratio < 1:
            raise ValueError(f"expand_ratio must be >= 1, got {expand_ratio}")
        hidden_channels = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(in_channels, hidden_channels, kernel_size=1))
        layers += [
            ConvBNActivation(hidden_channels, hidden_channels, stride=stride, groups=hidden_channels),
            nn.Conv2d(hidden_channels, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)
