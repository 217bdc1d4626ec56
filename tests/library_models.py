"""Small timm and transformers classifiers with seeded random weights, saved as the Hub lays
them out, and real photos of several sizes and aspect ratios (no download: matplotlib ships
the photo). Shared by the tests of camserve.sources and the library preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import torch
from PIL import Image

LABELS = ["cat", "dog", "bird"]
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # 512x600


def photos() -> dict[str, Image.Image]:
    """The photo, cropped and resized to portrait, landscape, small, odd and square shapes."""
    photo = Image.open(PHOTO).convert("RGB")
    return {
        "512x600": photo,
        "333x517 portrait crop": photo.crop((90, 40, 423, 557)),
        "500x250 landscape crop": photo.crop((6, 180, 506, 430)),
        "301x199 resized": photo.resize((301, 199), Image.BICUBIC),
        "97x61 small": photo.resize((97, 61), Image.BILINEAR),
        "61x97 small portrait": photo.resize((61, 97), Image.BILINEAR),
        "256x256 square": photo.crop((128, 150, 384, 406)),
    }


def jpeg_bytes(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --- timm ------------------------------------------------------------------------------------

# name -> (input side, the Grad-CAM layer, its layout, compensable)
TIMM = {
    "resnet18": (64, "layer4", "nchw", True),
    "convnext_atto": (64, "stages.3", "nchw", False),
    "vit_tiny_patch16_224": (64, "blocks.11.norm1", "cls_tokens", False),
}


def timm_model(name: str, num_classes: int = len(LABELS)) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    side = TIMM[name][0]
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        pretrained_cfg_overlay={"input_size": (3, side, side)},
    ).eval()


def save_timm_folder(name: str, folder: Path) -> Path:
    """The layout timm.models.save_for_hf writes (and the Hub stores)."""
    from timm.models import save_for_hf

    save_for_hf(
        timm_model(name), folder, model_config={"label_names": LABELS}, safe_serialization=True
    )
    return folder


# --- transformers ----------------------------------------------------------------------------

# family -> (the Grad-CAM layer, its layout, compensable); all at 64x64 input
TRANSFORMERS = {
    "resnet": ("resnet.encoder.stages.1", "nchw", True),
    "convnext": ("convnext.encoder.stages.1", "nchw", False),
    "vit": ("vit.layers.1.layernorm_before", "cls_tokens", False),
    "deit": ("deit.layers.1.layernorm_before", "prefix2_tokens", False),
    "swin": ("swin.layernorm", "tokens", True),
    # the head averages the last block's patch tokens: the final layernorm (an Identity)
    "beit": ("beit.layernorm", "cls_tokens", False),
    # use_mean_pooling false: the head reads the class token
    "beit-class-token": ("beit.layers.1.layernorm_before", "cls_tokens", False),
    "data2vec-vision": ("data2vec_vision.layernorm", "cls_tokens", False),
    # the head reads the class token and the patch tokens' mean
    "dinov2": ("dinov2.encoder.layer.1.norm1", "cls_tokens", False),
    "dinov2-registers": ("dinov2_with_registers.encoder.layer.1.norm1", "prefix5_tokens", False),
    "mobilenet_v2": ("mobilenet_v2.conv_1x1", "nchw", True),
    "mobilevit": ("mobilevit.conv_1x1_exp", "nchw", True),
    "efficientnet": ("efficientnet.encoder.top_activation", "nchw", True),
    # the head's GroupNorm (its blocks return tuples: the CNN rule would take an MLP branch)
    "poolformer": ("norm", "nchw", True),
}


def transformers_model(family: str):
    """(model, image processor) of a tiny configuration of the family."""
    import transformers as hf

    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    vit = dict(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, **labels,
    )  # fmt: skip
    convnet = dict(hidden_sizes=[16, 32], depths=[1, 1], **labels)
    dinov2 = {k: v for k, v in vit.items() if k != "intermediate_size"} | {"mlp_ratio": 2}
    models = {
        "resnet": lambda: hf.ResNetForImageClassification(
            hf.ResNetConfig(embedding_size=16, layer_type="basic", **convnet)
        ),
        "convnext": lambda: hf.ConvNextForImageClassification(
            hf.ConvNextConfig(num_stages=2, **convnet)
        ),
        "vit": lambda: hf.ViTForImageClassification(hf.ViTConfig(**vit)),
        "deit": lambda: hf.DeiTForImageClassification(hf.DeiTConfig(**vit)),
        "swin": lambda: hf.SwinForImageClassification(
            hf.SwinConfig(
                image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                window_size=4, **labels,
            )
        ),
        "beit": lambda: hf.BeitForImageClassification(
            hf.BeitConfig(use_relative_position_bias=True, **vit)
        ),
        "beit-class-token": lambda: hf.BeitForImageClassification(
            hf.BeitConfig(use_mean_pooling=False, use_absolute_position_embeddings=True, **vit)
        ),
        "data2vec-vision": lambda: hf.Data2VecVisionForImageClassification(
            hf.Data2VecVisionConfig(**vit)
        ),
        "dinov2": lambda: hf.Dinov2ForImageClassification(hf.Dinov2Config(**dinov2)),
        "dinov2-registers": lambda: hf.Dinov2WithRegistersForImageClassification(
            hf.Dinov2WithRegistersConfig(num_register_tokens=4, **dinov2)
        ),
        "mobilenet_v2": lambda: _fan_in(hf.MobileNetV2ForImageClassification(
            hf.MobileNetV2Config(image_size=64, depth_multiplier=0.35, **labels)
        )),
        "mobilevit": lambda: _fan_in(hf.MobileViTForImageClassification(
            hf.MobileViTConfig(
                image_size=64, hidden_sizes=[16, 16, 16],
                neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], **labels,
            )
        )),
        # hidden_dim: the width of the last convolution, 1280 * width_coefficient
        "efficientnet": lambda: _fan_in(hf.EfficientNetForImageClassification(
            hf.EfficientNetConfig(
                image_size=64, width_coefficient=0.25, depth_coefficient=0.1, hidden_dim=320,
                **labels,
            )
        )),
        "poolformer": lambda: hf.PoolFormerForImageClassification(
            hf.PoolFormerConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], **labels)
        ),
    }  # fmt: skip
    processors = {
        # ResNet and ConvNeXt use ConvNeXt's rule: shorter side to 64 / crop_pct, crop 64.
        "resnet": lambda: hf.ConvNextImageProcessor(size={"shortest_edge": 64}),
        "convnext": lambda: hf.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.9),
        "vit": lambda: hf.ViTImageProcessor(size={"height": 64, "width": 64}),
        # 75 -> 64: transformers floors the offset (5), torchvision's CenterCrop rounds (6).
        "deit": lambda: hf.DeiTImageProcessor(
            size={"height": 75, "width": 75}, crop_size={"height": 64, "width": 64}
        ),
        "swin": lambda: hf.ViTImageProcessor(
            size={"height": 64, "width": 64}, resample=3, image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
        # The families' own processor classes (each overrides pipeline methods), at 64 px.
        "beit": lambda: hf.BeitImageProcessor(size={"height": 64, "width": 64}),
        "beit-class-token": lambda: hf.BeitImageProcessor(
            size={"height": 72, "width": 72}, do_center_crop=True,
            crop_size={"height": 64, "width": 64},
        ),
        "data2vec-vision": lambda: hf.BeitImageProcessor(size={"height": 64, "width": 64}),
        "dinov2": lambda: hf.BitImageProcessor(
            size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}, resample=3,
        ),
        "dinov2-registers": lambda: hf.BitImageProcessor(
            size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}, resample=3,
        ),
        "mobilenet_v2": lambda: hf.MobileNetV2ImageProcessor(
            size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}
        ),
        # flips the channels to BGR, as MobileViT's checkpoints expect
        "mobilevit": lambda: hf.MobileViTImageProcessor(
            size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}
        ),
        "efficientnet": lambda: hf.EfficientNetImageProcessor(size={"height": 64, "width": 64}),
        "poolformer": lambda: hf.PoolFormerImageProcessor(
            size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    return models[family]().eval(), processors[family]()


def _fan_in(model: torch.nn.Module) -> torch.nn.Module:
    """Kaiming-normal convolutions and linear layers, unit-scale BatchNorms with the running
    statistics of a seeded random batch. The library's own initialisation (normal, std 0.02,
    BatchNorm scales included) fades these deep, narrow networks' activations to logits of
    ~1e-7 and empty maps, which would make every comparison trivially true."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight)
    for norm in norms:
        torch.nn.init.ones_(norm.weight)
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batch below
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def save_transformers_folder(family: str, folder: Path) -> Path:
    """The layout save_pretrained writes: config.json, model.safetensors and the image
    processor's preprocessor_config.json."""
    model, processor = transformers_model(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
