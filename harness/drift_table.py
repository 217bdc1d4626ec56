"""The drift table of docs/monitoring.md: the PSI of the shapes model's top-1 score bands
against its shipped calibration baseline, in distribution and under input shifts.

    .venv/bin/python -m harness.drift_table            # prints the table (about a minute)

In process, with the served pipeline (``Explainer``) and the same bands and PSI as the
recording rule ``camserve:zero_reference_score:psi1h`` (config/prometheus/rules.yml).
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from camserve.explainer import Explainer
from camserve.request import RequestOptions
from camserve.telemetry import SCORE_BANDS, ScoreBaseline
from harness.shapes.dataset import HELD_OUT_SEED, render_sample

# Inside the rule's logarithm: an empty band costs a bounded amount instead of infinity.
PSI_EPSILON = 0.001


def psi(live: dict[str, float], baseline: dict[str, float]) -> float:
    """The population stability index of band shares ``live`` against ``baseline``."""
    return sum(
        (live[band] - baseline[band])
        * math.log((live[band] + PSI_EPSILON) / (baseline[band] + PSI_EPSILON))
        for band in SCORE_BANDS
    )


def shares(scores: list[float]) -> dict[str, float]:
    return ScoreBaseline.from_scores(scores).shares


def explained(
    explainer: Explainer, images: list[Image.Image], targets: list[int | None] | None = None
) -> tuple[list[float], float]:
    """(the scores of the images' explanations, the share unstable)."""
    targets = targets or [None] * len(images)
    prepared = [
        explainer.prepare_image(image, RequestOptions(target=target), target)
        for image, target in zip(images, targets, strict=True)
    ]
    results = []
    for start in range(0, len(prepared), 32):
        results += explainer.explain(prepared[start : start + 32])
    blocks = [r.explained.zero_reference for r in results]
    return [b.score for b in blocks], sum(not b.stable for b in blocks) / len(blocks)


def _noise(image: Image.Image, sigma: float = 120.0) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


SHIFTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "darkened to 30% brightness": lambda im: ImageEnhance.Brightness(im).enhance(0.3),
    "Gaussian blur, radius 3": lambda im: im.filter(ImageFilter.GaussianBlur(3)),
    "contrast 30%": lambda im: ImageEnhance.Contrast(im).enhance(0.3),
    "greyscale": lambda im: im.convert("L").convert("RGB"),
    "pixel noise, σ = 120": _noise,
    "colour-inverted": ImageOps.invert,
    "channels swapped (RGB to BGR)": lambda im: Image.merge("RGB", im.split()[::-1]),
    "rotated 90°": lambda im: im.transpose(Image.Transpose.ROTATE_90),
}


def table(explainer: Explainer, in_distribution: int, per_shift: int, draws: int) -> list[str]:
    baseline = explainer.score_baseline
    if baseline is None:
        raise ValueError("the model has no score baseline: calibrate it first")
    samples = [render_sample(HELD_OUT_SEED, i) for i in range(max(in_distribution, per_shift))]
    scores, unstable = explained(explainer, [s.image for s in samples[:in_distribution]])
    name = f"{in_distribution} held-out images (in distribution)"
    rows = [(name, psi(shares(scores), baseline.shares), unstable)]
    rng = random.Random(0)
    drawn = sorted(psi(shares(rng.choices(scores, k=100)), baseline.shares) for _ in range(draws))
    bootstrap = (
        f"median {drawn[len(drawn) // 2]:.3f}, p99 {drawn[int(len(drawn) * 0.99)]:.3f}, "
        f"max {drawn[-1]:.2f}"
    )
    shifted = samples[:per_shift]
    # A class the client asks for that the model does not predict: its map is weak.
    top = explainer.explain([explainer.prepare_image(s.image) for s in shifted])
    others = [(r.explained.index + 1) % len(explainer.labels) for r in top]
    scores, unstable = explained(explainer, [s.image for s in shifted], others)
    name = "requested non-top classes (why they are excluded)"
    rows.append((name, psi(shares(scores), baseline.shares), unstable))
    for name, shift in SHIFTS.items():
        scores, unstable = explained(explainer, [shift(s.image) for s in shifted])
        rows.append((name, psi(shares(scores), baseline.shares), unstable))
    lines = ["| traffic | PSI against the baseline | unstable |", "|---|---|---|"]
    lines.append(f"| {rows[0][0]} | {rows[0][1]:.4f} | {rows[0][2]:.1%} |")
    lines.append(f"| 100 held-out images, {draws} bootstrap draws | {bootstrap} | |")
    lines += [f"| {name} | {value:.3g} | {share:.1%} |" for name, value, share in rows[1:]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models/shapes")
    parser.add_argument("--in-distribution", type=int, default=400)
    parser.add_argument("--per-shift", type=int, default=200)
    parser.add_argument("--draws", type=int, default=20_000)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    explainer = Explainer.from_directory(args.model_dir)
    print("\n".join(table(explainer, args.in_distribution, args.per_shift, args.draws)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
