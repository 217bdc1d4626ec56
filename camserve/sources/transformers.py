"""Hugging Face transformers: a folder that ``save_pretrained`` wrote, for any
``AutoModelForImageClassification`` model whose last feature map reads as a grid.

The served archive holds ``config.json`` and ``model.safetensors`` as ``save_pretrained``
writes them; a worker loads them with ``from_pretrained(..., local_files_only=True)`` and no
code from the folder (``trust_remote_code`` stays off). The model returns an
``ImageClassifierOutput``; a forward hook on the model hands its ``.logits`` to every caller
(Grad-CAM, Captum, the probe, calibration), and module names stay the library's own.

Layers by family (docs/bring-your-own-model.md#timm-and-transformers-the-layer-per-family):
the token families at the last block's first norm when the head reads the class token (ViT,
DeiT, BEiT without mean pooling; DINOv2, whose head also reads the patch tokens' mean), or at
the final ``layernorm`` when it averages the final patch tokens (Swin, BEiT and Data2Vec-vision
with mean pooling); EfficientNet after its last convolution's normalisation and activation,
PoolFormer at the head's GroupNorm. The other families by what their head reads, from one
forward and backward pass: the final tokens it averages (I-JEPA, CLIP, SigLIP, FocalNet,
PVTv2), else, when it reads the class token only, the last LayerNorm whose patch tokens reach
it (CvT, PVT); the feature map its global pooling takes (BiT's final norm); else the last
convolutional feature map (ResNet, ConvNeXt, MobileNetV2, MobileViT...). Anything else is
refused.

The preprocessing is read from the folder's image processor and measured against it
(camserve.sources.verify): a setting camserve does not read is refused with numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path

import torch
from torch import nn

from camserve.architectures import first_line
from camserve.device import blank_input, model_device
from camserve.grid import NCHW, grid_size, token_layout
from camserve.layers import has_conv, hooks_on_every_module
from camserve.sources import BuiltModel, FixedInput, Source

# model_type -> tokens before the patch tokens (class, distillation), for the token families;
# DINOv2 with registers has config.num_register_tokens more.
TOKEN_FAMILIES = {
    "vit": 1, "vit_msn": 1, "deit": 2, "beit": 1, "data2vec-vision": 1, "dinov2": 1,
    "dinov2_with_registers": 1, "swin": 0, "swinv2": 0,
}  # fmt: skip
# Token families whose position embeddings fix the input size (CLIP-like towers: their
# vision_config's image_size and patch_size).
FIXED_GRID_FAMILIES = ("vit", "vit_msn", "deit", "ijepa", "clip", "metaclip_2", "siglip")
# The parameters holding the tokens a model puts before its patch tokens (class,
# distillation, register tokens; CLIP's class_embedding): outside the tables, their count is
# the prefix of a token layout.
LEARNED_TOKENS = re.compile(r"(cls|class|distillation|register)_(token|tokens|embedding)$")
# A block's first norm, in the token families that name it so.
BLOCK_NORMS = ("layernorm_before", "norm1")
# Convolutional families whose last feature map the CNN rule would not take as the head sees
# it: EfficientNet's before its normalisation and activation, PoolFormer's inside the last
# block's MLP branch (its blocks return tuples, which the rule passes over). The layer whose
# output the head averages instead.
CONV_FAMILY_LAYERS = {"efficientnet": "efficientnet.encoder.top_activation", "poolformer": "norm"}
# Modules that pool a feature map, globally when their output is 1x1.
POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# Image processor classes with a resize rule of their own that camserve reproduces
# (crop_pct); any other setting a class reads is caught by the measurement (verify.py).
CONVNEXT_PROCESSORS = ("ConvNextImageProcessor", "ConvNextImageProcessorPil")
POOLFORMER_PROCESSORS = ("PoolFormerImageProcessor", "PoolFormerImageProcessorPil")
# PIL's filter numbers -> the names camserve.preprocess (torchvision) gives them.
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class TransformersSource(Source):
    name = "transformers"
    package = "transformers"
    extra = "transformers"
    prefix = "transformers:"

    # --- serving ---------------------------------------------------------------------------

    def load(self, directory: Path, config, num_classes: int) -> nn.Module:
        self.require(config.built_with)
        class_name = config.architecture.removeprefix(self.prefix)
        return logits_only(self._from_pretrained(class_name, directory))

    def target_layer(self, model: nn.Module) -> str | None:
        config = model.config
        family = config.model_type
        if family in CONV_FAMILY_LAYERS:
            return CONV_FAMILY_LAYERS[family]
        if not _row_major_tokens(config):
            raise ValueError(
                f"{type(model).__name__} keeps its last stage's tokens in Hiera's unrolled order "
                f"(num_query_pool {config.num_query_pool} < {len(config.depths) - 1} stages "
                "after the first): no --target-layout reads them as a grid, so camserve cannot "
                "explain this model"
            )
        if family not in TOKEN_FAMILIES:
            return _token_layer(model) or _pooled_map(model)
        if _head_averages_final_patch_tokens(config):
            return f"{model.base_model_prefix}.layernorm"
        norms = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in BLOCK_NORMS]
        return norms[-1] if norms else None

    def layout(self, model: nn.Module, layer_name: str, shape: tuple[int, ...]) -> str | None:
        config = model.config
        if len(shape) == 3 and config.model_type in TOKEN_FAMILIES:
            registers = config.num_register_tokens if "registers" in config.model_type else 0
            return token_layout(TOKEN_FAMILIES[config.model_type] + int(registers))
        if len(shape) == 3 and _row_major_tokens(config):
            return token_layout(learned_tokens(model))
        return NCHW if len(shape) == 4 else None

    def fixed_input(self, model: nn.Module) -> FixedInput | None:
        if model.config.model_type not in FIXED_GRID_FAMILIES:
            return None
        config = _vision_config(model.config)
        size, patch = config.image_size, config.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return FixedInput((int(size[0]), int(size[1])), int(patch))

    # --- archiving -------------------------------------------------------------------------

    def read_folder(self, directory: Path, config: dict) -> BuiltModel:
        """A folder of ``save_pretrained``: the model, its labels, its image processor."""
        self.require()
        class_name = self._classifier_class(directory, config)
        model = logits_only(self._from_pretrained(class_name, directory))
        takes = next(iter(inspect.signature(model.forward).parameters), None)
        if takes == "input_ids":
            raise ValueError(
                f"{class_name} takes input_ids (text or colour tokens), not only an image: "
                "camserve serves image classifiers whose forward takes pixel_values"
            )
        id2label = model.config.id2label or {}
        labels = [str(id2label[i]) for i in sorted(id2label)] if id2label else None
        notes: list[str] = []
        preprocessing = processor_preprocessing(directory, notes)
        _check_runs_at(model, class_name, preprocessing.input_size)
        return BuiltModel(
            source=self,
            architecture=f"{self.prefix}{class_name}",
            model=model,
            labels=labels,
            labels_from="config.json id2label",
            preprocessing=preprocessing,
            problem_type=model.config.problem_type,
            notes=notes,
        )

    def save(self, model: nn.Module, out_dir: Path, labels: list[str]) -> tuple[str, str]:
        """transformers' own layout: (weights file, config file) in ``out_dir``."""
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        with _quiet():
            model.save_pretrained(out_dir, safe_serialization=True)
        return WEIGHTS_FILE, CONFIG_FILE

    def _classifier_class(self, directory: Path, config: dict) -> str:
        import transformers
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )

        if config.get("auto_map"):
            raise ValueError(
                f"{directory}/config.json needs code from the folder (auto_map): camserve does "
                "not run a model folder's code (trust_remote_code stays off)"
            )
        if config.get("model_type") == "timm_wrapper":
            raise ValueError(
                f"{directory} holds a timm model in transformers' TimmWrapper (its preprocessing "
                "is timm's, in config.json): save the timm model itself with "
                "timm.models.save_for_hf(model.timm_model, folder) and archive that folder"
            )
        known = {
            name
            for names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values()
            for name in ((names,) if isinstance(names, str) else names)
        }
        architectures = config.get("architectures") or []
        classifiers = [a for a in architectures if a in known and hasattr(transformers, a)]
        if not classifiers:
            raise ValueError(
                f"{directory}/config.json describes {', '.join(architectures) or 'no architecture'}"
                f" (model_type {config.get('model_type')!r}), not an image classifier: camserve "
                "serves AutoModelForImageClassification models (e.g. ViTForImageClassification)"
            )
        return classifiers[0]

    def _from_pretrained(self, class_name: str, directory: Path) -> nn.Module:
        """The model, strictly: every weight present, none left over, every shape equal."""
        import transformers

        model_class = getattr(transformers, class_name, None)
        if not (inspect.isclass(model_class) and issubclass(model_class, nn.Module)):
            raise ValueError(f"transformers {self.version()} has no model class {class_name}")
        try:
            with _quiet():
                model, info = model_class.from_pretrained(
                    directory,
                    local_files_only=True,
                    trust_remote_code=False,
                    ignore_mismatched_sizes=True,  # reported below, as one line
                    output_loading_info=True,
                )
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise ValueError(
                f"transformers cannot load {class_name} from {directory}: {first_line(err)}"
            ) from None
        problems = [
            f"{len(info[key])} {what} (e.g. {_keys(info[key])})"
            for key, what in (
                ("missing_keys", "missing weights"),
                ("unexpected_keys", "unexpected weights"),
                ("mismatched_keys", "weights of another shape"),
            )
            if info.get(key)
        ]
        if problems:
            raise ValueError(
                f"the weights in {directory} do not match its config.json ({class_name}): "
                + "; ".join(problems)
            )
        return model.eval()


