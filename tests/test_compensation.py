"""The compensated-network oracle (DESIGN section 3) and the load-time probe."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from camserve.compensation import (
    RELATIVE_TOLERANCE,
    compensated_copy,
    find_absorbing_layer,
    probe_compensable,
    relative_change,
)
from camserve.gradcam import GradCam
from camserve.zero_reference import ScoreSettings, total_variation, zero_reference


def oracle(model, layer_name, x, calibration=None):
    """Reparameterise for real with delta = -mu and compare against the reported score."""
    gradcam = GradCam(model, layer_name)
    result = gradcam(x)
    [reported] = zero_reference(
        result.signed_map,
        result.alpha,
        result.channel_mean,
        result.channel_std,
        tuple(x.shape[-2:]),
        ScoreSettings(),
        True,
        calibration,
    )
    mu = result.channel_mean[0] if calibration is None else calibration.mean.float()
    delta = -mu
    absorbing = find_absorbing_layer(model, layer_name, x)
    shifted = compensated_copy(model, layer_name, delta, x, absorbing)

    others = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        for inputs in (x, others):
            assert relative_change(model(inputs), shifted(inputs)) <= RELATIVE_TOLERANCE

    target = result.targets.tolist()
    layer = shifted.get_submodule(layer_name)
    real_shifted_signed = LayerGradCam(shifted, layer).attribute(x, target=target)[:, 0]
    expected = (result.signed_map + reported.offset).clamp_min(0)
    torch.testing.assert_close(real_shifted_signed.detach().clamp_min(0), expected, atol=1e-5, rtol=0)

    real_original = LayerGradCam(model, model.get_submodule(layer_name)).attribute(x, target=target)
    real_tv = total_variation(real_original.detach()[:, 0].double(), real_shifted_signed.detach().double())
    assert abs(float(real_tv) - reported.score) < 1e-4
    return reported


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
