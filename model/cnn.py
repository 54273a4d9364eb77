"""A small CNN, the convolutional reference of the trade-off benchmark (benchmark.py mode=tradeoff):
a stride-2 stem, then stages of two 3x3 conv-BN-ReLU layers each, every stage after the first halving
the resolution (stride-2 first conv) and doubling the width, global average pooling and a linear head."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

VARIANTS: dict[str, dict] = {
    "cnn_small": dict(widths=(32, 64, 128)),
}


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """images (B, in_chans, H, W) at any H, W -> logits (B, classes)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"SmallCNN: widths={widths!r} must be a non-empty list of positive integers")
        self.in_chans, self.num_classes = in_chans, num_classes
        layers, cin = [conv_bn_relu(in_chans, widths[0], stride=2)], widths[0]
        for i, w in enumerate(widths):
            layers += [conv_bn_relu(cin, w, stride=1 if i == 0 else 2), conv_bn_relu(w, w)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SmallCNN expects images (B, {self.in_chans}, H, W), got {shape}")
        return self.head(self.features(x).mean(dim=(2, 3)))
