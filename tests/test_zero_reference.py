"""The score's arithmetic, its edge cases and the exactness of the worst-case search."""

from __future__ import annotations

import pytest
import torch

from camserve.zero_reference import (
    ChannelStatistics,
    ScoreSettings,
    total_variation,
    zero_reference,
)
from tests.score_reference import (
    centroids_px,
    reference_offsets,
    region_iou,
    worst_case_offsets,
)


def random_maps(n=6, h=7, w=7, seed=0):
    return torch.randn(n, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_tv_is_zero_for_identical_and_one_for_disjoint_maps():
    a = torch.zeros(1, 4, 4, dtype=torch.float64)
    b = torch.zeros_like(a)
    a[0, 0, 0] = 1.0
    b[0, 3, 3] = 2.0
    assert float(total_variation(a, a)) == 0.0
    assert float(total_variation(a, b)) == 1.0


def test_tv_matches_hand_computed_value():
    m = torch.tensor([[[3.0, 1.0], [0.0, -1.0]]], dtype=torch.float64)
    # M + 1 -> relu = [4, 2, 1, 0] / 7 versus [3, 1, 0, 0] / 4
    expected = 0.5 * (abs(4 / 7 - 3 / 4) + abs(2 / 7 - 1 / 4) + abs(1 / 7 - 0))
    assert abs(float(total_variation(m, m + 1)) - expected) < 1e-12


def test_empty_map_edge_cases_never_give_nan():
    empty = -torch.ones(1, 3, 3, dtype=torch.float64)
    full = torch.ones(1, 3, 3, dtype=torch.float64)
    assert float(total_variation(empty, empty)) == 0.0
    assert float(total_variation(full, empty)) == 1.0
    assert float(total_variation(empty, full)) == 1.0
    alpha = torch.ones(1, 2, dtype=torch.float64)
    [result] = zero_reference(
        empty, alpha, torch.ones(1, 2), (32, 32), ScoreSettings(), True
    ).items()
    assert result.map_empty and result.score == 0.0 and result.centroid_shift_px is None
    assert result.region_iou == 1.0
    values = [result.offset, result.score, result.worst_case.score, result.region_iou]
    assert all(v == v for v in values)


def test_shift_past_the_maximum_empties_the_map():
    maps = random_maps(1)
    shifted = maps - maps.max() - 0.1
    assert float(total_variation(maps, shifted)) == 1.0


def test_image_mean_offset_is_minus_the_mean_of_the_signed_map():
    g = torch.Generator().manual_seed(1)
    activations = torch.rand(3, 16, 5, 5, generator=g, dtype=torch.float64)
    alpha = torch.randn(3, 16, generator=g, dtype=torch.float64)
    signed = (alpha[:, :, None, None] * activations).sum(1)
    name, offset, radius = reference_offsets(
        alpha, activations.mean((2, 3)), activations.std((2, 3), correction=0), None, 0.2
    )
    assert name == "image_mean"
    torch.testing.assert_close(offset, -signed.mean((1, 2)))
    expected_radius = 0.2 * (alpha.abs() * activations.std((2, 3), correction=0)).sum(1)
    torch.testing.assert_close(radius, expected_radius)


def test_calibration_reference_uses_the_dataset_statistics():
    alpha = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    stats = ChannelStatistics(mean=torch.tensor([0.5, 0.25]), std=torch.tensor([1.0, 2.0]))
    name, offset, radius = reference_offsets(
        alpha, torch.zeros(1, 2), torch.zeros(1, 2), stats, 0.1
    )
    assert name == "calibration_mean"
    assert float(offset) == -(1.0 * 0.5 - 2.0 * 0.25)
    assert abs(float(radius) - 0.1 * (1.0 + 4.0)) < 1e-12


def test_worst_case_equals_a_dense_scan_and_is_never_beaten():
    maps = random_maps(8, seed=3)
    radius = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 0.05, 10.0], dtype=torch.float64)
    score, offset = worst_case_offsets(maps, radius)
    for i in range(len(maps)):
        grid = torch.linspace(-float(radius[i]), float(radius[i]), 4001, dtype=torch.float64)
        shifted = maps[i][None] + grid[:, None, None]
        scanned = total_variation(maps[i][None].expand_as(shifted), shifted)
        assert float(score[i]) >= float(scanned.max()) - 1e-12
        assert float(score[i]) <= float(scanned.max()) + 2e-3  # the grid can only miss a sliver
        assert abs(float(offset[i])) <= float(radius[i]) + 1e-12
        recomputed = total_variation(maps[i][None], maps[i][None] + offset[i])
        assert abs(float(recomputed) - float(score[i])) < 1e-12


