"""Conv-4 backbone of the MAML / iMAML baselines (docs/math.md sec. 4)."""
from __future__ import annotations

from torch import nn


def make_convnet(in_channels: int = 1, way: int = 5, blocks: int = 4, filters: int = 64,
                 image_size: int = 32) -> nn.Module:
    """f(x) = Linear(flatten(B_blocks(...B_1(x)))), B = MaxPool2(ReLU(BN(Conv3x3(.)))).

    Fits any image size: the 3x3 convs are padded (side kept) and a block pools only while its input side is >= 2,
    so the side goes s -> floor(s/2) until it reaches 1 and stays there (28x28, 4 blocks: 14, 7, 3, 1 as in MAML's
    reference; 12x12, 4 blocks: 6, 3, 1, 1).
    """
    if image_size < 1 or blocks < 1:
        raise ValueError(f"image_size={image_size} and blocks={blocks} must be >= 1")
    side = image_size
    layers: list[nn.Module] = []
    for b in range(blocks):
        layers += [nn.Conv2d(in_channels if b == 0 else filters, filters, 3, padding=1),
                   nn.BatchNorm2d(filters), nn.ReLU()]
        if side >= 2:
            layers.append(nn.MaxPool2d(2))
            side //= 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * side * side, way))
