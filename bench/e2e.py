"""End to end through TorchServe: camserve's handler against an independent plain handler.

Both servers run at once (each with its own ports, TMPDIR and worker) and serve the same
network with the same weights; a separate load-generating process drives them. A run
measures every load in blocks that alternate between the servers (ABBA), and a model gets
``runs`` runs, each giving its own explained/plain ratios: the result is their median with
the min-max spread, so that no verdict rests on one lucky run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
# The picture the benchmarks post: a 400x300 JPEG (issue 24's independent measurement).
IMAGE_SIZE = (400, 300)
VARIANTS = ("plain", "camserve")
# With a before tree (another checkout of camserve), its handler runs as a third server,
# interleaved with the other two: before and after measured in the same run.
BEFORE = "before"


@dataclass(frozen=True)
class Load:
    """One load-generator setting, run in ``blocks`` blocks per server and run; ``judged``
    names the number compared between handlers."""

    name: str
    concurrency: int
    duration_s: float  # per block
    max_requests: int  # per block
    judged: str = "throughput"  # or "p50_latency"
    blocks: int = 1


# 10 x 30 latency samples at concurrency 1, 3 x 12 s at concurrency 8, per server and run.
DEFAULT_LOADS = (
    Load("c1", 1, 60.0, 30, "p50_latency", blocks=10),
    Load("c8", 8, 12.0, 100_000, blocks=3),
)

TARGET_LAYERS = {
    "resnet50": "layer4",
    "mobilenet_v3_small": "features",
    "efficientnet_b0": "features",
}


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
    """One of the repository's models (``models/<name>``, e.g. shapes) or a torchvision
    architecture with random weights."""
    source = REPO / "models" / name
    if not (source / "model-config.yaml").exists():
        return torchvision_dir(name, workdir, batch_size)
    directory = workdir / "models" / f"{name}-b{batch_size}"
    if not directory.exists():
        shutil.copytree(source, directory)
        config = yaml.safe_load((directory / "model-config.yaml").read_text())
        config["batchSize"] = batch_size
        (directory / "model-config.yaml").write_text(yaml.safe_dump(config))
    return directory


def jpeg_images(workdir: Path, size: int | tuple[int, int], count: int = 8) -> list[Path]:
    """``count`` JPEGs of ``size`` (width, height; an int: square) from the shapes renderer."""
    width, height = (size, size) if isinstance(size, int) else size
    paths = []
    for index in range(count):
        image = render_sample(HELD_OUT_SEED, index).image.resize((width, height))
        path = workdir / f"image-{width}x{height}-{index}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def plain_archive(model_dir: Path, name: str, export_path: Path) -> Path:
    """``<export_path>/<name>.mar`` with the plain handler and the model's own files only:
    no camserve code in it."""
    section = yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]
    files = [section["weights"], section.get("labels", "index_to_name.json")]
    files += [section["model_file"]] if section.get("model_file") else []
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plain-archive-") as work:
        staging = Path(work) / "tmp"
        staging.mkdir()
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name, "--version", "1.0",
            "--handler", str(PLAIN_HANDLER),
            "--extra-files", ",".join(str(model_dir / f) for f in files),
            "--config-file", str(model_dir / "model-config.yaml"),
            "--export-path", str(export_path), "--force",
        ]  # fmt: skip
        done = subprocess.run(
            command, env=dict(os.environ, TMPDIR=str(staging)), capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}\n{done.stderr}")
    return export_path / f"{name}.mar"


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

    def take(self) -> int:
        """The peak since the last ``take`` (or the start); the next one starts from now."""
        peak, self.peak = self.peak, self.process.memory_info().rss
        return peak

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(1)
        return self.peak


def worker_pid(server: LocalTorchServe) -> int:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if any("model_service_worker" in part for part in child.cmdline()):
            return child.pid
    raise RuntimeError("no TorchServe worker process found")


def loadgen(targets: list[tuple[str, str]], images: list[Path], load: Load) -> list[list[dict]]:
    """Run ``load`` against every (url, token) in ``targets``, its blocks in ABBA order, in a
    process of its own; the blocks of each target, in the order given."""
    # --token=VALUE: a TorchServe token may start with "-".
    command = [
        sys.executable, "-m", "bench.loadgen",
        "--concurrency", str(load.concurrency), "--duration", str(load.duration_s),
        "--max-requests", str(load.max_requests), "--blocks", str(load.blocks),
    ]  # fmt: skip
    for url, token in targets:
        command += ["--url", url, f"--token={token}"]
    for image in images:
        command += ["--image", str(image)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["servers"]


def start_servers(
    workdir: Path, model: str, directory: Path, before_tree: Path | None = None
) -> dict[str, LocalTorchServe]:
    """The plain and the camserve server for ``model`` (and the before tree's camserve), all
    started (stopped on failure)."""
    servers: dict[str, LocalTorchServe] = {}
    variants = (*VARIANTS, BEFORE) if before_tree else VARIANTS
    try:
        for variant in variants:
            store = workdir / f"store-{model}-{variant}"
            config = CONFIG
            if variant == "plain":
                plain_archive(directory, model, store)
            elif variant == BEFORE:
                archive_from_tree(before_tree, directory, model, store)
                config = tree_config(before_tree, workdir)
            else:
                build_archive(directory, model, store, handler_file=HANDLER_FILE)
            server = LocalTorchServe.on_free_ports(
                workdir / f"ts-{model}-{variant}", config, store, models=f"{model}={model}.mar"
            )
            servers[variant] = server
            server.start(wait_for=model)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def tree_config(tree: Path, workdir: Path) -> Path:
    """The tree's own config.properties, its metrics.yaml named by absolute path: the metrics
    a handler may send are the ones its metrics.yaml declares (the rest are dropped)."""
    lines = (tree / "config" / "config.properties").read_text().splitlines()
    metrics = (tree / "config" / "metrics.yaml").resolve()
    path = workdir / "before-config.properties"
    path.write_text(
        "\n".join(
            f"metrics_config={metrics}" if line.startswith("metrics_config=") else line
            for line in lines
        )
        + "\n"
    )
    return path


def archive_from_tree(tree: Path, directory: Path, model: str, store: Path) -> Path:
    """``<store>/<model>.mar`` built by another checkout's own archive builder (its handler
    and its camserve), for a before/after run."""
    code = (
        "import sys; from camserve.tools.archive import build_archive; "
        "build_archive(sys.argv[1], sys.argv[2], sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(directory), model, str(store)],
        cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), check=True, capture_output=True,
    )  # fmt: skip
    return store / f"{model}.mar"


def target(server: LocalTorchServe, model: str) -> tuple[str, str]:
    return f"{server.inference_url}/predictions/{model}", server.keys()["inference"]


def rotated(names: list[str], by: int) -> list[str]:
    """``names`` starting ``by`` places on (A B C by 1: B C A)."""
    shift = by % len(names)
    return names[shift:] + names[:shift]


def measure_run(
    servers: dict[str, LocalTorchServe],
    model: str,
    images: list[Path],
    loads: tuple[Load, ...] | list[Load],
    run_index: int,
) -> dict[str, dict[str, dict]]:
    """One run: every load on every server, blocks interleaved; variant -> load -> summary.

    Run ``run_index`` starts at a rotated server: within a run the blocks go A B C C B A, so
    a middle server never runs two blocks back to back while the others do. In an A/A run (the
    same tree as camserve and as before, on a busy machine) the middle server's median
    throughput came out 25% lower. So over as many runs as servers each takes each place
    once (two servers: they alternate, as before)."""
    order = rotated(list(servers), run_index)
    measured: dict[str, dict[str, dict]] = {v: {} for v in servers}
    for load in loads:
        blocks = loadgen([target(servers[v], model) for v in order], images, load)
        for variant, variant_blocks in zip(order, blocks, strict=True):
            measured[variant][load.name] = pool(variant_blocks)
    return measured


def pool(blocks: list[dict]) -> dict:
    """A load's blocks on one server as one sample: latency quantiles over every request,
    throughput as all requests over all the blocks' time."""
    latencies = sorted(x for block in blocks for x in block["latencies_s"])
    requests = sum(block["requests"] for block in blocks)
    statuses: dict[str, int] = {}
    for block in blocks:
        for status, count in block["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        "requests": requests,
        "p50_s": round(statistics.median(latencies), 5),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 5),
        "throughput_rps": round(requests / sum(block["wall_s"] for block in blocks), 3),
        "mean_answer_bytes": round(
            sum(b["mean_answer_bytes"] * b["requests"] for b in blocks) / max(requests, 1), 1
        ),
        "block_p50_s": [block["p50_s"] for block in blocks],
        "statuses": statuses,
    }


