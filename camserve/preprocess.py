"""image -> tensor, with the steps and the arithmetic of the library the model was trained with.

One ``Preprocessing`` describes torchvision's evaluation pipeline, timm's
(``timm.data.create_transform``) and the image processors of Hugging Face transformers; the
fields say where they differ (docs/bring-your-own-model.md#preprocessing):

- ``backend``: ``"pil"`` resizes the decoded PIL image with PIL's filters (torchvision on PIL
  images, timm); ``"tensor"`` resizes a uint8 tensor with torchvision's antialiased kernels
  (transformers' default torchvision backend). The two differ by 1-4 grey levels.
- ``crop_offset``: torchvision's ``CenterCrop`` rounds an odd margin's half, transformers
  floors it: one pixel apart.
- ``interpolation``, ``rescale_factor``, mean and std, and how the resize reads its size.
- ``channel_order``: ``"bgr"`` hands the network its channels reversed (MobileViT's
  processors flip RGB to BGR), after normalising with mean and std in RGB order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = tuple(mode.value for mode in InterpolationMode)
BACKENDS = ("pil", "tensor")
CROP_OFFSETS = ("round", "floor")
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class Preprocessing:
    """Recorded in ``model-config.yaml`` so that serving matches training.

    ``resize``: an int scales the shorter side to it (the longer side to
    ``int(size * long / short)``, as torchvision, timm and transformers' ``shortest_edge``
    do); an (H, W) pair resizes to exactly (H, W), or, with ``keep_ratio``, scales both
    sides by the one factor that makes the image just cover (H, W), rounding each side
    (timm's ``ResizeKeepRatio``). ``center_crop`` (optional) then crops (H, W) at the
    centre, offsets rounded or floored (``crop_offset``). The pixels are then scaled by
    ``rescale_factor`` and normalised with ``mean`` and ``std`` (in RGB order); with
    ``channel_order`` ``bgr`` the channels are then reversed. The network input is
    ``input_size``.
    """

    input_size: tuple[int, int]
    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = InterpolationMode.BILINEAR.value
    keep_ratio: bool = False
    crop_offset: str = "round"
    rescale_factor: float = 1 / 255
    backend: str = "pil"
    channel_order: str = "rgb"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("interpolation", self.interpolation, INTERPOLATIONS),
            ("crop_offset", self.crop_offset, CROP_OFFSETS),
            ("backend", self.backend, BACKENDS),
            ("channel_order", self.channel_order, CHANNEL_ORDERS),
        ):
            if value not in allowed:
                raise ValueError(f"preprocessing {name} {value!r} is not one of {allowed}")
        if self.keep_ratio and not isinstance(self.resize, tuple):
            raise ValueError("keep_ratio needs an (H, W) resize")
        if not self.rescale_factor > 0 or min(self.std) <= 0:
            raise ValueError("rescale_factor and std must be positive")
        # Every image must come out at input_size, or batching breaks.
        resize = self.resize if self.resize is not None else self.input_size
        if self.center_crop is not None:
            out = tuple(self.center_crop)
        else:
            out = None if isinstance(resize, int) or self.keep_ratio else tuple(resize)
        if out != tuple(self.input_size):
            gives = "images of varying size" if out is None else f"{out[0]}x{out[1]} images"
            raise ValueError(
                f"resize {resize} + center crop {self.center_crop or 'none'} gives {gives}, not "
                f"the input size {self.input_size[0]}x{self.input_size[1]}: give an (H, W) "
                "resize equal to the input size, or a center crop equal to it"
            )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the normalised (3, H, W) float32 network input."""
        mode = InterpolationMode(self.interpolation)
        if self.backend == "pil":
            image = F.resize(image, self._resize_size(image.height, image.width), mode)
            pixels = F.pil_to_tensor(image)
        else:
            # transformers' own conversion: a contiguous (3, H, W) uint8 copy.
            pixels = F.pil_to_tensor(image).contiguous()
            pixels = F.resize(pixels, self._resize_size(*pixels.shape[-2:]), mode, antialias=True)
        if self.center_crop is not None:
            pixels = self._crop(pixels)
        tensor = self._normalise(pixels)
        return tensor.flip(0) if self.channel_order == "bgr" else tensor

    def _resize_size(self, height: int, width: int) -> list[int]:
        """The (H, W) the resize produces from a (height, width) image."""
        resize = self.resize if self.resize is not None else self.input_size
        if isinstance(resize, int):
            short, long = sorted((height, width))
            other = int(resize * long / short)
            return [resize, other] if height <= width else [other, resize]
        if self.keep_ratio:
            ratio = min(height / resize[0], width / resize[1])
            return [round(height / ratio), round(width / ratio)]
        return list(resize)

    def _crop(self, pixels: torch.Tensor) -> torch.Tensor:
        crop_height, crop_width = self.center_crop
        height, width = pixels.shape[-2:]
        if crop_height > height or crop_width > width:
            # Both libraries pad a too-small image with zeros, the odd pixel after.
            pad_w, pad_h = max(crop_width - width, 0), max(crop_height - height, 0)
            pixels = F.pad(pixels, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2])
            height, width = pixels.shape[-2:]
        offset = round if self.crop_offset == "round" else int
        top, left = offset((height - crop_height) / 2), offset((width - crop_width) / 2)
        return pixels[..., top : top + crop_height, left : left + crop_width]

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.backend == "pil":
            # torchvision's ToDtype(scale=True) then Normalize: x * (1/255), then (x - m) / s.
            scaled = pixels.to(torch.float32).mul_(self.rescale_factor)
            return F.normalize(scaled, list(self.mean), list(self.std))
        # transformers' torchvision backend fuses the two: (x - m / f) / (s / f).
        mean = torch.tensor(self.mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.std) * (1.0 / self.rescale_factor)
        return pixels.to(torch.float32).sub_(mean[:, None, None]).div_(std[:, None, None])

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """From ``model-config.yaml``; a field it lacks keeps the torchvision default, so
        configs written before a field existed read as they always did."""
        known = {field for field in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing settings: {sorted(unknown)}")

        def pair(value):
            return None if value is None else tuple(_size(value))

        resize = data.get("resize")
        defaults = cls(input_size=(1, 1))
        return cls(
            input_size=pair(data["input_size"]),
            resize=resize if isinstance(resize, int) or resize is None else pair(resize),
            center_crop=pair(data.get("center_crop")),
            mean=tuple(float(m) for m in data.get("mean", IMAGENET_MEAN)),
            std=tuple(float(s) for s in data.get("std", IMAGENET_STD)),
            interpolation=data.get("interpolation", defaults.interpolation),
            keep_ratio=bool(data.get("keep_ratio", False)),
            crop_offset=data.get("crop_offset", defaults.crop_offset),
            rescale_factor=float(data.get("rescale_factor", defaults.rescale_factor)),
            backend=data.get("backend", defaults.backend),
            channel_order=data.get("channel_order", defaults.channel_order),
        )


def _size(value: int | Sequence[int]) -> int | list[int]:
    if isinstance(value, int):
        return value
    if len(value) != 2:
        raise ValueError(f"expected an int or an (H, W) pair, got {value!r}")
    return [int(value[0]), int(value[1])]
