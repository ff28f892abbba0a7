"""Tiny architectures for fast tests (3x16x16 input, 10 classes)."""
import torch
import torch.nn as nn


class ResidualNet(nn.Module):
    """Conv-BN stem, a residual block with an Add, global pooling, Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(y + self.bn2(self.c2(torch.relu(self.c1(y)))))
        return self.fc(y.mean(dim=(2, 3)))


class PlainNet(nn.Module):
    """No BatchNorm: Conv, pool, Flatten, two Linear layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.fc1 = nn.Linear(6 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))))


def residual() -> ResidualNet:
    """Seeded weights; BatchNorm statistics set away from (0, 1) as a trained model's would be."""
    torch.manual_seed(0)
    m = ResidualNet()
    g = torch.Generator().manual_seed(1)
    for bn in (m.bn, m.bn2):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.2)
    return m.eval()


def plain() -> PlainNet:
    torch.manual_seed(0)
    return PlainNet().eval()
