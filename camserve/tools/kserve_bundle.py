"""The storage layout KServe's TorchServe runtime expects under an InferenceService's storageUri:

    <out>/config/config.properties   (config/kserve/config.properties, model name filled in)
    <out>/config/metrics.yaml        (config/metrics.yaml: camserve's metrics)
    <out>/model-store/<name>.mar     (the archive, rebuilt with batchSize 1)

    camserve kserve-bundle --model-dir models/shapes --name shapes --out .run/kserve-bundle

batchSize is forced to 1 in the archive itself because TorchServe takes the archive's
model-config.yaml over config.properties, and the kservev2 envelope answers only the first
request of a batch: a larger batch would silently drop requests.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import yaml

from camserve.tools.archive import MODEL_CONFIG, build_archive

# config/ is installed as camserve.config (pyproject's package-dir).
CONFIG_DIR = Path(str(resources.files("camserve.config")))
KSERVE_CONFIG = CONFIG_DIR / "kserve" / "config.properties"
METRICS_CONFIG = CONFIG_DIR / "metrics.yaml"
SNAPSHOT_KEY = "model_snapshot="


def kserve_properties(name: str, config: Path = KSERVE_CONFIG) -> str:
    """The KServe config.properties text with its model_snapshot naming ``name``.

    Comments are kept: the file is documentation for whoever opens the bucket.
    """
    lines = []
    for line in config.read_text().splitlines():
        if line.startswith(SNAPSHOT_KEY):
            snapshot = json.loads(line[len(SNAPSHOT_KEY) :])
            [settings] = snapshot["models"].values()
            for version in settings.values():
                version.update(marName=f"{name}.mar", batchSize=1)
            snapshot["models"] = {name: settings}
            line = SNAPSHOT_KEY + json.dumps(snapshot, separators=(",", ":"))
        lines.append(line)
    return "\n".join(lines) + "\n"


def build_bundle(
    model_dir: str | Path, name: str, out: str | Path, config: Path = KSERVE_CONFIG
) -> Path:
    """Write the KServe storage layout for ``model_dir`` into ``out``; returns ``out``."""
    model_dir, out = Path(model_dir), Path(out)
    with tempfile.TemporaryDirectory(prefix="camserve-kserve-") as work:
        staged = Path(work) / "model"
        shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns("__pycache__"))
        settings = yaml.safe_load((staged / MODEL_CONFIG).read_text())
        settings["batchSize"] = 1
        (staged / MODEL_CONFIG).write_text(yaml.safe_dump(settings, sort_keys=False))
        build_archive(staged, name, out / "model-store")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "config" / "config.properties").write_text(kserve_properties(name, config))
    shutil.copy2(METRICS_CONFIG, out / "config" / "metrics.yaml")
    return out
