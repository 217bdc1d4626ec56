"""Build a classifier by name: the embedded ``shapes_net``, a torchvision model, or a custom class."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from camserve.shapes.net import ShapesNet

SHAPES_NET = "shapes_net"


def build_model(
    architecture: str,
    num_classes: int,
    model_file: str | Path | None = None,
    model_class: str | None = None,
) -> nn.Module:
    """An untrained model of the named architecture with ``num_classes`` outputs."""
    if architecture == SHAPES_NET:
        return ShapesNet(num_classes=num_classes)
    if model_file is not None:
        return _custom_model(Path(model_file), model_class or architecture, num_classes)
    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown architecture {architecture!r}; use {SHAPES_NET!r}, a torchvision "
            "classification model (torchvision.models.list_models()), or a model file + class"
        )
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)


def _custom_model(model_file: Path, class_name: str, num_classes: int) -> nn.Module:
    module_name = f"camserve_user_model_{model_file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, model_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import a model from {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{model_file} defines no nn.Module subclass named {class_name!r}")
    try:
        return cls(num_classes=num_classes)
    except TypeError:
        return cls()


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """Load a state_dict with ``weights_only=True``; a pickled module is refused."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError and others
        raise ValueError(
            f"{weights} is not a plain state_dict loadable with weights_only=True "
            f"(pickled modules and code are refused): {err}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds a {type(state).__name__}, expected a state_dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match the architecture: {err}") from None
    return model
