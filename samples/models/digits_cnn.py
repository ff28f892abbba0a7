"""The sample source model: a small VGG-style CNN with BatchNorm for 3x32x32 digits.

Use with ``mapc compile samples/models/digits_cnn.state_dict.pt --arch samples.models.digits_cnn:build``.
"""
import torch.nn as nn


def block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),            # 16x16
            *block(w, 2 * w), nn.MaxPool2d(2),        # 8x8
            *block(2 * w, 2 * w), nn.MaxPool2d(2),    # 4x4
        )
        self.fc1 = nn.Linear(2 * w * 16, 64)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.classifier(self.relu(self.fc1(x)))


def build(num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes)
