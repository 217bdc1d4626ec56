"""The storage layout KServe's TorchServe runtime expects under an InferenceService's storageUri:

    <out>/config/config.properties   (config/kserve/config.properties, model name filled in)
    <out>/config/metrics.yaml        (config/metrics.yaml: camserve's metrics)
    <out>/model-store/<name>.mar     (the archive, rebuilt with batchSize 1)

    python -m camserve.kserve --model-dir models/shapes --name shapes --out .run/kserve-bundle

batchSize is forced to 1 in the archive itself because TorchServe takes the archive's
model-config.yaml over config.properties, and the kservev2 envelope answers only the first
request of a batch: a larger batch would silently drop requests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from camserve.archive import MODEL_CONFIG, REPO_DIR, build_archive

KSERVE_CONFIG = REPO_DIR / "config" / "kserve" / "config.properties"
METRICS_CONFIG = REPO_DIR / "config" / "metrics.yaml"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/shapes"))
    parser.add_argument("--name", default="shapes")
    parser.add_argument("--out", type=Path, default=Path(".run/kserve-bundle"))
    args = parser.parse_args(argv)
    out = build_bundle(args.model_dir, args.name, args.out)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"{path}  ({path.stat().st_size} bytes)")
    print(f"\nCopy {out}/ to your storageUri (e.g. gs://bucket/camserve/) and apply")
    print("config/kserve/inferenceservice.yaml with storageUri pointing there.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