def test_region_iou_and_centroid_shift():
    a = torch.zeros(1, 4, 4, dtype=torch.float64)
    a[0, 0, 0] = 1.0
    b = torch.zeros_like(a)
    b[0, 0, 0] = 1.0
    b[0, 0, 1] = 1.0
    assert float(region_iou(a, a)) == 1.0
    assert float(region_iou(a, b)) == 0.5
    centre = centroids_px(a, (40, 40))
    torch.testing.assert_close(centre, torch.tensor([[5.0, 5.0]], dtype=torch.float64))
    shift = (centroids_px(a, (40, 40)) - centroids_px(b, (40, 40))).norm(dim=-1)
    assert abs(float(shift) - 5.0) < 1e-12


def test_stable_follows_the_threshold():
    maps = random_maps(4, seed=5)
    alpha = torch.randn(4, 3, dtype=torch.float64)
    std = torch.rand(4, 3, dtype=torch.float64)
    results = zero_reference(maps, alpha, std, (64, 64), ScoreSettings(0.1, 0.3), False).items()
    for result in results:
        assert result.stable == (result.score <= 0.3)
        assert 0.0 <= result.score <= 1.0 and 0.0 <= result.worst_case.score <= 1.0
        assert result.compensable is False


@pytest.mark.parametrize("calibrated", [False, True], ids=["image_mean", "calibration_mean"])
@pytest.mark.parametrize("epsilon", [0.05, 0.5, 5.0])
def test_fused_pass_equals_the_functions_one_by_one(calibrated, epsilon):
    # zero_reference() computes everything in one fused pass; tests/score_reference.py
    # computes one quantity at a time. Random maps from real (alpha, A) pairs, some of them empty.
    g = torch.Generator().manual_seed(7)
    activations = torch.rand(6, 16, 7, 7, generator=g, dtype=torch.float64)
    alpha = torch.randn(6, 16, generator=g, dtype=torch.float64)
    alpha[0] = -alpha[0].abs()  # an empty map (A >= 0)
    signed = (alpha[:, :, None, None] * activations).sum(1)
    mean, std = activations.mean((2, 3)), activations.std((2, 3), correction=0)
    calibration = (
        ChannelStatistics(mean=mean.mean(0) * 1.3, std=std.mean(0)) if calibrated else None
    )
    batch = zero_reference(
        signed, alpha, std, (56, 56), ScoreSettings(epsilon, 0.25), True, calibration
    )
    name, offset, radius = reference_offsets(alpha, mean, std, calibration, epsilon)
    shifted = signed + offset[:, None, None]
    worst_score, worst_offset = worst_case_offsets(signed, radius)
    assert batch.reference == name and batch.map_empty[0]
    torch.testing.assert_close(batch.offset, offset, atol=1e-12, rtol=0)
    torch.testing.assert_close(batch.radius, radius, atol=1e-12, rtol=0)
    torch.testing.assert_close(batch.score, total_variation(signed, shifted), atol=1e-12, rtol=0)
    torch.testing.assert_close(batch.worst_score, worst_score, atol=1e-12, rtol=0)
    recomputed = total_variation(signed, signed + batch.worst_offset[:, None, None])
    torch.testing.assert_close(recomputed, worst_score, atol=1e-12, rtol=0)
    torch.testing.assert_close(batch.region_iou, region_iou(signed, shifted), atol=0, rtol=0)
    shift = (centroids_px(signed, (56, 56)) - centroids_px(shifted, (56, 56))).norm(dim=-1)
    either_empty = batch.map_empty | batch.shifted_map_empty
    torch.testing.assert_close(batch.centroid_shift_px[~either_empty], shift[~either_empty])
    assert batch.centroid_shift_px[either_empty].isnan().all()
    for item, score in zip(batch.cpu().items(), batch.score.tolist(), strict=True):
        assert item.score == score and item.stable == (score <= 0.25)
