"""Helpers for tests and the soak script that talk to a real TorchServe over loopback HTTP."""

from __future__ import annotations

import shutil
from pathlib import Path

import jsonschema
import psutil
import requests
import yaml

from camserve.encode_json import load_schema
from camserve.tools.archive import build_archive
from harness.local_torchserve import LocalTorchServe

REPO = Path(__file__).resolve().parents[1]
SHAPES_DIR = REPO / "models" / "shapes"
PRODUCTION_CONFIG = REPO / "config" / "production.properties"
VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def archive_with(store: Path, work: Path, **model_config) -> Path:
    """The shapes archive with TorchServe settings of ``model-config.yaml`` replaced."""
    source = work / "shapes_model"
    shutil.copytree(SHAPES_DIR, source, dirs_exist_ok=True)
    config = yaml.safe_load((source / "model-config.yaml").read_text())
    config.update(model_config)
    (source / "model-config.yaml").write_text(yaml.safe_dump(config))
    build_archive(source, "shapes", store)
    return store


def post_png(server: LocalTorchServe, model: str, png: bytes) -> requests.Response:
    """PNG bytes posted to ``/predictions/<model>`` with the inference token."""
    return requests.post(
        f"{server.inference_url}/predictions/{model}",
        data=png,
        headers={**server.auth(), "Content-Type": "image/png"},
        timeout=60,
    )


def worker_processes(server: LocalTorchServe) -> list[psutil.Process]:
    """The Python model workers: children of TorchServe's Java frontend."""
    root = psutil.Process(server.process.pid)
    return [
        child
        for child in root.children(recursive=True)
        if any("model_service_worker" in part for part in child.cmdline())
    ]


def response_timeout(server: LocalTorchServe, model: str = "shapes") -> float:
    """The model's configured response timeout, in seconds, as TorchServe reports it."""
    reply = requests.get(
        f"{server.management_url}/models/{model}", headers=server.auth("management"), timeout=10
    )
    reply.raise_for_status()
    return float(reply.json()[0]["responseTimeout"])


def same_answer(a: dict, b: dict, tolerance: float = 1e-4) -> bool:
    """Same classes, probabilities and Grad-CAM map, up to float noise across batches
    (over the classes both list: ``topk`` may differ)."""
    shared = min(len(a["predictions"]), len(b["predictions"]))
    first, second = a["predictions"][:shared], b["predictions"][:shared]
    if [p["index"] for p in first] != [p["index"] for p in second]:
        return False
    probabilities = zip(first, second, strict=True)
    if any(abs(p["probability"] - q["probability"]) > tolerance for p, q in probabilities):
        return False
    return map_distance(a, b) <= tolerance * 10


def map_distance(a: dict, b: dict) -> float:
    """Largest absolute difference between two normalised Grad-CAM maps."""
    rows = zip(a["grad_cam"]["map"], b["grad_cam"]["map"], strict=True)
    return max(abs(x - y) for ra, rb in rows for x, y in zip(ra, rb, strict=True))
