"""What the sanity check adds to ``camserve calibrate``: ResNet-50 (random weights, 224x224),
200 calibration images from JPEG files, calibrate without the check and with it, interleaved
in one run (the order alternates per round), on the torch threads given.

python -m bench.sanity_cost                       # 3 rounds, writes bench/results/
python -m bench.sanity_cost --arch shapes --rounds 1 --images 8 --out /tmp   # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.e2e import jpeg_images, model_dir
from bench.run import RESULTS, machine
from camserve.explainer import load_sanity
from camserve.sanity import SanityResult
from camserve.tools import sanity
from camserve.tools.calibrate import (
    CALIBRATION_FILE,
    calibrate_model_dir,
    image_files,
    read_images,
)

TARGET_RATIO = 2.0  # issue 23: the check may at most double calibrate's time


def cpu_seconds() -> float:
    """This process's CPU time, user + system, all threads: on a machine shared with other
    jobs it moves far less than the wall clock does."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def calibrate_once(
    source: Path, work: Path, files: list[Path], sanity_images: int
) -> tuple[dict[str, float], SanityResult | None]:
    """Wall and CPU seconds of one ``calibrate_model_dir`` run on a fresh copy of ``source``,
    and the sanity check's result it wrote."""
    folder = work / f"run-{time.monotonic_ns()}"
    shutil.copytree(source, folder)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    calibrate_model_dir(
        folder, read_images(files, 40_000_000), "bench", len(files), progress=False,
        baseline_images=read_images(files, 40_000_000), sanity_images=sanity_images,
    )  # fmt: skip
    seconds = {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu_start}
    result = load_sanity(folder / CALIBRATION_FILE)
    shutil.rmtree(folder)
    return seconds, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="resnet50 (random weights) or shapes")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--sanity-images", type=int, default=sanity.DEFAULT_IMAGES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="camserve-sanity-bench-") as tmp:
        work = Path(tmp)
        source = model_dir(args.arch, work)
        (work / "images").mkdir()
        jpeg_images(work / "images", 256, args.images)
        files = image_files(work / "images")
        rounds = []
        for number in range(args.rounds):
            order = [0, args.sanity_images] if number % 2 == 0 else [args.sanity_images, 0]
            runs = {count: calibrate_once(source, work, files, count) for count in order}
            result = runs[args.sanity_images][1]
            rounds.append({"without": runs[0][0], "with": runs[args.sanity_images][0]})
            print(f"round {number + 1}: {rounds[-1]}", file=sys.stderr)
    ratios = {
        clock: [r["with"][clock] / r["without"][clock] for r in rounds]
        for clock in ("wall_s", "cpu_s")
    }
    report = {
        "what": __doc__.splitlines()[0],
        "command": "python -m bench.sanity_cost " + " ".join(argv or sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "note": "the machine was shared with other jobs during this run (see the load average): "
        "the wall-clock ratio moves with their load, the CPU-time ratio (this process's user + "
        "system time, both torch threads) much less",
        "arch": args.arch,
        "calibration_images": args.images,
        "sanity_images": args.sanity_images,
        "rounds": [
            {run: {k: round(v, 3) for k, v in times.items()} for run, times in r.items()}
            for r in rounds
        ],
        "ratio_with_to_without": {
            **{
                f"{clock.removesuffix('_s')}_median": round(statistics.median(values), 3)
                for clock, values in ratios.items()
            },
            **{
                f"{clock.removesuffix('_s')}_each_round": [round(v, 3) for v in values]
                for clock, values in ratios.items()
            },
            "target_max": TARGET_RATIO,
        },
        "sanity_result": result.to_dict() if result else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started.date()}-sanity-cost-{args.arch}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ratios {report['ratio_with_to_without']}; wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
