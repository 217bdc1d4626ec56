"""The pipeline in one object: bytes -> tensor -> (logits, map, score) -> one result object.

Usable from a notebook as well as from the TorchServe handler::

    explainer = Explainer.from_directory("models/shapes")
    [result] = explainer.explain([explainer.prepare(ParsedRequest(png_bytes, RequestOptions()))])
    result.explained.signed_map      # M, before the ReLU
    result.explained.zero_reference  # the score block
    camserve.encode_json.explanation_json(result)   # the response body
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from camserve import maps
from camserve.architectures import check_input_size
from camserve.compensation import CompensationReport, probe_compensable
from camserve.decode import DEFAULT_MAX_PIXELS, decode_image
from camserve.device import to_host
from camserve.errors import BAD_OPTION, input_error
from camserve.gradcam import ClassChoice, ClassMaps, GradCam, PresentLabels, TopClasses
from camserve.grid import attach_target
from camserve.labels import (
    check_presence_threshold,
    load_label_thresholds,
    load_labels,
    resolve_target,
    resolve_targets,
)
from camserve.layers import auto_target_layer
from camserve.preprocess import Preprocessing
from camserve.request import MAX_MAPS, ParsedRequest, RequestOptions
from camserve.sanity import SanityResult
from camserve.sources import source_of_architecture
from camserve.telemetry import ScoreBaseline
from camserve.zero_reference import (
    ChannelStatistics,
    ScoreSettings,
    ZeroReference,
    ZeroReferenceBatch,
    zero_reference,
)

log = logging.getLogger(__name__)

MODEL_CONFIG = "model-config.yaml"
# Maps per answer when the request does not say (``maps``): the explained class alone, or on a
# multi-label model every present label up to this many.
DEFAULT_MAPS = 1
DEFAULT_MULTI_LABEL_MAPS = 5
DEFAULT_PRESENCE_THRESHOLD = 0.5


@dataclass(frozen=True)
class ExplainerConfig:
    """The ``handler:`` section of ``model-config.yaml``."""

    architecture: str
    weights: str
    target_layer: str | None  # None: picked at load time by camserve.layers.auto_target_layer
    preprocessing: Preprocessing
    labels: str = "index_to_name.json"
    topk: int = 5
    score: ScoreSettings = field(default_factory=ScoreSettings)
    max_pixels: int = DEFAULT_MAX_PIXELS
    calibration: str | None = None
    model_file: str | None = None
    model_class: str | None = None
    target_layout: str | None = None  # camserve.grid layout, for a model file's layer
    # timm and transformers: their config.json, and the package and version that built it.
    model_config: str | None = None
    built_with: dict | None = None
    # Per-class metric series (camserve.telemetry); only for models with few classes.
    class_metrics: bool = False
    # A sigmoid head (docs/multi-label.md): probabilities sigmoid(logits), a label present at
    # p >= its threshold (label_thresholds: a label -> threshold JSON; else presence_threshold).
    multi_label: bool = False
    presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD
    label_thresholds: str | None = None
    maps: int | None = None  # maps per answer by default; None: DEFAULT_MAPS or, multi-label, 5

    def __post_init__(self) -> None:
        check_presence_threshold(self.presence_threshold, "presence_threshold")
        if not self.multi_label and (
            self.label_thresholds is not None
            or self.presence_threshold != DEFAULT_PRESENCE_THRESHOLD
        ):
            raise ValueError("presence_threshold and label_thresholds need multi_label: true")
        if self.maps is not None and not 1 <= self.maps <= MAX_MAPS:
            raise ValueError(f"maps must be from 1 to {MAX_MAPS}, got {self.maps}")

    @property
    def default_maps(self) -> int:
        """Maps per answer when the request does not set ``maps``."""
        if self.maps is not None:
            return self.maps
        return DEFAULT_MULTI_LABEL_MAPS if self.multi_label else DEFAULT_MAPS

    @classmethod
    def from_handler_section(cls, section: dict) -> ExplainerConfig:
        known = {
            "architecture", "weights", "target_layer", "preprocessing", "labels", "topk",
            "epsilon", "threshold", "max_pixels", "calibration", "model_file", "model_class",
            "target_layout",
            "class_metrics",
            "model_config", "built_with",
            "multi_label", "presence_threshold", "label_thresholds", "maps",
        }  # fmt: skip
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown handler settings in model-config.yaml: {sorted(unknown)}")
        if not section.get("multi_label") and {"presence_threshold", "label_thresholds"} & set(
            section
        ):
            raise ValueError("presence_threshold and label_thresholds need multi_label: true")
        defaults = ScoreSettings()
        return cls(
            architecture=section["architecture"],
            weights=section["weights"],
            target_layer=section.get("target_layer"),
            preprocessing=Preprocessing.from_dict(section["preprocessing"]),
            labels=section.get("labels", "index_to_name.json"),
            topk=int(section.get("topk", 5)),
            score=ScoreSettings(
                epsilon=float(section.get("epsilon", defaults.epsilon)),
                threshold=float(section.get("threshold", defaults.threshold)),
            ),
            max_pixels=int(section.get("max_pixels", DEFAULT_MAX_PIXELS)),
            calibration=section.get("calibration"),
            model_file=section.get("model_file"),
            model_class=section.get("model_class"),
            target_layout=section.get("target_layout"),
            class_metrics=bool(section.get("class_metrics", False)),
            model_config=section.get("model_config"),
            built_with=section.get("built_with"),
            multi_label=_flag(section.get("multi_label", False), "multi_label"),
            presence_threshold=section.get("presence_threshold", DEFAULT_PRESENCE_THRESHOLD),
            label_thresholds=section.get("label_thresholds"),
            maps=int(section["maps"]) if section.get("maps") is not None else None,
        )

    def to_handler_section(self) -> dict:
        section = {
            "architecture": self.architecture,
            "weights": self.weights,
            **({"target_layer": self.target_layer} if self.target_layer else {}),
            "labels": self.labels,
            "topk": self.topk,
            "epsilon": self.score.epsilon,
            "threshold": self.score.threshold,
            "max_pixels": self.max_pixels,
            "preprocessing": self.preprocessing.to_dict(),
        }
        for key in (
            "calibration", "model_file", "model_class", "target_layout", "model_config",
            "built_with",
        ):  # fmt: skip
            if getattr(self, key) is not None:
                section[key] = getattr(self, key)
        if self.class_metrics:
            section["class_metrics"] = True
        if self.multi_label:
            section["multi_label"] = True
            section["presence_threshold"] = self.presence_threshold
            if self.label_thresholds is not None:
                section["label_thresholds"] = self.label_thresholds
        if self.maps is not None:
            section["maps"] = self.maps
        return section


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class ServedModel:
    """What a result says about the model that produced it (the encoders need no more)."""

    name: str
    labels: list[str]
    target_layer: str
    preprocessing: Preprocessing
    sanity_failed: bool = False  # its maps did not depend on its weights (docs/score.md)
    multi_label: bool = False


@dataclass(frozen=True)
class PreparedImage:
    """One decoded, preprocessed request, ready for a batch.

    Only the network's input is kept, not the decoded image: a 40 Mpx upload would otherwise
    hold ~115 MiB until its batch is answered (the overlay is drawn on the input tensor).
    """

    tensor: Tensor  # (3, H, W), the network's input
    options: RequestOptions
    requested_class: int | None  # ``options.target`` resolved to a class index; None: top-1
    topk: int
    maps: int = DEFAULT_MAPS  # classes that get a map (multi-label: at most, of the present)
    more_requested: tuple[int, ...] = ()  # multi-label: the other labels ``target`` named

    @property
    def requested_classes(self) -> tuple[int, ...]:
        """Every class ``target`` named, in order; empty: the model's choice."""
        if self.requested_class is None:
            return ()
        return (self.requested_class, *self.more_requested)


