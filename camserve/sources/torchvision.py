"""torchvision classifiers by name, and custom classes from a model file (camserve.architectures).

Swin and ViT are read by family: Swin's final ``norm`` is channels last, and after ViT's last
block only the class token reaches the head, so its map is taken at the last block's ``ln_1``
(docs/bring-your-own-model.md says why).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from camserve.grid import CLS_TOKENS, NCHW, NHWC
from camserve.sources import FixedInput, Source


class TorchvisionSource(Source):
    name = "torchvision"
    package = "torchvision"

    def target_layer(self, model: nn.Module) -> str | None:
        from torchvision.models.swin_transformer import SwinTransformer
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, SwinTransformer):
            return "norm"
        if isinstance(model, VisionTransformer):
            last = list(model.encoder.layers.named_children())[-1][0]
            return f"encoder.layers.{last}.ln_1"
        return None

    def layout(self, model: nn.Module, layer_name: str, shape: tuple[int, ...]) -> str | None:
        from torchvision.models.swin_transformer import SwinTransformer
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, SwinTransformer):
            # features.* and norm are channels last; permute turns them into (N, C, h, w).
            inside = layer_name in ("features", "norm") or layer_name.startswith("features.")
            return NHWC if inside and len(shape) == 4 else NCHW
        if isinstance(model, VisionTransformer):
            return CLS_TOKENS if layer_name.startswith("encoder") and len(shape) == 3 else NCHW
        return super().layout(model, layer_name, shape)

    def fixed_input(self, model: nn.Module) -> FixedInput | None:
        from torchvision.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):
            return FixedInput((model.image_size, model.image_size), model.patch_size)
        return None

    def load(self, directory: Path, config, num_classes: int) -> nn.Module:
        from camserve.architectures import build_model, load_weights, read_state_dict

        state = read_state_dict(directory / config.weights)
        model = build_model(
            config.architecture,
            num_classes,
            model_file=directory / config.model_file if config.model_file else None,
            model_class=config.model_class,
            state=state,  # constructor arguments the weights fix (camserve.architectures)
        )
        return load_weights(model, state)
