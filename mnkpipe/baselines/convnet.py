"""Conv-4 backbone of the MAML / iMAML baselines (SPEC section 3)."""
from __future__ import annotations

from torch import nn


def make_convnet(in_channels: int = 1, way: int = 5, blocks: int = 4, filters: int = 64,
                 image_size: int = 32) -> nn.Module:
    """f(x) = Linear(flatten(B_blocks(...B_1(x)))), B = MaxPool2(ReLU(BN(Conv3x3(.))))."""
    side = image_size
    layers: list[nn.Module] = []
    for b in range(blocks):
        layers += [nn.Conv2d(in_channels if b == 0 else filters, filters, 3, padding=1),
                   nn.BatchNorm2d(filters), nn.ReLU(), nn.MaxPool2d(2)]
        side //= 2
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for {blocks} pooling blocks")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * side * side, way))
