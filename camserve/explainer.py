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
from camserve.gradcam import ClassMaps, GradCam
from camserve.grid import attach_target
from camserve.labels import load_labels, resolve_target
from camserve.layers import auto_target_layer
from camserve.preprocess import Preprocessing
from camserve.request import ParsedRequest, RequestOptions
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

    @classmethod
    def from_handler_section(cls, section: dict) -> ExplainerConfig:
        known = {
            "architecture", "weights", "target_layer", "preprocessing", "labels", "topk",
            "epsilon", "threshold", "max_pixels", "calibration", "model_file", "model_class",
            "target_layout",
            "class_metrics",
            "model_config", "built_with",
        }  # fmt: skip
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown handler settings in model-config.yaml: {sorted(unknown)}")
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
        return section


@dataclass(frozen=True)
class ServedModel:
    """What a result says about the model that produced it (the encoders need no more)."""

    name: str
    labels: list[str]
    target_layer: str
    preprocessing: Preprocessing
    sanity_failed: bool = False  # its maps did not depend on its weights (docs/score.md)


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
    probabilities: Tensor  # (C,)
    explained: ClassExplanation
    requested: bool  # the explained class was asked for (``target``), not the top-1
    more: tuple[ClassExplanation, ...] = ()  # the next most probable classes (``maps`` > 1)

    def top(self) -> list[tuple[int, float]]:
        """The top-k (class index, probability) pairs, most probable first."""
        values, indices = torch.topk(self.probabilities, self.image.topk)
        return list(zip(indices.tolist(), values.tolist(), strict=True))


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
    ) -> None:
        model.eval()  # see load_model: nothing may run the served network in training mode
        config = _with_target_layer(model, config)
        self.config = config
        self.device = torch.device(device)
        self.served = ServedModel(name, labels, config.target_layer, config.preprocessing)
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
        explainer = cls(
            model, labels, config, calibration, name=name or directory.name, device=device
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
        }

    @property
    def labels(self) -> list[str]:
        return self.served.labels

    def prepare(self, request: ParsedRequest) -> PreparedImage:
        """Decode and validate one request; raises ``InputError`` for a bad item."""
        requested = resolve_target(request.options.target, self.labels)
        # Decoded in full: a reduced-scale JPEG decode moves the network input by grey
        # levels, far beyond the preprocessing tolerance (docs/performance.md#decoding).
        image = decode_image(request.image, self.config.max_pixels)
        return self.prepare_image(image, request.options, requested)

    def prepare_image(
        self,
        image: Image.Image,
        options: RequestOptions | None = None,
        requested_class: int | None = None,
    ) -> PreparedImage:
        """Prepare an already decoded RGB image (notebooks, evaluation, calibration)."""
        options = options or RequestOptions()
        return PreparedImage(
            tensor=self.config.preprocessing(image),
            options=options,
            requested_class=requested_class,
            topk=min(options.topk or self.config.topk, len(self.labels)),
        )

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
        extra = max(item.options.maps for item in batch) - 1
        result = self.gradcam(x, [item.requested_class for item in batch], extra_classes=extra)
        scored = time.perf_counter()
        class_maps = (result.explained, *result.extra)
        # Plain arithmetic from here on: without autograd's bookkeeping each of the score's
        # small tensor operations dispatches ~10% faster.
        with torch.inference_mode():
            # Only the image_mean reference needs the activations' std.
            channel_std = result.channel_std if self.calibration is None else None
            scores = [self._score(maps, channel_std) for maps in class_maps]
            # The batch's one trip to the CPU; everything per image below is plain indexing.
            probabilities, *host = to_host(
                [
                    result.logits.softmax(dim=1),
                    *(maps.classes for maps in class_maps),
                    *(maps.signed_map for maps in class_maps),
                    *(score.packed for score in scores),
                ]
            )
        count = len(class_maps)
        classes = [values.tolist() for values in host[:count]]
        signed = host[count : 2 * count]
        blocks = [
            replace(score, packed=packed).items()
            for score, packed in zip(scores, host[2 * count :], strict=True)
        ]
        if on_stage is not None:
            # Stage names are the ones camserve.telemetry.STAGES declares.
            on_stage("forward_gradcam", scored - started)
            on_stage("score", time.perf_counter() - scored)
        explained = []
        for i, item in enumerate(batch):
            per_class = [
                ClassExplanation(classes[k][i], signed[k][i], blocks[k][i])
                for k in range(min(item.options.maps, len(class_maps)))
            ]
            explained.append(
                Explanation(
                    model=self.served,
                    image=item,
                    probabilities=probabilities[i],
                    explained=per_class[0],
                    requested=item.requested_class is not None,
                    more=tuple(per_class[1:]),
                )
            )
        return explained

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


def _with_target_layer(model: nn.Module, config: ExplainerConfig) -> ExplainerConfig:
    if config.target_layer is not None:
        return config
    layer = auto_target_layer(model, config.preprocessing.input_size)
    log.info("no target_layer configured: picked %r (last spatial feature map)", layer)
    return replace(config, target_layer=layer)
