"""Pack a model folder (weights, labels, model-config.yaml) into a self-contained ``.mar``.

The archive carries the handler and the serving core (the ``camserve`` package without
``camserve.tools``), so it runs on a stock TorchServe with torch, torchvision, captum and
pillow installed and nothing of ours.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml

import camserve
from camserve.architectures import (
    build_model,
    check_input_size,
    first_line,
    imagenet_categories,
    infer_num_classes,
    load_weights,
    read_state_dict,
)
from camserve.compensation import probe_compensable
from camserve.device import blank_input
from camserve.explainer import DEFAULT_PRESENCE_THRESHOLD, ExplainerConfig, presence_thresholds
from camserve.labels import check_presence_threshold, load_label_thresholds, load_labels
from camserve.layers import auto_target_layer, check_target_layer
from camserve.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from camserve.sources import BuiltModel, read_pretrained
from camserve.sources.timm import TimmSource
from camserve.sources.torchvision import TorchvisionSource

log = logging.getLogger(__name__)

CORE_DIR = Path(camserve.__file__).resolve().parent
# handlers/ is installed as camserve.handlers (pyproject's package-dir), so this works from a
# source checkout and from an installed wheel alike.
HANDLERS_DIR = Path(str(resources.files("camserve.handlers")))
HANDLER_FILE = HANDLERS_DIR / "camserve_handler.py"
MODEL_CONFIG = "model-config.yaml"
# Parts of the installed package a worker does not run (an installed wheel holds them all).
NOT_SHIPPED = ("tools", "handlers", "config")


def _core_only(directory: str, names: list[str]) -> list[str]:
    """What the archive leaves out of the package: the build tools, the handler package
    (shipped apart), the configs and bytecode."""
    top = Path(directory).resolve() == CORE_DIR
    return [
        n
        for n in names
        if n == "__pycache__" or n.endswith((".pyc", ".pyo")) or (top and n in NOT_SHIPPED)
    ]


def _copy_handler_modules(package: Path) -> None:
    """The handler's own modules (``camserve.handlers.torchserve_internals``); TorchServe
    loads the handler file itself from the archive's root."""
    package.mkdir()
    for module in HANDLERS_DIR.glob("*.py"):
        if module.name != HANDLER_FILE.name:
            shutil.copy2(module, package / module.name)


def build_archive(
    model_dir: str | Path,
    name: str,
    export_path: str | Path,
    version: str = "1.0",
    handler_file: str | Path = HANDLER_FILE,
) -> Path:
    """Build ``<export_path>/<name>.mar`` from ``model_dir``; returns its path."""
    model_dir, export_path = Path(model_dir), Path(export_path)
    config_path = model_dir / MODEL_CONFIG
    section = yaml.safe_load(config_path.read_text()).get("handler", {})
    needed = [section.get("weights"), section.get("labels", "index_to_name.json")]
    optional = ("calibration", "model_file", "model_config", "label_thresholds")
    needed += [section.get(k) for k in optional if section.get(k)]
    missing = [f for f in needed if not f or not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks files named in {MODEL_CONFIG}: {missing}")
    if section.get("multi_label"):
        # A bad threshold or a file naming unknown labels fails here, not at serving time.
        config = ExplainerConfig.from_handler_section(section)
        presence_thresholds(model_dir, config, load_labels(model_dir / config.labels))
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as work:
        payload = Path(work) / "payload"
        shutil.copytree(CORE_DIR, payload / "camserve", ignore=_core_only)
        _copy_handler_modules(payload / "camserve" / "handlers")
        for file in needed + [MODEL_CONFIG]:
            shutil.copy2(model_dir / file, payload / file)
        # torch-model-archiver stages in $TMPDIR/<name> and deletes it: give it its own.
        staging = Path(work) / "tmp"
        staging.mkdir()
        env = dict(os.environ, TMPDIR=str(staging))
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", version,
            "--handler", str(handler_file),
            "--extra-files", str(payload),
            "--config-file", str(payload / MODEL_CONFIG),
            "--export-path", str(export_path),
            "--force",
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}\n{done.stderr}")
    return export_path / f"{name}.mar"


