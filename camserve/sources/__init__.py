"""Where a model comes from: torchvision (or a model file), timm, or Hugging Face transformers.

Each source is one small module with one interface (``Source``): build the served model
from an unpacked archive, name its default Grad-CAM layer and the layout of a layer's
output, and the input size its weights fix. The archive side (``camserve.tools.archive``)
also asks a source for the model's own preprocessing and labels.

timm and transformers are optional (``pip install camserve[timm]``, ``camserve[transformers]``):
nothing here imports them until a model of theirs is built, and a worker without the
package refuses to load with one log line that names the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from camserve.explainer import ExplainerConfig
    from camserve.preprocess import Preprocessing

log = logging.getLogger(__name__)


class MissingExtra(ImportError):
    """A model needs a package this Python lacks; the message names the extra to install."""


@dataclass(frozen=True)
class FixedInput:
    """The only input size a model accepts: its position embeddings cover one patch grid."""

    size: tuple[int, int]
    patch: int

    def describe(self) -> str:
        h, w = (side // self.patch for side in self.size)
        return f"their position embeddings cover a {h}x{w} grid of {self.patch}-pixel patches"


class Source:
    """How camserve loads and reads the models of one library.

    This base class is the generic behaviour, used for a custom ``nn.Module``: no family
    layer (``camserve.layers`` picks the last convolutional map), an (N, C, h, w) layout for
    4-D outputs and none for anything else (a ``--target-layout`` must say it).
    """

    name = "custom"
    package: str | None = None  # the Python package a worker needs for these models
    extra: str | None = None  # camserve's pip extra that installs it
    prefix: str | None = None  # the architecture prefix in model-config.yaml, e.g. "timm:"

    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` is one of this library's classes (read without importing it)."""
        return self.package is not None and type(model).__module__.split(".")[0] == self.package

    def target_layer(self, model: nn.Module) -> str | None:
        """The family's Grad-CAM layer; None: the last convolutional feature map."""
        return None

    def layout(self, model: nn.Module, layer_name: str, shape: tuple[int, ...]) -> str | None:
        """How ``layer_name``'s output holds its grid (camserve.grid); None: not known."""
        from camserve.grid import NCHW

        return NCHW if len(shape) == 4 else None

    def fixed_input(self, model: nn.Module) -> FixedInput | None:
        """The input size the weights fix, if they fix one."""
        return None

    def load(self, directory: Path, config: ExplainerConfig, num_classes: int) -> nn.Module:
        """The served model with its weights, from an unpacked archive (worker side)."""
        raise NotImplementedError

    def require(self, built_with: dict | None = None):
        """Import this source's package, or raise ``MissingExtra`` after one clear log line.

        ``built_with``: what the archive recorded (``built_with()``); a different installed
        version is logged, not refused."""
        recorded = (built_with or {}).get("version")
        try:
            module = importlib.import_module(self.package)
        except ImportError as err:
            built = f" (this model was built with {self.package} {recorded})" if recorded else ""
            message = (
                f"{self.name} models need the {self.package} package, which this Python cannot "
                f"import ({err}){built}: pip install 'camserve[{self.extra}]' into the Python "
                "that runs the model"
            )
            log.error(message)
            raise MissingExtra(message) from None
        if recorded and recorded != self.version():
            log.warning(
                "this model was built with %s %s; this worker has %s %s",
                self.package, recorded, self.package, self.version(),
            )  # fmt: skip
        return module

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def built_with(self) -> dict:
        """What the archive records about the package that built the model."""
        return {"package": self.package, "version": self.version()}


@dataclass
class BuiltModel:
    """A model read for an archive, with what its library says about it (archive side)."""

    source: Source
    architecture: str  # as model-config.yaml records it, e.g. "timm:resnet18"
    model: nn.Module
    labels: list[str] | None  # None: the library has no names for the classes
    labels_from: str
    preprocessing: Preprocessing | None  # None: the caller gives one (torchvision)
    # transformers' problem_type (e.g. "multi_label_classification"); None when not stated.
    problem_type: str | None = None
    notes: list[str] = field(default_factory=list)  # told to the user with the summary


def read_pretrained(directory: str | Path) -> BuiltModel:
    """A saved folder in one of the Hub's layouts, told apart by its ``config.json``: timm's
    (``architecture``, ``pretrained_cfg``), or transformers' (``architectures``,
    ``model_type``); its model with its weights, labels, preprocessing and problem_type."""
    import json

    from camserve.sources.timm import TimmSource
    from camserve.sources.transformers import TransformersSource

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        what = "a folder without config.json" if directory.is_dir() else "not a folder"
        raise FileNotFoundError(
            f"--pretrained {directory} is {what}; expected timm's save_for_hf or "
            "transformers' save_pretrained layout"
        )
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not JSON: {err}") from None
    if isinstance(config, dict) and ("architectures" in config or "model_type" in config):
        return TransformersSource().read_folder(directory, config)
    if isinstance(config, dict) and "architecture" in config:
        return TimmSource().read_folder(directory, config)
    raise ValueError(
        f"{config_path} is in neither Hub layout: timm's has 'architecture' and "
        "'pretrained_cfg', transformers' has 'architectures' and 'model_type'"
    )


def _sources() -> tuple[Source, ...]:
    from camserve.sources.timm import TimmSource
    from camserve.sources.torchvision import TorchvisionSource
    from camserve.sources.transformers import TransformersSource

    return TimmSource(), TransformersSource(), TorchvisionSource()


def source_of_architecture(architecture: str) -> Source:
    """The source an architecture name in model-config.yaml belongs to."""
    for source in _sources():
        if source.prefix is not None and architecture.startswith(source.prefix):
            return source
    from camserve.sources.torchvision import TorchvisionSource

    return TorchvisionSource()


def source_of_model(model: nn.Module) -> Source:
    """The source whose library defines ``model``'s class; the generic one otherwise."""
    for source in _sources():
        if source.owns(model):
            return source
    return Source()
