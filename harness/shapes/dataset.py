"""Deterministic generator of labelled shape images with ground-truth object masks: one object
per image (``render_sample``, the ``shapes`` model) or 1 to 3 (``render_multi_sample``,
``shapes-multi``).

Sample ``i`` of a split depends only on ``(seed, i)``, so any subset can be regenerated.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
IMAGE_SIZE = 64
TRAIN_SEED = 1
HELD_OUT_SEED = 2


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    mask: np.ndarray  # bool, H x W: the object's extent (a ring's includes its hole)
    label: int
    ink: np.ndarray  # bool, H x W: only the pixels painted with the object's colour


def render_sample(seed: int, index: int, size: int = IMAGE_SIZE) -> ShapeSample:
    rng = random.Random(f"{seed}:{index}")
    noise = np.random.default_rng([seed, index])
    label = rng.randrange(len(CLASSES))
    image = _background(rng, noise, size)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size)

    extent = rng.uniform(0.22, 0.42) * size
    cx = rng.uniform(extent / 2 + 2, size - extent / 2 - 2)
    cy = rng.uniform(extent / 2 + 2, size - extent / 2 - 2)
    mask, ink = _draw_object(rng, image, draw, CLASSES[label], cx, cy, extent)
    return ShapeSample(image=_camera(rng, noise, image), mask=mask, label=label, ink=ink)


@dataclass(frozen=True)
class MultiShapeSample:
    """An image of the multi-label variant: 1 to 3 objects of different classes."""

    image: Image.Image
    labels: tuple[int, ...]  # the classes present, in drawing order (no class twice)
    masks: tuple[np.ndarray, ...]  # one bool H x W extent per object, as ``labels``
    inks: tuple[np.ndarray, ...]

    def mask_of(self, label: int) -> np.ndarray:
        return self.masks[self.labels.index(label)]


MAX_OBJECTS = 3


def render_multi_sample(seed: int, index: int, size: int = IMAGE_SIZE) -> MultiShapeSample:
    """1 to ``MAX_OBJECTS`` objects of distinct classes that do not touch, on the same kind of
    background and clutter as ``render_sample``; depends only on ``(seed, index)``."""
    rng = random.Random(f"multi:{seed}:{index}")
    noise = np.random.default_rng([seed, index, MAX_OBJECTS])
    labels = rng.sample(range(len(CLASSES)), rng.randint(1, MAX_OBJECTS))
    image = _background(rng, noise, size)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size)
    placed: list[tuple[float, float, float]] = []  # (cx, cy, bounding radius)
    masks, inks = [], []
    for label in labels:
        extent, cx, cy = _free_place(rng, placed, size)
        mask, ink = _draw_object(rng, image, draw, CLASSES[label], cx, cy, extent)
        masks.append(mask)
        inks.append(ink)
    return MultiShapeSample(
        image=_camera(rng, noise, image),
        labels=tuple(labels),
        masks=tuple(masks),
        inks=tuple(inks),
    )


# The farthest any shape reaches from its centre, in units of extent / 2 (the square's corner).
_REACH = 1.3
_GAP = 3.0  # pixels between two objects' bounding circles


def _free_place(
    rng: random.Random, placed: list[tuple[float, float, float]], size: int
) -> tuple[float, float, float]:
    """An object's extent and centre whose bounding circle keeps ``_GAP`` from the others';
    smaller objects are tried when the image gets crowded."""
    scale = 1.0
    while True:
        for _ in range(50):
            extent = rng.uniform(0.2, 0.32) * size * scale
            reach = extent / 2 * _REACH
            cx = rng.uniform(reach + 1, size - reach - 1)
            cy = rng.uniform(reach + 1, size - reach - 1)
            if all(math.hypot(cx - x, cy - y) > reach + r + _GAP for x, y, r in placed):
                placed.append((cx, cy, reach))
                return extent, cx, cy
        scale *= 0.9


def _draw_object(
    rng: random.Random,
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    extent: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one shape in a colour that stands out locally; returns (extent mask, ink)."""
    size = image.width
    angle = rng.uniform(-math.pi, math.pi)
    ink_image = Image.new("L", (size, size), 0)
    colour = _contrasting_colour(rng, image, cx, cy)
    for target, fill in ((draw, colour), (ImageDraw.Draw(ink_image), 255)):
        _draw_shape(target, kind, cx, cy, extent, angle, fill)
    mask_image = ink_image.copy()
    if kind == "ring":
        # A peak in the hole points at the ring: its extent is the disk it bounds.
        _draw_shape(ImageDraw.Draw(mask_image), "circle", cx, cy, extent, angle, 255)
    return np.asarray(mask_image) > 127, np.asarray(ink_image) > 127


