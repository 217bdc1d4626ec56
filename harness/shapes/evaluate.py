"""Measure the ``shapes`` model on a held-out generated set: accuracy, Grad-CAM pointing game
(the upsampled map's peak inside the object's extent; also reported against the painted
pixels only), share of map mass inside the extent, and the zero-reference score distribution.

For ``shapes-multi`` (``--multi-label``): mean average precision, and the per-label pointing
game: each label present in the image is explained (``target`` = the image's labels), and its
map's peak must fall inside that label's own object, not merely inside some object; how often
it falls on another object of the image instead is reported too.

    python -m harness.shapes.evaluate --model-dir models/shapes
    python -m harness.shapes.evaluate --multi-label --model-dir models/shapes-multi
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from camserve.explainer import Explainer
from harness.shapes.dataset import CLASSES, HELD_OUT_SEED, generate, generate_multi


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
            upsampled = _upsampled(result.explained.grad_cam, sample.mask.shape)
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


def _upsampled(grad_cam: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The map at the image's size, as the overlay draws it (bilinear)."""
    grid = grad_cam[None, None].float()
    return F.interpolate(grid, size=shape, mode="bilinear", align_corners=False)[0, 0]


def _distance(mask, peak: int) -> float:
    """Pixels from the flat index ``peak`` to the nearest pixel of ``mask`` (0 inside it)."""
    rows, columns = mask.nonzero()
    y, x = divmod(peak, mask.shape[1])
    return float(((rows - y) ** 2 + (columns - x) ** 2).min() ** 0.5)


def average_precision(scores: list[float], positives: list[bool]) -> float:
    """The mean of the precisions at each positive, ranked by score (ties: the given order)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            precisions.append(hits / rank)
    return statistics.fmean(precisions) if precisions else 0.0


def evaluate_multi(explainer: Explainer, count: int, batch_size: int = 64) -> dict:
    """mAP, presence accuracy and the per-label pointing game on held-out multi-shape images."""
    label_count = len(CLASSES)
    probabilities: list[list[float]] = [[] for _ in range(label_count)]
    truths: list[list[bool]] = [[] for _ in range(label_count)]
    exact = 0
    own = other = background = 0  # where each true label's map peaks
    crowded_own = crowded_other = crowded = 0  # the same, for images with several objects
    crowded_nearest_own = 0  # ... and when the peak is nearer its own object than any other
    missed_by: list[float] = []  # pixels from a peak outside its own object to that object
    inside_mass: list[float] = []
    area: list[float] = []
    scores: list[float] = []
    worst: list[float] = []
    served_true = served_false = served_own = 0  # the default answer's present labels
    for start in range(0, count, batch_size):
        samples = generate_multi(HELD_OUT_SEED, min(batch_size, count - start), start=start)
        named = [explainer.prepare_image(s.image, requested_class=tuple(s.labels)) for s in samples]
        served = [explainer.prepare_image(s.image) for s in samples]
        for sample, result, default in zip(
            samples, explainer.explain(named), explainer.explain(served), strict=True
        ):
            present = result.present.tolist()
            exact += present == [c in sample.labels for c in range(label_count)]
            for c in range(label_count):
                probabilities[c].append(float(result.probabilities[c]))
                truths[c].append(c in sample.labels)
            several = len(sample.labels) > 1
            crowded += several * len(sample.labels)
            for item in (result.explained, *result.more):
                upsampled = _upsampled(item.grad_cam, sample.image.size[::-1])
                peak = int(upsampled.argmax())
                mask = torch.from_numpy(sample.mask_of(item.index))
                hit = bool(mask.flatten()[peak])
                elsewhere = any(
                    bool(sample.mask_of(c).flatten()[peak])
                    for c in sample.labels
                    if c != item.index
                )
                distances = {c: _distance(sample.mask_of(c), peak) for c in sample.labels}
                if not hit:
                    missed_by.append(distances[item.index])
                own += hit
                other += elsewhere
                background += not hit and not elsewhere
                crowded_own += several and hit
                crowded_other += several and elsewhere
                crowded_nearest_own += several and min(distances, key=distances.get) == item.index
                total = float(upsampled.sum())
                inside_mass.append(float(upsampled[mask].sum()) / total if total > 0 else 0.0)
                area.append(float(mask.float().mean()))
                scores.append(item.zero_reference.score)
                worst.append(item.zero_reference.worst_case.score)
            for item in (default.explained, *default.more):
                if not default.is_present(item.index):
                    continue
                if item.index not in sample.labels:
                    served_false += 1
                    continue
                served_true += 1
                peak = int(_upsampled(item.grad_cam, sample.image.size[::-1]).argmax())
                served_own += bool(sample.mask_of(item.index).flatten()[peak])
    labels = sum(sum(t) for t in truths)
    per_label_ap = {
        CLASSES[c]: average_precision(probabilities[c], truths[c]) for c in range(label_count)
    }
    return {
        "held_out_seed": HELD_OUT_SEED,
        "count": count,
        "labels": labels,
        "mean_average_precision": statistics.fmean(per_label_ap.values()),
        "average_precision": per_label_ap,
        "exact_set_accuracy": exact / count,
        "presence_threshold": explainer.config.presence_threshold,
        "explained_labels": "ground truth (target = the image's labels)",
        "pointing_game": own / labels,
        "peak_on_another_object": other / labels,
        "peak_on_background": background / labels,
        "several_objects": {
            "labels": crowded,
            "pointing_game": crowded_own / crowded,
            "peak_on_another_object": crowded_other / crowded,
            "peak_nearest_its_own_object": crowded_nearest_own / crowded,
        },
        "peak_outside_own_object_distance_px": {
            "median": statistics.median(missed_by) if missed_by else 0.0,
            "p90": statistics.quantiles(missed_by, n=10)[-1] if len(missed_by) > 1 else 0.0,
        },
        "mass_inside_own_mask_mean": statistics.fmean(inside_mass),
        "own_mask_area_fraction_mean": statistics.fmean(area),
        "served": {
            "explained_present_labels": served_true + served_false,
            "false_present_labels": served_false,
            "pointing_game_true_labels": served_own / max(served_true, 1),
        },
        "score_median": statistics.median(scores),
        "score_p90": statistics.quantiles(scores, n=10)[-1],
        "worst_case_score_median": statistics.median(worst),
        "stable_fraction": sum(s <= explainer.config.score.threshold for s in scores) / len(scores),
        "reference": result.explained.zero_reference.reference,
        "compensable": explainer.compensation.compensable,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/shapes"))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--multi-label", action="store_true", help="shapes-multi's measures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    explainer = Explainer.from_directory(args.model_dir)
    measure = evaluate_multi if args.multi_label else evaluate
    metrics = measure(explainer, args.count)
    if explainer.calibration is not None:
        # The same images against the fallback reference, for comparison.
        explainer.calibration = None
        fallback = measure(explainer, args.count)
        keys = ("reference", "score_median", "score_p90", "worst_case_score_median")
        metrics["without_calibration"] = {key: fallback[key] for key in (*keys, "stable_fraction")}
    (args.model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