def _row_major_tokens(config) -> bool:
    """Whether the final tokens are in row-major order. Hiera unrolls its mask units so that
    each query pooling is a reshape; only when every stage after the first pools (its released
    configurations) is its last stage's order row-major again."""
    if config.model_type != "hiera":
        return True
    return config.num_query_pool >= len(config.depths) - 1


def _check_runs_at(model: nn.Module, class_name: str, size: tuple[int, int]) -> None:
    """Refuse, in one line, a model that fails on its own processor's output size (position
    embeddings for another size: PVT, SigLIP, CLIP...), before the library's error would."""
    try:
        with torch.no_grad():
            model(blank_input(model, size))
    except (RuntimeError, ValueError) as err:
        built_for = "x".join(str(side) for side in _config_size(model.config))
        raise ValueError(
            f"{class_name} does not run on its image processor's {size[0]}x{size[1]} output "
            f"({first_line(err)}); its config.json says {built_for}: save the processor that "
            "makes the input the model was trained at"
        ) from None


def _config_size(config) -> tuple[int, int]:
    """The (H, W) the config was built for (224 when it does not say), to trace the model at."""
    side = getattr(_vision_config(config), "image_size", None) or 224
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


def _vision_config(config):
    """The config holding the image side: a CLIP-like model's vision_config, else its own."""
    return getattr(config, "vision_config", None) or config


