"""The map conventions, in one place: every map camserve shows or scores derives from the signed
map ``M`` (docs/score.md#notation).

- Grad-CAM is ``ReLU(M)``; under a reference shift it is ``ReLU(M + c)``.
- For display a map is divided by its maximum (an empty map stays zero).
- For the score a map is a distribution: ``ReLU(M) / sum ReLU(M)``.

All functions work on the last two dimensions, so a batch ``(N, h, w)`` or a stack of shifted
maps ``(N, C, h, w)`` goes through in one call, on whatever device the maps live.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grad_cam(signed_map: Tensor, offset: Tensor | float = 0.0) -> Tensor:
    """``ReLU(M + c)``; ``offset`` is a number or one value per map (broadcast over h, w)."""
    if isinstance(offset, Tensor) and offset.dim() > 0:
        offset = offset[..., None, None]
    return (signed_map + offset).clamp_min(0)


def peak_normalised(maps: Tensor) -> Tensor:
    """``ReLU(map) / max``: the display scale, 1 at the peak; an empty map stays all zeros."""
    positive = maps.clamp_min(0)
    peak = positive.amax(dim=(-2, -1), keepdim=True)
    return positive / torch.where(peak > 0, peak, torch.ones_like(peak))


def mass(maps: Tensor) -> tuple[Tensor, Tensor]:
    """``ReLU(map) / sum ReLU(map)``, and which maps are empty (no positive evidence)."""
    positive = maps.clamp_min(0)
    total = positive.sum(dim=(-2, -1), keepdim=True)
    empty = total[..., 0, 0] <= 0
    return positive / torch.where(total > 0, total, torch.ones_like(total)), empty
