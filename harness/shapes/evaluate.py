"""Measure the ``shapes`` model on a held-out generated set: accuracy, Grad-CAM pointing game
(the upsampled map's peak inside the object's extent; also reported against the painted
pixels only), share of map mass inside the extent, and the zero-reference score distribution.

    python -m harness.shapes.evaluate --model-dir models/shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from camserve.explainer import Explainer
from harness.shapes.dataset import HELD_OUT_SEED, generate


def evaluate(explainer: Explainer, count: int, batch_size: int = 64) -> dict:
    correct = pointing = pointing_ink = 0
    inside_mass: list[float] = []
    area: list[float] = []
    scores: list[float] = []
    worst: list[float] = []
    empty = 0
    for start in range(0, count, batch_size):
        samples = generate(HELD_OUT_SEED, min(batch_size, count - start), start=start)
        prepared = [explainer.prepare_image(s.image, requested_class=s.label) for s in samples]
        results = explainer.explain(prepared)
        for sample, result in zip(samples, results, strict=True):
            correct += int(result.probabilities.argmax()) == sample.label
            upsampled = F.interpolate(
                result.explained.grad_cam[None, None].float(),
                size=sample.mask.shape,
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            mask = torch.from_numpy(sample.mask)
            area.append(float(mask.float().mean()))
            total = float(upsampled.sum())
            if total <= 0:
                empty += 1
                inside_mass.append(0.0)
            else:
                peak = int(upsampled.argmax())
                pointing += bool(mask.flatten()[peak])
                pointing_ink += bool(sample.ink.flatten()[peak])
                inside_mass.append(float(upsampled[mask].sum()) / total)
            scores.append(result.explained.zero_reference.score)
            worst.append(result.explained.zero_reference.worst_case.score)
    return {
        "held_out_seed": HELD_OUT_SEED,
        "count": count,
        "accuracy": correct / count,
        "pointing_game": pointing / count,
        "pointing_game_ink_only": pointing_ink / count,
        "mass_inside_mask_mean": statistics.fmean(inside_mass),
        "mask_area_fraction_mean": statistics.fmean(area),
        "empty_maps": empty,
        "score_median": statistics.median(scores),
        "score_p90": statistics.quantiles(scores, n=10)[-1],
        "worst_case_score_median": statistics.median(worst),
        "stable_fraction": sum(s <= explainer.config.score.threshold for s in scores) / count,
        "reference": results[0].explained.zero_reference.reference,
        "epsilon": explainer.config.score.epsilon,
        "threshold": explainer.config.score.threshold,
        "compensable": explainer.compensation.compensable,
        "explained_class": "ground truth",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/shapes"))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    explainer = Explainer.from_directory(args.model_dir)
    metrics = evaluate(explainer, args.count)
    if explainer.calibration is not None:
        # The same images against the fallback reference, for comparison.
        explainer.calibration = None
        fallback = evaluate(explainer, args.count)
        metrics["without_calibration"] = {
            key: fallback[key]
            for key in (
                "reference",
                "score_median",
                "score_p90",
                "worst_case_score_median",
                "stable_fraction",
            )
        }
    (args.model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