def _camera(rng: random.Random, noise: np.random.Generator, image: Image.Image) -> Image.Image:
    """Sensor noise and, sometimes, a slight blur."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels += noise.normal(0.0, rng.uniform(4.0, 14.0), pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return image


def _background(rng: random.Random, noise: np.random.Generator, size: int) -> Image.Image:
    start = np.array([rng.uniform(0, 255) for _ in range(3)], dtype=np.float32)
    end = np.array([rng.uniform(0, 255) for _ in range(3)], dtype=np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (math.cos(direction) * xs + math.sin(direction) * ys + 1.5) / 3.0
    pixels = start * (1 - t[..., None]) + end * t[..., None]
    blotches = noise.normal(0, 30, (8, 8, 3)).astype(np.float32)
    blotches = np.asarray(
        Image.fromarray((blotches + 128).clip(0, 255).astype(np.uint8), "RGB").resize(
            (size, size), Image.BICUBIC
        ),
        dtype=np.float32,
    )
    return Image.fromarray((pixels + blotches - 128).clip(0, 255).astype(np.uint8), "RGB")


def _clutter(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> None:
    for _ in range(rng.randint(6, 16)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.random()
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if kind < 0.5:
            length, angle = rng.uniform(4, size / 2), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=1)
        elif kind < 0.8:
            r = rng.uniform(0.5, 2.0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            w, h = rng.uniform(1, 4), rng.uniform(1, 4)
            draw.rectangle([x, y, x + w, y + h], fill=colour)


def _contrasting_colour(
    rng: random.Random, image: Image.Image, cx: float, cy: float
) -> tuple[int, int, int]:
    local = np.asarray(image.crop((cx - 8, cy - 8, cx + 8, cy + 8)), dtype=np.float32)
    local_mean = local.reshape(-1, 3).mean(axis=0)
    best, best_distance = (0, 0, 0), -1.0
    for _ in range(12):
        colour = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
        distance = float(np.abs(colour - local_mean).sum())
        if distance > best_distance:
            best, best_distance = tuple(int(c) for c in colour), distance
        if distance > 220:
            break
    return best


def _polygon(cx, cy, radii, angle, count):
    return [
        (
            cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / count),
            cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / count),
        )
        for i in range(count)
    ]


def _draw_shape(draw, kind, cx, cy, extent, angle, fill) -> None:
    r = extent / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(r / 3)))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.3], angle, 4), fill=fill)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.25], angle, 3), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.25, r * 0.5], angle, 10), fill=fill)
    elif kind == "cross":
        arm = r * 0.38
        for theta in (angle, angle + math.pi / 2):
            dx, dy = math.cos(theta), math.sin(theta)
            px, py = -dy * arm, dx * arm
            draw.polygon(
                [
                    (cx - dx * r + px, cy - dy * r + py),
                    (cx + dx * r + px, cy + dy * r + py),
                    (cx + dx * r - px, cy + dy * r - py),
                    (cx - dx * r - px, cy - dy * r - py),
                ],
                fill=fill,
            )
    else:
        raise ValueError(f"unknown shape {kind!r}")


def generate(seed: int, count: int, size: int = IMAGE_SIZE, start: int = 0) -> list[ShapeSample]:
    return [render_sample(seed, start + i, size) for i in range(count)]


def generate_multi(
    seed: int, count: int, size: int = IMAGE_SIZE, start: int = 0
) -> list[MultiShapeSample]:
    return [render_multi_sample(seed, start + i, size) for i in range(count)]


def to_uint8_tensors(samples: list[ShapeSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) uint8, labels (N,), masks (N, H, W) bool."""
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2)
    labels = torch.tensor([s.label for s in samples])
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    return images.contiguous(), labels, masks


def multi_to_uint8_tensors(
    samples: list[MultiShapeSample],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) uint8 and multi-hot targets (N, len(CLASSES)) float."""
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2)
    targets = torch.zeros(len(samples), len(CLASSES))
    for row, sample in enumerate(samples):
        targets[row, list(sample.labels)] = 1.0
    return images.contiguous(), targets


def write_examples(out_dir: str, seed: int = HELD_OUT_SEED) -> list[str]:
    """One held-out PNG per class, named after it (``examples/star.png``...)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, index = {}, 0
    while len(written) < len(CLASSES):
        sample = render_sample(seed, index)
        name = CLASSES[sample.label]
        if name not in written:
            path = out / f"{name}.png"
            sample.image.save(path)
            written[name] = str(path)
        index += 1
    return sorted(written.values())


def write_multi_examples(out_dir: str, seed: int = HELD_OUT_SEED) -> list[str]:
    """Held-out ``shapes-multi`` PNGs with 1, 2 and 3 objects and no shape twice, named after
    the shapes they hold (``examples/multi/ring+star.png``...)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, used, index = [], set(), 0
    for size in range(1, MAX_OBJECTS + 1):
        while True:
            sample = render_multi_sample(seed, index)
            index += 1
            if len(sample.labels) == size and not used & set(sample.labels):
                break
        used |= set(sample.labels)
        path = out / ("+".join(sorted(CLASSES[label] for label in sample.labels)) + ".png")
        sample.image.save(path)
        written.append(str(path))
    return written


if __name__ == "__main__":
    import sys

    folder = sys.argv[1] if len(sys.argv) > 1 else "examples"
    print("\n".join(write_examples(folder) + write_multi_examples(f"{folder}/multi")))
