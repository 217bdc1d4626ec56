"""The JSON encoder keeps the digits of model-scale numbers, whatever their scale."""

from __future__ import annotations

import copy

import pytest
import torch

from camserve.encode_json import MAP_DECIMALS, display_cells, explanation_json, significant
from camserve.explainer import Explainer
from camserve.maps import peak_normalised
from tests.conftest import held_out

TINY = 1e-9


def test_significant_keeps_digits_not_decimals():
    assert significant(1.23456789e-10) == 1.23457e-10
    assert significant(0.0595531234) == 0.0595531
    assert significant(-4.2e-13) == -4.2e-13
    assert significant(0.0) == 0.0
    assert significant(123456.789) == 123457.0


def test_display_cells_equal_the_torch_display_map():
    # The encoder's numpy form of the display map: the same numbers as camserve.maps'
    # peak_normalised rounded by torch, bit for bit (recorded answers rely on it).
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(7, 7, generator=generator) * 10.0**-k for k in range(0, 12, 3)]
    maps += [torch.zeros(8, 8), -torch.rand(8, 8), torch.full((2, 3), 0.5)]
    maps += [torch.randint(-3, 4, (7, 7)).float() for _ in range(5)]  # ties at the peak
    for signed in maps:
        expected = torch.round(peak_normalised(signed).double(), decimals=MAP_DECIMALS).tolist()
        assert display_cells(signed.numpy()) == expected


@pytest.fixture(scope="module")
def tiny_explainer(shapes_explainer) -> Explainer:
    """The shapes network with its last block scaled down: activations ~1e-9, the same maps."""
    model = copy.deepcopy(shapes_explainer.model)
    last_norm = model.features[-2]
    with torch.no_grad():
        last_norm.weight.mul_(TINY)
        last_norm.bias.mul_(TINY)
    return Explainer(model, shapes_explainer.labels, shapes_explainer.config, name="tiny")


def test_tiny_activations_keep_their_offsets_radii_and_probabilities(tiny_explainer):
    prepared = [tiny_explainer.prepare_image(held_out(i).image) for i in range(3)]
    for result in tiny_explainer.explain(prepared):
        reported = result.explained.zero_reference
        assert 0 < abs(reported.offset) < 1e-6 and 0 < reported.worst_case.radius < 1e-6
        body = explanation_json(result)
        block = body["zero_reference"]
        # The JSON says what the computation said, to 6 significant digits: never a bare 0.0
        # next to a positive score.
        assert block["offset"] == pytest.approx(reported.offset, rel=1e-5)
        assert block["worst_case"]["radius"] == pytest.approx(reported.worst_case.radius, rel=1e-5)
        assert block["worst_case"]["offset"] == pytest.approx(reported.worst_case.offset, rel=1e-5)
        if block["score"] > 0:
            assert block["offset"] != 0.0
        for prediction in body["predictions"]:
            expected = float(result.probabilities[prediction["index"]])
            assert prediction["probability"] == pytest.approx(expected, rel=1e-5)
