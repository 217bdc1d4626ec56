"""The zero-reference quantities one by one, the slow and obvious way (docs/score.md).

The serving core computes them all in one fused pass (``camserve.zero_reference``); these
definitions are what the tests hold it to, and what the dense-scan test checks the exactness
of the worst-case search on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camserve.maps import mass, peak_normalised
from camserve.zero_reference import (
    CALIBRATION_MEAN,
    IMAGE_MEAN,
    ChannelStatistics,
    total_variation,
)


def reference_offsets(
    alpha: Tensor,
    channel_mean: Tensor,
    channel_std: Tensor,
    calibration: ChannelStatistics | None,
    epsilon: float,
) -> tuple[str, Tensor, Tensor]:
    """Return (reference name, offset c per image, worst-case radius r per image)."""
    if calibration is None:
        name, mu, sigma = IMAGE_MEAN, channel_mean, channel_std
    else:
        name = CALIBRATION_MEAN
        mu = calibration.mean.to(alpha)[None, :]
        sigma = calibration.std.to(alpha)[None, :]
    offset = -(alpha * mu).sum(dim=1)
    radius = epsilon * (alpha.abs() * sigma).sum(dim=1)
    return name, offset, radius


def shifted_total_variation(maps: Tensor, offsets: Tensor) -> Tensor:
    """TV(P(M), P(M + c)) for each image (N) and each of its offsets (N, C): shape (N, C)."""
    return total_variation(maps[:, None], maps[:, None] + offsets[:, :, None, None])


def worst_case_candidates(maps: Tensor, radius: Tensor) -> Tensor:
    """Offsets that contain the largest TV(P(M), P(M + c)) over c in [-r, r].

    Between two consecutive cut-offs c = -M_ij the active set is fixed and the TV is a convex
    function over a positive affine one, hence quasi-convex, so its maximum on each piece sits
    at a piece's end (docs/score.md#worst-case). The candidates {-r, r} and the cut-offs inside
    (-r, r) therefore contain the exact maximum.
    """
    r = radius[:, None]
    cut_offs = -maps.flatten(1)
    inside = cut_offs.abs() < r
    return torch.cat([-r, r, torch.where(inside, cut_offs, -r)], dim=1)


def worst_case_offsets(maps: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Largest TV(P(M), P(M + c)) over c in [-r, r], and the c that attains it."""
    candidates = worst_case_candidates(maps, radius)
    scores = shifted_total_variation(maps, candidates)
    best = scores.argmax(dim=1, keepdim=True)
    return scores.gather(1, best)[:, 0], candidates.gather(1, best)[:, 0]


def region_iou(maps: Tensor, shifted: Tensor, level: float = 0.5) -> Tensor:
    """IoU of {D >= level} with D = ReLU(.)/max; 1 when both regions are empty."""
    a, b = _region(maps, level), _region(shifted, level)
    intersection = (a & b).sum(dim=(-2, -1)).to(maps.dtype)
    union = (a | b).sum(dim=(-2, -1)).to(maps.dtype)
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def _region(maps: Tensor, level: float) -> Tensor:
    normalised = peak_normalised(maps)
    return (normalised >= level) & (normalised > 0)


def centroids_px(maps: Tensor, input_size: tuple[int, int]) -> Tensor:
    """Centroid (y, x) of each map's mass, in input pixels (cell centres)."""
    p = mass(maps)[0]
    h, w = p.shape[-2:]
    ys = (torch.arange(h, dtype=p.dtype, device=p.device) + 0.5) * (input_size[0] / h)
    xs = (torch.arange(w, dtype=p.dtype, device=p.device) + 0.5) * (input_size[1] / w)
    return torch.stack([(p.sum(-1) * ys).sum(-1), (p.sum(-2) * xs).sum(-1)], dim=-1)