@dataclass(frozen=True)
class ClassExplanation:
    """Grad-CAM of one class of one image, kept as the signed map M, with its score."""

    index: int
    signed_map: Tensor  # M = sum_k alpha_k A^k, (h, w), before the ReLU
    zero_reference: ZeroReference

    @property
    def grad_cam(self) -> Tensor:
        """ReLU(M)."""
        return maps.grad_cam(self.signed_map)

    @property
    def shifted_grad_cam(self) -> Tensor:
        """ReLU(M + c): the map with the layer's zero moved to the reference."""
        return maps.grad_cam(self.signed_map, self.zero_reference.offset)


@dataclass(frozen=True)
class Explanation:
    """One image's whole answer, on the CPU: what both encoders (JSON and PNG) take."""

    model: ServedModel
    image: PreparedImage
    probabilities: Tensor  # (C,): softmax, or sigmoid for a multi-label model
    explained: ClassExplanation
    requested: bool  # the explained class was asked for (``target``), not the top-1
    # Single-label: the next most probable classes (``maps`` > 1). Multi-label: the other
    # present labels, or the other labels ``target`` named.
    more: tuple[ClassExplanation, ...] = ()
    present: Tensor | None = None  # (C,) bool, multi-label only: p >= the label's threshold

    def top(self) -> list[tuple[int, float]]:
        """The top-k (class index, probability) pairs, most probable first."""
        values, indices = torch.topk(self.probabilities, self.image.topk)
        return list(zip(indices.tolist(), values.tolist(), strict=True))

    def is_present(self, index: int) -> bool | None:
        """Whether a label is present (multi-label); None for a single-label model."""
        return None if self.present is None else bool(self.present[index])

    def monitored(self) -> list[tuple[ZeroReference, int, bool]]:
        """What the metrics and the drift baseline count, as (score block, class index,
        requested). Single-label: the explained class, ``requested`` as answered. Multi-label:
        every explained label, ``requested`` false only for a present label the model chose,
        so that ``requested=false`` means "the model's own prediction" for both heads."""
        if self.present is None:
            return [(self.explained.zero_reference, self.explained.index, self.requested)]
        return [
            (item.zero_reference, item.index, self.requested or not self.is_present(item.index))
            for item in (self.explained, *self.more)
        ]


