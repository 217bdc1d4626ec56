"""signed map -> zero-reference sensitivity score (docs/score.md).

Shifting the target layer's activations by a per-channel constant delta, with the
downstream bias compensating, leaves alpha unchanged and moves the signed map by the
uniform offset c = <alpha, delta>. With delta = -mu, c = -<alpha, mu>. The score is the
total variation between the mass distributions of ReLU(M) and ReLU(M + c).
No extra forward or backward pass: everything here is arithmetic on (M, alpha).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

IMAGE_MEAN = "image_mean"
CALIBRATION_MEAN = "calibration_mean"


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel activation mean and std at the target layer, from a calibration set."""

    mean: Tensor
    std: Tensor
    count: int = 0


@dataclass(frozen=True)
class ScoreSettings:
    epsilon: float = 0.1
    threshold: float = 0.25


@dataclass(frozen=True)
class WorstCase:
    epsilon: float
    radius: float
    offset: float
    score: float


@dataclass(frozen=True)
class ZeroReference:
    reference: str
    offset: float
    score: float
    worst_case: WorstCase
    region_iou: float
    centroid_shift_px: float | None
    stable: bool
    threshold: float
    compensable: bool
    map_empty: bool
    shifted_map_empty: bool

    def to_json(self) -> dict:
        return asdict(self)


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


def mass(maps: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU(M) / sum ReLU(M) over the last two dims, and which maps are empty."""
    positive = maps.clamp_min(0)
    total = positive.sum(dim=(-2, -1), keepdim=True)
    empty = total[..., 0, 0] <= 0
    return positive / torch.where(total > 0, total, torch.ones_like(total)), empty


def total_variation(maps: Tensor, shifted: Tensor) -> Tensor:
    """TV(P(M), P(M')) in [0, 1]; 1 if exactly one map is empty, 0 if both are."""
    return _tv(*mass(maps), *mass(shifted))


def _tv(p: Tensor, p_empty: Tensor, q: Tensor, q_empty: Tensor) -> Tensor:
    tv = 0.5 * (p - q).abs().sum(dim=(-2, -1))
    tv = torch.where(p_empty != q_empty, torch.ones_like(tv), tv)
    return torch.where(p_empty & q_empty, torch.zeros_like(tv), tv)


def worst_case_candidates(maps: Tensor, radius: Tensor) -> Tensor:
    """Offsets that contain the largest TV(P(M), P(M + c)) over c in [-r, r].

    Between two consecutive breakpoints c = -M_ij the active set is fixed and the TV is
    sum_i |a_i + b_i c| / (S + n c): a convex numerator over a positive affine denominator,
    hence quasi-convex, so its maximum on each piece sits at a piece's end. The candidates
    {-r, r} and the breakpoints inside (-r, r) therefore contain the exact maximum.
    """
    r = radius[:, None]
    breakpoints = -maps.flatten(1)
    inside = breakpoints.abs() < r
    return torch.cat([-r, r, torch.where(inside, breakpoints, -r)], dim=1)


def worst_case_offsets(maps: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Largest TV(P(M), P(M + c)) over c in [-r, r], and the c that attains it."""
    candidates = worst_case_candidates(maps, radius)
    shifted = maps[:, None] + candidates[:, :, None, None]
    p, p_empty = mass(maps)
    scores = _tv(p[:, None], p_empty[:, None], *mass(shifted))
    best = scores.argmax(dim=1, keepdim=True)
    return scores.gather(1, best)[:, 0], candidates.gather(1, best)[:, 0]


def region_iou(maps: Tensor, shifted: Tensor, level: float = 0.5) -> Tensor:
    """IoU of {D >= level} with D = ReLU(.)/max; 1 when both regions are empty."""
    a, b = _region(maps, level), _region(shifted, level)
    intersection = (a & b).sum(dim=(-2, -1)).to(maps.dtype)
    union = (a | b).sum(dim=(-2, -1)).to(maps.dtype)
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def _region(maps: Tensor, level: float) -> Tensor:
    positive = maps.clamp_min(0)
    peak = positive.amax(dim=(-2, -1), keepdim=True)
    return (positive >= level * peak) & (peak > 0)


def centroids_px(maps: Tensor, input_size: tuple[int, int]) -> Tensor:
    """Centroid (y, x) of each map's mass, in input pixels (cell centres)."""
    return _centroids(mass(maps)[0], input_size)


def _centroids(p: Tensor, input_size: tuple[int, int]) -> Tensor:
    h, w = p.shape[-2:]
    ys = (torch.arange(h, dtype=p.dtype) + 0.5) * (input_size[0] / h)
    xs = (torch.arange(w, dtype=p.dtype) + 0.5) * (input_size[1] / w)
    return torch.stack([(p.sum(-1) * ys).sum(-1), (p.sum(-2) * xs).sum(-1)], dim=-1)


def zero_reference(
    signed_map: Tensor,
    alpha: Tensor,
    channel_mean: Tensor,
    channel_std: Tensor,
    input_size: tuple[int, int],
    settings: ScoreSettings,
    compensable: bool,
    calibration: ChannelStatistics | None = None,
) -> list[ZeroReference]:
    """The zero-reference block for each image of a batch."""
    maps = signed_map.double()
    name, offset, radius = reference_offsets(
        alpha.double(), channel_mean.double(), channel_std.double(), calibration, settings.epsilon
    )
    # The reference offset and every worst-case candidate in one batched pass: the maps are
    # tiny, so the cost is the number of tensor operations, not their size.
    offsets = torch.cat([offset[:, None], worst_case_candidates(maps, radius)], dim=1)
    all_shifted = maps[:, None] + offsets[:, :, None, None]
    p, empty = mass(maps)
    q, q_empty = mass(all_shifted)
    tvs = _tv(p[:, None], empty[:, None], q, q_empty)
    score = tvs[:, 0]
    best = tvs[:, 1:].argmax(dim=1, keepdim=True)
    worst_score = tvs[:, 1:].gather(1, best)[:, 0]
    worst_offset = offsets[:, 1:].gather(1, best)[:, 0]
    shifted, shifted_empty = all_shifted[:, 0], q_empty[:, 0]
    iou = region_iou(maps, shifted)
    shift = (_centroids(p, input_size) - _centroids(q[:, 0], input_size)).norm(dim=-1)
    results = []
    for i in range(maps.shape[0]):
        either_empty = bool(empty[i] or shifted_empty[i])
        results.append(
            ZeroReference(
                reference=name,
                offset=float(offset[i]),
                score=float(score[i]),
                worst_case=WorstCase(
                    epsilon=settings.epsilon,
                    radius=float(radius[i]),
                    offset=float(worst_offset[i]),
                    score=float(worst_score[i]),
                ),
                region_iou=float(iou[i]),
                centroid_shift_px=None if either_empty else float(shift[i]),
                stable=bool(score[i] <= settings.threshold),
                threshold=settings.threshold,
                compensable=compensable,
                map_empty=bool(empty[i]),
                shifted_map_empty=bool(shifted_empty[i]),
            )
        )
    return results
