"""timm (PyTorch Image Models): a model by name with weights, or a folder in the Hub's layout.

The served archive holds the folder that ``timm.models.save_for_hf`` writes (``config.json``
with the architecture, its arguments and ``pretrained_cfg``; ``model.safetensors``), and a
worker rebuilds it with ``timm.create_model("local-dir:...")``: nothing is downloaded.

- The Grad-CAM layer is the first of these whose output reads as a grid that gets gradient
  from the explained logit: the map ``forward_features`` returns when it is one (EfficientNet's
  ``bn2``, Swin's ``norm``); the module of timm's own ``feature_info`` (the last feature
  map); the last ``norm1`` inside it (ViT, DeiT, EVA: after their last block only the class
  token reaches the head); the final ``norm``. The layout comes from ``output_fmt``,
  ``feature_info``'s channel count and the input's grid (``TimmSource.layout``); a model
  none of them fits is refused with the reason for each (``harness.sweep_timm`` checks one
  model of every timm family).
- The preprocessing is timm's data config (``resolve_data_config``: input size,
  interpolation, ``crop_pct``, ``crop_mode``, mean, std), which ``create_transform`` turns
  into a resize of the PIL image, a centre crop (offsets rounded) and a normalisation; the
  archive measures camserve's reading of it against ``create_transform`` (verify.py).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from torch import nn

from camserve.grid import NCHW, NHWC, grid_size, token_layout
from camserve.sources import BuiltModel, FixedInput, Source

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


class TimmSource(Source):
    name = "timm"
    package = "timm"
    extra = "timm"
    prefix = "timm:"

    # --- serving ---------------------------------------------------------------------------

    def load(self, directory: Path, config, num_classes: int) -> nn.Module:
        from camserve.architectures import load_weights, read_state_dict

        timm = self.require(config.built_with)
        model = timm.create_model(f"local-dir:{directory}", pretrained=False)
        return load_weights(model, read_state_dict(directory / config.weights))

    def target_layer(self, model: nn.Module) -> str | None:
        """The first of ``head_input`` and ``feature_layers`` whose output reads as a grid
        that gets gradient from the explained logit: the map the head reads when it is one,
        else the last ``feature_info`` module, the last ``norm1`` inside it (after a ViT's
        last block only the class token reaches the head; PiT's stage returns a tuple), the
        final ``norm``. None of them: refused with the reason of each."""
        from camserve.grid import LAYOUTS, grid_tap

        candidates = list(dict.fromkeys([*head_input(model), *feature_layers(model)]))
        if not candidates:
            return None
        problems = []
        for name in candidates:
            try:
                with grid_tap(model, name, _input_size(model)):
                    return name
            except ValueError as err:
                problems.append(str(err).split(". ")[0])
        raise ValueError(
            f"cannot pick a target layer of timm's {type(model).__name__} automatically: "
            f"{'; '.join(problems)}. Name one with --target-layer and its layout with "
            f"--target-layout ({', '.join(LAYOUTS)})"
        )

    def layout(self, model: nn.Module, layer_name: str, shape: tuple[int, ...]) -> str | None:
        """Channels last when the model says ``output_fmt`` NHWC or its channel count
        (``feature_info``'s ``num_chs``) is the last axis; tokens after ``num_prefix_tokens``
        prefix tokens, else after none (CaiT and XCiT add the class token after the layer)
        or one (CoaT has a class token but no ``num_prefix_tokens``): whichever gives the
        input's grid."""
        channels = _feature_channels(model)
        if len(shape) == 4:
            nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC" or (
                channels is not None and shape[1] != channels and shape[3] == channels
            )
            return NHWC if nhwc else NCHW
        if len(shape) == 3 and channels in (None, shape[2]):
            size = _input_size(model)
            prefixes = (int(getattr(model, "num_prefix_tokens", 0) or 0), 0, 1)
            for prefix in dict.fromkeys(prefixes):
                if grid_size(token_layout(prefix), shape, size) is not None:
                    return token_layout(prefix)
        return None

    def fixed_input(self, model: nn.Module) -> FixedInput | None:
        embed = getattr(model, "patch_embed", None)
        if embed is None or not getattr(embed, "strict_img_size", False):
            return None
        size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
        if not size or not patch:
            return None
        return FixedInput((int(size[0]), int(size[1])), int(patch[0]))

    # --- archiving -------------------------------------------------------------------------

    def build(
        self,
        name: str,
        weights: str | Path,
        input_size: tuple[int, int] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> BuiltModel:
        """``timm.create_model(name)`` with the head the weights have, and the weights.

        ``input_size``, ``mean`` and ``std`` override the pretrained config's, as timm's own
        scripts do; a ViT is then built for that size (its position embeddings fix it)."""
        from camserve.architectures import load_weights, read_checkpoint

        timm = self.require()
        self._check_name(timm, name)
        state, key = read_checkpoint(weights)
        overlay = {
            k: v
            for k, v in (
                ("input_size", (3, *input_size) if input_size else None),
                ("mean", tuple(mean) if mean else None),
                ("std", tuple(std) if std else None),
            )
            if v is not None
        }
        num_classes = self._num_classes(timm, name, state, weights)
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=overlay
        )
        mismatch_hint(model, state, input_size)
        if input_size is not None:
            default_size_hint(timm, name, num_classes, model, state, input_size)
        load_weights(model, state)
        check_runs(model.eval(), name, input_size is not None)
        notes = [f"weights: {key} of the checkpoint"] if key else []
        return self._built(name, model, *self._imagenet_labels(model), notes)

    def read_folder(self, directory: Path, config: dict) -> BuiltModel:
        """A folder written by ``timm.models.save_for_hf`` (or downloaded from the Hub)."""
        from camserve.architectures import (
            first_line,
            load_weights,
            read_state_dict,
            state_dict_mismatch,
            with_shared_tensors,
        )

        timm = self.require()
        name = config.get("architecture")
        if not isinstance(name, str) or not timm.is_model(name):
            raise ValueError(
                f"{directory}/config.json names the timm architecture {name!r}, which timm "
                f"{self.version()} does not know"
            )
        classes = config.get("num_classes", (config.get("pretrained_cfg") or {}).get("num_classes"))
        if not classes:
            raise ValueError(
                f"{directory}/config.json describes {name} without a classifier "
                f"(num_classes {classes}): camserve explains image classifiers"
            )
        try:
            model = timm.create_model(f"local-dir:{directory}", pretrained=False)
        except (TypeError, ValueError, RuntimeError, KeyError) as err:
            raise ValueError(
                f"timm cannot build {name} from {directory}/config.json: {first_line(err)}"
            ) from None
        weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(
                f"{directory} holds no weights ({', '.join(WEIGHT_FILES)}) next to config.json"
            )
        state = with_shared_tensors(model, read_state_dict(weights))
        problem = state_dict_mismatch(model, state)
        if problem:
            raise ValueError(
                f"the weights in {directory} do not match its config.json ({name}): {problem}"
            )
        load_weights(model, state)
        names = model.pretrained_cfg.get("label_names")
        if names:
            labels = _label_list(names, model.num_classes, directory), "config.json"
        else:
            labels = self._imagenet_labels(model)
        return self._built(name, model, *labels)

    def _built(self, name: str, model: nn.Module, labels, labels_from: str, notes=()) -> BuiltModel:
        notes = list(notes)
        return BuiltModel(
            source=self,
            architecture=f"{self.prefix}{name}",
            model=model.eval(),
            labels=labels,
            labels_from=labels_from,
            preprocessing=self.preprocessing(model, notes),
            notes=notes,
        )

    def preprocessing(self, model: nn.Module, notes: list[str] | None = None):
        """The model's data config (timm.data.resolve_data_config) as a ``Preprocessing``,
        measured against ``timm.data.create_transform`` of that config and refused when they
        differ (camserve.sources.verify); ``notes`` gets the measured difference."""
        from timm.data import create_transform, resolve_data_config

        from camserve.sources.verify import verified_note, verify_preprocessing

        config = resolve_data_config({}, model=model)
        ours = data_config_preprocessing(config)
        architecture = model.pretrained_cfg.get("architecture", type(model).__name__)
        name = f"timm's create_transform for {architecture}"
        worst = verify_preprocessing(ours, create_transform(**config), name)
        if notes is not None:
            notes.append(verified_note(name, worst))
        return ours

    def save(self, model: nn.Module, out_dir: Path, labels: list[str]) -> tuple[str, str]:
        """timm's own folder layout: (weights file, config file) in ``out_dir``, as
        ``timm.models.save_for_hf`` writes it, but with safetensors' ``save_model``: it
        stores a tensor shared under several names once (CoaT), where ``save_file`` refuses."""
        from safetensors.torch import save_model
        from timm.models._hub import save_config_for_hf

        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(out_dir / "model.safetensors"))
        save_config_for_hf(model, out_dir / "config.json", model_config={"label_names": labels})
        return "model.safetensors", "config.json"

    def _check_name(self, timm, name: str) -> None:
        from timm.models import split_model_name_tag

        base, tag = split_model_name_tag(name)
        if not timm.is_model(base):
            close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown timm model {base!r}{hint}; see timm.list_models()")
        if tag and name not in timm.list_pretrained(name):
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
            raise ValueError(
                f"timm has no pretrained config {tag!r} for {base}; its tags: "
                f"{', '.join(tags) or 'none'}"
            )

    def _num_classes(self, timm, name: str, state: dict, weights) -> int:
        from timm.models import get_pretrained_cfg_value

        head = get_pretrained_cfg_value(name, "classifier") or "head"
        head = head[0] if isinstance(head, tuple | list) else head
        weight = state.get(f"{head}.weight")
        if weight is None or weight.dim() < 2:
            raise ValueError(
                f"{weights} has no classifier weight {head}.weight, which timm's {name} has: "
                f"are these weights for another model, or a model without a head?"
            )
        return int(weight.shape[0])

    def _imagenet_labels(self, model: nn.Module) -> tuple[list[str] | None, str]:
        """ImageNet class names shipped inside timm, when the head has ImageNet's size."""
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None, ""
        info = ImageNetInfo(subset)
        return (
            [info.index_to_description(i) for i in range(model.num_classes)],
            f"{subset} class names shipped with timm",
        )


