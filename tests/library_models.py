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
    }  # fmt: skip
    torch.manual_seed(0)
    return models[family]().eval(), processors[family]()


def save_transformers_folder(family: str, folder: Path) -> Path:
    """The layout save_pretrained writes: config.json, model.safetensors and the image
    processor's preprocessor_config.json."""
    model, processor = transformers_model(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
