"""Read a target layer's output as an (N, C, h, w) grid, whatever layout the layer uses.

Grad-CAM, the compensation probe, the calibration statistics and the score all need the
target layer's activations as (N, C, h, w), with the channels on dimension 1. Convolutional
networks give that directly. Swin's stages and final ``norm`` give channels last,
(N, h, w, C); ViT's encoder gives a token sequence, (N, 1 + h*w, C), whose first token is
the class token (DeiT has two tokens before the patches, Hugging Face's Swin none). Taking
dimension 1 as the channels there would explain rows (Swin) or tokens (ViT) instead: a
confident, meaningless map.

So the layout is either known from the model family, given explicitly (``--target-layout``),
or the layer is refused: never guessed. A non-grid layer is wrapped, after its weights are
loaded, in a ``GridLayer``: it runs the layer, converts its output to the grid, passes the
grid through an ``nn.Identity`` (the *grid tap*, named ``<layer>.grid``) and converts it back
for the rest of the network, which computes exactly what it did before. Captum's
``LayerGradCam``, the probe and the calibration then all work on the tap, whose output is
already the (N, C, h, w) grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from camserve.device import blank_input

NCHW = "nchw"
NHWC = "nhwc"
TOKENS = "tokens"
CLS_TOKENS = "cls_tokens"
# prefix<K>_tokens: K tokens (class, distillation, registers...), then the patch tokens.
PREFIX_TOKENS = re.compile(r"prefix([0-9]+)_tokens")
LAYOUTS = {
    NCHW: "(N, C, h, w), convolutional feature maps",
    NHWC: "(N, h, w, C), channels last (Swin)",
    TOKENS: "(N, h*w, C), patch tokens in row-major order",
    CLS_TOKENS: "(N, 1 + h*w, C), a class token, then patch tokens (ViT)",
    "prefix<K>_tokens": "(N, K + h*w, C), K tokens (class, distillation, registers), then "
    "patch tokens (DeiT: prefix2_tokens)",
}
TAP = "grid"


def prefix_tokens(layout: str) -> int | None:
    """How many tokens come before the patch tokens; None for a layout that is no sequence."""
    if layout == TOKENS:
        return 0
    if layout == CLS_TOKENS:
        return 1
    match = PREFIX_TOKENS.fullmatch(layout)
    return int(match.group(1)) if match else None


def token_layout(prefix: int) -> str:
    """The layout of a token sequence with ``prefix`` tokens before the patch tokens."""
    return {0: TOKENS, 1: CLS_TOKENS}.get(prefix, f"prefix{prefix}_tokens")


def check_layout(layout: str) -> None:
    if layout not in (NCHW, NHWC) and prefix_tokens(layout) is None:
        raise ValueError(f"unknown target layout {layout!r}; use one of {', '.join(LAYOUTS)}")


def grid_size(layout: str, shape: tuple[int, ...], input_size: tuple[int, int]):
    """(h, w) of an output of ``shape`` read in ``layout``, or None when it cannot be.

    A grid must fit in the input and have its aspect: one stride ``s`` with ``h ~ H/s`` and
    ``w ~ W/s`` up to the rounding of one cell, so ``|h W - w H| <= max(H, W)``.
    """
    check_layout(layout)
    height, width = input_size
    prefix = prefix_tokens(layout)
    if prefix is None:
        if len(shape) != 4:
            return None
        h, w = shape[2:] if layout == NCHW else shape[1:3]
    else:
        if len(shape) != 3:
            return None
        count = shape[1] - prefix
        if count < 1:
            return None
        h = max(1, round(math.sqrt(count * height / width)))
        w = count // h
        if h * w != count:
            return None
    if h > height or w > width or abs(h * width - w * height) > max(height, width):
        return None
    return int(h), int(w)


def family_layout(model: nn.Module, layer_name: str, shape: tuple[int, ...]) -> str | None:
    """The layout a known model family uses at ``layer_name``; None when it is not known."""
    from camserve.sources import source_of_model

    return source_of_model(model).layout(model, layer_name, shape)


def read_layout(
    model: nn.Module,
    layer_name: str,
    shape: tuple[int, ...],
    input_size: tuple[int, int],
    layout: str | None = None,
) -> str:
    """The layout of ``layer_name``'s output: the given one, else the family's; refused
    with a ``ValueError`` when the output cannot be read as a grid that way."""
    given = layout is not None
    if given:
        check_layout(layout)
    layout = layout if given else family_layout(model, layer_name, shape)
    if layout is not None and grid_size(layout, shape, tuple(input_size)) is not None:
        return layout
    if layout is None:
        why = "its layout is not known (a token sequence needs --target-layout)"
    else:
        how = "the given layout" if given else "its family's layout"
        why = (
            f"read as {layout} {LAYOUTS[layout]}, {how}, it has no grid that fits the "
            "input's size and aspect"
        )
    raise ValueError(
        f"module {layer_name!r} outputs shape {tuple(shape)} at input size "
        f"{tuple(input_size)}: {why}. camserve explains only (N, C, h, w) grids with a known "
        f"channel axis: name another --target-layer, or give --target-layout "
        f"({', '.join(LAYOUTS)})"
    )


def to_grid(output: Tensor, layout: str, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """(grid (N, C, h, w), the tokens before the patch tokens or None)."""
    if layout == NCHW:
        return output, None
    if layout == NHWC:
        return output.permute(0, 3, 1, 2), None
    count = prefix_tokens(layout)
    prefix = output[:, :count] if count else None
    tokens = output[:, count:]
    grid = tokens.transpose(1, 2).reshape(output.shape[0], output.shape[2], *size)
    return grid, prefix


def from_grid(grid: Tensor, layout: str, prefix: Tensor | None) -> Tensor:
    """The inverse of ``to_grid``."""
    if layout == NCHW:
        return grid
    if layout == NHWC:
        return grid.permute(0, 2, 3, 1)
    tokens = grid.flatten(2).transpose(1, 2)
    return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)


class GridTap(nn.Identity):
    """Passes the grid through unchanged: the module Captum attributes at."""


class GridLayer(nn.Module):
    """The target layer, with its output presented as a grid at the ``grid`` tap."""

    def __init__(self, layer: nn.Module, layout: str, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.layer = layer
        self.grid = GridTap()
        self.layout = layout
        self.input_size = tuple(input_size)

    def forward(self, *args, **kwargs):
        output = self.layer(*args, **kwargs)
        size = grid_size(self.layout, tuple(output.shape), self.input_size)
        if size is None:
            raise ValueError(
                f"the target layer output shape {tuple(output.shape)}, not a {self.layout} "
                f"grid at input size {self.input_size}"
            )
        grid, prefix = to_grid(output, self.layout, size)
        return from_grid(self.grid(grid), self.layout, prefix)


def attach_grid(model: nn.Module, layer_name: str, layout: str, input_size: tuple[int, int]) -> str:
    """Wrap ``layer_name`` in a ``GridLayer`` (after the weights are loaded: its parameters'
    names change) and return the tap's name; an (N, C, h, w) layer is returned as it is."""
    if layout == NCHW:
        return layer_name
    layer = model.get_submodule(layer_name)
    if isinstance(layer, GridLayer):
        return f"{layer_name}.{TAP}"
    parent_name, _, child = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, GridLayer(layer, layout, input_size))
    return f"{layer_name}.{TAP}"


