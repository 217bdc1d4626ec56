"""Oracles shared by the test modules: the compensated network of docs/score.md#oracles."""

from __future__ import annotations

import torch
from captum.attr import LayerGradCam
from torch import Tensor, nn

from camserve.compensation import (
    RELATIVE_TOLERANCE,
    add_shift,
    compensated_copy,
    find_absorbing_layer,
    relative_change,
)
from camserve.gradcam import GradCam
from camserve.zero_reference import (
    ChannelStatistics,
    ScoreSettings,
    ZeroReference,
    total_variation,
    zero_reference,
)


def oracle(
    model: nn.Module, layer_name: str, x: Tensor, calibration: ChannelStatistics | None = None
) -> ZeroReference:
    """Reparameterise for real with delta = -mu and compare against the reported score."""
    gradcam = GradCam(model, layer_name)
    result = gradcam(x)
    [reported] = zero_reference(
        result.explained.signed_map,
        result.explained.alpha,
        result.channel_std,
        tuple(x.shape[-2:]),
        ScoreSettings(),
        True,
        calibration,
    ).items()
    mu = result.channel_mean[0] if calibration is None else calibration.mean.to(x)
    delta = -mu
    absorbing = find_absorbing_layer(model, layer_name, x)
    shifted = compensated_copy(model, layer_name, delta, x, absorbing)

    others = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(9)).to(x.device)
    with torch.no_grad():
        for inputs in (x, others):
            original = model(inputs)
            handle = add_shift(model, layer_name, delta)
            try:
                effect = model(inputs) - original
            finally:
                handle.remove()
            assert relative_change(original, shifted(inputs), effect) <= RELATIVE_TOLERANCE

    target = result.explained.classes.tolist()
    layer = shifted.get_submodule(layer_name)
    real_shifted_signed = LayerGradCam(shifted, layer).attribute(x, target=target)[:, 0]
    expected = (result.explained.signed_map + reported.offset).clamp_min(0)
    # 1e-5 in absolute terms for maps up to 1; float32 rounding grows with larger maps
    # (random ResNet-101 maps reach ~40), so beyond that 1e-5 of the map's maximum.
    atol = 1e-5 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(
        real_shifted_signed.detach().clamp_min(0), expected, atol=atol, rtol=0
    )

    original_layer = model.get_submodule(layer_name)
    real_original = LayerGradCam(model, original_layer).attribute(x, target=target)
    real_tv = total_variation(
        real_original.detach()[:, 0].double(), real_shifted_signed.detach().double()
    )
    assert abs(float(real_tv) - reported.score) < 1e-4
    return reported
