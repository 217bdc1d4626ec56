"""The cascading parameter-randomisation sanity check (Adebayo et al., "Sanity Checks for
Saliency Maps", NeurIPS 2018, section 3.1), run by ``camserve calibrate``.

Does the map depend on what the model learned? Re-initialise the network from the top, one
stage at a time, and after each step compare the Grad-CAM maps of the calibration images with
the trained model's maps (docs/score.md#sanity-check):

- **Stages** (``randomisation_stages``): the parameterised modules that finish in the forward
  pass after the target layer, grouped by the child of their lowest common ancestor with the
  target (the head, ``fc``, ``classifier``; a ViT's ``heads``, ``encoder.ln`` and the last
  block's ``mlp``...), then the target layer's own children (``layer4.2``, ``layer4.1``...),
  last to finish first. Parameters of the target's ancestors (a ViT's class token and
  position embedding) act before the layer and are left alone.
- **Randomisation** (``reinitialise``): each module's own ``reset_parameters()`` (or
  ``_reset_parameters()``, as ``MultiheadAttention`` has), else each of its own parameters
  drawn from N(0, 0.02²). It runs on the CPU with the seed ``seed + step``, so the same seed
  gives the same numbers on every device. It works on a deep copy: the served weights are
  never touched.
- **Maps**: through ``Explainer.explain`` on the copy, the path serving uses, for the class
  the trained model predicts on each image.
- **Similarity** per image: Spearman rank correlation of ReLU(M), of M and of |M| at the
  layer's resolution, SSIM of the peak-normalised maps at the input size (7x7 uniform window),
  and whether the map's peak stays in the same cell; median and 90th percentile over images.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from camserve.device import blank_input, model_device
from camserve.encode_png import upsample
from camserve.explainer import Explainer, PreparedImage
from camserve.grid import GridLayer
from camserve.layers import hooks_on_every_module
from camserve.maps import grad_cam
from camserve.request import RequestOptions
from camserve.sanity import FAILED, PASSED, SanityResult, SanityStep, Spread

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
DEFAULT_IMAGES = 48
# The verdict: "failed" when the median rank correlation of the Grad-CAM maps after
# randomising the head and the last stage (step 2) is at or above DEFAULT_THRESHOLD, or when
# the head alone (step 1) leaves them at or above HEAD_THRESHOLD: a head that cannot move
# the maps does not reach them (docs/score.md#sanity-check).
DEFAULT_THRESHOLD = 0.5
HEAD_THRESHOLD = 0.9
VERDICT_STEP = 2
FALLBACK_STD = 0.02
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


class NothingToRandomise(ValueError):
    """No module with parameters runs after the target layer or inside it: the check has
    nothing to re-initialise (the maps then depend on the weights only below the layer)."""


@dataclass(frozen=True)
class Stage:
    """One randomisation step: the modules re-initialised together, in forward order."""

    name: str
    modules: tuple[str, ...]


def _has_own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _inside(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(f"{ancestor}.")


def _finish_order(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """Module name -> when it (last) finished in a forward pass of one blank image."""
    finished: dict[str, int] = {}
    counter = itertools.count()

    def hook(name: str):
        return lambda module, inputs, output: finished.__setitem__(name, next(counter))

    with hooks_on_every_module(model, hook, root=True), torch.no_grad():
        model(blank_input(model, input_size))
    return finished


def _child_key(name: str, ancestor: str) -> str:
    """The child of ``ancestor`` (a module name, "" for the root) that holds ``name``."""
    rest = name[len(ancestor) + 1 :] if ancestor else name
    head = rest.split(".", 1)[0]
    return f"{ancestor}.{head}" if ancestor else head


def _common_ancestor(a: str, b: str) -> str:
    shared = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        shared.append(x)
    return ".".join(shared)


def randomisation_stages(
    model: nn.Module, target_layer: str, input_size: tuple[int, int]
) -> list[Stage]:
    """The cascade's stages, from the head down to the target layer's own children.

    A parameterised module that never runs as a module (``MultiheadAttention``'s
    ``out_proj``) goes with its nearest ancestor that does; one with no running ancestor
    below the root (an unused auxiliary head) plays no part in the maps and is left out.
    """
    target = target_layer
    if isinstance(model.get_submodule(target), GridLayer):
        target = f"{target}.layer"  # the wrapped layer itself, not camserve's grid tap
    finished = _finish_order(model, input_size)
    if target not in finished:
        raise ValueError(f"target layer {target_layer!r} does not run in the forward pass")
    groups: dict[str, list[tuple[int, str]]] = {}
    for name, module in model.named_modules():
        if not _has_own_parameters(module) or _inside(target, name) and name != target:
            continue  # no parameters of its own, or an ancestor of the target
        runner = name
        while runner and runner not in finished:
            runner = runner.rpartition(".")[0]
        if not runner or _inside(target, runner) and runner != target:
            continue
        when = finished[runner]
        if _inside(name, target):
            key = target if name == target else _child_key(name, target)
        elif when > finished[target]:
            key = _child_key(name, _common_ancestor(name, target))
        else:
            continue  # runs before the target layer: never randomised
        groups.setdefault(key, []).append((when, name))
    ordered = sorted(groups.items(), key=lambda item: max(when for when, _ in item[1]))
    # A normalisation (only 1-D parameters: BatchNorm, LayerNorm, a layer scale) rescales
    # the output of the weight layer that ran just before it: one stage with it, as a
    # convolution and its BatchNorm are one block in the paper's Inception v3.
    merged: list[tuple[list[str], list[tuple[int, str]]]] = []
    for key, members in ordered:
        if merged and _mergeable(model, key, members, merged[-1][0][-1], target):
            merged[-1][0].append(key)
            merged[-1][1].extend(members)
        else:
            merged.append(([key], list(members)))
    return [
        Stage(
            "+".join(_display_name(key, target_layer) for key in keys),
            tuple(name for _, name in sorted(members)),
        )
        for keys, members in reversed(merged)
    ]


def _mergeable(
    model: nn.Module, key: str, members: list[tuple[int, str]], previous: str, target: str
) -> bool:
    """Whether the group ``key`` only rescales the group ``previous`` that ran before it:
    1-D parameters only, the same parent module, and both on the same side of the target."""
    if key.rpartition(".")[0] != previous.rpartition(".")[0]:
        return False
    if _inside(key, target) != _inside(previous, target):
        return False
    return all(
        parameter.dim() <= 1
        for _, name in members
        for parameter in model.get_submodule(name).parameters(recurse=False)
    )


def _display_name(name: str, target_layer: str) -> str:
    """A served model's name without camserve's grid wrapper (``norm.layer`` -> ``norm``)."""
    wrapped = f"{target_layer}.layer"
    return target_layer + name[len(wrapped) :] if _inside(name, wrapped) else name


def reinitialise(module: nn.Module) -> None:
    """Re-initialise ``module``'s own parameters as its constructor would, on the CPU with the
    current RNG state: ``reset_parameters()`` (``_reset_parameters()``), else N(0, 0.02²)."""
    device = model_device(module)
    module.to("cpu")
    try:
        reset = getattr(module, "reset_parameters", None) or getattr(
            module, "_reset_parameters", None
        )
        with torch.no_grad():
            if callable(reset):
                reset()
            else:
                for parameter in module.parameters(recurse=False):
                    parameter.normal_(0.0, FALLBACK_STD)
    finally:
        module.to(device)


def randomise_stage(model: nn.Module, stage: Stage, seed: int) -> None:
    """Re-initialise every module of ``stage`` in ``model``, reproducibly from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in stage.modules:
            reinitialise(model.get_submodule(name))