def load_model(directory: str | Path, config: ExplainerConfig, num_classes: int) -> nn.Module:
    """The configured model with its weights, from a model folder, built by its source
    (camserve.sources: torchvision or a model file, timm, transformers)."""
    model = source_of_architecture(config.architecture).load(Path(directory), config, num_classes)
    # Eval mode before anything runs it: a forward in training mode (layer tracing, the grid
    # and gradient checks) would overwrite BatchNorm's running statistics.
    return model.eval()


def load_calibration(path: str | Path, layer: str | None = None) -> ChannelStatistics:
    """Statistics written by ``camserve calibrate``; refused if taken at another layer."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if layer is not None and data.get("layer", layer) != layer:
        raise ValueError(
            f"{path} holds statistics of layer {data['layer']!r}, but the target layer is "
            f"{layer!r}: run camserve calibrate again"
        )
    return ChannelStatistics(
        mean=data["mean"].double(), std=data["std"].double(), count=int(data.get("count", 0))
    )


def load_score_baseline(path: str | Path) -> ScoreBaseline | None:
    """The calibration images' top-1 score bands (the drift baseline), if the file has them."""
    return ScoreBaseline.from_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_sanity(path: str | Path) -> SanityResult | None:
    """The sanity check's result, if the file has one (files older than the check do not)."""
    return SanityResult.from_calibration(torch.load(path, map_location="cpu", weights_only=True))