def learned_tokens(model: nn.Module) -> int:
    """How many tokens the model's learned class, distillation and register tokens add."""
    return sum(
        parameter.shape[:-1].numel() if parameter.dim() > 1 else 1
        for name, parameter in model.named_parameters()
        if LEARNED_TOKENS.search(name)
    )


def _token_layer(model: nn.Module) -> str | None:
    """The layer of a family no table names, when its last modules work on token sequences
    (None: it ends on a convolutional map, for the CNN rule, or no layer qualifies).

    Read from one forward and backward pass at the config's image size. Among the modules
    whose output is a token sequence that reads as a grid (the learned tokens first,
    ``learned_tokens``) and that the explained logit depends on, those of the last one's
    length: the last of them if the logit reaches its patch tokens (the head pools them, as
    Swin's does: I-JEPA, SigLIP, CLIP, FocalNet, PVTv2); else the head reads the learned tokens
    only, and the layer is the last LayerNorm whose patch tokens the logit reaches, the last
    block's attention input, as for ViT (CvT and PVT, whose convolutions run inside the
    attention, so that the CNN rule would take a key or value projection)."""
    size = _config_size(model.config)
    prefix = learned_tokens(model)
    layout = token_layout(prefix)
    outputs: dict[str, tuple[int, torch.Tensor]] = {}
    last_map = -1
    counter = iter(range(1 << 30))
    linear: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, output) of nn.Linear

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            nonlocal last_map
            if not isinstance(output, torch.Tensor):
                return
            if isinstance(module, nn.Linear):
                linear.append((inputs[0], output))
            order = next(counter)
            if output.dim() == 3 and output.shape[-1] > 1:  # (N, C, 1): a pooled vector
                outputs[name] = (order, output)
            elif output.dim() == 4 and has_conv(module):
                last_map = order

        return hook

    # The input carries the gradient, so that frozen weights change nothing.
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(model_device(model)).requires_grad_()
    with hooks_on_every_module(model, record), torch.enable_grad():
        logits = model(x)  # the served model gives the logits; a fresh one its output
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        explained = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
        grids = [
            (order, name, output)
            for name, (order, output) in outputs.items()
            if output.requires_grad and grid_size(layout, tuple(output.shape), size) is not None
        ]
        if not grids:
            return None
        grids.sort(key=lambda item: item[0])
        gradients = torch.autograd.grad(explained, [item[2] for item in grids], allow_unused=True)
    # The sequences the logit depends on (not, e.g., SigLIP's attention-pooling head, which
    # runs but feeds nothing the classifier reads); the last one's length is the final stage's.
    used = [
        (order, name, output.shape[1], gradient)
        for (order, name, output), gradient in zip(grids, gradients, strict=True)
        if gradient is not None and bool(gradient.ne(0).any())
    ]
    if not used or used[-1][0] < last_map:
        return None  # no sequence reaches the head, or a convolutional map ends: the CNN rule
    final = [(name, gradient) for _, name, length, gradient in used if length == used[-1][2]]
    reached = [name for name, gradient in final if bool(gradient[:, prefix:].ne(0).any())]
    if reached and reached[-1] == final[-1][0]:
        # The head pools these tokens: only if its classifier's input is their mean is this
        # module's output what it pools (a block that returns a tuple leaves a branch of it,
        # e.g. Hiera's MLP branch before the residual sum, as the last sequence to finish).
        head = [inputs for inputs, output in linear if output is logits]
        if head and not _is_mean(outputs[reached[-1]][1][:, prefix:].detach(), head[-1]):
            raise ValueError(
                f"{type(model).__name__}'s head pools token sequences that no single module "
                "outputs (its blocks return tuples): name the layer with --target-layer and "
                "its layout with --target-layout"
            )
        return reached[-1]
    norms = [name for name in reached if isinstance(model.get_submodule(name), nn.LayerNorm)]
    return norms[-1] if norms else None