def rank(values: Tensor) -> Tensor:
    """Ranks along the last dimension (1-based), ties sharing their average rank."""
    order = values.argsort(dim=-1, stable=True)
    sorted_values = values.gather(-1, order)
    n = values.shape[-1]
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    positions = positions.expand_as(sorted_values).contiguous()
    # A run of equal values shares the mean of its positions: the runs' first and last
    # positions come from cumulative maxima over "starts here" / "ends here" markers.
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=-1).values
    last = torch.where(ends, positions, torch.full_like(positions, n + 1))
    last = last.flip(-1).cummin(dim=-1).values.flip(-1)
    return torch.empty_like(positions).scatter_(-1, order, (first + last) / 2)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each pair of maps (..., h, w) -> (...).

    A constant map has no ranking: two constant maps count as identical (1), a constant map
    against a varying one as unrelated (0). Never NaN.
    """
    ra, rb = rank(a.flatten(-2).double()), rank(b.flatten(-2).double())
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    na, nb = ra.norm(dim=-1), rb.norm(dim=-1)
    both = (na > 0) & (nb > 0)
    rho = (ra * rb).sum(dim=-1) / torch.where(both, na * nb, torch.ones_like(na))
    rho = rho.clamp(-1.0, 1.0)  # rounding can step past 1 for identical rankings
    neither = (na == 0) & (nb == 0)
    return torch.where(both, rho, neither.double())


def ssim(a: Tensor, b: Tensor, window: int = SSIM_WINDOW, data_range: float = 1.0) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of each pair of maps (N, H, W) -> (N,).

    Uniform ``window`` x ``window`` windows over every position where one fits, sample
    covariances, K1 = 0.01, K2 = 0.03: scikit-image's ``structural_similarity`` defaults.
    """
    x, y = a.double()[:, None], b.double()[:, None]
    count = window * window
    unbiased = count / (count - 1)

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mx, my = mean(x), mean(y)
    vx = unbiased * (mean(x * x) - mx * mx)
    vy = unbiased * (mean(y * y) - my * my)
    cxy = unbiased * (mean(x * y) - mx * my)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return index.mean(dim=(1, 2, 3))