def head_input(model: nn.Module) -> list[str]:
    """The module whose (N, C, h, w) or channels-last output ``forward_features`` returns,
    the map ``forward_head`` reads: EfficientNet's ``bn2`` after its last convolution, which
    ``feature_info`` leaves out; Swin's final ``norm``. Empty for token sequences (the
    head may read the class token alone) and when a functional step (a reshape, a
    concatenation) comes after the last module."""
    import torch

    from camserve.device import blank_input
    from camserve.layers import hooks_on_every_module

    forward_features = getattr(model, "forward_features", None)
    if forward_features is None:
        return []
    finished: list[tuple[str, object]] = []

    def record(name: str):
        return lambda module, inputs, output: finished.append((name, output))

    try:
        with hooks_on_every_module(model, record), torch.no_grad():
            features = forward_features(blank_input(model, _input_size(model)))
    except Exception:  # noqa: BLE001 - then feature_info alone decides
        return []
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        # Tokens: the head may read the class token alone (ViT), or a 1-token sequence (PiT).
        return []
    names = [name for name, output in finished if output is features]
    passing = (nn.Sequential, nn.ModuleList, nn.Identity)
    preferred = [n for n in names if n in feature_layers(model)[:1]]
    # Else the outermost module that does more than pass it on (bn2, not bn2.act nor stages).
    modules = [n for n in names if not isinstance(model.get_submodule(n), passing)]
    return preferred or modules[-1:]


