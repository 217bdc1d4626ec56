"""The archive's preprocessing, measured against the library's own before it is accepted.

camserve reads a library's preprocessing from its settings (timm's data config, a transformers
image processor's ``size``, ``crop_size``, ``resample``...) into a ``Preprocessing``. A setting
it does not read, or a processor class with a step of its own, would make that reading wrong
without any error. So every timm and transformers archive runs both pipelines on a few seeded
probe images (portrait, landscape, square, smaller than any crop, odd sizes, large) and is
refused when they differ by more than ``PREPROCESSING_TOLERANCE``: measured, not assumed from
the class. The probes mix smooth gradients with noise, so that a different filter, crop
offset or backend shows in the numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from PIL import Image

from camserve.preprocess import Preprocessing

# On the normalised network input: float32 rounding and nothing else (timm divides by 255
# where torchvision multiplies by 1/255: 1 ulp). One constant for the archive and the tests.
PREPROCESSING_TOLERANCE = 1e-6
# (width, height): portrait, landscape, square, smaller than any crop, odd, large
PROBE_SIZES = ((181, 263), (317, 203), (224, 224), (45, 29), (97, 61), (521, 389))
PROBE_SEED = 0


@functools.cache
def probe_images() -> tuple[Image.Image, ...]:
    """Seeded RGB images: per-channel ramps and a diagonal wave, plus Gaussian noise."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    images = []
    for width, height in PROBE_SIZES:
        y = torch.linspace(0, 1, height)[:, None].expand(height, width)
        x = torch.linspace(0, 1, width)[None, :].expand(height, width)
        wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (3 * x + 2 * y))
        smooth = 200 * torch.stack([x, y, wave]) + 28
        pixels = smooth + 24 * torch.randn(3, height, width, generator=generator)
        pixels = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
        images.append(Image.fromarray(pixels.numpy(), "RGB"))
    return tuple(images)


def verify_preprocessing(
    ours: Preprocessing, library: Callable[[Image.Image], torch.Tensor], name: str
) -> float:
    """The largest absolute difference between ``ours`` and ``library`` (image -> (3, H, W)
    network input) over the probe images; a one-line ``ValueError`` naming ``name``, the
    difference, the tolerance and the probe's size when it exceeds the tolerance."""
    from camserve.architectures import first_line

    worst, worst_size = 0.0, ""
    for image in probe_images():
        size = f"{image.width}x{image.height}"
        try:
            expected = torch.as_tensor(library(image), dtype=torch.float32)
        except (ValueError, RuntimeError, TypeError, IndexError, KeyError) as err:
            raise ValueError(
                f"{name} fails on a {size} probe image ({first_line(err)}): camserve cannot "
                "check its preprocessing against the library's"
            ) from None
        got = ours(image)
        if got.shape != expected.shape:
            raise ValueError(
                f"{name} makes a {_shape(expected)} input of a {size} probe image, camserve's "
                f"reading of its settings {_shape(got)}: camserve does not reproduce this "
                "preprocessing"
            )
        difference = float((got - expected).abs().max())
        if math.isnan(difference) or difference > worst:
            worst, worst_size = (math.inf if math.isnan(difference) else difference), size
    if worst > PREPROCESSING_TOLERANCE:
        raise ValueError(
            f"{name}: camserve's reading of its settings differs from the library's own output "
            f"by up to {worst:.3g} (on a {worst_size} probe image), above the tolerance "
            f"{PREPROCESSING_TOLERANCE:g} on the normalised input: camserve does not reproduce "
            "this preprocessing (docs/bring-your-own-model.md#preprocessing-the-librarys-own)"
        )
    return worst


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(side) for side in tensor.shape)


def verified_note(name: str, worst: float) -> str:
    """What the archive summary says about a measurement that passed."""
    return (
        f"preprocessing: {name}'s own output to {worst:.1g} on {len(PROBE_SIZES)} probe images "
        f"(tolerance {PREPROCESSING_TOLERANCE:g})"
    )