def peak_kept(a: Tensor, b: Tensor) -> Tensor:
    """Whether each pair of Grad-CAM maps (N, h, w) peaks in the same cell (two empty maps
    count as kept, one empty map as moved)."""
    pa, pb = a.flatten(1), b.flatten(1)
    empty_a, empty_b = pa.amax(dim=1) <= 0, pb.amax(dim=1) <= 0
    same = pa.argmax(dim=1) == pb.argmax(dim=1)
    return torch.where(empty_a | empty_b, empty_a & empty_b, same)


def spread(values: Tensor) -> Spread:
    values = values.double()
    return Spread(float(values.median()), float(values.quantile(0.9)))


def compare(
    trained: Tensor, randomised: Tensor, input_size: tuple[int, int], stage: str
) -> SanityStep:
    """One step's similarities between two stacks of signed maps M (N, h, w)."""
    relu_trained, relu_randomised = grad_cam(trained), grad_cam(randomised)
    big_trained = torch.stack([upsample(m, input_size) for m in relu_trained])
    big_randomised = torch.stack([upsample(m, input_size) for m in relu_randomised])
    return SanityStep(
        stage=stage,
        rank_correlation=spread(spearman(relu_trained, relu_randomised)),
        rank_correlation_signed=spread(spearman(trained, randomised)),
        rank_correlation_abs=spread(spearman(trained.abs(), randomised.abs())),
        ssim=spread(ssim(big_trained, big_randomised)),
        peak_kept=float(peak_kept(relu_trained, relu_randomised).double().mean()),
    )


def signed_maps(
    explainer: Explainer,
    tensors: Sequence[Tensor],
    classes: Sequence[int | None],
    batch_size: int = 32,
) -> tuple[Tensor, list[int]]:
    """The signed maps M (N, h, w) of preprocessed images, on the CPU, and the classes they
    explain (``None``: the top-1), through ``Explainer.explain``: the serving path."""
    maps, explained = [], []
    topk = min(explainer.config.topk, len(explainer.labels))
    for start in range(0, len(tensors), batch_size):
        batch = [
            PreparedImage(tensor, RequestOptions(), requested, topk)
            for tensor, requested in zip(
                tensors[start : start + batch_size], classes[start : start + batch_size],
                strict=True,
            )
        ]  # fmt: skip
        for result in explainer.explain(batch):
            maps.append(result.explained.signed_map)
            explained.append(result.explained.index)
    return torch.stack(maps), explained


def verdict_step(steps: Sequence[SanityStep]) -> int:
    """The step the verdict reads: the head and the last stage randomised (the head alone
    when nothing else is randomised)."""
    return min(VERDICT_STEP, len(steps))


def verdict(
    steps: Sequence[SanityStep], threshold: float, head_threshold: float = HEAD_THRESHOLD
) -> str:
    """Failed when the maps survive randomising the head and the last stage (their median
    rank correlation with the trained model's maps is still at or above ``threshold``), or
    the head alone (still at or above ``head_threshold``)."""
    survived = steps[verdict_step(steps) - 1].rank_correlation.median >= threshold
    head_ignored = steps[0].rank_correlation.median >= head_threshold
    return FAILED if survived or head_ignored else PASSED


def run_check(
    explainer: Explainer,
    tensors: Sequence[Tensor],
    seed: int = DEFAULT_SEED,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 32,
    progress: bool = True,
    trained: tuple[Tensor, list[int]] | None = None,
) -> SanityResult:
    """Run the cascade on preprocessed images (3, H, W) and return the curve and verdict.

    The trained model's maps explain each image's top-1 class; every randomised model's maps
    explain that same class, so a step compares like with like. ``trained``: those maps and
    classes when a pass of the served explainer already computed them (calibrate's)."""
    if not tensors:
        raise ValueError("the sanity check needs at least one image")
    config = explainer.config
    size = config.preprocessing.input_size
    if trained is None:
        trained = signed_maps(explainer, tensors, [None] * len(tensors), batch_size)
    trained, classes = trained
    model = copy.deepcopy(explainer.model)  # the served weights are never touched
    stages = randomisation_stages(model, config.target_layer, size)
    if not stages:
        raise NothingToRandomise(
            f"no module with parameters runs after or inside {config.target_layer!r}"
        )
    randomised = Explainer(
        model, explainer.labels, config, compensation=explainer.compensation,
        name=f"{explainer.served.name} (randomised)", device=explainer.device,
    )  # fmt: skip
    steps = []
    for number, stage in enumerate(tqdm(stages, desc="sanity check", disable=not progress), 1):
        randomise_stage(model, stage, seed + number)
        maps, _ = signed_maps(randomised, tensors, classes, batch_size)
        steps.append(compare(trained, maps, size, stage.name))
    result = SanityResult(
        verdict=verdict(steps, threshold),
        threshold=threshold,
        head_threshold=HEAD_THRESHOLD,
        verdict_step=verdict_step(steps),
        seed=seed,
        images=len(tensors),
        steps=tuple(steps),
    )
    log.info(result.log_line())
    return result
