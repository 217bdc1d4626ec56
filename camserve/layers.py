"""Pick the Grad-CAM target layer automatically: the last spatial feature map before the head.

The Grad-CAM paper explains the last convolutional feature map: it keeps the spatial
layout while carrying the most class-specific features. We find it by running the model
once and watching which modules finish, in order: the answer is the last module to finish
whose output is an (N, K, h, w) tensor, which is, or contains, a convolution, and after which a
layer with a weight matrix still runs. Without that last layer the map is the class scores
themselves (SqueezeNet's 1x1 classifier convolution, then only pooling): each logit's gradient
picks one channel, so the Grad-CAM weights say nothing. Requiring a
convolution skips pooling layers of the head (VGG's ``AdaptiveAvgPool2d((7, 7))`` still
outputs a 4-D map) and normalisation layers (ConvNeXt's head ``LayerNorm2d``). Taking the last
module to finish prefers the outermost container (``layer4`` over ``layer4.1``), whose name
is stable across depths of the same family.

Known families are handled by their source (camserve.sources), with the layers that the
Grad-CAM literature and pytorch-grad-cam's documentation use (docs/bring-your-own-model.md
says why): timm's own ``feature_info``, Swin's final norm (channels last or tokens, averaged
into the head) and ViT's last block's first LayerNorm (a layer after which only the class
token reaches the head would give zero gradient to the patches). A model whose last modules
output token sequences is not guessed at: name its layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camserve.device import blank_input
from camserve.grid import LAYOUTS, read_layout


@dataclass(frozen=True)
class LayerOutput:
    """A module that ran in the forward pass, with the shape of its (last) output."""

    name: str
    shape: tuple[int, ...]
    has_conv: bool
    finished: int  # position in the order modules finished
    mixes_channels: bool = False  # holds a weight matrix or kernel of its own


def has_conv(module: nn.Module) -> bool:
    """The module is, or contains, a 2-D convolution."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _mixes_channels(module: nn.Module) -> bool:
    """A learned layer that weighs channels against each other (a Linear, a convolution,
    an attention projection), unlike a normalisation's per-channel scale."""
    return any(parameter.dim() >= 2 for parameter in module.parameters(recurse=False))


@contextmanager
def hooks_on_every_module(
    model: nn.Module, make_hook: Callable[[str], Callable], root: bool = False
) -> Iterator[None]:
    """``make_hook(name)`` as the forward hook of every named module (and of the root, named
    "", with ``root``) while the block runs."""
    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if root or name
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trace_outputs(model: nn.Module, input_size: tuple[int, int]) -> list[LayerOutput]:
    """Every named module whose output is a tensor, in the order the modules finished."""
    finished: dict[str, tuple[int, tuple[int, ...]]] = {}
    counter = iter(range(1 << 30))

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output) -> None:
            if isinstance(output, Tensor):
                # A module called twice (a shared ReLU) counts where it last finished.
                finished[name] = (next(counter), tuple(output.shape))

        return record

    was_training = model.training
    model.eval()
    try:
        # Not the root: its output is the logits, never a candidate.
        with hooks_on_every_module(model, hook), torch.no_grad():
            model(blank_input(model, input_size))
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    return sorted(
        (
            LayerOutput(name, shape, has_conv(modules[name]), order, _mixes_channels(modules[name]))
            for name, (order, shape) in finished.items()
        ),
        key=lambda layer: layer.finished,
    )


def family_target_layer(model: nn.Module) -> str | None:
    """The target layer of a model family its source knows (camserve.sources); None for
    the others."""
    from camserve.sources import source_of_model

    return source_of_model(model).target_layer(model)


def auto_target_layer(model: nn.Module, input_size: tuple[int, int]) -> str:
    """The family's layer for a known family, else the last module finishing with a 4-D
    output that is or contains a Conv2d and is followed by a channel-mixing layer."""
    family = family_target_layer(model)
    if family is not None:
        return family
    outputs = trace_outputs(model, input_size)
    # The root's own weights (a functional head) run after every module.
    root_head = _mixes_channels(model)
    last_mixing = max((layer.finished for layer in outputs if layer.mixes_channels), default=-1)
    candidates = [
        layer
        for layer in outputs
        if len(layer.shape) == 4 and layer.has_conv and (root_head or last_mixing > layer.finished)
    ]
    if not candidates:
        raise ValueError(
            f"cannot pick a target layer automatically: no convolutional module of "
            f"{type(model).__name__} outputs an (N, K, h, w) feature map that a learned head "
            f"reads at input size {tuple(input_size)}; name one with --target-layer (and its "
            f"layout with --target-layout: {', '.join(LAYOUTS)})"
        )
    chosen = candidates[-1]
    tokens = [
        layer for layer in outputs if layer.finished > chosen.finished and len(layer.shape) == 3
    ]
    if tokens:
        # A patch embedding followed by a transformer: its last convolution is not the
        # layer to explain, and the token layout is the user's to state.
        raise ValueError(
            f"cannot pick a target layer automatically: after {chosen.name!r}, "
            f"{type(model).__name__} works on token sequences ({tokens[-1].name!r} outputs "
            f"{tokens[-1].shape}); name the layer with --target-layer and its layout with "
            f"--target-layout ({', '.join(LAYOUTS)})"
        )
    return chosen.name


def check_target_layer(
    model: nn.Module, layer_name: str, input_size: tuple[int, int], layout: str | None = None
) -> str:
    """The layout of ``layer_name``'s output (camserve.grid); a ``ValueError`` that lists
    usable names when the layer cannot be explained."""
    outputs = {layer.name: layer for layer in trace_outputs(model, input_size)}
    spatial = [name for name, layer in outputs.items() if len(layer.shape) == 4 and layer.has_conv]
    hint = ", ".join(spatial[-8:])
    try:
        model.get_submodule(layer_name)
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no module named {layer_name!r}; "
            f"the last feature maps are: {hint}"
        ) from None
    layer = outputs.get(layer_name)
    if layer is None:
        raise ValueError(
            f"module {layer_name!r} does not run in the forward pass (or returns "
            f"no tensor); the last feature maps are: {hint}"
        )
    if len(layer.shape) not in (3, 4):
        raise ValueError(
            f"module {layer_name!r} outputs shape {layer.shape}, not an (N, K, h, w) feature "
            f"map; the last feature maps are: {hint}"
        )
    return read_layout(model, layer_name, layer.shape, input_size, layout)
