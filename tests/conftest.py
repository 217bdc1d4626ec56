from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
import yaml

from camserve.explainer import Explainer
from camserve.tools.archive import build_archive
from harness.local_torchserve import LocalTorchServe, free_port
from harness.shapes.dataset import HELD_OUT_SEED, render_sample

REPO = Path(__file__).resolve().parents[1]
SHAPES_DIR = REPO / "models" / "shapes"
SHAPES_MULTI_DIR = REPO / "models" / "shapes-multi"
CONFIG = REPO / "config" / "config.properties"
# A custom model file for archive tests: one conv block, then a GAP + Linear head.
TINY_MODEL_SOURCE = (
    "from torch import nn\n\n"
    "class Tiny(nn.Module):\n"
    "    def __init__(self, num_classes=3):\n"
    "        super().__init__()\n"
    "        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())\n"
    "        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
    "                                  nn.Linear(8, num_classes))\n\n"
    "    def forward(self, x):\n"
    "        return self.head(self.body(x))\n"
)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shapes_explainer() -> Explainer:
    return Explainer.from_directory(SHAPES_DIR)


@pytest.fixture(scope="session")
def shapes_multi_explainer() -> Explainer:
    return Explainer.from_directory(SHAPES_MULTI_DIR)


@pytest.fixture(scope="session")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def png_bytes(image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def held_out(index: int):
    return render_sample(HELD_OUT_SEED, index)


def shapes_variant_store(tmp_path_factory, name: str, handler=None, **settings) -> Path:
    """A model store holding shapes.mar built with changed model-config.yaml settings:
    ``settings`` at the top level (batchSize...), ``handler`` in the handler section."""
    source = tmp_path_factory.mktemp(f"{name}_model")
    for item in SHAPES_DIR.iterdir():
        if item.is_file():
            shutil.copy2(item, source / item.name)
    config = yaml.safe_load((source / "model-config.yaml").read_text())
    config.update(settings)
    config["handler"].update(handler or {})
    (source / "model-config.yaml").write_text(yaml.safe_dump(config))
    store = tmp_path_factory.mktemp(f"{name}_store")
    build_archive(source, "shapes", store)
    return store


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    """The archive `make` builds, or a fresh one when the suite runs on its own."""
    built = REPO / "model_store" / "shapes.mar"
    store = tmp_path_factory.mktemp("model_store")
    if built.exists():
        shutil.copy2(built, store / "shapes.mar")
    else:
        build_archive(SHAPES_DIR, "shapes", store)
    return store


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """A real TorchServe with its own ports, TMPDIR and working directory."""
    ts = LocalTorchServe.on_free_ports(tmp_path_factory.mktemp("torchserve"), CONFIG, model_store)
    ts.start()
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def batching_server(tmp_path_factory):
    """batchSize 8 and a long delay: 8 concurrent posts are served as one batch."""
    store = shapes_variant_store(tmp_path_factory, "batching", batchSize=8, maxBatchDelay=5000)
    ts = LocalTorchServe.on_free_ports(tmp_path_factory.mktemp("batching_ts"), CONFIG, store)
    ts.start()
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def production_server(tmp_path_factory, model_store):
    """TorchServe with config/production.properties; its inference address comes from
    TS_INFERENCE_ADDRESS (enable_envvars_config), as a deployment would set it."""
    ts = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("production"),
        REPO / "config" / "production.properties",
        model_store,
    )
    ts.file_inference_address = ts.properties["inference_address"]
    env_address = f"http://127.0.0.1:{free_port()}"
    with mock.patch.dict("os.environ", {"TS_INFERENCE_ADDRESS": env_address}):
        ts.start()
    ts.properties["inference_address"] = env_address
    yield ts
    ts.stop()


@dataclass
class StaticHeaders:
    """An item's headers and id, as ``camserve.protocols.Headers`` reads them (for tests)."""

    values: dict = field(default_factory=dict)
    request_id: str = "ts-request-id"

    def get(self, name: str):
        return self.values.get(name)


@pytest.fixture(scope="session")
def shapes_explanation(shapes_explainer):
    """One real explanation of a held-out image, for encoders and protocols."""
    [explanation] = shapes_explainer.explain([shapes_explainer.prepare_image(held_out(0).image)])
    return explanation
