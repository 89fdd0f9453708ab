"""A small model zoo for the built-in datasets. Any torch nn.Module works with gossipfl; these
are just sensible defaults. Normalisation uses GroupNorm, whose statistics are per sample, so
averaging models never averages running statistics that belong to other data."""

from __future__ import annotations

import math
from typing import Callable

from torch import nn


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """Two conv-pool blocks and a linear head (about 30k parameters at width 16 on 28x28)."""
    channels, height, wide = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (height // 4) * (wide // 4), num_classes),
    )


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        groups = min(8, c_out)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.GroupNorm(groups, c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out))
        self.act = nn.ReLU()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.act(self.body(x) + self.skip(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """A ResNet-8 style network with GroupNorm: three stages of one residual block."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.GroupNorm(min(8, width), width), nn.ReLU(),
        _Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))


def logistic(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda shape, classes, hidden, width: mlp(shape, classes, hidden),
    "cnn": lambda shape, classes, hidden, width: cnn(shape, classes, width),
    "resnet": lambda shape, classes, hidden, width: resnet(shape, classes, width),
    "logistic": lambda shape, classes, hidden, width: logistic(shape, classes),
}
IMAGE_MODELS = ("cnn", "resnet")


def build(name: str, input_shape: tuple[int, ...], num_classes: int, *, hidden: list[int] | None = None,
          width: int = 16) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if name in IMAGE_MODELS and len(input_shape) != 3:
        raise ValueError(f"model.name = {name!r} needs image input (C, H, W), got shape {input_shape}")
    return MODELS[name](input_shape, num_classes, hidden or [200], width)
