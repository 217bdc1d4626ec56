"""Recompute ``models/shapes/calibration.pt`` on the shapes training set (make calibrate-shapes),
or with ``--multi-label`` ``models/shapes-multi/calibration.pt`` on its own training set.

python -m harness.shapes.calibrate --count 4000
python -m harness.shapes.calibrate --multi-label --model-dir models/shapes-multi --count 4000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from camserve.tools.calibrate import CALIBRATION_FILE, calibrate_model_dir
from harness.shapes import SHAPES_DIR
from harness.shapes.dataset import TRAIN_SEED, render_multi_sample, render_sample


def training_images(count: int, multi_label: bool = False) -> Iterator[Image.Image]:
    """The first ``count`` images of the ``shapes`` (or ``shapes-multi``) training set
    (regenerated, not stored)."""
    render = render_multi_sample if multi_label else render_sample
    return (render(TRAIN_SEED, index).image for index in range(count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=SHAPES_DIR)
    parser.add_argument("--count", type=int, default=4000, help="training images to use")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--multi-label", action="store_true", help="the shapes-multi images")
    args = parser.parse_args(argv)
    kind = "shapes-multi" if args.multi_label else "shapes"
    source = f"{kind} training set (TRAIN_SEED), images 0..{args.count - 1}"
    stats = calibrate_model_dir(
        args.model_dir, training_images(args.count, args.multi_label), source, args.count,
        args.batch_size, baseline_images=training_images(args.count, args.multi_label),
    )  # fmt: skip
    print(f"wrote {args.model_dir / CALIBRATION_FILE} ({stats.count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
