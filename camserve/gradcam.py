"""tensor -> (logits, signed map), both from one forward pass through Captum's LayerGradCam.

Example::

    cam = GradCam(model, "layer4")
    batch = cam(x)                       # explain each image's top-1 class
    batch = cam(x, requested=[3, None])  # class 3 for the first image, top-1 for the second
    batch.explained.signed_map           # M, (N, h, w); batch.explained.grad_cam = ReLU(M)
    # A multi-label (sigmoid) head: every present label, most probable first, up to 5 each.
    batch = cam.explain(x, PresentLabels(thresholds, requested=[(), (2, 4)], caps=[5, 5]))
    batch.counts                         # (N,) maps per image; batch.extra holds ranks 1..

Which classes get a map is a ``ClassChoice``: ``TopClasses`` (a softmax head: the requested
or top-1 class, then the next most probable) or ``PresentLabels`` (a sigmoid head). Either
way the classes are picked from the logits of the one forward pass, the first map comes from
Captum, and every further rank backpropagates through the head only, on the same graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    # PresentLabels only: the (N, C) present flags the classes were chosen by, and (N,) how
    # many of the ranks (explained, *extra) hold for each image.
    present: Tensor | None = None
    counts: Tensor | None = None

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


class ClassChoice(Protocol):
    """Which classes of each image get a map, picked from the logits of the one forward.

    ``present`` and ``counts`` are what a multi-label choice found (None otherwise): the (N, C)
    present flags and how many ranks hold for each image."""

    present: Tensor | None
    counts: Tensor | None

    def first(self, logits: Tensor) -> Tensor:
        """(N,) the explained class of each image, from the (detached) logits."""

    def later(self, logits: Tensor) -> list[Tensor]:
        """The further ranks, one (N,) class tensor each; called after ``first``."""

    def may_need_more(self) -> bool:
        """Whether ``later`` can return anything: Captum then keeps the graph."""


@dataclass
class TopClasses:
    """A softmax head: the requested class (``None``: the top-1), then the ``extra`` next
    most probable classes."""

    requested: Sequence[int | None]
    extra: int = 0
    present = counts = None  # every rank holds for every image
    _explained: Tensor | None = field(default=None, repr=False)

    def first(self, logits: Tensor) -> Tensor:
        explained = logits.argmax(dim=1)
        if any(c is not None for c in self.requested):
            # Built only when some image asks for a class: the usual request moves nothing.
            requested = torch.tensor([c or 0 for c in self.requested], device=logits.device)
            is_requested = torch.tensor(
                [c is not None for c in self.requested], device=logits.device
            )
            explained = torch.where(is_requested, requested, explained)
        self._explained = explained
        return explained

    def later(self, logits: Tensor) -> list[Tensor]:
        count = min(self.extra, logits.shape[1] - 1)
        if count <= 0:
            return []
        # The next most probable classes, skipping the one already explained (masked out, so
        # no data-dependent indexing: the batch stays on its device without a sync).
        masked = logits.scatter(1, self._explained[:, None], float("-inf"))
        others = masked.topk(count, dim=1).indices
        return [others[:, rank] for rank in range(count)]

    def may_need_more(self) -> bool:
        return self.extra > 0


@dataclass
class PresentLabels:
    """A sigmoid (multi-label) head: label c is present when ``sigmoid(z_c) >= thresholds[c]``.

    Each image gets its ``requested`` labels in the order given or, when it names none, its
    present labels, most probable first, at most ``caps[i]``; with none present, its most
    probable label alone. ``present`` and ``counts`` (maps per image) are set by ``first``.
    """

    thresholds: Tensor  # (C,) on the logits' device
    requested: Sequence[Sequence[int]]  # per image; empty: the present labels
    caps: Sequence[int]  # per image: most maps when it names no label
    present: Tensor | None = None
    counts: Tensor | None = None
    _ranked: Tensor | None = field(default=None, repr=False)  # (N, C): classes per rank
    _host_bound: int = 0  # the most ranks any image can have, known without the device

    def __post_init__(self) -> None:
        if len(self.requested) != len(self.caps):
            raise ValueError(f"{len(self.requested)} requested lists for {len(self.caps)} caps")
        self._host_bound = max(
            (
                len(named) if named else cap
                for named, cap in zip(self.requested, self.caps, strict=True)
            ),
            default=0,
        )

    def first(self, logits: Tensor) -> Tensor:
        self.present = logits.sigmoid() >= self.thresholds
        # Most probable first (sigmoid is monotone: by logit), then present before absent;
        # both sorts are stable, so ties keep the label order and answers are reproducible.
        by_logit = logits.argsort(dim=1, descending=True, stable=True)
        absent = (~self.present).gather(1, by_logit).to(torch.uint8)
        ranked = by_logit.gather(1, absent.argsort(dim=1, stable=True))
        counts = self.present.sum(dim=1).clamp_(min=1)
        counts = torch.minimum(counts, torch.tensor(self.caps, device=logits.device))
        named = [tuple(labels) for labels in self.requested]
        if any(named):
            # Named labels replace the ranking of their image, in the order given.
            width = max(len(labels) for labels in named)
            padded = [
                list(labels) + list(labels[-1:] or [0]) * (width - len(labels)) for labels in named
            ]
            is_named = torch.tensor([bool(labels) for labels in named], device=logits.device)
            chosen = torch.tensor(padded, device=logits.device)
            head = torch.where(is_named[:, None], chosen, ranked[:, :width])
            ranked = torch.cat([head, ranked[:, width:]], dim=1)
            sizes = torch.tensor([len(labels) for labels in named], device=logits.device)
            counts = torch.where(is_named, sizes, counts)
        self._ranked, self.counts = ranked, counts
        return ranked[:, 0]

    def later(self, logits: Tensor) -> list[Tensor]:
        # One host sync for the batch's number of ranks, unless the requests fix it: a rank
        # nobody needs would cost a backward pass.
        ranks = self._host_bound
        if ranks > 1 and not all(self.requested):
            ranks = min(ranks, int(self.counts.max()))
        return [self._ranked[:, rank] for rank in range(1, ranks)]

    def may_need_more(self) -> bool:
        return self._host_bound > 1


@dataclass
class _ForwardPass:
    """What the callbacks of one Captum call hand each other."""

    choice: ClassChoice
    activations: Tensor | None = None
    logits: Tensor | None = None
    explained: Tensor | None = None
    alpha: Tensor | None = None


class GradCam:
    """Grad-CAM for one target layer of a frozen classifier.

    The function handed to Captum runs the model once, keeps the full logits, and returns the
    logit of the class to explain (as the ``ClassChoice`` picks it). So the prediction and
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
        return self.explain(x, TopClasses(requested, extra_classes))

    def explain(self, x: Tensor, choice: ClassChoice) -> GradCamBatch:
        """Explain the classes ``choice`` picks from this forward pass's logits."""
        self._pass = _ForwardPass(choice)
        # Registered before Captum's own hook, so it sees the very tensor Captum
        # differentiates against (Captum then marks it as requiring grad).
        handle = self.layer.register_forward_hook(self._capture_activations)
        try:
            with torch.enable_grad():
                signed = self._captum.attribute(
                    x,
                    relu_attributions=False,
                    grad_kwargs={"retain_graph": True} if choice.may_need_more() else None,
                )
                run = self._pass
                extra = self._class_maps(choice.later(run.logits.detach()))
            return GradCamBatch(
                logits=run.logits.detach(),
                explained=ClassMaps(run.explained, signed.detach()[:, 0], run.alpha),
                activations=run.activations.detach(),
                extra=extra,
                present=choice.present,
                counts=choice.counts,
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
        run.explained = run.choice.first(logits.detach())
        run.logits = logits
        return logits.gather(1, run.explained[:, None]).sum().reshape(1)

    def _capture_alpha(self, gradient: Tensor) -> None:
        if self._pass.alpha is None:
            self._pass.alpha = gradient.mean(dim=(2, 3))

    def _class_maps(self, ranks: list[Tensor]) -> tuple[ClassMaps, ...]:
        """One map per (N,) class tensor, on the graph Captum's call kept."""
        run = self._pass
        logits, activations = run.logits, run.activations
        maps = []
        for rank, classes in enumerate(ranks):
            # Examples do not interact in eval mode, so the batch sum gives each its own
            # gradient; activations is a leaf, so this only runs the head backwards.
            (gradient,) = torch.autograd.grad(
                logits.gather(1, classes[:, None]).sum(),
                activations,
                retain_graph=rank < len(ranks) - 1,
            )
            alpha = gradient.mean(dim=(2, 3))
            signed = (alpha[:, :, None, None] * activations.detach()).sum(dim=1)
            maps.append(ClassMaps(classes=classes, signed_map=signed, alpha=alpha))
        return tuple(maps)
