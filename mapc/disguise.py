"""A small learnable input transform: what an attacker puts in front of a frozen artifact.

    T(x) = A x + b + r(x)

A x + b is a 1x1 convolution over channels (a colour map, per-channel affine
included), identity at the start; r is a residual two-layer 3x3 conv net
(C -> hidden -> C, ReLU), zero at the start, so T starts as the identity. It
operates on the model's preprocessed input. ``mapc attack`` trains it against
the artifact (the input-disguise attack).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Disguise(nn.Module):
    def __init__(self, channels: int, hidden: int = 8):
        super().__init__()
        self.colour = nn.Conv2d(channels, channels, 1)
        self.r1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.r2 = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            self.colour.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.colour.bias.zero_()
            self.r2.weight.zero_()
            self.r2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.colour(x) + self.r2(F.relu(self.r1(x)))
