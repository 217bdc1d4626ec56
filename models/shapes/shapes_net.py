"""The ``shapes`` classifier: four conv blocks, global average pooling, one Linear.

The archive ships this file as its model file (``model_file`` in model-config.yaml).
"""

from __future__ import annotations

from torch import Tensor, nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class ShapesNet(nn.Module):
    """64x64 RGB in, ``features`` is 128 x 8 x 8, then GAP + Linear (a compensable head)."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, 32),
            nn.MaxPool2d(2),
            *_block(32, 64),
            nn.MaxPool2d(2),
            *_block(64, 128),
            nn.MaxPool2d(2),
            *_block(128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))
