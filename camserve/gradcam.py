"""tensor -> (logits, Grad-CAM), both from one forward pass through Captum's LayerGradCam."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from captum.attr import LayerGradCam
from torch import Tensor, nn


@dataclass(frozen=True)
class ClassMaps:
    """Grad-CAM for further classes of the same images, from the same forward pass."""

    targets: Tensor  # (N,)
    signed_map: Tensor  # (N, h, w)
    alpha: Tensor  # (N, K)


@dataclass(frozen=True)
class GradCamBatch:
    """Everything the response needs, at the target layer's resolution (h x w).

    ``signed_map`` is M = sum_k alpha_k A^k before the ReLU; the Grad-CAM map is ReLU(M).
    ``alpha`` (N, K) are the channel weights; ``channel_mean``/``channel_std`` (N, K) are the
    spatial statistics of the activations A, used by the ``image_mean`` reference.
    """

    logits: Tensor
    targets: Tensor
    signed_map: Tensor
    alpha: Tensor
    channel_mean: Tensor
    channel_std: Tensor
    extra: tuple[ClassMaps, ...] = ()

    @property
    def grad_cam(self) -> Tensor:
        return self.signed_map.clamp_min(0)

    @property
    def probabilities(self) -> Tensor:
        return self.logits.softmax(dim=1)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: autograd then records nothing before the layer."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class GradCam:
    """Grad-CAM for one target layer of a frozen classifier.

    The function handed to Captum runs the model once, keeps the full logits, and returns
    the logit of the class to explain (the requested one, else the argmax). So the
    prediction and the map come from the same forward pass.
    """

    def __init__(self, model: nn.Module, layer_name: str) -> None:
        self.model = freeze(model)
        self.layer_name = layer_name
        self.layer = model.get_submodule(layer_name)
        self._captum = LayerGradCam(self._explained_logit, self.layer)
        self._pass: dict = {}

    def __call__(
        self, x: Tensor, targets: Sequence[int | None] | None = None, extra_classes: int = 0
    ) -> GradCamBatch:
        """Explain each image of ``x`` for its target (``None`` means the top-1 class).

        ``extra_classes`` more maps per image explain the next most probable classes; they
        reuse the forward pass and only backpropagate through the head after the layer.
        """
        if targets is None:
            targets = [None] * x.shape[0]
        if len(targets) != x.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {x.shape[0]}")
        self._pass = {
            "requested": torch.tensor([-1 if t is None else int(t) for t in targets]),
        }
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
            activations: Tensor = run["activations"].detach()
            return GradCamBatch(
                logits=run["logits"].detach(),
                targets=run["targets"],
                signed_map=signed.detach()[:, 0],
                alpha=run["alpha"],
                channel_mean=activations.mean(dim=(2, 3)),
                channel_std=activations.std(dim=(2, 3), correction=0),
                extra=extra,
            )
        finally:
            handle.remove()
            self._pass = {}

    def _capture_activations(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise ValueError(
                f"target layer {self.layer_name!r} must output an (N, K, h, w) tensor, "
                f"got {getattr(output, 'shape', type(output))}"
            )
        self._pass["activations"] = output

    def _explained_logit(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        run = self._pass
        activations: Tensor = run["activations"]
        activations.register_hook(self._capture_alpha)
        top1 = logits.argmax(dim=1)
        requested = run["requested"].to(top1.device)
        targets = torch.where(requested >= 0, requested, top1)
        run["logits"] = logits
        run["targets"] = targets
        return logits.gather(1, targets[:, None]).squeeze(1)

    def _capture_alpha(self, gradient: Tensor) -> None:
        self._pass.setdefault("alpha", gradient.mean(dim=(2, 3)))

    def _extra_class_maps(self, count: int) -> tuple[ClassMaps, ...]:
        run = self._pass
        logits: Tensor = run["logits"]
        activations: Tensor = run["activations"]
        count = min(count, logits.shape[1] - 1)
        # The next most probable classes, skipping the one already explained.
        order = logits.detach().argsort(dim=1, descending=True)
        others = order[order != run["targets"][:, None]].view(logits.shape[0], -1)[:, :count]
        maps = []
        for rank in range(count):
            targets = others[:, rank]
            # Examples do not interact in eval mode, so the batch sum gives each its own
            # gradient; activations is a leaf, so this only runs the head backwards.
            (gradient,) = torch.autograd.grad(
                logits.gather(1, targets[:, None]).sum(),
                activations,
                retain_graph=rank < count - 1,
            )
            alpha = gradient.mean(dim=(2, 3))
            signed = (alpha[:, :, None, None] * activations.detach()).sum(dim=1)
            maps.append(ClassMaps(targets=targets, signed_map=signed, alpha=alpha))
        return tuple(maps)
