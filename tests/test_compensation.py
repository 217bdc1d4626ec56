"""The compensated-network oracle (docs/score.md#oracles) and the load-time probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camserve.compensation import RELATIVE_TOLERANCE, probe_compensable
from tests.oracles import oracle


def test_oracle_on_shapes(shapes_explainer):
    from tests.conftest import held_out

    for index in range(3):
        x = shapes_explainer.prepare_image(held_out(index).image).tensor[None]
        reported = oracle(shapes_explainer.model, "features", x)
        assert reported.reference == "image_mean"


def test_oracle_on_resnet18_layer4(resnet18):
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    reported = oracle(resnet18, "layer4", x)
    assert reported.offset != 0.0


def _conv_head(relu_after_target: bool) -> nn.Module:
    head = [nn.ReLU()] if relu_after_target else []
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),  # target "2"
        *head,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def test_probe_is_true_for_gap_linear_head():
    torch.manual_seed(0)
    report = probe_compensable(_conv_head(False), "2", (16, 16))
    assert report.compensable and report.absorbing_layer == "5"
    assert report.worst_relative_change <= RELATIVE_TOLERANCE


def test_probe_is_false_when_a_relu_follows_the_target():
    torch.manual_seed(0)
    report = probe_compensable(_conv_head(True), "2", (16, 16))
    assert not report.compensable and report.absorbing_layer == "6"
    assert report.worst_relative_change > RELATIVE_TOLERANCE


def test_probe_is_false_for_zero_padded_conv_borders():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # target "0"
        nn.Conv2d(8, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    report = probe_compensable(model, "0", (12, 12))
    assert report.absorbing_layer == "1" and not report.compensable


@pytest.mark.parametrize("layer", ["features"])
def test_probe_on_shapes_and_resnet18(shapes_explainer, resnet18, layer):
    assert shapes_explainer.compensation.compensable
    assert shapes_explainer.compensation.absorbing_layer == "classifier"
    report = probe_compensable(resnet18, "layer4", (64, 64))
    assert report.compensable and report.absorbing_layer == "fc"
