"""signed map -> zero-reference sensitivity score (docs/score.md).

Shifting the target layer's activations by a per-channel constant delta, with the downstream
bias compensating, leaves alpha unchanged and moves the signed map by the uniform offset
c = <alpha, delta>. With delta = -mu, c = -<alpha, mu>. The score is the total variation
between the mass distributions of ReLU(M) and ReLU(M + c). No extra forward or backward
pass: everything here is arithmetic on (M, alpha), batched, on the maps' device.

Example::

    batch = zero_reference(signed_map, alpha, channel_mean, channel_std, (64, 64),
                           ScoreSettings(), compensable=True)
    [first, *rest] = batch.cpu().items()      # one ZeroReference per image
    first.score, first.worst_case.score
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from camserve.maps import mass, peak_normalised

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
    """One image's zero-reference block, as the response reports it."""

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


@dataclass(frozen=True)
class ZeroReferenceBatch:
    """The zero-reference blocks of a batch, as tensors of shape (N,) on the maps' device.

    ``centroid_shift_px`` is NaN where either map is empty. ``cpu()`` is the batch's single
    transfer; ``items()`` then turns it into plain per-image values.
    """

    reference: str
    settings: ScoreSettings
    compensable: bool
    offset: Tensor
    score: Tensor
    radius: Tensor
    worst_offset: Tensor
    worst_score: Tensor
    region_iou: Tensor
    centroid_shift_px: Tensor
    map_empty: Tensor
    shifted_map_empty: Tensor

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.type == "Tensor"}

    def cpu(self) -> ZeroReferenceBatch:
        return ZeroReferenceBatch(
            self.reference,
            self.settings,
            self.compensable,
            **{name: value.cpu() for name, value in self._tensors().items()},
        )

    def items(self) -> list[ZeroReference]:
        columns = {name: value.tolist() for name, value in self._tensors().items()}
        epsilon, threshold = self.settings.epsilon, self.settings.threshold
        return [
            ZeroReference(
                reference=self.reference,
                offset=row["offset"],
                score=row["score"],
                worst_case=WorstCase(
                    epsilon, row["radius"], row["worst_offset"], row["worst_score"]
                ),
                region_iou=row["region_iou"],
                centroid_shift_px=None
                if row["centroid_shift_px"] != row["centroid_shift_px"]
                else row["centroid_shift_px"],
                stable=row["score"] <= threshold,
                threshold=threshold,
                compensable=self.compensable,
                map_empty=row["map_empty"],
                shifted_map_empty=row["shifted_map_empty"],
            )
            for row in (
                dict(zip(columns, values, strict=True))
                for values in zip(*columns.values(), strict=True)
            )
        ]


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


def total_variation(maps: Tensor, shifted: Tensor) -> Tensor:
    """TV(P(M), P(M')) in [0, 1]; 1 if exactly one map is empty, 0 if both are."""
    p, p_empty = mass(maps)
    q, q_empty = mass(shifted)
    tv = 0.5 * (p - q).abs().sum(dim=(-2, -1))
    tv = torch.where(p_empty != q_empty, torch.ones_like(tv), tv)
    return torch.where(p_empty & q_empty, torch.zeros_like(tv), tv)


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


def zero_reference(
    signed_map: Tensor,
    alpha: Tensor,
    channel_mean: Tensor,
    channel_std: Tensor,
    input_size: tuple[int, int],
    settings: ScoreSettings,
    compensable: bool,
    calibration: ChannelStatistics | None = None,
) -> ZeroReferenceBatch:
    """The zero-reference blocks of a batch: signed maps (N, h, w), alpha and the channel
    statistics (N, K). Computed in float64 on the maps' device."""
    maps = signed_map.double()
    name, offset, radius = reference_offsets(
        alpha.double(), channel_mean.double(), channel_std.double(), calibration, settings.epsilon
    )
    shifted = maps + offset[:, None, None]
    worst_score, worst_offset = worst_case_offsets(maps, radius)
    map_empty, shifted_empty = mass(maps)[1], mass(shifted)[1]
    shift = (centroids_px(maps, input_size) - centroids_px(shifted, input_size)).norm(dim=-1)
    return ZeroReferenceBatch(
        reference=name,
        settings=settings,
        compensable=compensable,
        offset=offset,
        score=shifted_total_variation(maps, offset[:, None])[:, 0],
        radius=radius,
        worst_offset=worst_offset,
        worst_score=worst_score,
        region_iou=region_iou(maps, shifted),
        centroid_shift_px=torch.where(map_empty | shifted_empty, torch.nan, shift),
        map_empty=map_empty,
        shifted_map_empty=shifted_empty,
    )
