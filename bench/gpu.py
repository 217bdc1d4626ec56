"""``make bench-gpu``: ResNet-50 on CUDA, explained against plain, in process and end to end.

    python -m bench.gpu                      # needs CUDA; a few minutes on one data-centre GPU
    python -m bench.gpu --device cuda:1      # another GPU
    python -m bench.gpu --device cpu --smoke # the harness itself on the CPU (its test runs this)

In one run, interleaved: ResNet-50 (random weights) at 224x224 and batch 1, 8 and 32,
camserve's ``Explainer.explain`` against a plain ``inference_mode`` forward (CUDA events) and
the peak GPU memory of each; then the same two through TorchServe (camserve's handler against
bench/plain_handler.py, one worker each on the GPU, dynamic batching up to 32). Writes
bench/results/<date>-gpu.json with the GPU's name, the machine and the command. Without CUDA
it measures nothing, says why on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import e2e
from bench.run import RESULTS, machine, write_results
from bench.timing import summarise

NO_CUDA_EXIT = 2
TARGETS = {"explained_ratio_max": 1.10, "peak_memory_ratio_max": 1.20}
# The targets hold at the batch sizes a GPU serves; batch 1 is reported, not judged.
JUDGED_BATCHES = (8, 32)


def cuda_missing(device: torch.device) -> str | None:
    """Why ``device`` cannot run, or None when it can."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return (
            f"bench-gpu needs a CUDA GPU, but torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}) finds none: torch.cuda.is_available() is False. Run it on "
            "a machine with an NVIDIA GPU and a driver for that CUDA version; nothing was "
            "measured."
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"bench-gpu: {device} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
    return None


class Timer:
    """Seconds per call: CUDA events on a GPU (what the GPU's stream spent, launches
    included), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak bytes allocated on ``device`` during ``fn``: in total (weights included) and above
    what was resident before the call."""
    if device.type != "cuda":
        return {"peak_mb": None, "working_mb": None}
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mb": round(peak / 2**20, 2), "working_mb": round((peak - resident) / 2**20, 2)}


def inprocess(explainer, batches: list[int], repeats: int, device: torch.device) -> dict:
    """Plain and explained, interleaved round after round, from the same CPU tensors (both
    pay the same stack and host-to-device copy, as a handler does)."""
    from bench.inprocess import prepared_batch

    timer = Timer(device)
    results = {}
    for batch in batches:
        prepared = prepared_batch(explainer, batch)
        tensors = [item.tensor for item in prepared]

        def plain(tensors=tensors):
            with torch.inference_mode():
                return explainer.model(torch.stack(tensors).to(device))

        def explained(prepared=prepared):
            return explainer.explain(prepared)

        candidates = {"plain": plain, "camserve": explained}
        for fn in candidates.values():  # warm-up: cuDNN autotuning, allocator, Captum
            for _ in range(3):
                fn()
        memory = {name: peak_memory(fn, device) for name, fn in candidates.items()}
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, fn in candidates.items():
                samples[name].append(timer(fn))
        stats = {name: summarise(values) for name, values in samples.items()}
        plain_s, ours_s = stats["plain"].median_s, stats["camserve"].median_s
        entry = {
            "stats": {name: s.to_json() for name, s in stats.items()},
            "ratio_to_plain": round(ours_s / plain_s, 3),
            "throughput_images_per_s": {
                name: round(batch / s.median_s, 1) for name, s in stats.items()
            },
            "memory": memory,
        }
        if memory["plain"]["peak_mb"]:
            entry["peak_memory_ratio"] = round(
                memory["camserve"]["peak_mb"] / memory["plain"]["peak_mb"], 3
            )
        results[f"batch{batch}"] = entry
    return results


def gpu_description(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": None, "device": str(device)}
    properties = torch.cuda.get_device_properties(device)
    return {
        "name": properties.name,
        "device": str(device),
        "memory_gb": round(properties.total_memory / 2**30, 1),
        "capability": f"{properties.major}.{properties.minor}",
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def verdicts(inproc: dict, end_to_end: dict, device_lines: dict, device: torch.device) -> dict:
    checks = {}
    for key, value in inproc.items():
        if int(key.removeprefix("batch")) not in JUDGED_BATCHES:
            continue
        ratio = value["ratio_to_plain"]
        checks[f"inprocess {key} explained/plain = {ratio}"] = (
            ratio <= TARGETS["explained_ratio_max"]
        )
        if "peak_memory_ratio" in value:
            memory = value["peak_memory_ratio"]
            checks[f"inprocess {key} peak GPU memory explained/plain = {memory}"] = (
                memory <= TARGETS["peak_memory_ratio_max"]
            )
    for variant, lines in device_lines.items():
        # TorchServe must have given the worker the GPU, and the handler must have used it.
        on_device = [line for line in lines if f"on device {device.type}" in line]
        checks[f"e2e {variant} worker logged its device: {lines[-1] if lines else None}"] = bool(
            on_device
        )
    for model, value in end_to_end.items():
        for name, ratio in value["ratios"].items():
            if name.endswith("_throughput") and name != "c1_throughput":
                checks[f"e2e {model} {name} ratio = {ratio}"] = (
                    ratio >= 1 / TARGETS["explained_ratio_max"]
                )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:<index> (cpu: harness test)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="gpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    problem = cuda_missing(device)
    if problem:
        print(problem, file=sys.stderr)
        return NO_CUDA_EXIT
    if device.type == "cuda":
        if device.index is None:  # set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if args.smoke:
        arch, batches, repeats, image_size = "shapes", [1, 2], 3, 64
        loads = [e2e.Load("c1", 1, 10.0, 5, "p50_latency"), e2e.Load("c8", 8, 2.0, 100_000)]
    else:
        arch, batches, repeats, image_size = "resnet50", [1, 8, 32], 30, 256
        loads = [
            e2e.Load("c1", 1, 30.0, 60, "p50_latency"),
            e2e.Load("c8", 8, 10.0, 100_000),
            e2e.Load("c32", 32, 10.0, 100_000),
        ]
    started = datetime.datetime.now(datetime.UTC)
    results: dict = {
        "command": " ".join(
            [
                Path(sys.executable).name,
                "-m",
                "bench.gpu",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "gpu": gpu_description(device),
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="camserve-bench-gpu-") as work:
        work_path = Path(work)
        model_dir = e2e.model_dir(arch, work_path, batch_size=max(batches))
        from camserve.explainer import Explainer

        explainer = Explainer.from_directory(model_dir, device=device)
        size = "x".join(map(str, explainer.config.preprocessing.input_size))
        results["model"] = f"{arch} ({'trained' if arch == 'shapes' else 'random'} weights), {size}"
        results["inprocess"] = inprocess(explainer, batches, repeats, device)
        del explainer
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the TorchServe workers get the GPU to themselves
        results["e2e"] = e2e.run(
            work_path, {arch: model_dir}, {arch: image_size}, loads=loads, runs=2
        )
    device_lines = results["e2e"][arch].pop("device_lines")
    results["e2e_worker_devices"] = device_lines
    checks = verdicts(results["inprocess"], results["e2e"], device_lines, device)
    results["verdicts"] = checks
    results["seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    stem = f"{started:%Y-%m-%d}-{args.name}{'-smoke' if args.smoke else ''}"
    path = write_results(results, args.out, stem)
    print(f"wrote {path} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
