"""image -> tensor, with the same torchvision.transforms.v2 pipeline the model was trained with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Recorded in ``model-config.yaml`` so that serving matches training.

    ``resize`` follows ``v2.Resize``: an int scales the shorter side, a pair sets (H, W).
    ``center_crop`` (optional) then crops to (H, W). The network input is ``input_size``.
    """

    input_size: tuple[int, int]
    resize: int | tuple[int, int] | None = None
    center_crop: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    _transform: v2.Compose = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        resize = self.resize if self.resize is not None else self.input_size
        steps: list = [v2.Resize(_size(resize), antialias=True)]
        if self.center_crop is not None:
            steps.append(v2.CenterCrop(_size(self.center_crop)))
        steps += [
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ]
        object.__setattr__(self, "_transform", v2.Compose(steps))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @property
    def min_source_side(self) -> int:
        """A source at least this large on each side is only ever scaled down."""
        resize = self.resize if self.resize is not None else self.input_size
        return resize if isinstance(resize, int) else max(resize)

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("_transform", None)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        def pair(value):
            return None if value is None else tuple(_size(value))

        resize = data.get("resize")
        return cls(
            input_size=pair(data["input_size"]),
            resize=resize if isinstance(resize, int) or resize is None else pair(resize),
            center_crop=pair(data.get("center_crop")),
            mean=tuple(data.get("mean", IMAGENET_MEAN)),
            std=tuple(data.get("std", IMAGENET_STD)),
        )


def _size(value: int | Sequence[int]) -> int | list[int]:
    if isinstance(value, int):
        return value
    if len(value) != 2:
        raise ValueError(f"expected an int or an (H, W) pair, got {value!r}")
    return [int(value[0]), int(value[1])]