def run_ratios(measured: dict, peaks: dict[str, int], loads) -> dict[str, float]:
    """Each camserve server's numbers over the plain one's: ``c1_p50_latency``, ... for this
    tree, ``before_c1_p50_latency``, ... for a before tree."""
    plain = measured["plain"]
    ratios = {}
    for variant in measured:
        if variant == "plain":
            continue
        ours, prefix = measured[variant], "" if variant == "camserve" else f"{variant}_"
        for load in loads:
            if load.judged == "p50_latency":
                ratios[f"{prefix}{load.name}_p50_latency"] = round(
                    ours[load.name]["p50_s"] / plain[load.name]["p50_s"], 3
                )
            else:
                ratios[f"{prefix}{load.name}_throughput"] = round(
                    ours[load.name]["throughput_rps"] / plain[load.name]["throughput_rps"], 3
                )
        ratios[f"{prefix}peak_worker_rss"] = round(peaks[variant] / peaks["plain"], 3)
    return ratios


def run(
    workdir: Path,
    models: dict[str, Path],
    image_sizes: dict[str, int | tuple[int, int]] | None = None,
    loads: tuple[Load, ...] | list[Load] = DEFAULT_LOADS,
    runs: int = 3,
    before_tree: Path | None = None,
) -> dict:
    """Every model: ``runs`` interleaved runs; each number's median over the runs, and for
    each ratio its median and min-max. ``before_tree``: also that checkout's handler."""
    results = {}
    for model, directory in models.items():
        images = jpeg_images(workdir, (image_sizes or {}).get(model, IMAGE_SIZE))
        servers = start_servers(workdir, model, directory, before_tree)
        try:
            rss = {v: PeakRss(worker_pid(s)) for v, s in servers.items()}
            loadgen([target(s, model) for s in servers.values()], images, Load("warm", 2, 5, 20))
            per_run = []
            for index in range(runs):
                for sampler in rss.values():
                    sampler.take()
                measured = measure_run(servers, model, images, loads, index)
                peaks = {v: sampler.take() for v, sampler in rss.items()}
                per_run.append(
                    {
                        "ratios": run_ratios(measured, peaks, loads),
                        "variants": {
                            v: {"peak_worker_rss_mb": round(peaks[v] / 2**20, 1), **measured[v]}
                            for v in servers
                        },
                    }
                )
            for sampler in rss.values():
                sampler.stop()
            devices = {v: device_lines(s) for v, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        results[model] = summarise(per_run, loads)
        results[model]["image_size"] = list(images_size(images[0]))
        results[model]["device_lines"] = devices
    return results


def summarise(per_run: list[dict], loads) -> dict:
    """Medians over the runs: each variant's numbers, and each ratio with its min-max."""
    variants = {}
    for variant in per_run[0]["variants"]:
        runs = [r["variants"][variant] for r in per_run]
        summary = {"peak_worker_rss_mb": _median([r["peak_worker_rss_mb"] for r in runs])}
        for load in loads:
            for key in ("p50_s", "p99_s", "throughput_rps", "mean_answer_bytes"):
                summary[f"{load.name}_{key}"] = _median([r[load.name][key] for r in runs])
        statuses: dict[str, int] = {}
        for r in runs:
            for load in loads:
                for status, count in r[load.name]["statuses"].items():
                    statuses[status] = statuses.get(status, 0) + count
        summary["statuses"] = statuses
        variants[variant] = summary
    names = list(per_run[0]["ratios"])
    return {
        "variants": variants,
        "ratios": {n: _median([r["ratios"][n] for r in per_run]) for n in names},
        "ratio_spread": {
            n: [min(r["ratios"][n] for r in per_run), max(r["ratios"][n] for r in per_run)]
            for n in names
        },
        "runs": per_run,
    }


def images_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


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
    return round(statistics.median(values), 5)