def detach_grid(model: nn.Module, layer_name: str) -> None:
    """Undo ``attach_grid``."""
    wrapper = model.get_submodule(layer_name)
    if isinstance(wrapper, GridLayer):
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper.layer)


def output_shape(model: nn.Module, layer_name: str, input_size: tuple[int, int]) -> tuple:
    """The shape of ``layer_name``'s output for one blank image (None: no tensor output)."""
    seen: list = []
    handle = model.get_submodule(layer_name).register_forward_hook(
        lambda module, inputs, output: seen.append(getattr(output, "shape", None))
    )
    try:
        with torch.no_grad():
            model(blank_input(model, input_size))
    finally:
        handle.remove()
    if not seen or seen[-1] is None:
        raise ValueError(
            f"module {layer_name!r} does not run in the forward pass (or returns no tensor)"
        )
    return tuple(seen[-1])


def check_gradient_reaches_grid(model: nn.Module, tap: str, input_size: tuple[int, int]) -> None:
    """Refuse a layer whose grid gets no gradient from the explained logit.

    After ViT's last block only the class token reaches the head: the patch tokens of
    ``encoder.layers.<last>`` or ``encoder.ln`` get exactly zero gradient, and every
    Grad-CAM map there would be empty.
    """
    grids: list[Tensor] = []

    def differentiate_from_here(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        # Autograd starts at the grid, as in serving: nothing before it is recorded, so the
        # check holds no activations of the layers before (~200 MB for ResNet-50 at 224²,
        # which the allocator then kept). The clone takes any in-place op downstream.
        grids.append(output.detach().requires_grad_(True))
        return grids[-1].clone()

    handle = model.get_submodule(tap).register_forward_hook(differentiate_from_here)
    trainable = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 3, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            logits = model(x)
            explained = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            (gradient,) = torch.autograd.grad(explained, grids[-1], allow_unused=True)
    finally:
        handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    if gradient is None or not bool(gradient.ne(0).any()):
        raise ValueError(
            f"the explained logit has zero gradient at every position of {tap!r}: nothing "
            "of this layer's grid reaches the head (after a ViT's last block only the class "
            "token does). Pick an earlier layer with --target-layer (and its --target-layout), "
            "e.g. the last block's first LayerNorm (ln_1, norm1, layernorm_before)"
        )


def attach_target(
    model: nn.Module, layer_name: str, input_size: tuple[int, int], layout: str | None = None
) -> str:
    """Read ``layer_name``'s layout (refusing what cannot be read), attach its grid, check
    that gradient reaches it, and return the name to explain: the tap, or the layer itself
    when it already outputs (N, C, h, w)."""
    input_size = tuple(input_size)
    model.eval()  # the checks below run the network: BatchNorm must not learn from them
    shape = output_shape(model, layer_name, input_size)
    layout = read_layout(model, layer_name, shape, input_size, layout)
    was_attached = isinstance(model.get_submodule(layer_name), GridLayer)
    tap = attach_grid(model, layer_name, layout, input_size)
    try:
        check_gradient_reaches_grid(model, tap, input_size)
    except ValueError:
        if not was_attached:
            detach_grid(model, layer_name)
        raise
    return tap


@contextmanager
def grid_tap(
    model: nn.Module, layer_name: str, input_size: tuple[int, int], layout: str | None = None
) -> Iterator[str]:
    """``attach_target`` for the duration of a ``with`` block: the model's parameter names
    are its own again afterwards (the archive saves its state_dict)."""
    was_attached = isinstance(model.get_submodule(layer_name), GridLayer)
    tap = attach_target(model, layer_name, input_size, layout)
    try:
        yield tap
    finally:
        if not was_attached:
            detach_grid(model, layer_name)
