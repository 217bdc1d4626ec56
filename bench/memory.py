"""Worst-case worker memory: a full batch of maximum-size images, per format, on a real
TorchServe; writes bench/results/<date>-memory.json::

    .venv/bin/python -m bench.memory [--batch 8]

The server runs config/config.properties and the shapes archive as shipped (batchSize 8,
max_pixels 40 M), except a long maxBatchDelay so that the concurrent posts form one batch.
Each input has max_pixels pixels (6400 x 6250) and fits max_request_size; per format it is
the variant that costs most to decode (16-bit or 32-bit samples, an alpha channel).

Peak memory is the worker's VmHWM (the kernel's high-water mark of its resident set),
reset through /proc/<pid>/clear_refs before each batch, so a short peak is not missed.
The reset sets it to the current resident size, which stays high after a big batch (the
allocator keeps freed memory), so single images are measured first.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image, ImageDraw

from bench.run import machine
from camserve.tools.archive import build_archive
from harness.local_torchserve import LocalTorchServe, read_properties
from tests.live import worker_processes

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "config.properties"
SHAPES = REPO / "models" / "shapes"
WIDTH, HEIGHT = 6400, 6250  # 40,000,000 pixels: the shipped max_pixels
MIB = 2**20


def _picture() -> Image.Image:
    """Smooth gradients and a disc: compresses well enough to fit max_request_size at
    40 Mpx in every format, and still decodes to a full-size image."""
    x = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None]
    channels = [np.broadcast_to(x, (HEIGHT, WIDTH)), np.broadcast_to(y, (HEIGHT, WIDTH))]
    channels.append((channels[0] + channels[1]) / 2)
    image = Image.fromarray(np.dstack(channels).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((1000, 1000, 5000, 5000), fill=(200, 30, 30))
    return image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def max_size_inputs() -> dict[str, bytes]:
    rgb = _picture()
    grey = np.asarray(rgb.convert("L"))
    palette = rgb.convert("P", dither=Image.Dither.NONE, palette=Image.Palette.ADAPTIVE)
    return {
        "png_16bit_grey": _encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "jpeg_rgb": _encode(rgb, "JPEG", quality=90),
        "gif": _encode(palette, "GIF"),
        "tiff_32bit_grey": _encode(
            Image.fromarray(grey.astype(np.int32) * 257), "TIFF", compression="tiff_deflate"
        ),
        "webp_rgba_lossless": _encode(rgb.convert("RGBA"), "WEBP", lossless=True, method=0),
        "bmp_1bit": _encode(rgb.convert("1"), "BMP"),
    }


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(server: LocalTorchServe, body: bytes, count: int) -> dict:
    """``count`` concurrent posts of ``body``; the worker's resident memory around them."""
    [worker] = worker_processes(server)
    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib(worker.pid, "VmRSS")
    url = f"{server.inference_url}/predictions/shapes"
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=count) as pool:
        replies = list(
            pool.map(
                lambda _: requests.post(url, data=body, headers=server.auth(), timeout=600),
                range(count),
            )
        )
    seconds = time.perf_counter() - started
    return {
        "items": count,
        "statuses": sorted({r.status_code for r in replies}),
        "rss_before_mib": round(before / 1024),
        "peak_rss_mib": round(_status_kib(worker.pid, "VmHWM") / 1024),
        "rss_after_mib": round(_status_kib(worker.pid, "VmRSS") / 1024),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default: the archive's")
    args = parser.parse_args(argv)
    model_config = yaml.safe_load((SHAPES / "model-config.yaml").read_text())
    batch = args.batch or model_config["batchSize"]
    properties = read_properties(CONFIG)
    max_request = int(properties["max_request_size"])
    inputs = max_size_inputs()
    for name, body in inputs.items():
        assert len(body) <= max_request, f"{name}: {len(body)} bytes over max_request_size"

    work = Path(tempfile.mkdtemp(prefix="camserve-memory-"))
    try:
        source = work / "model"
        shutil.copytree(SHAPES, source)
        model_config.update(batchSize=batch, maxBatchDelay=5000)
        (source / "model-config.yaml").write_text(yaml.safe_dump(model_config))
        build_archive(source, "shapes", work / "store")
        server = LocalTorchServe.on_free_ports(work / "ts", CONFIG, work / "store")
        server.start()
        try:
            measure(server, inputs["jpeg_rgb"], 1)  # warm-up: first-call allocations
            # Every image alone first: after a big batch the allocator keeps the freed
            # heap resident, which would hide a single image's smaller peak.
            results = {name: {"bytes": len(body)} for name, body in inputs.items()}
            for name, body in inputs.items():
                results[name]["alone"] = measure(server, body, 1)
            for name, body in inputs.items():
                results[name]["full_batch"] = measure(server, body, batch)
                print(name, json.dumps(results[name]), flush=True)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    worst = max(results.values(), key=lambda r: r["full_batch"]["peak_rss_mib"])
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.memory" + (f" --batch {args.batch}" if args.batch else ""),
        "machine": machine(),
        "settings": {
            "config": "config/config.properties",
            "batch_size": batch,
            "max_pixels": model_config["handler"]["max_pixels"],
            "image_size": [WIDTH, HEIGHT],
            "max_request_size": max_request,
        },
        "results": results,
        "worst_full_batch_peak_rss_mib": worst["full_batch"]["peak_rss_mib"],
    }
    out = REPO / "bench" / "results" / f"{datetime.date.today().isoformat()}-memory.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
