"""The pipeline in one object: bytes -> tensor -> (logits, map, score) -> JSON-ready result.

Usable from a notebook as well as from the TorchServe handler::

    explainer = Explainer.from_directory("models/shapes")
    [result] = explainer.explain([explainer.prepare(ParsedRequest(png_bytes, RequestOptions()))])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from camserve.architectures import build_model, load_weights
from camserve.compensation import CompensationReport, probe_compensable
from camserve.decode import DEFAULT_MAX_PIXELS, decode_image
from camserve.gradcam import GradCam
from camserve.labels import load_labels, resolve_target
from camserve.layers import auto_target_layer
from camserve.preprocess import Preprocessing
from camserve.request import ParsedRequest, RequestOptions
from camserve.zero_reference import (
    ChannelStatistics,
    ScoreSettings,
    ZeroReference,
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
    # Per-class metric series (camserve.telemetry); only for models with few classes.
    class_metrics: bool = False

    @classmethod
    def from_handler_section(cls, section: dict) -> ExplainerConfig:
        known = {
            "architecture", "weights", "target_layer", "preprocessing", "labels", "topk",
            "epsilon", "threshold", "max_pixels", "calibration", "model_file", "model_class",
            "class_metrics",
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
            class_metrics=bool(section.get("class_metrics", False)),
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
        for key in ("calibration", "model_file", "model_class"):
            if getattr(self, key) is not None:
                section[key] = getattr(self, key)
        if self.class_metrics:
            section["class_metrics"] = True
        return section


@dataclass(frozen=True)
class PreparedImage:
    tensor: Tensor
    target: int | None
    topk: int
    options: RequestOptions
    image: Image.Image


@dataclass(frozen=True)
class ClassExplanation:
    """Grad-CAM and its zero-reference score for one class of one image."""

    target: int
    grad_cam: Tensor  # (h, w), ReLU'd, not normalised
    shifted_grad_cam: Tensor  # ReLU(M + c)
    zero_reference: ZeroReference


@dataclass(frozen=True)
class ExplainedImage:
    """One image's answer before encoding."""

    probabilities: Tensor  # (C,)
    target: int
    requested: bool
    grad_cam: Tensor  # (h, w), ReLU'd, not normalised
    shifted_grad_cam: Tensor  # ReLU(M + c)
    zero_reference: ZeroReference
    topk: int
    prepared: PreparedImage
    more: tuple[ClassExplanation, ...] = ()  # the next classes, when ``maps`` > 1


def load_model(directory: str | Path, config: ExplainerConfig, num_classes: int) -> nn.Module:
    """The configured architecture (or model file) with its weights, from a model folder."""
    directory = Path(directory)
    model = build_model(
        config.architecture,
        num_classes,
        model_file=directory / config.model_file if config.model_file else None,
        model_class=config.model_class,
    )
    return load_weights(model, directory / config.weights)


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


class Explainer:
    def __init__(
        self,
        model: nn.Module,
        labels: list[str],
        config: ExplainerConfig,
        calibration: ChannelStatistics | None = None,
        compensation: CompensationReport | None = None,
    ) -> None:
        if config.target_layer is None:
            layer = auto_target_layer(model, config.preprocessing.input_size)
            log.info("no target_layer configured: picked %r (last spatial feature map)", layer)
            config = replace(config, target_layer=layer)
        self.config = config
        self.labels = labels
        self.gradcam = GradCam(model, config.target_layer)
        self.calibration = calibration
        if compensation is None:
            compensation = probe_compensable(
                model, config.target_layer, config.preprocessing.input_size
            )
        self.compensation = compensation
        log.info(compensation.log_line(config.target_layer))

    @classmethod
    def from_directory(cls, directory: str | Path, section: dict | None = None) -> Explainer:
        """Load from an unpacked archive (or ``models/<name>``) holding ``model-config.yaml``."""
        directory = Path(directory)
        if section is None:
            section = yaml.safe_load((directory / MODEL_CONFIG).read_text())["handler"]
        config = ExplainerConfig.from_handler_section(section)
        labels = load_labels(directory / config.labels)
        model = load_model(directory, config, len(labels))
        calibration = (
            load_calibration(directory / config.calibration, config.target_layer)
            if config.calibration
            else None
        )
        return cls(model, labels, config, calibration)

    @property
    def model(self) -> nn.Module:
        return self.gradcam.model

    def prepare(self, request: ParsedRequest) -> PreparedImage:
        """Decode and validate one request; raises ``InputError`` for a bad item."""
        target = resolve_target(request.options.target, self.labels)
        image = decode_image(
            request.image, self.config.max_pixels, self.config.preprocessing.min_source_side
        )
        return self.prepare_image(image, request.options, target)

    def prepare_image(
        self,
        image: Image.Image,
        options: RequestOptions | None = None,
        target: int | None = None,
    ) -> PreparedImage:
        """Prepare an already decoded RGB image (notebooks, evaluation, calibration)."""
        options = options or RequestOptions()
        return PreparedImage(
            tensor=self.config.preprocessing(image),
            target=target,
            topk=min(options.topk or self.config.topk, len(self.labels)),
            options=options,
            image=image,
        )

    def explain(
        self,
        batch: list[PreparedImage],
        on_stage: Callable[[str, float], None] | None = None,
    ) -> list[ExplainedImage]:
        """Explain a batch; ``on_stage(name, seconds)`` hears how long each stage took."""
        if not batch:
            return []
        started = time.perf_counter()
        x = torch.stack([item.tensor for item in batch])
        extra = max(item.options.maps for item in batch) - 1
        result = self.gradcam(x, [item.target for item in batch], extra_classes=extra)
        scored = time.perf_counter()
        scores = self._score(result.signed_map, result.alpha, result)
        more = [(maps, self._score(maps.signed_map, maps.alpha, result)) for maps in result.extra]
        if on_stage is not None:
            # Stage names are the ones camserve.telemetry.STAGES declares.
            on_stage("forward_gradcam", scored - started)
            on_stage("score", time.perf_counter() - scored)
        probabilities = result.probabilities
        explained = []
        for i, item in enumerate(batch):
            main = _class_explanation(int(result.targets[i]), result.signed_map[i], scores[i])
            explained.append(
                ExplainedImage(
                    probabilities=probabilities[i],
                    target=main.target,
                    requested=item.target is not None,
                    grad_cam=main.grad_cam,
                    shifted_grad_cam=main.shifted_grad_cam,
                    zero_reference=main.zero_reference,
                    topk=item.topk,
                    prepared=item,
                    more=tuple(
                        _class_explanation(int(maps.targets[i]), maps.signed_map[i], score[i])
                        for maps, score in more[: item.options.maps - 1]
                    ),
                )
            )
        return explained

    def _score(self, signed_map: Tensor, alpha: Tensor, result) -> list[ZeroReference]:
        return zero_reference(
            signed_map,
            alpha,
            result.channel_mean,
            result.channel_std,
            self.config.preprocessing.input_size,
            self.config.score,
            self.compensation.compensable,
            self.calibration,
        )


def _class_explanation(target: int, signed_map: Tensor, score: ZeroReference) -> ClassExplanation:
    return ClassExplanation(
        target=target,
        grad_cam=signed_map.clamp_min(0),
        shifted_grad_cam=(signed_map + score.offset).clamp_min(0),
        zero_reference=score,
    )
