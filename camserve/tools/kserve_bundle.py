"""The storage layout KServe's TorchServe runtime expects under an InferenceService's storageUri:

    <out>/config/config.properties   (config/kserve/config.properties, model filled in)
    <out>/config/metrics.yaml        (config/metrics.yaml: camserve's metrics)
    <out>/model-store/<name>.mar     (the archive)

    camserve kserve-bundle --model-dir models/shapes --name shapes --out .run/kserve-bundle

The model_snapshot takes the archive's batch settings (TorchServe takes the archive's
model-config.yaml over config.properties anyway): camserve reads KServe's bodies itself,
one request per item, so batching works under KServe as it does without it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from camserve.tools.archive import MODEL_CONFIG, build_archive

# config/ is installed as camserve.config (pyproject's package-dir).
CONFIG_DIR = Path(str(resources.files("camserve.config")))
KSERVE_CONFIG = CONFIG_DIR / "kserve" / "config.properties"
METRICS_CONFIG = CONFIG_DIR / "metrics.yaml"
SNAPSHOT_KEY = "model_snapshot="
BATCH_SETTINGS = ("batchSize", "maxBatchDelay", "responseTimeout", "minWorkers", "maxWorkers")

# What the runtime's wrapper (pytorch/serve kubernetes/kserve/kserve_wrapper, TorchServe
# 0.12, kserve 0.13) binds itself, whatever config.properties says: KServe's HTTP API and
# KServe's gRPC API. TorchServe must leave both free or the wrapper exits and the pod loops.
RUNTIME_HTTP_PORT = 8080
RUNTIME_GRPC_PORT = 8081
# The wrapper's defaults for keys missing from config.properties.
WRAPPER_DEFAULT_ADDRESS = "http://127.0.0.1:8085"
WRAPPER_DEFAULT_GRPC_PORT = "7070"


@dataclass(frozen=True)
class WrapperView:
    """Where the wrapper sends its requests, derived from config.properties as it does:
    REST to the inference address, gRPC to the inference host at ``grpc_inference_port``,
    readiness polls to the management address; one KServe model per model_snapshot entry."""

    inference_address: str
    management_address: str
    grpc_target: str
    model_names: tuple[str, ...]


def wrapper_view(properties: dict[str, str]) -> WrapperView:
    """What the wrapper reads from ``properties`` (as parsed from config.properties)."""
    inference = properties.get("inference_address", WRAPPER_DEFAULT_ADDRESS)
    grpc_port = properties.get("grpc_inference_port", WRAPPER_DEFAULT_GRPC_PORT)
    snapshot = json.loads(properties.get("model_snapshot", "{}"))
    return WrapperView(
        inference_address=inference,
        management_address=properties.get("management_address", WRAPPER_DEFAULT_ADDRESS),
        grpc_target=f"{urlsplit(inference).hostname}:{grpc_port}",
        model_names=tuple(snapshot.get("models", {})) or ("model",),
    )


def torchserve_ports(properties: dict[str, str]) -> dict[str, int]:
    """Every port TorchServe binds under ``properties`` (TorchServe's defaults otherwise)."""
    return {
        "inference": urlsplit(properties.get("inference_address", "http://x:8080")).port,
        "management": urlsplit(properties.get("management_address", "http://x:8081")).port,
        "metrics": urlsplit(properties.get("metrics_address", "http://x:8082")).port,
        "grpc_inference": int(properties.get("grpc_inference_port", 7070)),
        "grpc_management": int(properties.get("grpc_management_port", 7071)),
    }


def kserve_properties(name: str, settings: dict, config: Path = KSERVE_CONFIG) -> str:
    """The KServe config.properties text with its model_snapshot naming ``name`` and carrying
    the archive's batch ``settings``. Comments are kept: the file is documentation for whoever
    opens the bucket."""
    lines = []
    for line in config.read_text().splitlines():
        if line.startswith(SNAPSHOT_KEY):
            snapshot = json.loads(line[len(SNAPSHOT_KEY) :])
            [versions] = snapshot["models"].values()
            for version in versions.values():
                version["marName"] = f"{name}.mar"
                version.update({k: settings[k] for k in BATCH_SETTINGS if k in settings})
            snapshot["models"] = {name: versions}
            line = SNAPSHOT_KEY + json.dumps(snapshot, separators=(",", ":"))
        lines.append(line)
    return "\n".join(lines) + "\n"


def build_bundle(
    model_dir: str | Path, name: str, out: str | Path, config: Path = KSERVE_CONFIG
) -> Path:
    """Write the KServe storage layout for ``model_dir`` into ``out``; returns ``out``."""
    model_dir, out = Path(model_dir), Path(out)
    settings = yaml.safe_load((model_dir / MODEL_CONFIG).read_text())
    build_archive(model_dir, name, out / "model-store")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "config" / "config.properties").write_text(kserve_properties(name, settings, config))
    shutil.copy2(METRICS_CONFIG, out / "config" / "metrics.yaml")
    return out
