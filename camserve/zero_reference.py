"""signed map -> zero-reference sensitivity score (docs/score.md).

Shifting the target layer's activations by a per-channel constant delta, with the downstream
bias compensating, leaves alpha unchanged and moves the signed map by the uniform offset
c = <alpha, delta>. With delta = -mu, c = -<alpha, mu>. The score is the total variation
between the mass distributions of ReLU(M) and ReLU(M + c). No extra forward or backward
pass: everything here is arithmetic on (M, alpha), batched, on the maps' device.

Example::

    batch = zero_reference(signed_map, alpha, channel_std, (64, 64), ScoreSettings(),
                           compensable=True)     # channel_std: None with calibration
    [first, *rest] = batch.cpu().items()      # one ZeroReference per image
    first.score, first.worst_case.score
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from camserve.maps import mass

IMAGE_MEAN = "image_mean"
CALIBRATION_MEAN = "calibration_mean"


@dataclass(frozen=True)
class ChannelStatistics:
    """Per-channel activation mean and std at the target layer, from a calibration set."""

    mean: Tensor
    std: Tensor
    count: int = 0

    def to(self, device: str | torch.device) -> ChannelStatistics:
        """float64 on ``device``: done once at load time, not in every batch."""
        return replace(
            self,
            mean=self.mean.to(device, torch.float64),
            std=self.std.to(device, torch.float64),
        )


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


# The columns of a batch's packed blocks: one (N, 9) float64 tensor, so that the whole
# batch's scores reach the CPU in one transfer.
COLUMNS = (
    "offset", "score", "radius", "worst_offset", "worst_score", "region_iou",
    "centroid_shift_px", "map_empty", "shifted_map_empty",
)  # fmt: skip
_COLUMN = {name: index for index, name in enumerate(COLUMNS)}
_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class ZeroReferenceBatch:
    """The zero-reference blocks of a batch, on the maps' device: one row per image, the
    columns ``COLUMNS`` (each readable as an (N,) tensor, e.g. ``batch.score``).

    ``centroid_shift_px`` is NaN where either map is empty. ``cpu()`` is the batch's single
    transfer; ``items()`` then turns it into plain per-image values.
    """

    reference: str
    settings: ScoreSettings
    compensable: bool
    packed: Tensor  # (N, len(COLUMNS)) float64; the two *_empty columns are 0 or 1

    def column(self, name: str) -> Tensor:
        """One column as an (N,) tensor (bool for the two ``*_empty`` columns)."""
        values = self.packed[:, _COLUMN[name]]
        return values > 0 if name.endswith("_empty") else values

    offset = property(lambda self: self.column("offset"))
    score = property(lambda self: self.column("score"))
    radius = property(lambda self: self.column("radius"))
    worst_offset = property(lambda self: self.column("worst_offset"))
    worst_score = property(lambda self: self.column("worst_score"))
    region_iou = property(lambda self: self.column("region_iou"))
    centroid_shift_px = property(lambda self: self.column("centroid_shift_px"))
    map_empty = property(lambda self: self.column("map_empty"))
    shifted_map_empty = property(lambda self: self.column("shifted_map_empty"))

    def cpu(self) -> ZeroReferenceBatch:
        return replace(self, packed=self.packed.cpu())

    def items(self) -> list[ZeroReference]:
        epsilon, threshold = self.settings.epsilon, self.settings.threshold
        return [
            ZeroReference(
                reference=self.reference,
                offset=offset,
                score=score,
                worst_case=WorstCase(epsilon, radius, worst_offset, worst_score),
                region_iou=iou,
                centroid_shift_px=None if shift != shift else shift,  # NaN: a map is empty
                stable=score <= threshold,
                threshold=threshold,
                compensable=self.compensable,
                map_empty=empty > 0,
                shifted_map_empty=shifted_empty > 0,
            )
            for (
                offset,
                score,
                radius,
                worst_offset,
                worst_score,
                iou,
                shift,
                empty,
                shifted_empty,
            ) in self.packed.tolist()
        ]


def total_variation(maps: Tensor, shifted: Tensor) -> Tensor:
    """TV(P(M), P(M')) in [0, 1]; 1 if exactly one map is empty, 0 if both are."""
    p, p_empty = mass(maps)
    q, q_empty = mass(shifted)
    tv = 0.5 * (p - q).abs().sum(dim=(-2, -1))
    tv = torch.where(p_empty != q_empty, torch.ones_like(tv), tv)
    return torch.where(p_empty & q_empty, torch.zeros_like(tv), tv)


def zero_reference(
    signed_map: Tensor,
    alpha: Tensor,
    channel_std: Tensor | None,
    input_size: tuple[int, int],
    settings: ScoreSettings,
    compensable: bool,
    calibration: ChannelStatistics | None = None,
) -> ZeroReferenceBatch:
    """The zero-reference blocks of a batch, in float64 on the maps' device.

    ``signed_map`` (N, h, w) and ``alpha`` (N, K); ``channel_std`` (N, K), the activations'
    spatial std, is needed only without ``calibration`` (the ``image_mean`` reference).

    One fused pass, because on maps this small the cost is the number of tensor operations
    (kernel launches on a GPU), not their size: the map itself, the reference shift and every
    worst-case candidate are the columns of one (N, 4 + hw, hw) stack, normalised and compared
    at once. ``tests/score_reference.py`` defines each quantity on its own, the slow and
    obvious way; the tests hold the two equal.
    """
    n, h, w = signed_map.shape
    maps = signed_map.reshape(n, h * w).double()
    alpha = alpha.double()
    if calibration is None:
        if channel_std is None:
            raise ValueError("the image_mean reference needs the activations' channel std")
        name = IMAGE_MEAN
        offset = maps.mean(dim=1).neg_()  # -<alpha, spatial mean of A> = -mean(M)
        radius = (alpha.abs() * channel_std.double()).sum(dim=1).mul_(settings.epsilon)
    else:
        name = CALIBRATION_MEAN
        offset = alpha @ calibration.mean.to(maps).neg()
        radius = alpha.abs() @ (settings.epsilon * calibration.std.to(maps))
    r = radius[:, None]
    low = r.neg()
    # Columns: 0 the map itself (c = 0), 1 the reference offset, 2 and 3 -r and r, then every
    # cut-off -M_ij clamped into [-r, r]: those outside land on -r or r, already candidates.
    offsets = torch.cat(
        [torch.zeros_like(r), offset[:, None], low, r, maps.neg().clamp_(low, r)], dim=1
    )
    dist = (maps[:, None, :] + offsets[:, :, None]).clamp_min_(0)  # (N, 4 + hw, hw)
    total = dist.sum(dim=2, keepdim=True)
    dist.div_(total.clamp_min(_TINY))  # mass distributions
    total = total[..., 0]
    # TV(P, Q) = 1 - sum min(P, Q) when both have mass; 1 when one is empty, 0 when both are.
    tv = 1 - torch.minimum(dist[:, :1], dist).sum(dim=2)
    tv.masked_fill_((total + total[:, :1]) <= 0, 0.0)
    worst_score, best = tv[:, 2:].max(dim=1)
    worst_offset = offsets[:, 2:].gather(1, best[:, None])[:, 0]
    pair = dist[:, :2]  # P(M) and P(M + c): same regions and centroids as ReLU(M), ReLU(M + c)
    # At least half the peak. A distribution's peak is at least 1 / hw, so the floor at
    # _TINY only matters for an empty (all-zero) map: it has no region.
    region = pair >= pair.amax(dim=2, keepdim=True).mul_(0.5).clamp_min_(_TINY)
    union = region.any(dim=1).sum(dim=1)
    iou = (region.all(dim=1).sum(dim=1) + (union == 0)).double() / union.clamp_min(1)
    centres = _cell_centres(h, w, tuple(input_size), maps.device)
    shift = torch.linalg.vector_norm((pair[:, 1] - pair[:, 0]) @ centres, dim=1)
    empty = total[:, :2] <= 0
    shift.masked_fill_(empty.any(dim=1), torch.nan)
    columns = [offset, tv[:, 1], radius, worst_offset, worst_score, iou, shift]
    packed = torch.cat([torch.stack(columns, dim=1), empty.double()], dim=1)
    return ZeroReferenceBatch(name, settings, compensable, packed)


@functools.lru_cache(maxsize=32)
def _cell_centres(h: int, w: int, input_size: tuple[int, int], device: torch.device) -> Tensor:
    """(h * w, 2): the (y, x) centre of each map cell in input pixels; made once per shape."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * (input_size[0] / h)
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * (input_size[1] / w)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2).to(device)