class Explainer:
    """The pipeline for one model: prepare requests, then explain them in batches.

    ``device`` is where the model, Grad-CAM and the score run; results come back on the CPU.
    """

    score_baseline: ScoreBaseline | None = None  # from_directory sets it for a calibrated model
    sanity: SanityResult | None = None  # likewise, when the calibration file has a result

    def __init__(
        self,
        model: nn.Module,
        labels: list[str],
        config: ExplainerConfig,
        calibration: ChannelStatistics | None = None,
        compensation: CompensationReport | None = None,
        name: str = "model",
        device: str | torch.device = "cpu",
        thresholds: list[float] | None = None,
    ) -> None:
        """``thresholds``: a multi-label model's presence threshold per label (default: the
        config's ``presence_threshold`` for every label)."""
        model.eval()  # see load_model: nothing may run the served network in training mode
        config = _with_target_layer(model, config)
        self.config = config
        self.device = torch.device(device)
        self.served = ServedModel(
            name, labels, config.target_layer, config.preprocessing, multi_label=config.multi_label
        )
        self.thresholds = _presence_thresholds(config, labels, thresholds)
        if self.thresholds is not None:
            log.info(
                "%s is multi-label: sigmoid probabilities, a label present at p >= %s",
                name,
                _describe_thresholds(self.thresholds),
            )
        size = config.preprocessing.input_size
        check_input_size(model, size)
        # Explained at the layer's (N, C, h, w) grid: the layer itself, or the tap that
        # camserve.grid attaches to a channels-last or token layer (refused without one).
        grid = attach_target(model, config.target_layer, size, config.target_layout)
        # On the serving device before anything runs: the probe, Grad-CAM and the score.
        model = model.to(self.device)
        if compensation is None:
            compensation = probe_compensable(model, grid, size)
        self.compensation = compensation
        log.info("%s on device %s", name, self.device)
        log.info(compensation.log_line(config.target_layer))
        self.gradcam = GradCam(model, grid)
        release_freed_memory()
        # float64 on the device once here, not converted in every batch.
        self.calibration = calibration.to(self.device) if calibration is not None else None
        self._threshold_tensor = (
            torch.tensor(self.thresholds, device=self.device)
            if self.thresholds is not None
            else None
        )

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        section: dict | None = None,
        name: str | None = None,
        device: str | torch.device = "cpu",
    ) -> Explainer:
        """Load from an unpacked archive (or ``models/<name>``) holding ``model-config.yaml``."""
        directory = Path(directory)
        if section is None:
            section = yaml.safe_load((directory / MODEL_CONFIG).read_text())["handler"]
        config = ExplainerConfig.from_handler_section(section)
        labels = load_labels(directory / config.labels)
        model = load_model(directory, config, len(labels))
        # The layer first, so calibration statistics are checked against the real one.
        config = _with_target_layer(model, config)
        calibration = (
            load_calibration(directory / config.calibration, config.target_layer)
            if config.calibration
            else None
        )
        thresholds = presence_thresholds(directory, config, labels)
        explainer = cls(
            model,
            labels,
            config,
            calibration,
            name=name or directory.name,
            device=device,
            thresholds=thresholds,
        )
        if config.calibration:
            explainer.score_baseline = load_score_baseline(directory / config.calibration)
            explainer.set_sanity(load_sanity(directory / config.calibration))
        else:
            log.info("%s: uncalibrated, so no sanity check result", explainer.served.name)
        return explainer

    def set_sanity(self, result: SanityResult | None) -> None:
        """Record the sanity check's result: logged, and a failed one marks every answer."""
        self.sanity = result
        self.served = replace(self.served, sanity_failed=result is not None and result.failed)
        name = self.served.name
        if result is None:
            log.info("%s: the calibration file holds no sanity check result", name)
        elif result.failed:
            log.warning("%s: %s; answers carry sanity: failed", name, result.log_line())
        else:
            log.info("%s: %s", name, result.log_line())

    @property
    def model(self) -> nn.Module:
        return self.gradcam.model

    def describe(self) -> dict:
        """What the served model's description (TorchServe's describe API) says of it."""
        return {
            "target_layer": self.config.target_layer,
            "input_size": list(self.config.preprocessing.input_size),
            "classes": len(self.labels),
            "reference": "calibration_mean" if self.calibration is not None else "image_mean",
            "compensable": self.compensation.compensable,
            # The parameter-randomisation check of calibrate; None: never checked.
            "sanity": self.sanity.describe() if self.sanity is not None else None,
            "multi_label": self.thresholds is not None,
            **(self._describe_multi_label() if self.thresholds is not None else {}),
        }

    def _describe_multi_label(self) -> dict:
        default = self.config.presence_threshold
        return {
            "presence_threshold": default,
            # Only the labels with their own threshold (label_thresholds).
            "label_thresholds": {
                label: threshold
                for label, threshold in zip(self.labels, self.thresholds, strict=True)
                if threshold != default
            },
            "maps": self.config.default_maps,
        }

    @property
    def labels(self) -> list[str]:
        return self.served.labels

    def prepare(self, request: ParsedRequest) -> PreparedImage:
        """Decode and validate one request; raises ``InputError`` for a bad item."""
        requested = self._resolve(request.options.target)
        # Decoded in full: a reduced-scale JPEG decode moves the network input by grey
        # levels, far beyond the preprocessing tolerance (docs/performance.md#decoding).
        image = decode_image(request.image, self.config.max_pixels)
        return self.prepare_image(image, request.options, requested)

    def prepare_image(
        self,
        image: Image.Image,
        options: RequestOptions | None = None,
        requested_class: int | tuple[int, ...] | None = None,
    ) -> PreparedImage:
        """Prepare an already decoded RGB image (notebooks, evaluation, calibration).

        ``requested_class``: a class index, or on a multi-label model a tuple of them."""
        options = options or RequestOptions()
        named = (
            tuple(requested_class)
            if isinstance(requested_class, tuple | list)
            else () if requested_class is None else (requested_class,)
        )  # fmt: skip
        if len(named) > 1 and not self.config.multi_label:
            raise ValueError("only a multi-label model explains several requested classes")
        return PreparedImage(
            tensor=self.config.preprocessing(image),
            options=options,
            requested_class=named[0] if named else None,
            topk=min(options.topk or self.config.topk, len(self.labels)),
            maps=options.maps if options.maps is not None else self.config.default_maps,
            more_requested=named[1:],
        )

    def _resolve(self, target: object) -> int | tuple[int, ...] | None:
        """A request's ``target``: one class, or on a multi-label model a list of labels."""
        if self.config.multi_label:
            return resolve_targets(target, self.labels, MAX_MAPS)
        if isinstance(target, list):
            raise input_error(
                BAD_OPTION,
                "'target' names one class: only a multi-label model explains a list of labels",
            )
        return resolve_target(target, self.labels)

    def explain(
        self,
        batch: list[PreparedImage],
        on_stage: Callable[[str, float], None] | None = None,
    ) -> list[Explanation]:
        """Explain a batch; ``on_stage(name, seconds)`` hears how long each stage took."""
        if not batch:
            return []
        started = time.perf_counter()
        x = torch.stack([item.tensor for item in batch]).to(self.device)
        result = self.gradcam.explain(x, self._choice(batch))
        scored = time.perf_counter()
        class_maps = (result.explained, *result.extra)
        # Plain arithmetic from here on: without autograd's bookkeeping each of the score's
        # small tensor operations dispatches ~10% faster.
        with torch.inference_mode():
            # Only the image_mean reference needs the activations' std.
            channel_std = result.channel_std if self.calibration is None else None
            scores = [self._score(maps, channel_std) for maps in class_maps]
            # The batch's one trip to the CPU; everything per image below is plain indexing.
            multi_label = result.present is not None
            probabilities, *host = to_host(
                [
                    result.logits.sigmoid() if multi_label else result.logits.softmax(dim=1),
                    *(maps.classes for maps in class_maps),
                    *(maps.signed_map for maps in class_maps),
                    *(score.packed for score in scores),
                    *((result.present, result.counts) if multi_label else ()),
                ]
            )
        count = len(class_maps)
        classes = [values.tolist() for values in host[:count]]
        signed = host[count : 2 * count]
        blocks = [
            replace(score, packed=packed).items()
            for score, packed in zip(scores, host[2 * count : 3 * count], strict=True)
        ]
        present, counts = host[3 * count :] if multi_label else (None, None)
        maps_per_image = counts.tolist() if multi_label else [item.maps for item in batch]
        if on_stage is not None:
            # Stage names are the ones camserve.telemetry.STAGES declares.
            on_stage("forward_gradcam", scored - started)
            on_stage("score", time.perf_counter() - scored)
        explained = []
        for i, item in enumerate(batch):
            per_class = [
                ClassExplanation(classes[k][i], signed[k][i], blocks[k][i])
                for k in range(min(maps_per_image[i], len(class_maps)))
            ]
            explained.append(
                Explanation(
                    model=self.served,
                    image=item,
                    probabilities=probabilities[i],
                    explained=per_class[0],
                    requested=item.requested_class is not None,
                    more=tuple(per_class[1:]),
                    present=present[i] if multi_label else None,
                )
            )
        return explained

    def _choice(self, batch: list[PreparedImage]) -> ClassChoice:
        if self._threshold_tensor is None:
            extra = max(item.maps for item in batch) - 1
            return TopClasses([item.requested_class for item in batch], extra)
        return PresentLabels(
            self._threshold_tensor,
            [item.requested_classes for item in batch],
            [item.maps for item in batch],
        )

    def _score(self, maps: ClassMaps, channel_std: Tensor | None) -> ZeroReferenceBatch:
        return zero_reference(
            maps.signed_map,
            maps.alpha,
            channel_std,
            self.config.preprocessing.input_size,
            self.config.score,
            self.compensation.compensable,
            self.calibration,
        )