def _is_mean(tokens: torch.Tensor, head_input: torch.Tensor) -> bool:
    """Whether ``head_input`` (N, C) is the mean of ``tokens`` (N, L, C), up to float32."""
    mean, head_input = tokens.mean(dim=1), head_input.detach().flatten(1)
    if mean.shape != head_input.shape:
        return False
    scale = float(head_input.abs().max().clamp_min(1e-12))
    return bool((mean - head_input).abs().max() <= 1e-4 * scale)


def _pooled_map(model: nn.Module) -> str | None:
    """The module whose (N, C, h, w) output the head's global pooling takes, in the families no
    table names (None: no such pooling, for the CNN rule). The CNN rule needs a convolution, so
    it would pass over a final normalisation and activation: BiT's pre-activation ``bit.norm``
    (as EfficientNet's ``top_activation``, which its table names)."""
    size = _config_size(model.config)
    produced: list[tuple[str, torch.Tensor]] = []
    pooled: list[tuple[torch.Tensor, int]] = []  # (a global pool's input, maps made before it)
    maps = 0

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            nonlocal maps
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                return
            produced.append((name, output))
            if isinstance(module, POOLS) and output.shape[-2:] == (1, 1):
                pooled.append((inputs[0], maps))
            elif output.shape[-2:] != (1, 1) and has_conv(module):
                maps += 1

        return hook

    with hooks_on_every_module(model, record), torch.no_grad():
        model(blank_input(model, size))
    if not pooled or pooled[-1][1] != maps:  # a feature map after the last global pool
        return None
    sources = [name for name, output in produced if output is pooled[-1][0]]
    return sources[-1] if sources else None  # the last to finish: the outermost module


def _head_averages_final_patch_tokens(config) -> bool:
    """Whether the head reads the final layer's patch tokens only through their mean: then
    the final ``layernorm`` (an ``Identity`` in BEiT with mean pooling) is the layer. The other
    token families read the class token (ViT, DeiT, BEiT without mean pooling), or the class
    token next to the patch tokens' mean (DINOv2): their layer is the last block's first norm,
    where the patch tokens also carry what the class token gathers in the last block."""
    if config.model_type in ("swin", "swinv2"):
        return True
    return config.model_type in ("beit", "data2vec-vision") and bool(config.use_mean_pooling)


def logits_only(model: nn.Module) -> nn.Module:
    """Make ``model(x)`` return the logits tensor instead of an ``ImageClassifierOutput``."""
    if not getattr(model, "_camserve_logits_only", False):
        model.register_forward_hook(_logits)
        model._camserve_logits_only = True
    return model


