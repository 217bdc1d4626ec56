"""Build a classifier by name (a torchvision model, or a custom class from a model file), and
read weights: safetensors, state_dicts and training checkpoints, never pickled code."""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import math
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn


def build_model(
    architecture: str,
    num_classes: int,
    model_file: str | Path | None = None,
    model_class: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """An untrained model of the named architecture with ``num_classes`` outputs, built with
    the torchvision constructor arguments that ``state``'s keys and shapes fix."""
    if model_file is not None:
        return _custom_model(Path(model_file), model_class or architecture, num_classes)
    known = torchvision.models.list_models(module=torchvision.models)
    if architecture not in known:
        close = difflib.get_close_matches(architecture, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown architecture {architecture!r}{hint}; use a torchvision "
            "classification model (torchvision.models.list_models()), or a model file + class"
        )
    options = constructor_options(architecture, state)
    return torchvision.models.get_model(
        architecture, weights=None, num_classes=num_classes, **options
    )


def constructor_options(architecture: str, state: dict[str, torch.Tensor] | None) -> dict:
    """torchvision constructor arguments that change a state_dict, read back from one.

    - googlenet and inception_v3: ``aux_logits``. torchvision's own ImageNet weights drop
      the auxiliary heads, so their state_dicts have no ``aux1.``/``AuxLogits.`` keys.
    - vit_*: ``image_size``, from the position embeddings (1 + (size / patch)^2 tokens),
      and ``representation_size`` when the head has a ``pre_logits`` layer.
    """
    if not state:
        return {}
    options: dict = {}
    if architecture in ("googlenet", "inception_v3"):
        aux = "aux1." if architecture == "googlenet" else "AuxLogits."
        options["aux_logits"] = any(key.startswith(aux) for key in state)
        options["init_weights"] = False  # the weights replace it at once
    if architecture.startswith("vit_"):
        positions, patches = state.get("encoder.pos_embedding"), state.get("conv_proj.weight")
        if positions is not None and patches is not None and positions.dim() == 3:
            side = math.isqrt(positions.shape[1] - 1)
            if side * side == positions.shape[1] - 1:
                options["image_size"] = side * int(patches.shape[-1])
        pre_logits = state.get("heads.pre_logits.weight")
        if pre_logits is not None:
            options["representation_size"] = int(pre_logits.shape[0])
    return options


def check_input_size(model: nn.Module, input_size: tuple[int, int]) -> None:
    """Refuse an input size other than the one the weights were trained for."""
    from camserve.sources import source_of_model

    fixed = source_of_model(model).fixed_input(model)
    if fixed is not None and tuple(input_size) != tuple(fixed.size):
        (h, w), (given_h, given_w) = fixed.size, input_size
        raise ValueError(
            f"{type(model).__name__} weights were trained at {h}x{w} ({fixed.describe()}), "
            f"but the input size is {given_h}x{given_w}: use --input-size "
            f"{h if h == w else f'{h}x{w}'}"
        )


def _custom_model(model_file: Path, class_name: str, num_classes: int) -> nn.Module:
    module = _import_model_file(model_file)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{model_file} defines no nn.Module subclass named {class_name!r}")
    try:
        return cls(num_classes=num_classes)
    except TypeError:
        return cls()


def _import_model_file(model_file: Path):
    """Import a model file once per process: every model built from it shares one class."""
    module_name = f"camserve_user_model_{model_file.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")) == model_file.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(module_name, model_file.resolve())
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import a model from {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# Where training scripts keep the weights inside a checkpoint, in the order timm's own
# loader prefers them (its default use_ema=True): the EMA copy when there is one.
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``weights``; see ``read_checkpoint``."""
    return read_checkpoint(weights)[0]


def read_checkpoint(weights: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state_dict, the checkpoint key it came from or None) from a ``.safetensors`` file, a
    state_dict, or a training checkpoint that holds one.

    Nothing runs code: safetensors holds tensors only, and ``torch.load`` runs with
    ``weights_only=True``, admitting ``argparse.Namespace`` alone (the ``args`` of timm's
    and torchvision's training checkpoints). A checkpoint is unwrapped at the first of
    ``CHECKPOINT_KEYS`` it has; ``module.`` and ``_orig_mod.`` prefixes are dropped.
    """
    weights = Path(weights)
    if is_safetensors(weights):
        return _read_safetensors(weights), None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError and others
        raise ValueError(
            f"{weights} is neither safetensors nor a state_dict loadable with weights_only=True "
            f"(pickled modules and code are refused): {first_line(err)}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds a {type(state).__name__}, expected a state_dict")
    key = next((k for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), None)
    if key is not None:
        state = state[key]
    elif not all(isinstance(v, torch.Tensor) for v in state.values()):
        others = ", ".join(sorted(str(k) for k in state)[:6])
        raise ValueError(
            f"{weights} is a checkpoint without a state_dict (its keys: {others}); expected "
            f"one of {', '.join(CHECKPOINT_KEYS)}, or a plain state_dict"
        )
    return _without_wrapper_prefixes(state), key


def first_line(err: BaseException) -> str:
    """A library's error as one line (the command line prints one line, no traceback)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's header: a little-endian length, then JSON."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(
            f"{path} is a safetensors file, but the safetensors package is missing: "
            "pip install safetensors"
        ) from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def _without_wrapper_prefixes(state: dict) -> dict:
    """Drop the prefixes that wrap every key, in any order (compiled DDP: both)."""

    def wrapping(prefix: str) -> bool:
        return all(isinstance(k, str) and k.startswith(prefix) for k in state)

    while state and (prefix := next(filter(wrapping, WRAPPER_PREFIXES), None)):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, weights: str | Path | dict[str, torch.Tensor]) -> nn.Module:
    """Load a state_dict (a file, read by ``read_state_dict``, or a dict), strictly."""
    state = weights if isinstance(weights, dict) else read_state_dict(weights)
    # The per-module format versions torch.save keeps; safetensors and plain dicts carry
    # none, which some modules refuse (torchvision's MNASNet): they get the model's own,
    # those of the layout the keys and shapes are checked against below.
    metadata = getattr(state, "_metadata", None) or model.state_dict()._metadata
    state = OrderedDict(with_shared_tensors(model, state))
    state._metadata = metadata
    problems = state_dict_mismatch(model, state)
    if problems:
        raise ValueError(
            f"{'the weights' if isinstance(weights, dict) else weights} do not match "
            f"{type(model).__name__}: {problems}"
        )
    model.load_state_dict(state, strict=True)
    return model


def with_shared_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """``state`` with the names it lacks of a tensor the model holds under several names.

    ``safetensors.torch.save_model`` (and the Hub's files) store a shared tensor once:
    tied weights, or CoaT's position encodings shared by the blocks of a stage."""
    names: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        if tensor.device.type != "meta" and tensor.numel():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            names.setdefault(where, []).append(name)
    filled = dict(state)
    for group in names.values():
        present = next((n for n in group if n in state), None)
        if present is not None:
            filled.update({n: state[present] for n in group if n not in state})
    return filled


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """A short account of missing, unexpected and wrongly shaped keys; None if they match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("keys with other shapes", shapes),
        )
        if items
    ]
    if not parts:
        return None
    return "; ".join(parts) + " - are these weights for another architecture?"


def infer_num_classes(architecture: str, state: dict[str, torch.Tensor]) -> int:
    """The class count of a torchvision state_dict: the size its head has where the
    1000-class reference model has 1000 (1000 when nothing differs)."""
    reference = build_model(architecture, 1000, state=state).state_dict()
    for key, tensor in reference.items():
        theirs = state.get(key)
        if (
            tensor.dim() >= 1
            and tensor.shape[0] == 1000
            and isinstance(theirs, torch.Tensor)
            and theirs.dim() == tensor.dim()
            and theirs.shape[1:] == tensor.shape[1:]
        ):
            return int(theirs.shape[0])
    return 1000


def imagenet_categories(architecture: str) -> list[str] | None:
    """The 1000 ImageNet labels from torchvision's weight metadata (no download needed)."""
    try:
        weights_enum = torchvision.models.get_model_weights(architecture)
    except (ValueError, KeyError):
        return None
    for weights in weights_enum:
        categories = weights.meta.get("categories")
        if categories and len(categories) == 1000:
            return list(categories)
    return None
