"""End to end through TorchServe: camserve's handler against a plain handler, same weights.

Both servers run at once (each with its own ports, TMPDIR and worker); a separate
load-generating process drives them in alternating rounds on loopback.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import torch
import torchvision
import yaml

from camserve.tools.archive import HANDLER_FILE, build_archive
from harness.local_torchserve import LocalTorchServe
from harness.shapes.dataset import HELD_OUT_SEED, render_sample

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "config.properties"
PLAIN_HANDLER = REPO / "bench" / "plain_handler.py"


def resnet50_dir(workdir: Path) -> Path:
    """A ResNet-50 with random weights, packaged like a user's model."""
    directory = workdir / "models" / "resnet50"
    if (directory / "model-config.yaml").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), directory / "weights.pt")
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    labels = {str(i): name for i, name in enumerate(categories)}
    (directory / "index_to_name.json").write_text(json.dumps(labels))
    config = {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 8,
        "maxBatchDelay": 10,
        "responseTimeout": 120,
        "handler": {
            "architecture": "resnet50",
            "weights": "weights.pt",
            "labels": "index_to_name.json",
            "target_layer": "layer4",
            "topk": 5,
            "preprocessing": {"input_size": [224, 224]},
        },
    }
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    return directory


def jpeg_images(workdir: Path, size: int, count: int = 8) -> list[Path]:
    paths = []
    for index in range(count):
        image = render_sample(HELD_OUT_SEED, index).image.resize((size, size))
        path = workdir / f"image-{size}-{index}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


class PeakRss:
    """Samples a process's resident memory every 20 ms and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(1)
        return self.peak


def worker_pid(server: LocalTorchServe) -> int:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if any("model_service_worker" in part for part in child.cmdline()):
            return child.pid
    raise RuntimeError("no TorchServe worker process found")


def loadgen(url: str, token: str, images: list[Path], concurrency: int, duration: float,
            max_requests: int) -> dict:  # fmt: skip
    command = [
        sys.executable, "-m", "bench.loadgen", "--url", url, "--token", token,
        "--concurrency", str(concurrency), "--duration", str(duration),
        "--max-requests", str(max_requests),
    ]  # fmt: skip
    for image in images:
        command += ["--image", str(image)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    workdir: Path,
    models: dict[str, Path],
    image_sizes: dict[str, int],
    c1_requests: int,
    c8_seconds: float,
    rounds: int = 2,
) -> dict:
    results = {}
    for model, model_dir in models.items():
        images = jpeg_images(workdir, image_sizes[model])
        servers: dict[str, LocalTorchServe] = {}
        try:
            for variant, handler in (("plain", PLAIN_HANDLER), ("camserve", HANDLER_FILE)):
                store = workdir / f"store-{model}-{variant}"
                build_archive(model_dir, model, store, handler_file=handler)
                server = LocalTorchServe.on_free_ports(
                    workdir / f"ts-{model}-{variant}", CONFIG, store, models=f"{model}={model}.mar"
                )
                servers[variant] = server
                server.start(wait_for=model)
            rss = {v: PeakRss(worker_pid(s)) for v, s in servers.items()}
            measured: dict[str, dict[str, list]] = {v: {"c1": [], "c8": []} for v in servers}
            for server in servers.values():  # warm-up
                url = f"{server.inference_url}/predictions/{model}"
                loadgen(url, server.keys()["inference"], images, 2, 5, 20)
            for _ in range(rounds):
                for variant, server in servers.items():
                    url = f"{server.inference_url}/predictions/{model}"
                    token = server.keys()["inference"]
                    measured[variant]["c1"].append(
                        loadgen(url, token, images, 1, c1_requests * 2.0, c1_requests)
                    )
                    measured[variant]["c8"].append(
                        loadgen(url, token, images, 8, c8_seconds, 100_000)
                    )
            peaks = {v: r.stop() for v, r in rss.items()}
        finally:
            for server in servers.values():
                server.stop()
        summary = {}
        for variant, runs in measured.items():
            summary[variant] = {
                "c1_p50_s": _median([r["p50_s"] for r in runs["c1"]]),
                "c1_p99_s": _median([r["p99_s"] for r in runs["c1"]]),
                "c8_throughput_rps": _median([r["throughput_rps"] for r in runs["c8"]]),
                "c8_p50_s": _median([r["p50_s"] for r in runs["c8"]]),
                "peak_worker_rss_mb": round(peaks[variant] / 2**20, 1),
                "statuses": _merge([r["statuses"] for r in runs["c1"] + runs["c8"]]),
                "runs": runs,
            }
        plain, ours = summary["plain"], summary["camserve"]
        results[model] = {
            "variants": summary,
            "ratios": {
                "c1_p50_latency": round(ours["c1_p50_s"] / plain["c1_p50_s"], 3),
                "c8_throughput": round(ours["c8_throughput_rps"] / plain["c8_throughput_rps"], 3),
                "peak_worker_rss": round(
                    ours["peak_worker_rss_mb"] / plain["peak_worker_rss_mb"], 3
                ),
            },
            "image_size": image_sizes[model],
        }
    return results


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _merge(counters: list[dict]) -> dict:
    merged: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            merged[key] = merged.get(key, 0) + value
    return merged