def feature_layers(model: nn.Module) -> list[str]:
    """The Grad-CAM layers to try, in order: the last ``feature_info`` module (its last
    block when it is a ``ModuleList``, which is never called itself), the last ``norm1``
    inside it (the first norm of its last transformer block), then the model's final
    ``norm``, whose tokens the head pools (MViTv2, whose stages return tuples)."""
    info = getattr(model, "feature_info", None)
    if not info:
        return []
    modules = dict(model.named_modules())
    name = info[-1]["module"]
    if name not in modules:
        # A few models' feature_info misspells the module (Twins: "block.3" for "blocks.3").
        close = difflib.get_close_matches(name, list(modules), n=1, cutoff=0.9)
        name = close[0] if close else None
    layers = []
    if name is not None:
        module = modules[name]
        if isinstance(module, nn.ModuleList) and len(module):
            name, module = f"{name}.{len(module) - 1}", module[-1]
        norms = [n for n, m in module.named_modules() if n.rpartition(".")[2] == "norm1"]
        layers = [name] + [f"{name}.{n}" for n in norms[-1:]]
    final = modules.get("norm")
    if final is not None and not isinstance(final, nn.Identity):
        layers.append("norm")
    return layers


def _feature_channels(model: nn.Module) -> int | None:
    info = getattr(model, "feature_info", None)
    return int(info[-1]["num_chs"]) if info and info[-1].get("num_chs") else None