def _logits(module: nn.Module, inputs: tuple, output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def processor_preprocessing(directory: Path, notes: list[str] | None = None):
    """The folder's image processor, as ``AutoImageProcessor`` loads it, as a
    ``Preprocessing``: read from its settings, then measured against the processor's own
    output (camserve.sources.verify) and refused when they differ. ``notes`` gets the
    measured difference."""
    from transformers import AutoImageProcessor
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    from camserve.sources.verify import verified_note, verify_preprocessing

    if not (directory / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no preprocessor_config.json: save the image processor next to "
            "the model (processor.save_pretrained(folder))"
        )
    try:
        with _quiet():
            processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"transformers cannot read {directory}/preprocessor_config.json: {first_line(err)}"
        ) from None
    kind = type(processor).__name__
    if not isinstance(processor, TorchvisionBackend | PilBackend):
        raise ValueError(
            f"{kind} is neither of transformers' torchvision and PIL image processors: camserve "
            "reproduces the processors that resize, centre-crop, rescale and normalise"
        )
    try:
        ours = _read_processor(processor, kind, isinstance(processor, TorchvisionBackend))
    except (AttributeError, KeyError, TypeError) as err:  # a setting of another shape
        raise ValueError(
            f"{kind}: camserve cannot read its settings as resize, crop, rescale and normalise "
            f"({first_line(err)}): camserve does not reproduce this preprocessing"
        ) from None

    def theirs(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    worst = verify_preprocessing(ours, theirs, kind)
    if notes is not None:
        notes.append(verified_note(kind, worst))
    return ours


def _read_processor(processor, kind: str, tensor_backend: bool):
    """A ``Preprocessing`` from the processor's settings; refused when they have no fixed
    output size (camserve batches one input size)."""
    from transformers.image_utils import pil_torch_interpolation_mapping

    from camserve.preprocess import Preprocessing

    if not processor.do_resize or getattr(processor, "do_pad", False):
        raise ValueError(f"{kind}: camserve needs do_resize true and do_pad false")
    size = processor.size
    if size is None:
        raise ValueError(
            f"{kind} has no size: it does not resize to one image size (it may cut patches of "
            "its own); camserve needs height and width, or a shortest edge with a centre crop"
        )
    crop = (
        (processor.crop_size.height, processor.crop_size.width)
        if getattr(processor, "do_center_crop", False)
        else None
    )
    crop_pct = getattr(processor, "crop_pct", None)
    if kind in CONVNEXT_PROCESSORS:
        edge, crop_pct = size.shortest_edge, crop_pct or 224 / 256
        if edge < 384:  # ConvNeXt's rule: shorter side to edge / crop_pct, crop edge x edge
            resize, crop = int(edge / crop_pct), (edge, edge)
        else:  # at 384 and above it warps to edge x edge
            resize = (edge, edge)
    elif kind in POOLFORMER_PROCESSORS and crop_pct is not None:
        # PoolFormer's rule: the size divided by crop_pct, a square one as the shorter side
        if size.shortest_edge or size.height == size.width:
            resize = int((size.shortest_edge or size.height) / crop_pct)
        else:
            resize = (int(size.height / crop_pct), int(size.width / crop_pct))
    elif size.height and size.width:
        resize = (size.height, size.width)
    elif size.shortest_edge and not size.longest_edge and crop:
        resize = size.shortest_edge
    else:
        raise ValueError(
            f"{kind} resizes to {dict(size)} without a fixed output size: camserve needs "
            "height and width, or a shortest edge with a centre crop"
        )
    resample = processor.resample
    # Each backend's own reading of the PIL filter number (torchvision's: NEAREST_EXACT...).
    mode = (
        pil_torch_interpolation_mapping[resample].value
        if tensor_backend
        else PIL_FILTERS[int(resample)]
    )
    mean = processor.image_mean if processor.do_normalize else 0.0
    std = _three(processor.image_std if processor.do_normalize else 1.0)
    if getattr(processor, "include_top", False):  # EfficientNet divides by std once more
        std = tuple(s * t for s, t in zip(std, _three(processor.image_std), strict=True))
    return Preprocessing(
        input_size=crop or resize,
        resize=resize,
        center_crop=crop,
        mean=_three(mean),
        std=std,
        interpolation=mode,
        crop_offset="floor",
        rescale_factor=float(processor.rescale_factor) if processor.do_rescale else 1.0,
        backend="tensor" if tensor_backend else "pil",
        # MobileViT's checkpoints take BGR: its processors flip the channels last
        channel_order="bgr" if getattr(processor, "do_flip_channel_order", False) else "rgb",
    )


def _three(value) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values (R G B), got {values}")
    return tuple(values)


def _keys(entries) -> str:
    """A few state_dict keys of a loading report (mismatches come as (key, shapes) tuples)."""
    names = sorted(entry[0] if isinstance(entry, tuple) else str(entry) for entry in entries)
    return ", ".join(names[:3])


@contextlib.contextmanager
def _quiet():
    """transformers' load reports and progress bars off: camserve says what went wrong."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
