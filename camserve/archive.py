"""Pack a model folder (weights, labels, model-config.yaml) into a self-contained ``.mar``.

The archive carries the handler and the ``camserve`` package, so it runs on a stock
TorchServe with torch, torchvision, captum and pillow installed and nothing of ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import camserve

PACKAGE_DIR = Path(camserve.__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
HANDLER_FILE = REPO_DIR / "handlers" / "camserve_handler.py"
MODEL_CONFIG = "model-config.yaml"


def _ignore(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def build_archive(
    model_dir: str | Path,
    name: str,
    export_path: str | Path,
    version: str = "1.0",
    handler_file: str | Path = HANDLER_FILE,
) -> Path:
    """Build ``<export_path>/<name>.mar`` from ``model_dir``; returns its path."""
    model_dir, export_path = Path(model_dir), Path(export_path)
    config_path = model_dir / MODEL_CONFIG
    section = yaml.safe_load(config_path.read_text()).get("handler", {})
    needed = [section.get("weights"), section.get("labels", "index_to_name.json")]
    needed += [section.get(k) for k in ("calibration", "model_file") if section.get(k)]
    missing = [f for f in needed if not f or not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks files named in {MODEL_CONFIG}: {missing}")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="camserve-archive-") as work:
        payload = Path(work) / "payload"
        shutil.copytree(PACKAGE_DIR, payload / "camserve", ignore=_ignore)
        for file in needed + [MODEL_CONFIG]:
            shutil.copy2(model_dir / file, payload / file)
        # torch-model-archiver stages in $TMPDIR/<name> and deletes it: give it its own.
        staging = Path(work) / "tmp"
        staging.mkdir()
        env = dict(os.environ, TMPDIR=str(staging))
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name,
            "--version", version,
            "--handler", str(handler_file),
            "--extra-files", str(payload),
            "--config-file", str(payload / MODEL_CONFIG),
            "--export-path", str(export_path),
            "--force",
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed:\n{done.stdout}\n{done.stderr}")
    return export_path / f"{name}.mar"