# --- Bring your own model: a torchvision architecture or a custom class plus weights, a timm
# model by name plus weights, or a saved timm/transformers folder (camserve.sources).

WEIGHTS_FILE = "weights.pt"
LABELS_FILE = "index_to_name.json"
LABEL_THRESHOLDS_FILE = "label_thresholds.json"
# transformers' config.json declares a sigmoid head so (docs/multi-label.md).
MULTI_LABEL_PROBLEM = "multi_label_classification"
SERVING_DEFAULTS = {
    "minWorkers": 1,
    "maxWorkers": 1,
    "batchSize": 8,
    "maxBatchDelay": 10,
    "responseTimeout": 120,
}


@dataclass(frozen=True)
class ModelSummary:
    """What ``write_model_dir`` decided, for the log and the command line."""

    architecture: str
    num_classes: int
    labels_from: str
    target_layer: str
    target_layer_auto: bool
    compensable: bool
    compensation: str
    problem_type: str | None = None  # transformers' config.json problem_type, when it has one
    notes: tuple[str, ...] = ()
    head: str = "single-label (softmax)"

    def describe(self) -> str:
        how = "picked automatically" if self.target_layer_auto else "given"
        extra = "".join(f"; {note}" for note in self.notes)
        if self.problem_type:
            extra += f"; problem_type {self.problem_type}"
        return (
            f"{self.architecture}: {self.num_classes} classes (labels: {self.labels_from}); "
            f"{self.head}; target layer {self.target_layer!r} ({how}); "
            f"{self.compensation}{extra}"
        )


