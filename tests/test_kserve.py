"""KServe: the v2 (Open Inference Protocol) envelope on a real TorchServe started from the
bundle `make kserve-bundle` writes, bound to loopback and free ports for the test."""

from __future__ import annotations

import base64
import json
import uuid

import jsonschema
import pytest
import requests
import yaml

from camserve.encode_json import load_schema
from camserve.tools.kserve_bundle import KSERVE_CONFIG, build_bundle
from harness.local_torchserve import LocalTorchServe, read_properties
from tests.conftest import REPO, SHAPES_DIR, held_out, png_bytes

pytestmark = pytest.mark.integration
VALIDATOR = jsonschema.Draft202012Validator(load_schema())
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(SHAPES_DIR, "shapes", tmp_path_factory.mktemp("kserve-bundle"))


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory, bundle):
    # The shipped config binds 0.0.0.0:8085; the test moves every port to loopback.
    ts = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("ts_kserve"),
        bundle / "config" / "config.properties",
        bundle / "model-store",
        models="",  # the config's model_snapshot loads the model, as under KServe
        overrides={"metrics_config": str(bundle / "config" / "metrics.yaml")},
    )
    ts.start(wait_for="shapes")
    yield ts
    ts.stop()


def v2_request(image: bytes, parameters: dict | None = None, request_id: str | None = None):
    tensor = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(image).decode()],
    }
    if parameters:
        tensor["parameters"] = parameters
    body = {"inputs": [tensor]}
    if request_id:
        body["id"] = request_id
    return body


def post_v2(server, verb: str, body: dict):
    return requests.post(f"{server.inference_url}/v2/models/shapes/{verb}", json=body, timeout=60)


def answer(response) -> dict:
    """The camserve JSON inside the v2 response's single BYTES output."""
    v2 = response.json()
    assert v2["model_name"] == "shapes"
    [output] = v2["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    body = json.loads(output["data"][0])
    VALIDATOR.validate(body)
    return body


def test_bundle_layout_and_settings(bundle):
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "config/config.properties",
        "config/metrics.yaml",
        "model-store/shapes.mar",
    ]
    assert (bundle / "config" / "metrics.yaml").read_text() == (
        REPO / "config" / "metrics.yaml"
    ).read_text()
    properties = read_properties(bundle / "config" / "config.properties")
    assert properties["service_envelope"] == "kservev2"
    assert properties["inference_address"] == "http://0.0.0.0:8085"
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["enable_model_api"] == "false"
    assert properties["metrics_config"] == "/mnt/models/config/metrics.yaml"
    snapshot = json.loads(properties["model_snapshot"])
    assert snapshot["models"]["shapes"]["1.0"]["batchSize"] == 1
    assert snapshot["models"]["shapes"]["1.0"]["marName"] == "shapes.mar"
    # The shipped file and the bundle's agree apart from the filled-in snapshot.
    shipped = read_properties(KSERVE_CONFIG)
    assert {k: v for k, v in shipped.items() if k != "model_snapshot"} == {
        k: v for k, v in properties.items() if k != "model_snapshot"
    }


@pytest.mark.parametrize("verb", ["infer", "explain"])
def test_v2_infer_and_explain(kserve_server, verb):
    sample = held_out(30 if verb == "infer" else 31)
    request_id = str(uuid.uuid4())
    response = post_v2(kserve_server, verb, v2_request(png_bytes(sample.image), None, request_id))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == request_id
    body = answer(response)
    assert body["predictions"][0]["label"] == CLASSES[sample.label]
    assert body["input_size"] == [64, 64] and "images" not in body


def test_v2_parameters_carry_the_options(kserve_server):
    sample = held_out(32)
    other = CLASSES[(sample.label + 2) % len(CLASSES)]
    parameters = {"target": other, "topk": 2, "images": True}
    response = post_v2(kserve_server, "infer", v2_request(png_bytes(sample.image), parameters))
    assert response.status_code == 200, response.text
    body = answer(response)
    assert body["explained"] == {**body["explained"], "label": other, "requested": True}
    assert len(body["predictions"]) == 2
    assert set(body["images"]) == {
        "heatmap_png", "overlay_png", "shifted_heatmap_png", "shifted_overlay_png"
    }  # fmt: skip


def test_v2_bad_image_gets_its_status_and_a_json_error(kserve_server):
    response = post_v2(kserve_server, "infer", v2_request(b"GIF89a but truncated"))
    assert response.status_code == 422
    [output] = response.json()["outputs"]
    error = json.loads(output["data"][0])
    VALIDATOR.validate(error)
    assert error["code"] == "undecodable_image"


def test_v2_non_bytes_input_is_refused(kserve_server):
    body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [0.5, 0.25]}]}
    response = post_v2(kserve_server, "infer", body)
    assert response.status_code == 400
    error = json.loads(response.json()["outputs"][0]["data"][0])
    assert error["code"] == "missing_image" and "BYTES" in error["message"]


def test_v2_request_with_two_images_is_refused_plainly(kserve_server):
    images = [png_bytes(held_out(i).image) for i in (33, 34)]
    tensors = [v2_request(image)["inputs"][0] for image in images]
    response = post_v2(kserve_server, "infer", {"inputs": tensors})
    assert response.status_code == 400
    outputs = response.json()["outputs"]
    assert len(outputs) == 2
    error = json.loads(outputs[0]["data"][0])
    VALIDATOR.validate(error)
    assert error["code"] == "missing_image" and "one request per image" in error["message"]
    # The worker is fine afterwards.
    assert post_v2(kserve_server, "infer", {"inputs": tensors[:1]}).status_code == 200


def test_served_with_batch_size_1(kserve_server):
    described = requests.get(f"{kserve_server.management_url}/models/shapes", timeout=30).json()
    assert described[0]["batchSize"] == 1
    # And the archive in the repository keeps its own batching for plain TorchServe.
    local = yaml.safe_load((REPO / "models" / "shapes" / "model-config.yaml").read_text())
    assert local["batchSize"] > 1


def test_camserve_metrics_are_exported_under_kserve(kserve_server):
    response = post_v2(kserve_server, "infer", v2_request(png_bytes(held_out(0).image)))
    assert response.status_code == 200, response.text
    metrics = requests.get(f"{kserve_server.metrics_url}/metrics", timeout=30).text
    assert any(
        line.startswith("camserve_explanations_total") and float(line.split()[-1]) >= 1
        for line in metrics.splitlines()
    )
