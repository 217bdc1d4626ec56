"""What the sanity check adds to ``camserve calibrate``: ResNet-50 (random weights, 224x224),
200 calibration images from JPEG files, calibrate without the check and with it, interleaved
in one run (the order alternates per round), on the torch threads given.

python -m bench.sanity_cost                       # 3 rounds, writes bench/results/
python -m bench.sanity_cost --rounds 1 --images 8 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.e2e import jpeg_images, torchvision_dir
from bench.run import RESULTS, machine
from camserve.sanity import SanityResult
from camserve.tools import sanity
from camserve.tools.calibrate import (
    CALIBRATION_FILE,
    calibrate_model_dir,
    image_files,
    read_images,
)

TARGET_RATIO = 2.0  # issue 23: the check may at most double calibrate's time


def calibrate_once(source: Path, work: Path, files: list[Path], sanity_images: int) -> float:
    """Seconds for one ``calibrate_model_dir`` run on a fresh copy of ``source``."""
    folder = work / f"run-{time.monotonic_ns()}"
    shutil.copytree(source, folder)
    start = time.perf_counter()
    calibrate_model_dir(
        folder, read_images(files, 40_000_000), "bench", len(files), progress=False,
        baseline_images=read_images(files, 40_000_000), sanity_images=sanity_images,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if sanity_images:
        calibrate_once.result = torch.load(folder / CALIBRATION_FILE, weights_only=True)
    shutil.rmtree(folder)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sanity-images", type=int, default=sanity.DEFAULT_IMAGES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="camserve-sanity-bench-") as tmp:
        work = Path(tmp)
        source = torchvision_dir(args.arch, work)
        (work / "images").mkdir()
        jpeg_images(work / "images", 256, args.images)
        files = image_files(work / "images")
        rounds = []
        for number in range(args.rounds):
            order = [0, args.sanity_images] if number % 2 == 0 else [args.sanity_images, 0]
            seconds = {count: calibrate_once(source, work, files, count) for count in order}
            rounds.append({"without_s": seconds[0], "with_s": seconds[args.sanity_images]})
            print(f"round {number + 1}: {rounds[-1]}", file=sys.stderr)
    ratios = [r["with_s"] / r["without_s"] for r in rounds]
    result = SanityResult.from_calibration(calibrate_once.result)
    report = {
        "what": __doc__.splitlines()[0],
        "command": "python -m bench.sanity_cost " + " ".join(argv or sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "note": "the machine was shared with other jobs during this run (see the load average)",
        "arch": args.arch,
        "calibration_images": args.images,
        "sanity_images": args.sanity_images,
        "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
        "ratio_with_to_without": {
            "median": round(statistics.median(ratios), 3),
            "each_round": [round(r, 3) for r in ratios],
            "target_max": TARGET_RATIO,
        },
        "sanity_result": result.to_dict() if result else None,
    }
    print(json.dumps(report, indent=2))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{started.date()}-sanity-cost-{args.arch}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
