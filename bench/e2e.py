"""End to end through TorchServe: camserve's handler against a plain handler, same weights.

Both servers run at once (each with its own ports, TMPDIR and worker); a separate
load-generating process drives them in alternating rounds on loopback.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
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
SHAPES_DIR = REPO / "models" / "shapes"
# Both handlers log the device they load on with this phrase (the GPU run checks it).
DEVICE_PHRASE = "on device "


@dataclass(frozen=True)
class Load:
    """One load-generator setting: ``judged`` names the number compared between handlers."""

    name: str
    concurrency: int
    duration_s: float
    max_requests: int
    judged: str = "throughput"  # or "p50_latency"


DEFAULT_LOADS = (Load("c1", 1, 120.0, 60, "p50_latency"), Load("c8", 8, 20.0, 100_000))

TARGET_LAYERS = {"resnet50": "layer4", "mobilenet_v3_small": "features"}


def torchvision_dir(arch: str, workdir: Path, batch_size: int = 8) -> Path:
    """A torchvision ImageNet classifier with random weights, packaged like a user's model."""
    directory = workdir / "models" / f"{arch}-b{batch_size}"
    if (directory / "model-config.yaml").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    torch.save(model.state_dict(), directory / "weights.pt")
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    labels = {str(i): name for i, name in enumerate(categories)}
    (directory / "index_to_name.json").write_text(json.dumps(labels))
    config = {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": batch_size,
        "maxBatchDelay": 10,
        "responseTimeout": 120,
        "handler": {
            "architecture": arch,
            "weights": "weights.pt",
            "labels": "index_to_name.json",
            "target_layer": TARGET_LAYERS[arch],
            "topk": 5,
            "preprocessing": {"input_size": [224, 224]},
        },
    }
    (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    return directory


def model_dir(name: str, workdir: Path, batch_size: int = 8) -> Path:
    """``shapes`` (the repository's model) or a torchvision architecture with random weights."""
    if name != "shapes":
        return torchvision_dir(name, workdir, batch_size)
    directory = workdir / "models" / f"shapes-b{batch_size}"
    if not directory.exists():
        shutil.copytree(SHAPES_DIR, directory)
        config = yaml.safe_load((directory / "model-config.yaml").read_text())
        config["batchSize"] = batch_size
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
    # --token=VALUE: a TorchServe token may start with "-".
    command = [
        sys.executable, "-m", "bench.loadgen", "--url", url, f"--token={token}",
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
    loads: tuple[Load, ...] | list[Load] = DEFAULT_LOADS,
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
            measured: dict[str, dict[str, list]] = {
                v: {load.name: [] for load in loads} for v in servers
            }
            for server in servers.values():  # warm-up
                url = f"{server.inference_url}/predictions/{model}"
                loadgen(url, server.keys()["inference"], images, 2, 5, 20)
            for _ in range(rounds):
                for variant, server in servers.items():
                    url = f"{server.inference_url}/predictions/{model}"
                    token = server.keys()["inference"]
                    for load in loads:
                        measured[variant][load.name].append(
                            loadgen(
                                url,
                                token,
                                images,
                                load.concurrency,
                                load.duration_s,
                                load.max_requests,
                            )  # fmt: skip
                        )
            peaks = {v: r.stop() for v, r in rss.items()}
            devices = {v: device_lines(s) for v, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        summary = {}
        for variant, runs in measured.items():
            summary[variant] = {"peak_worker_rss_mb": round(peaks[variant] / 2**20, 1)}
            for load in loads:
                summary[variant].update(
                    {
                        f"{load.name}_p50_s": _median([r["p50_s"] for r in runs[load.name]]),
                        f"{load.name}_p99_s": _median([r["p99_s"] for r in runs[load.name]]),
                        f"{load.name}_throughput_rps": _median(
                            [r["throughput_rps"] for r in runs[load.name]]
                        ),
                    }
                )
            summary[variant]["statuses"] = _merge(
                [r["statuses"] for rs in runs.values() for r in rs]
            )
            summary[variant]["runs"] = runs
        plain, ours = summary["plain"], summary["camserve"]
        ratios = {}
        for load in loads:
            if load.judged == "p50_latency":
                key = f"{load.name}_p50_s"
                ratios[f"{load.name}_p50_latency"] = round(ours[key] / plain[key], 3)
            else:
                key = f"{load.name}_throughput_rps"
                ratios[f"{load.name}_throughput"] = round(ours[key] / plain[key], 3)
        ratios["peak_worker_rss"] = round(
            ours["peak_worker_rss_mb"] / plain["peak_worker_rss_mb"], 3
        )
        results[model] = {
            "variants": summary,
            "ratios": ratios,
            "image_size": image_sizes[model],
            "device_lines": devices,
        }
    return results


def device_lines(server: LocalTorchServe) -> list[str]:
    """The worker's log lines that name the device its handler loaded the model on."""
    log = server.workdir / "logs" / "model_log.log"
    if not log.exists():
        return []
    return [
        line.strip()[-200:] for line in log.read_text(errors="replace").splitlines()
        if DEVICE_PHRASE in line
    ]  # fmt: skip


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _merge(counters: list[dict]) -> dict:
    merged: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            merged[key] = merged.get(key, 0) + value
    return merged
