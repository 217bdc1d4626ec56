"""Oracles shared by the test modules: the compensated network of docs/score.md#oracles, and
Grad-CAM computed by hand from a layer's raw output."""

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
from camserve.grid import GridLayer
from camserve.zero_reference import (
    ChannelStatistics,
    ScoreSettings,
    ZeroReference,
    total_variation,
    zero_reference,
)


def oracle(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    calibration: ChannelStatistics | None = None,
    classes: list[int] | None = None,
) -> ZeroReference:
    """Reparameterise for real with delta = -mu and compare against the reported score of
    the first image, for its top-1 class or ``classes`` (one per image: a label's logit)."""
    gradcam = GradCam(model, layer_name)
    result = gradcam(x, classes)
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


def hand_grad_cam(model: nn.Module, layer: str, layout: str, x: Tensor, targets: Tensor) -> Tensor:
    """Grad-CAM from the layer's raw output, rearranged by hand as pytorch-grad-cam's
    reshape_transform does: an oracle that shares no code with camserve.grid.

    ``layout``: nchw, nhwc, or a square grid of tokens after 0 (tokens), 1 (cls_tokens) or
    K (prefixK_tokens) other tokens."""
    raw = model.get_submodule(layer)
    raw = raw.layer if isinstance(raw, GridLayer) else raw
    seen = []
    handle = raw.register_forward_hook(lambda m, i, output: seen.append(output))
    try:
        with torch.enable_grad():  # the model is frozen: differentiate through the input
            logits = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    output = seen[-1]
    (gradient,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), output)
    if layout == "nhwc":
        output, gradient = output.permute(0, 3, 1, 2), gradient.permute(0, 3, 1, 2)
    elif layout != "nchw":
        skip = {"tokens": 0, "cls_tokens": 1}.get(layout)
        skip = int(layout.removeprefix("prefix").removesuffix("_tokens")) if skip is None else skip
        side = int((output.shape[1] - skip) ** 0.5)

        def grid(tokens):
            return tokens[:, skip:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

        output, gradient = grid(output), grid(gradient)
    alpha = gradient.mean(dim=(2, 3), keepdim=True)
    return (alpha * output).sum(dim=1).clamp_min(0).detach()