def make_preprocessing(
    input_size: int | Sequence[int] = 224,
    resize: int | Sequence[int] | None = None,
    center_crop: int | Sequence[int] | None = None,
    crop: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Preprocessing:
    """torchvision's evaluation pipeline by default: resize the shorter side to
    ``input * 256 / 224``, centre-crop ``input_size``, normalise. ``crop=False`` resizes
    straight to ``input_size`` instead. Inconsistent sizes raise a ``ValueError``."""
    size = _pair(input_size, "input size")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R G B), got {list(mean)} and {list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    if crop:
        crop_size = _pair(center_crop, "center crop") if center_crop is not None else size
        if resize is None:
            resize = round(min(crop_size) * 256 / 224)
    else:
        if center_crop is not None:
            raise ValueError(
                "a center crop was given together with crop=False (--center-crop none)"
            )
        crop_size = None
        resize = size if resize is None else resize
    if isinstance(resize, Sequence):
        resize = _pair(resize, "resize")
    elif int(resize) < 1:
        raise ValueError(f"resize must be positive, got {resize}")
    # Preprocessing refuses sizes that would not give input_size images.
    return Preprocessing(
        input_size=size,
        resize=resize,
        center_crop=crop_size,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{what} must be a positive int or an (H, W) pair, got {value!r}")
    return pair


def read_labels(path: str | Path) -> list[str]:
    """Labels from TorchServe's ``index_to_name.json`` or a text file, one label a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    if path.suffix == ".json":
        return load_labels(path)
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not labels:
        raise ValueError(f"{path} holds no labels (expected one label a line)")
    return labels


def write_model_dir(
    out_dir: str | Path,
    weights: str | Path | None = None,
    architecture: str | None = None,
    labels: str | Path | Sequence[str] | None = None,
    target_layer: str | None = None,
    preprocessing: Preprocessing | None = None,
    model_file: str | Path | None = None,
    model_class: str | None = None,
    topk: int = 5,
    serving: dict | None = None,
    target_layout: str | None = None,
    pretrained: str | Path | None = None,
    data_config: dict | None = None,
    multi_label: bool = False,
    presence_threshold: float | None = None,
    label_thresholds: str | Path | None = None,
) -> ModelSummary:
    """Validate a model and write a model folder (weights, labels, ``model-config.yaml``)
    that ``build_archive`` packs. Raises ``ValueError`` with a clear message on bad input.

    The model is a torchvision ``architecture`` or a ``model_file`` class with ``weights``
    (``preprocessing``: default torchvision's evaluation pipeline); a timm model,
    ``architecture="timm:NAME"`` with ``weights`` (its data config, ``data_config`` may set
    ``input_size``, ``mean`` and ``std``); or a ``pretrained`` folder, whose config decides
    everything but the labels and the layer.

    ``multi_label`` declares a sigmoid head (a transformers folder whose config says
    ``problem_type: multi_label_classification`` is one by itself): a label is present at
    ``p >= presence_threshold`` (default 0.5), or at the threshold ``label_thresholds`` (a
    label -> threshold JSON file, copied into the archive) gives it."""
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    if presence_threshold is not None:
        presence_threshold = check_presence_threshold(presence_threshold, "--threshold")
    if label_thresholds is not None and not Path(label_thresholds).is_file():
        raise FileNotFoundError(f"label thresholds file {label_thresholds} does not exist")
    if pretrained is not None or (architecture or "").startswith(TimmSource.prefix):
        if preprocessing is not None or model_file is not None:
            raise ValueError(
                "the preprocessing of a timm model or a saved folder is its library's own "
                "(no --resize, --center-crop or --model-file)"
            )
        if pretrained is not None:
            built = read_pretrained(pretrained)
        else:
            _weights_file(weights)
            name = architecture.removeprefix(TimmSource.prefix)
            built = TimmSource().build(name, weights, **(data_config or {}))
        label_list, labels_from = _labels_of(built, labels)
    else:
        if data_config:
            raise ValueError("data_config applies to timm models only")
        built, label_list, labels_from = _torchvision_model(
            weights, architecture, labels, model_file, model_class
        )
        built.preprocessing = preprocessing or make_preprocessing()
    head = _head(built, multi_label, presence_threshold, label_thresholds)
    return _write_built(
        Path(out_dir), built, label_list, labels_from, target_layer, target_layout, topk,
        serving, model_file, model_class, head,
    )  # fmt: skip


@dataclass(frozen=True)
class _Head:
    """A single-label (softmax) head, or a multi-label one with its thresholds."""

    multi_label: bool = False
    presence_threshold: float | None = None
    label_thresholds: Path | None = None

    def describe(self) -> str:
        if not self.multi_label:
            return "single-label (softmax)"
        threshold = self.presence_threshold or DEFAULT_PRESENCE_THRESHOLD
        per_label = (
            f", per-label thresholds from {self.label_thresholds}" if self.label_thresholds else ""
        )
        return f"multi-label (sigmoid; present at p >= {threshold:g}{per_label})"


def _head(built: BuiltModel, multi_label: bool, presence_threshold, label_thresholds) -> _Head:
    """The flag, or what a transformers folder's ``problem_type`` declares; a contradiction
    between the two is refused, and so are thresholds for a single-label head."""
    declared = built.problem_type == MULTI_LABEL_PROBLEM
    if multi_label and built.problem_type not in (None, MULTI_LABEL_PROBLEM):
        raise ValueError(
            f"--multi-label contradicts the folder's config.json (problem_type "
            f"{built.problem_type}): fix the config or leave the flag out"
        )
    if not (multi_label or declared):
        if presence_threshold is not None or label_thresholds is not None:
            raise ValueError("--threshold and --label-thresholds apply only with --multi-label")
        return _Head()
    return _Head(
        True, presence_threshold, Path(label_thresholds) if label_thresholds is not None else None
    )


def _torchvision_model(weights, architecture, labels, model_file, model_class):
    """A torchvision model or a model file's class, with its weights and labels."""
    if model_file is not None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"model file {model_file} does not exist")
        if not model_class:
            raise ValueError("a custom model needs --model-class (the nn.Module class name)")
        architecture = architecture or model_class
    if not architecture:
        raise ValueError("name an architecture (--arch) or a model file and class")
    _weights_file(weights)
    state = read_state_dict(weights)
    label_list, labels_from = _labels(architecture, state, labels, model_file)
    model = build_model(architecture, len(label_list), model_file, model_class, state=state)
    load_weights(model, state)
    built = BuiltModel(
        source=TorchvisionSource(),
        architecture=architecture,
        model=model.eval(),
        labels=label_list,
        labels_from=labels_from,
        preprocessing=None,
    )
    return built, label_list, labels_from


def _weights_file(weights) -> None:
    if weights is None:
        raise ValueError("--weights (safetensors, a state_dict or a checkpoint) is required")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")


def _labels_of(built: BuiltModel, labels) -> tuple[list[str], str]:
    """``--labels`` when given (it overrides the library's), else the library's."""
    count = _output_count(built)
    if labels is not None:
        names, labels_from = (
            (read_labels(labels), str(labels))
            if isinstance(labels, str | Path)
            else ([str(label) for label in labels], "given")
        )
        if len(names) != count:
            raise ValueError(f"the model has {count} classes, but {len(names)} labels were given")
        return names, labels_from
    if built.labels is None:
        raise ValueError(
            f"the model has {count} classes and {built.source.name} names none: give their "
            "names with --labels (index_to_name.json or a text file with one label a line)"
        )
    return built.labels, built.labels_from


def _output_count(built: BuiltModel) -> int:
    outputs = blank_logits(built.model, built.preprocessing.input_size)
    if outputs.dim() != 2:
        raise ValueError(
            f"the model outputs shape {tuple(outputs.shape)}: a classifier must output "
            "(N, number of classes) logits"
        )
    return int(outputs.shape[1])


def blank_logits(model: torch.nn.Module, size: tuple[int, int]) -> torch.Tensor:
    """The model's output for one blank RGB image, or a ``ValueError`` that says why
    camserve cannot serve it: it must take (N, 3, H, W) and return one logits tensor."""
    shape = (1, 3, *size)
    try:
        with torch.no_grad():
            outputs = model(blank_input(model, size))
    except RuntimeError as error:
        raise ValueError(
            f"the model cannot run on an RGB image batch of shape {shape}: "
            f"{first_line(error)}. camserve "
            "feeds 3-channel RGB images at the input size: check --input-size; a grayscale "
            "model needs a first convolution with 3 input channels (its weight divided by 3 "
            "on each computes the same on grey images)"
        ) from None
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(
            f"the model's forward returns a {type(outputs).__name__}, not a logits tensor: "
            "camserve explains a forward that returns (N, number of classes) logits; wrap the "
            "model in a module whose forward returns only them"
        )
    return outputs


def _write_built(
    out_dir: Path,
    built: BuiltModel,
    label_list: list[str],
    labels_from: str,
    target_layer: str | None,
    target_layout: str | None,
    topk: int,
    serving: dict | None,
    model_file: str | Path | None,
    model_class: str | None,
    head: _Head,
) -> ModelSummary:
    model, preprocessing, architecture = built.model, built.preprocessing, built.architecture
    size = preprocessing.input_size
    check_input_size(model, size)
    outputs = blank_logits(model, size)
    if outputs.dim() != 2 or outputs.shape[1] != len(label_list):
        raise ValueError(
            f"the model outputs shape {tuple(outputs.shape)}, but there are {len(label_list)} "
            "labels: a classifier must output (N, number of labels) logits"
        )
    auto = target_layer is None
    if auto:
        target_layer = auto_target_layer(model, size)
        log.info("target layer for %s: %r (picked automatically)", architecture, target_layer)
    # Refuses a layer whose output has no known channel axis (camserve.grid).
    layout = check_target_layer(model, target_layer, size, target_layout)
    if head.multi_label and len(label_list) < 2:
        raise ValueError(
            "--multi-label needs a model with at least two outputs (one logit per label); "
            "this one has one"
        )
    if head.label_thresholds is not None:
        default = head.presence_threshold or DEFAULT_PRESENCE_THRESHOLD
        load_label_thresholds(head.label_thresholds, label_list, default)
    report = probe_compensable(model, target_layer, size, layout=layout)
    log.info(report.log_line(target_layer))

    out_dir.mkdir(parents=True, exist_ok=True)
    if built.source.prefix is None:  # torchvision, a model file: a plain state_dict
        torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
        weights_file, model_config, built_with = WEIGHTS_FILE, None, None
    else:  # the library's own folder layout, rebuilt by the worker (camserve.sources)
        weights_file, model_config = built.source.save(model, out_dir, label_list)
        built_with = built.source.built_with()
    mapping = {str(i): name for i, name in enumerate(label_list)}
    (out_dir / LABELS_FILE).write_text(json.dumps(mapping, indent=1) + "\n")
    model_file = Path(model_file) if model_file is not None else None
    section = ExplainerConfig(
        architecture=architecture,
        weights=weights_file,
        target_layer=target_layer,
        preprocessing=preprocessing,
        labels=LABELS_FILE,
        topk=min(topk, len(label_list)),
        model_file=model_file.name if model_file is not None else None,
        model_class=model_class if model_file is not None else None,
        target_layout=target_layout,
        model_config=model_config,
        built_with=built_with,
        multi_label=head.multi_label,
        **(
            {"presence_threshold": head.presence_threshold}
            if head.presence_threshold is not None
            else {}
        ),
        label_thresholds=LABEL_THRESHOLDS_FILE if head.label_thresholds is not None else None,
    ).to_handler_section()
    if model_file is not None:
        shutil.copy2(model_file, out_dir / model_file.name)
    if head.label_thresholds is not None:
        shutil.copy2(head.label_thresholds, out_dir / LABEL_THRESHOLDS_FILE)
    config = {**SERVING_DEFAULTS, **(serving or {}), "handler": section}
    (out_dir / MODEL_CONFIG).write_text(
        "# Written by camserve archive. TorchServe reads the top level; camserve, handler:.\n"
        + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    )
    return ModelSummary(
        architecture=architecture,
        num_classes=len(label_list),
        labels_from=labels_from,
        target_layer=target_layer,
        target_layer_auto=auto,
        compensable=report.compensable,
        compensation=(
            f"compensable={report.compensable} (absorbing layer {report.absorbing_layer}, "
            f"worst relative output change {report.worst_relative_change:.1e}, "
            f"tolerance {report.tolerance:g})"
            if report.worst_relative_change is not None
            else f"compensable=False ({report.reason})"
        ),
        problem_type=built.problem_type,
        notes=tuple(built.notes),
        head=head.describe(),
    )


def _labels(
    architecture: str,
    state: dict,
    labels: str | Path | Sequence[str] | None,
    model_file: Path | None,
) -> tuple[list[str], str]:
    if labels is not None:
        if isinstance(labels, str | Path):
            names, labels_from = read_labels(labels), str(labels)
        else:
            names, labels_from = [str(label) for label in labels], "given"
        if model_file is None:
            count = infer_num_classes(architecture, state)
            if count != len(names):
                raise ValueError(
                    f"the weights have {count} classes, but {len(names)} labels were given"
                )
        return names, labels_from
    if model_file is not None:
        raise ValueError("this model needs --labels (index_to_name.json or one label a line)")
    count = infer_num_classes(architecture, state)
    categories = imagenet_categories(architecture) if count == 1000 else None
    if categories is None:
        raise ValueError(
            f"the weights have {count} classes: give their names with --labels "
            "(index_to_name.json or a text file with one label a line)"
        )
    return categories, "ImageNet categories from torchvision's weight metadata"


def build_model_archive(
    name: str, export_path: str | Path, version: str = "1.0", **model: object
) -> tuple[Path, ModelSummary]:
    """``write_model_dir`` into a temporary folder, then ``build_archive``."""
    with tempfile.TemporaryDirectory(prefix="camserve-model-") as work:
        summary = write_model_dir(work, **model)
        return build_archive(work, name, export_path, version), summary
