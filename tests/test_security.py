"""The production config holds: keys are required, the model API is off, model URLs cannot
reach the network (SSRF), only inference can leave loopback, and weights never unpickle code.
"""

from __future__ import annotations

import http.server
import pathlib
import re
import shutil
import threading

import psutil
import pytest
import requests
import torch
import yaml

from camserve.architectures import load_weights
from camserve.explainer import Explainer
from harness.local_torchserve import read_properties
from harness.shapes import shapes_net
from tests.conftest import SHAPES_DIR, held_out, png_bytes
from tests.live import PRODUCTION_CONFIG

REFUSED = (400, 401, 403)  # TorchServe 0.12 answers a bad token with 400 InvalidKeyException
PROPERTIES = read_properties(PRODUCTION_CONFIG)


def predict(server, headers: dict) -> requests.Response:
    return requests.post(
        f"{server.inference_url}/predictions/shapes",
        data=png_bytes(held_out(0).image),
        headers=headers,
        timeout=60,
    )


@pytest.mark.integration
def test_inference_needs_the_inference_key(production_server):
    bad_keys = ({}, {"Authorization": "Bearer wrong"}, production_server.auth("management"))
    for headers in bad_keys:
        response = predict(production_server, headers)
        assert response.status_code in REFUSED and "Token Authorization failed" in response.text
        ping = requests.get(f"{production_server.inference_url}/ping", headers=headers, timeout=10)
        assert ping.status_code in REFUSED
    assert predict(production_server, production_server.auth()).status_code == 200


@pytest.mark.integration
def test_management_needs_the_management_key(production_server):
    url = f"{production_server.management_url}/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, production_server.auth()):
        response = requests.get(url, headers=headers, timeout=10)
        assert response.status_code in REFUSED and "Token Authorization failed" in response.text
    listed = requests.get(url, headers=production_server.auth("management"), timeout=10)
    assert [m["modelName"] for m in listed.json()["models"]] == ["shapes"]


@pytest.fixture
def listener():
    """A loopback HTTP server that records every request: an SSRF would show up here."""
    hits: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    thread.join(10)


@pytest.mark.integration
def test_the_model_api_cannot_register_replace_or_delete(production_server, listener):
    base, hits = listener
    management = production_server.management_url
    key = production_server.auth("management")
    for url in ("shapes.mar", f"{base}/evil.mar", "file:///etc/passwd"):
        response = requests.post(
            f"{management}/models", params={"url": url, "model_name": "evil"}, headers=key,
            timeout=30,
        )  # fmt: skip
        assert response.status_code == 405, response.text
    assert (
        requests.delete(f"{management}/models/shapes", headers=key, timeout=30).status_code == 405
    )
    listed = requests.get(f"{management}/models", headers=key, timeout=10).json()["models"]
    assert [m["modelName"] for m in listed] == ["shapes"]
    assert hits == []


@pytest.mark.integration
def test_workflow_urls_cannot_reach_the_network(production_server, listener):
    """The workflow API stays on with the model API off; allowed_urls still stops SSRF."""
    base, hits = listener
    response = requests.post(
        f"{production_server.management_url}/workflows",
        params={"url": f"{base}/evil.war"},
        headers=production_server.auth("management"),
        timeout=30,
    )
    assert response.status_code == 404 and "does not match any allowed URL" in response.text
    assert hits == []


def test_allowed_urls_match_only_archives_in_a_model_store():
    pattern = re.compile(PROPERTIES["allowed_urls"].replace("\\\\", "\\"))
    assert pattern.match("file:///srv/camserve/model_store/shapes.mar")
    for url in (
        "http://127.0.0.1:8080/model_store/shapes.mar",
        "https://example.com/model_store/shapes.mar",
        "s3://bucket/model_store/shapes.mar",
        "file:///etc/passwd",
        "file:///srv/../tmp/model_store/shapes.mar",
        "file:///srv/model_store/sub/shapes.mar",
        "file:///srv/model_store/shapes.mar.sh",
        "shapes.mar",
    ):
        assert not pattern.match(url), url


@pytest.mark.integration
def test_only_inference_follows_the_environment_and_all_binds_are_loopback(production_server):
    # TS_INFERENCE_ADDRESS moved inference away from the file's address.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{production_server.file_inference_address}/ping", timeout=5)
    assert predict(production_server, production_server.auth()).status_code == 200
    java = [
        p
        for p in psutil.Process(production_server.process.pid).children(recursive=True)
        if p.name() == "java"
    ]
    listening = [c for p in java for c in p.net_connections("inet") if c.status == "LISTEN"]
    assert len(listening) >= 5  # inference, management, metrics, 2 x gRPC
    assert {c.laddr.ip.removeprefix("::ffff:") for c in listening} == {"127.0.0.1"}


@pytest.mark.integration
def test_bodies_over_max_request_size_are_refused_by_the_frontend(production_server):
    limit = int(PROPERTIES["max_request_size"])
    response = predict_body(production_server, b"\x89PNG\r\n\x1a\n" + bytes(limit))
    assert response.status_code == 413
    assert predict_body(production_server, png_bytes(held_out(1).image)).status_code == 200


def predict_body(server, body: bytes) -> requests.Response:
    return requests.post(
        f"{server.inference_url}/predictions/shapes", data=body, headers=server.auth(), timeout=60
    )


def test_production_config_sets_every_bound():
    expected = {
        "disable_token_authorization": "false",
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "limit_max_image_pixels": "true",
    }
    assert {k: PROPERTIES.get(k) for k in expected} == expected
    for key in ("management_address", "metrics_address", "inference_address"):
        assert PROPERTIES[key].startswith("http://127.0.0.1:"), key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert PROPERTIES[key] == "127.0.0.1"
    for key in ("max_request_size", "max_response_size", "default_response_timeout"):
        assert int(PROPERTIES[key]) > 0, key
    model_config = yaml.safe_load((SHAPES_DIR / "model-config.yaml").read_text())
    assert 0 < int(model_config["handler"]["max_pixels"]) <= 100_000_000
    assert int(model_config["responseTimeout"]) > 0


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_load_with_weights_only(tmp_path):
    model = shapes_net()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    loaded = load_weights(shapes_net(), tmp_path / "state.pt")
    pairs = zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    torch.save(model, tmp_path / "module.pt")  # a pickled nn.Module, not a state_dict
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(shapes_net(), tmp_path / "module.pt")

    marker = tmp_path / "code-ran"
    torch.save({"features.0.weight": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickled modules and code are refused"):
        load_weights(shapes_net(), tmp_path / "evil.pt")
    assert not marker.exists(), "unpickling ran code"


def test_a_model_folder_with_a_pickled_module_does_not_load(tmp_path):
    """The handler's own loading path (Explainer.from_directory) refuses it too."""
    folder = tmp_path / "model"
    shutil.copytree(SHAPES_DIR, folder)
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    torch.save(shapes_net(), folder / config["handler"]["weights"])
    with pytest.raises(ValueError, match="weights_only=True"):
        Explainer.from_directory(folder)
