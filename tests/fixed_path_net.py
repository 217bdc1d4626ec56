"""Classifiers whose Grad-CAM maps do not depend on what they learned: the sanity check's
failing constructions (tests/test_sanity.py); FixedPathNet is also archived for a real server.

Its Grad-CAM layer ``features`` holds fixed filters (buffers, never trained) and reaches the
logits through a fixed projection (a buffer): alpha and A are the same for every value of the
learned parameters, which only add a per-class offset from the image's mean colour. Every
stage the check randomises (``head``, then ``colour``) leaves every map exactly as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHANNELS = 16


class FixedFilters(nn.Module):
    """Seeded 5x5 filters with stride 8 and a ReLU: an untrained, fixed feature map."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(CHANNELS, 3, 5, 5, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.conv2d(x, self.weight, stride=8, padding=2))


class FixedPathNet(nn.Module):
    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.features = FixedFilters()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("projection", torch.randn(num_classes, CHANNELS, generator=generator))
        self.colour = nn.Linear(3, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        evidence = self.features(x).mean(dim=(2, 3)) @ self.projection.T
        return evidence + self.head(torch.relu(self.colour(x.mean(dim=(2, 3)))))


class LearnedBlockFixedPathNet(nn.Module):
    """A learned target block whose channels reach the logits only through a fixed projection;
    the learned head reads the image's mean colour beside it. Randomising the block moves the
    maps (A changes), randomising the head cannot (alpha is the fixed projection): the maps
    ignore what the head learned, so the check must fail it at step 1."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, CHANNELS, 5, stride=8, padding=2), nn.ReLU())
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("projection", torch.randn(num_classes, CHANNELS, generator=generator))
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        evidence = self.features(x).mean(dim=(2, 3)) @ self.projection.T
        return evidence + self.head(x.mean(dim=(2, 3)))
