"""tensor -> (logits, signed map), both from one forward pass through Captum's LayerGradCam.

Example::

    cam = GradCam(model, "layer4")
    batch = cam(x)                       # explain each image's top-1 class
    batch = cam(x, requested=[3, None])  # class 3 for the first image, top-1 for the second
    batch.explained.signed_map           # M, (N, h, w); batch.explained.grad_cam = ReLU(M)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from captum.attr import LayerGradCam
from torch import Tensor, nn

from camserve import maps


@dataclass(frozen=True)
class ClassMaps:
    """Signed maps of one class per image, and the channel weights that made them."""

    classes: Tensor  # (N,) class index per image
    signed_map: Tensor  # (N, h, w), M = sum_k alpha_k A^k before the ReLU
    alpha: Tensor  # (N, K)

    @property
    def grad_cam(self) -> Tensor:
        """ReLU(M), (N, h, w)."""
        return maps.grad_cam(self.signed_map)


@dataclass(frozen=True)
class GradCamBatch:
    """Everything the score and the response need, at the target layer's resolution (h x w).

    ``explained`` holds the explained class of each image (the requested one, else the top-1);
    ``extra`` the next most probable classes when asked for. ``activations`` is A itself;
    its spatial statistics (``channel_mean``/``channel_std``, (N, K)) are computed only when
    asked for: only the ``image_mean`` reference needs the std.
    """

    logits: Tensor
    explained: ClassMaps
    activations: Tensor  # A, (N, K, h, w), detached
    extra: tuple[ClassMaps, ...] = ()

    @property
    def channel_mean(self) -> Tensor:
        return self.activations.mean(dim=(2, 3))

    @property
    def channel_std(self) -> Tensor:
        # Two plain passes (mean, then the norm of the deviations): torch's std kernel is
        # ~10x slower on (N, K, h*w) with small h*w, 1.3 ms for MobileNetV3 at batch 8.
        cells = self.activations.flatten(2)
        deviations = cells - cells.mean(dim=2, keepdim=True)
        return torch.linalg.vector_norm(deviations, dim=2).div_(cells.shape[2] ** 0.5)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: autograd then records nothing before the layer."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@dataclass
class _ForwardPass:
    """What the callbacks of one Captum call hand each other."""

    # (N,) class index, meaningful where is_requested (N,); both None: every image's top-1.
    requested: Tensor | None
    is_requested: Tensor | None
    activations: Tensor | None = None
    logits: Tensor | None = None
    explained: Tensor | None = None
    alpha: Tensor | None = None


class GradCam:
    """Grad-CAM for one target layer of a frozen classifier.

    The function handed to Captum runs the model once, keeps the full logits, and returns the
    logit of the class to explain (the requested one, else the argmax). So the prediction and
    the map come from the same forward pass, and only the layer's output requires a gradient.
    """

    def __init__(self, model: nn.Module, layer_name: str) -> None:
        self.model = freeze(model)
        self.layer_name = layer_name
        self.layer = model.get_submodule(layer_name)

        def explained_logits(x: Tensor) -> Tensor:
            return self._explained_logits(x)

        # Captum reads the forward function's signature on every call; a preset one is free.
        explained_logits.__signature__ = inspect.signature(explained_logits)
        self._captum = LayerGradCam(explained_logits, self.layer)
        self._pass: _ForwardPass | None = None

    def __call__(
        self,
        x: Tensor,
        requested: Sequence[int | None] | None = None,
        extra_classes: int = 0,
    ) -> GradCamBatch:
        """Explain each image of ``x`` for its requested class (``None``: its top-1 class).

        ``extra_classes`` more maps per image explain the next most probable classes; they
        reuse the forward pass and only backpropagate through the head after the layer.
        """
        requested = [None] * x.shape[0] if requested is None else list(requested)
        if len(requested) != x.shape[0]:
            raise ValueError(f"{len(requested)} requested classes for a batch of {x.shape[0]}")
        if any(c is not None for c in requested):
            self._pass = _ForwardPass(
                requested=torch.tensor([c or 0 for c in requested], device=x.device),
                is_requested=torch.tensor([c is not None for c in requested], device=x.device),
            )
        else:  # the usual request: no class tensors to build and move
            self._pass = _ForwardPass(requested=None, is_requested=None)
        # Registered before Captum's own hook, so it sees the very tensor Captum
        # differentiates against (Captum then marks it as requiring grad).
        handle = self.layer.register_forward_hook(self._capture_activations)
        try:
            with torch.enable_grad():
                signed = self._captum.attribute(
                    x,
                    relu_attributions=False,
                    grad_kwargs={"retain_graph": True} if extra_classes else None,
                )
                extra = self._extra_class_maps(extra_classes) if extra_classes else ()
            run = self._pass
            return GradCamBatch(
                logits=run.logits.detach(),
                explained=ClassMaps(run.explained, signed.detach()[:, 0], run.alpha),
                activations=run.activations.detach(),
                extra=extra,
            )
        finally:
            handle.remove()
            self._pass = None

    def _capture_activations(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(
                f"target layer {self.layer_name!r} must output an (N, K, h, w) tensor, "
                f"got {getattr(output, 'shape', type(output))}"
            )
        self._pass.activations = output

    def _explained_logits(self, x: Tensor) -> Tensor:
        """The sum of the explained logits, as a 1-element tensor: Captum differentiates
        each element it is given separately, but in eval mode the examples do not interact,
        so one backward of the sum gives every image its own gradient."""
        run = self._pass
        logits = self.model(x)
        run.activations.register_hook(self._capture_alpha)
        run.explained = logits.argmax(dim=1)
        if run.requested is not None:
            run.explained = torch.where(run.is_requested, run.requested, run.explained)
        run.logits = logits
        return logits.gather(1, run.explained[:, None]).sum().reshape(1)

    def _capture_alpha(self, gradient: Tensor) -> None:
        if self._pass.alpha is None:
            self._pass.alpha = gradient.mean(dim=(2, 3))

    def _extra_class_maps(self, count: int) -> tuple[ClassMaps, ...]:
        run = self._pass
        logits, activations = run.logits, run.activations
        count = min(count, logits.shape[1] - 1)
        # The next most probable classes, skipping the one already explained (masked out, so
        # no data-dependent indexing: the batch stays on its device without a sync).
        masked = logits.detach().scatter(1, run.explained[:, None], float("-inf"))
        others = masked.topk(count, dim=1).indices
        maps = []
        for rank in range(count):
            classes = others[:, rank]
            # Examples do not interact in eval mode, so the batch sum gives each its own
            # gradient; activations is a leaf, so this only runs the head backwards.
            (gradient,) = torch.autograd.grad(
                logits.gather(1, classes[:, None]).sum(),
                activations,
                retain_graph=rank < count - 1,
            )
            alpha = gradient.mean(dim=(2, 3))
            signed = (alpha[:, :, None, None] * activations.detach()).sum(dim=1)
            maps.append(ClassMaps(classes=classes, signed_map=signed, alpha=alpha))
        return tuple(maps)
