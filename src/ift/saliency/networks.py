"""Classifier networks for the explanation study.

Every ReLU is its own ``nn.ReLU`` module (never ``F.relu`` and never reused), because captum's
Guided Backprop overrides the backward of ``nn.ReLU`` modules: a functional ReLU would silently
turn GBP into the plain gradient (the bug in the reference code of Yeh et al.).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ARCHITECTURES = ("madry_cnn", "small_cnn", "softplus_mlp", "resnet")


class MadryCNN(nn.Module):
    """Madry et al. MNIST CNN: conv5x5-32, pool, conv5x5-64, pool, fc1024, fc10.

    ``width`` scales every layer (1.0 is the paper's network; smaller widths keep CPU runs short).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: float = 1.0):
        super().__init__()
        c, h, w = input_shape
        c1, c2, fc = (max(1, round(n * width)) for n in (32, 64, 1024))
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), fc), nn.ReLU(), nn.Linear(fc, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A small CNN for 8x8 inputs (sklearn ``digits``): conv3x3-16, conv3x3-32, pool, fc64, fc."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: float = 1.0):
        super().__init__()
        c, h, w = input_shape
        c1, c2, fc = (max(1, round(n * width)) for n in (16, 32, 64))
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * (h // 2) * (w // 2), fc), nn.ReLU(), nn.Linear(fc, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SoftplusMLP(nn.Module):
    """Bias-free Softplus MLP ``f(x) = W_l s(W_{l-1} ... s(W_1 x))`` of Proposition A.1."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 64),
                 bias: bool = False):
        super().__init__()
        dims = [int(torch.tensor(input_shape).prod()), *hidden, num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out, bias=bias))
            if i < len(dims) - 2:
                layers.append(nn.Softplus())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def weights(self) -> list[torch.Tensor]:
        return [m.weight for m in self.net if isinstance(m, nn.Linear)]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()  # a second module: GBP hooks must not be shared between uses
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3 stages of BasicBlocks, widths 16k/32k/64k; depth 6n+2)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"resnet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(16 * width * k)) for k in (1, 2, 4)]
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        ]
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for b in range(n):
                layers.append(BasicBlock(c_in, c_out, 2 if (b == 0 and stage > 0) else 1))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_network(arch: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Network by name; ``kwargs`` go to its constructor (``width``, ``hidden``, ``depth``)."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    if arch == "madry_cnn":
        if input_shape[1] % 4 or input_shape[2] % 4:
            raise ValueError(f"madry_cnn needs H and W divisible by 4, got {input_shape}; use small_cnn")
        return MadryCNN(input_shape, num_classes, **kwargs)
    if arch == "small_cnn":
        return SmallCNN(input_shape, num_classes, **kwargs)
    if arch == "softplus_mlp":
        return SoftplusMLP(input_shape, num_classes, **kwargs)
    if arch == "resnet":
        return ResNet(input_shape, num_classes, **kwargs)
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


def default_arch(input_shape: Sequence[int]) -> str:
    """A sensible network for the data: small_cnn for tiny images, resnet for colour, else madry_cnn."""
    c, h, w = (int(s) for s in input_shape)
    if h < 16 or w < 16:
        return "small_cnn"
    if c == 3:
        return "resnet"
    return "madry_cnn"