def _input_size(model: nn.Module) -> tuple[int, int]:
    """The input size the model was built for (its data config, --input-size included)."""
    _, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return int(height), int(width)


def data_config_preprocessing(config: dict):
    """timm's ``transforms_imagenet_eval`` for a data config, as a ``Preprocessing``."""
    from timm.data import DEFAULT_CROP_PCT
    from timm.data.transforms import str_to_interp_mode

    from camserve.preprocess import Preprocessing

    _, height, width = config["input_size"]
    crop_pct = config.get("crop_pct") or DEFAULT_CROP_PCT
    mode = config.get("crop_mode") or "center"
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if mode not in ("center", "squash"):
        raise ValueError(
            f"timm's crop_mode {mode!r} (resize the longer side, then pad) is not supported; "
            "camserve reproduces 'center' and 'squash'"
        )
    keep_ratio = mode == "center" and scale[0] != scale[1]
    return Preprocessing(
        input_size=(height, width),
        # center: the shorter side (a square target) or timm's ResizeKeepRatio; squash: (H, W)
        resize=scale[0] if mode == "center" and not keep_ratio else scale,
        center_crop=(height, width),
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
        interpolation=str_to_interp_mode(config["interpolation"]).value,
        keep_ratio=keep_ratio,
    )


def check_runs(model: nn.Module, name: str, size_given: bool) -> None:
    """Refuse, in one line, a model that does not run at its input size: window sizes,
    attention biases or asserts fix the size of some families (Swin, LeViT, EfficientFormer),
    and their error would otherwise surface as a traceback."""
    import torch
    from timm.models import get_pretrained_cfg_value

    from camserve.architectures import first_line
    from camserve.device import blank_input

    height, width = _input_size(model)
    try:
        with torch.no_grad():
            model(blank_input(model, (height, width)))
    except Exception as err:  # noqa: BLE001 - whatever the library raises becomes one line
        default = (get_pretrained_cfg_value(name, "input_size") or (3, height, width))[1:]
        hint = f"; give an --input-size it accepts (its default is {default[0]}x{default[1]})"
        raise ValueError(
            f"timm's {name} does not run at input size {height}x{width} "
            f"({type(err).__name__}: {first_line(err)}){hint if size_given else ''}"
        ) from None


def default_size_hint(
    timm, name: str, num_classes: int, model: nn.Module, state: dict, input_size: tuple[int, int]
) -> None:
    """Refuse weights that fit the model at its default input size but not at the given
    one (attention biases and relative position tables of LeViT, Swin... depend on it)."""
    import torch

    from camserve.architectures import state_dict_mismatch, with_shared_tensors

    if state_dict_mismatch(model, with_shared_tensors(model, state)) is None:
        return
    with torch.device("meta"):
        default = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if state_dict_mismatch(default, state) is None:
        _, height, width = default.pretrained_cfg["input_size"]
        raise ValueError(
            f"the weights fit {name} at its default input size {height}x{width}, not at "
            f"--input-size {'x'.join(map(str, input_size))}: some of its tensors depend on "
            "the input size; drop --input-size"
        )


def mismatch_hint(model: nn.Module, state: dict, input_size: tuple[int, int] | None) -> None:
    """Refuse position embeddings for another input size with the option that fixes it."""
    from camserve.architectures import state_dict_mismatch

    ours, theirs = model.state_dict().get("pos_embed"), state.get("pos_embed")
    if ours is None or theirs is None or ours.shape == theirs.shape:
        return
    problem = state_dict_mismatch(model, state)
    raise ValueError(
        f"the weights' position embeddings have {theirs.shape[1]} tokens, the model built for "
        f"{'--input-size ' + 'x'.join(map(str, input_size)) if input_size else 'its default size'}"
        f" has {ours.shape[1]}: give the --input-size the weights were trained at ({problem})"
    )


def _label_list(names, count: int, directory: Path) -> list[str]:
    if isinstance(names, dict):
        names = {int(k): str(v) for k, v in names.items()}
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{directory}/config.json label_names skip class indices")
        names = [names[i] for i in range(len(names))]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(
            f"{directory}/config.json has {len(names)} label_names for {count} classes"
        )
    return names