def release_freed_memory() -> None:
    """Hand the memory the load-time checks freed back to the OS (glibc's ``malloc_trim``).

    The layout read, the gradient check and the compensation probe run the network; glibc
    keeps what they freed in its heap, and on ResNet-50 the worker then served ~100 MB above
    a plain handler's peak. Elsewhere than glibc this does nothing.
    """
    # The process's own symbols (libc among them): no library search, no subprocess.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def presence_thresholds(
    directory: str | Path, config: ExplainerConfig, labels: list[str]
) -> list[float] | None:
    """A multi-label model's presence threshold per label, from its folder's
    ``label_thresholds`` file or else ``presence_threshold``; None for a softmax head.
    Raises ``ValueError`` for a file naming unknown labels or thresholds outside (0, 1)."""
    thresholds = (
        load_label_thresholds(
            Path(directory) / config.label_thresholds, labels, config.presence_threshold
        )
        if config.label_thresholds
        else None
    )
    return _presence_thresholds(config, labels, thresholds)


def _presence_thresholds(
    config: ExplainerConfig, labels: list[str], thresholds: list[float] | None
) -> list[float] | None:
    """A multi-label model's threshold per label (checked), or None for a softmax head."""
    if not config.multi_label:
        if thresholds is not None:
            raise ValueError("presence thresholds need a multi-label model (multi_label: true)")
        return None
    if len(labels) < 2:
        raise ValueError(
            "a multi-label model needs at least two outputs (one logit per label); with one "
            "output the model is a binary classifier"
        )
    if thresholds is None:
        return [config.presence_threshold] * len(labels)
    if len(thresholds) != len(labels):
        raise ValueError(f"{len(thresholds)} presence thresholds for {len(labels)} labels")
    return [check_presence_threshold(t) for t in thresholds]


def _describe_thresholds(thresholds: list[float]) -> str:
    distinct = sorted(set(thresholds))
    if len(distinct) == 1:
        return f"{distinct[0]:g}"
    return f"per-label thresholds from {distinct[0]:g} to {distinct[-1]:g}"


def _with_target_layer(model: nn.Module, config: ExplainerConfig) -> ExplainerConfig:
    if config.target_layer is not None:
        return config
    layer = auto_target_layer(model, config.preprocessing.input_size)
    log.info("no target_layer configured: picked %r (last spatial feature map)", layer)
    return replace(config, target_layer=layer)
