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
from importlib import resources
from pathlib import Path

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
