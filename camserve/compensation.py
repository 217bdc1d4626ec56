"""Is a per-channel shift at the target layer an exact reparameterisation of the network?

At load time we follow the forward pass from the target layer to the first affine layer
that runs after it, then build the compensated network for real: a hook adds delta to the
layer's output and that affine layer's bias absorbs it. If the outputs match the original
on random inputs (relative tolerance ``RELATIVE_TOLERANCE``), the shift is ``compensable``.

The shift is one constant per channel of the layer's (N, C, h, w) grid (camserve.grid): a
channels-last or token layer is probed at its grid tap, so the shift runs along the real
channel axis and never along rows or tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camserve.device import model_device
from camserve.grid import GridLayer, GridTap, grid_tap

RELATIVE_TOLERANCE = 1e-4
_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.MultiheadAttention)


@dataclass(frozen=True)
class CompensationReport:
    compensable: bool
    absorbing_layer: str | None
    worst_relative_change: float | None
    tolerance: float
    reason: str

    def log_line(self, layer_name: str) -> str:
        return (
            f"target layer {layer_name!r}: compensable={self.compensable} "
            f"(absorbing layer {self.absorbing_layer!r}, worst relative output change "
            f"{self.worst_relative_change}, tolerance {self.tolerance}): {self.reason}"
        )


def leaf_modules_after(model: nn.Module, layer_name: str, example: Tensor) -> list[str]:
    """Names of leaf modules in the order they start running after the target layer ends.

    A ``MultiheadAttention`` counts as a leaf: it applies its input projection (and its
    bias) functionally, so its ``out_proj`` child never runs as a module.
    """
    target = model.get_submodule(layer_name)
    order: list[str] = []
    state = {"after": False}
    handles = [target.register_forward_hook(lambda *_: state.__setitem__("after", True))]
    units = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in model.named_modules():
        inside_unit = any(name.startswith(f"{unit}.") for unit in units)
        leaf = not any(True for _ in module.children()) or name in units
        if name and leaf and not inside_unit:
            handles.append(module.register_forward_pre_hook(_recorder(name, order, state)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _recorder(name: str, order: list[str], state: dict):
    def record(module: nn.Module, inputs: tuple) -> None:
        if state["after"]:
            order.append(name)

    return record


def find_absorbing_layer(model: nn.Module, layer_name: str, example: Tensor) -> str | None:
    """The first affine layer (Linear, Conv2d, BatchNorm2d, the input projection of a
    MultiheadAttention) with a bias that runs after the target."""
    for name in leaf_modules_after(model, layer_name, example):
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            if module.in_proj_bias is not None and module.in_proj_weight is not None:
                return name
        elif isinstance(module, nn.BatchNorm2d) or (
            isinstance(module, _AFFINE) and module.bias is not None
        ):
            return name
    return None


def add_shift(model: nn.Module, layer_name: str, delta: Tensor):
    """Hook that adds ``delta`` (one constant per channel) to the layer's output, an
    (N, C, h, w) grid: a channels-last or token layer is shifted at its grid tap."""
    layer = model.get_submodule(layer_name)
    if isinstance(layer, GridLayer):
        layer = layer.grid
    shift = delta.reshape(1, -1, 1, 1)

    def add(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if output.dim() != 4 or output.shape[1] != shift.shape[1]:
            raise ValueError(
                f"cannot shift {layer_name!r}: its output {tuple(output.shape)} is not an "
                f"(N, {shift.shape[1]}, h, w) grid (probe its grid tap, camserve.grid)"
            )
        return output + shift.to(output)

    return layer.register_forward_hook(add)


def compensated_copy(
    model: nn.Module, layer_name: str, delta: Tensor, example: Tensor, absorbing_layer: str
) -> nn.Module:
    """A copy of ``model`` whose target layer outputs A + delta and whose absorbing layer's
    bias is changed so that the network's outputs would be unchanged if the path between
    them commutes with per-channel constants."""
    shifted = copy.deepcopy(model).eval()
    absorbing = shifted.get_submodule(absorbing_layer)
    seen: list[Tensor] = []
    capture = absorbing.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            shifted(example[:1])
            handle = add_shift(shifted, layer_name, delta)
            shifted(example[:1])
    finally:
        capture.remove()
    input_shift = (seen[1] - seen[0])[0]
    with torch.no_grad():
        _absorb(absorbing, input_shift)
    del handle  # the shift hook stays on the copy for good
    return shifted


def _absorb(layer: nn.Module, input_shift: Tensor) -> None:
    if isinstance(layer, nn.Linear | nn.MultiheadAttention):
        weight, bias = (
            (layer.weight, layer.bias)
            if isinstance(layer, nn.Linear)
            else (layer.in_proj_weight, layer.in_proj_bias)
        )
        # A Linear on tokens (N, L, C) sees the shift at every position; one bias can only
        # absorb it if it is the same everywhere (it is not when a class token is spared).
        # The mean is the best single bias; the probe then measures what is left.
        shift = input_shift.reshape(-1, weight.shape[1]).mean(dim=0)
        bias -= weight @ shift
    elif isinstance(layer, nn.BatchNorm2d):
        # Moving the running mean is the same as bias -= weight * d / sqrt(var + eps).
        layer.running_mean += input_shift.mean(dim=(1, 2))
    elif isinstance(layer, nn.Conv2d):
        response = F.conv2d(
            input_shift[None],
            layer.weight,
            None,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )[0]
        h, w = response.shape[-2:]
        # Exact only without zero padding; then every position has the same response.
        layer.bias -= response[:, h // 2, w // 2]
    else:
        raise TypeError(f"cannot absorb a shift into {type(layer).__name__}")


def relative_change(reference: Tensor, other: Tensor, effect: Tensor | None = None) -> float:
    """max |other - reference| over the larger of max |reference| and max |effect|.

    ``effect`` is the uncompensated shift's change of the outputs: rounding in
    ``W (A + delta) + (b - W delta)`` grows with |W delta|, so a network with tiny outputs
    (random MobileNetV2 gives ~1e-9) is judged against the size of what was cancelled.
    """
    scale = reference.abs().max()
    if effect is not None:
        scale = torch.maximum(scale, effect.abs().max())
    return float((other - reference).abs().max() / scale.clamp_min(1e-30))


def probe_compensable(
    model: nn.Module,
    layer_name: str,
    input_size: tuple[int, int],
    tolerance: float = RELATIVE_TOLERANCE,
    seed: int = 0,
    layout: str | None = None,
) -> CompensationReport:
    """Build the compensated network for a random shift and compare it on random inputs.

    ``layer_name`` is a layer (read through its grid, ``layout`` as camserve.grid reads it,
    refused when it has none) or an attached grid tap."""
    if not isinstance(model.get_submodule(layer_name), GridTap):
        with grid_tap(model, layer_name, input_size, layout) as tap:
            if tap != layer_name:
                return probe_compensable(model, tap, input_size, tolerance, seed)
    # Drawn on the CPU (the same numbers on every device), then run where the model serves.
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(4, 3, *input_size, generator=generator).to(device)
    model = model.eval()
    absorbing = find_absorbing_layer(model, layer_name, probe[:1])
    if absorbing is None:
        return CompensationReport(
            False, None, None, tolerance, "no affine layer with a bias runs after the target"
        )
    activations: list[Tensor] = []
    target = model.get_submodule(layer_name)
    capture = target.register_forward_hook(lambda m, i, out: activations.append(out.detach()))
    try:
        with torch.no_grad():
            original = model(probe)
    finally:
        capture.remove()
    spread = activations[0].std(dim=(0, 2, 3))
    # Dead channels (std 0) get the layer's overall spread: a fixed floor would dwarf layers
    # whose activations are tiny (random MobileNetV2: ~1e-9) and hide what a ReLU clips.
    overall = activations[0].std()
    overall = overall if overall > 0 else activations[0].abs().max().clamp_min(1e-12)
    spread = torch.where(spread > 0, spread, overall)
    delta = torch.randn(spread.shape, generator=generator).to(device) * spread
    shifted = compensated_copy(model, layer_name, delta, probe, absorbing)
    handle = add_shift(model, layer_name, delta)
    try:
        with torch.no_grad():
            uncompensated = model(probe)
    finally:
        handle.remove()
    with torch.no_grad():
        change = relative_change(original, shifted(probe), uncompensated - original)
    ok = change <= tolerance
    reason = (
        f"{absorbing}'s bias absorbs the shift exactly"
        if ok
        else f"the path to {absorbing} does not commute with a per-channel shift "
        "(a nonlinearity, normalisation, padding or skip connection comes first)"
    )
    return CompensationReport(ok, absorbing, change, tolerance, reason)
