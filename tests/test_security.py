"""The shipped configs hold: keys are required, the model API is off, no registration URL
reaches the network or writes a store (SSRF, FTP, file copies) in any of them, only inference
can leave loopback, and weights never unpickle code.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch
import yaml

from camserve.architectures import load_weights
from camserve.explainer import Explainer
from harness.local_torchserve import LocalTorchServe, free_port, read_properties
from harness.shapes import shapes_net
from tests.conftest import REPO, SHAPES_DIR, held_out, png_bytes
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


# --- Registration: no URL reaches the network or writes a store, in any shipped config -------

SHIPPED_CONFIGS = {
    "local": REPO / "config" / "config.properties",
    "production": PRODUCTION_CONFIG,
    "kserve": REPO / "config" / "kserve" / "config.properties",
}
NO_URL = "(?!)"  # an empty negative lookahead: a pattern that matches nothing
# Java fetches a file:// URL that names a host (other than localhost) by FTP, on port 21 even
# when the URL names another port (seen with the old pattern: every such URL connected to 21).
FTP_PORT = 21


def test_every_shipped_config_allows_no_registration_url():
    """TorchServe 0.12 splits allowed_urls at commas and full-matches each pattern,
    case-insensitively, against a URL; plain archive names never go through it."""
    for name, path in SHIPPED_CONFIGS.items():
        properties = read_properties(path)
        assert properties["allowed_urls"] == NO_URL, name
        assert properties["workflow_store"] == "/dev/null", name
        assert properties["enable_model_api"] == "false", name
    pattern = re.compile(NO_URL, re.IGNORECASE)
    for url in ("", "shapes.mar", "file:///srv/model_store/shapes.mar", "http://127.0.0.1/x.mar"):
        assert not pattern.fullmatch(url), url


class Listener:
    """Loopback TCP listeners that record every connection: an SSRF, or the FTP fetch Java
    makes for a file:// URL with a host, shows up here whatever the protocol."""

    def __init__(self, ports: list[int]) -> None:
        self.connections: list[int] = []
        self.running = True
        self.sockets = []
        for port in ports:
            sock = socket.socket()
            self.sockets.append(sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen(16)
                sock.settimeout(0.2)
            except OSError:
                for opened in self.sockets:
                    opened.close()
                raise
        self.threads = [threading.Thread(target=self._accept, args=(s,)) for s in self.sockets]
        for thread in self.threads:
            thread.start()

    def _accept(self, sock: socket.socket) -> None:
        while self.running:
            try:
                connection, _ = sock.accept()
            except OSError:  # the accept timeout: look at self.running again
                continue
            self.connections.append(sock.getsockname()[1])
            connection.close()

    def close(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(10)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def listener():
    """A listener on a free port and on the FTP port (root binds it; CI runs as root)."""
    port = free_port()
    deadline = time.monotonic() + 120
    while True:
        try:
            listening = Listener([port, FTP_PORT])
            break
        except PermissionError:
            pytest.fail("binding 127.0.0.1:21 needs root (or CAP_NET_BIND_SERVICE)")
        except OSError:  # another test run holds port 21 for one test: wait for it (bounded)
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    yield port, listening
    listening.close()


def registration_attempts(port: int, store: Path, outside: Path) -> list[str]:
    """URLs that must not register anything, fetch anything or write anything.

    ``outside`` holds a readable file, a real archive in a folder named model_store, and a
    symlink named model_store to that folder."""
    secret, evil = outside / "secret.txt", outside / "model_store" / "evil.mar"
    linked = outside / "via" / "model_store" / "evil.mar"
    back = "/".join([".."] * len(store.parts[1:]))
    return [
        # A host in a file:// URL: Java fetches it by FTP on port 21.
        "file://127.0.0.1/model_store/x.mar",
        f"file://127.0.0.1:{port}/model_store/x.mar",
        f"FILE://127.0.0.1:{port}/model_store/x.mar",
        f"File://localhost:{port}{store}/shapes.mar",
        # A ? or # after a readable file: TorchServe copied the file, named by its path.
        f"file://{secret}?/model_store/q.mar",
        f"file://{secret}#/model_store/q.mar",
        f"file://{evil}?/model_store/q.mar",
        f"file://{secret}%3F/model_store/q.mar",
        f"file://{secret}%23/model_store/q.mar",
        # Outside the store: another folder named model_store, a symlink, .., one slash.
        f"file://{evil}",
        f"file://{linked}",
        f"file://{store}/{back}{evil}",
        f"file:{evil}",
        f"jar:file://{evil}!/",
        # The store itself by URL (TorchServe would copy it onto itself).
        f"file://{store}/shapes.mar",
        # The network.
        f"http://127.0.0.1:{port}/model_store/x.mar",
        f"https://127.0.0.1:{port}/model_store/x.mar",
        f"HTTP://localhost:{port}/model_store/x.war",
        f"ftp://127.0.0.1:{port}/model_store/x.mar",
        # Plain paths and names: resolved in the (workflow) store, never outside it.
        str(evil),
        f"{back}{evil}",
        "evil.mar",
        "x.war",
    ]


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a symlink's target, a folder."""
    digest = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            digest[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            digest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest[name] = "dir"
    return digest


@pytest.fixture
def outside(tmp_path, model_store) -> Path:
    folder = tmp_path / "outside"
    (folder / "model_store").mkdir(parents=True)
    (folder / "secret.txt").write_text("not for the model store\n")
    shutil.copy2(model_store / "shapes.mar", folder / "model_store" / "evil.mar")
    (folder / "via").mkdir()
    (folder / "via" / "model_store").symlink_to(folder / "model_store")
    return folder


@pytest.fixture(scope="module")
def kserve_as_shipped(tmp_path_factory, model_store):
    """config/kserve/config.properties as it ships (tokens off, its model_snapshot), on free
    loopback ports, with metrics.yaml from the repository instead of the bundle's path."""
    ts = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("kserve_lockdown"),
        SHIPPED_CONFIGS["kserve"],
        model_store,
        models="",
        overrides={"metrics_config": str(REPO / "config" / "metrics.yaml")},
    )
    ts.start(wait_for="shapes")
    yield ts
    ts.stop()


def register(server, api: str, url: str, as_json: bool = False) -> requests.Response:
    address = f"{server.management_url}/{api}"
    key = server.auth("management")
    if as_json:  # the workflow API also reads the request from a JSON body
        return requests.post(address, json={"url": url}, headers=key, timeout=60)
    return requests.post(address, params={"url": url}, headers=key, timeout=60)


@pytest.mark.integration
@pytest.mark.parametrize("config", list(SHIPPED_CONFIGS))
def test_registration_fetches_and_writes_nothing(request, config, listener, outside):
    server = request.getfixturevalue({"local": "server", "production": "production_server",
                                      "kserve": "kserve_as_shipped"}[config])  # fmt: skip
    port, listening = listener
    store_before, outside_before = tree_digest(server.model_store), tree_digest(outside)
    statuses = {}
    for url in registration_attempts(port, server.model_store, outside):
        for api, as_json in (("workflows", False), ("workflows", True), ("models", False)):
            response = register(server, api, url, as_json)
            statuses[api, as_json, url] = response.status_code
    time.sleep(1)  # a late connection would still be counted
    assert listening.connections == []
    assert tree_digest(server.model_store) == store_before
    assert tree_digest(outside) == outside_before
    assert Path("/dev/null").is_char_device()
    management, key = server.management_url, server.auth("management")
    assert requests.get(f"{management}/workflows", headers=key, timeout=10).json() == {
        "workflows": []
    }
    models = requests.get(f"{management}/models", headers=key, timeout=10).json()["models"]
    assert [m["modelName"] for m in models] == ["shapes"]
    for (api, _json, url), status in statuses.items():
        assert status >= 400, (api, url, status)
        if api == "models":  # the model API is off in every shipped config
            assert status == 405, (url, status)


@pytest.mark.integration
def test_with_the_model_api_on_allowed_urls_still_refuses_every_url(
    tmp_path_factory, model_store, listener, outside
):
    """The second wall: production.properties with the model API switched on (and no model
    loaded at start) still registers no URL, while a plain store name still works."""
    store = tmp_path_factory.mktemp("model_api_on_store")
    shutil.copy2(model_store / "shapes.mar", store / "shapes.mar")
    ts = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("model_api_on"), PRODUCTION_CONFIG, store, models="",
        overrides={"enable_model_api": "true", "load_models": ""},
    )  # fmt: skip
    port, listening = listener
    ts.start(wait_for=None)
    try:
        ts.wait_listening()
        before, outside_before = tree_digest(store), tree_digest(outside)
        for url in registration_attempts(port, store, outside):
            response = register(ts, "models", url)
            assert 400 <= response.status_code < 500, (url, response.text)
        time.sleep(1)
        assert listening.connections == []
        assert tree_digest(store) == before and tree_digest(outside) == outside_before
        key = ts.auth("management")
        response = requests.post(
            f"{ts.management_url}/models",
            params={"url": "shapes.mar", "initial_workers": "0"}, headers=key, timeout=60,
        )  # fmt: skip
        assert response.status_code == 200, response.text
    finally:
        ts.stop()


@pytest.mark.integration
def test_the_model_api_cannot_register_replace_or_delete(production_server, listener):
    port, listening = listener
    base = f"http://127.0.0.1:{port}"
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
    assert listening.connections == []


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
