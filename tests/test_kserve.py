"""KServe: the bundle `make kserve-bundle` writes, and what camserve answers to the exact REST
requests KServe's TorchServe runtime wrapper sends, on a real TorchServe started from that
bundle's config and archive (ports moved to free loopback ones for the test).

The wrapper (pytorch/serve kubernetes/kserve/kserve_wrapper for TorchServe 0.12, on kserve
0.13.0) is not on PyPI, so CI cannot run it; `WrapperRest` below reproduces the requests its
REST path sends to TorchServe, as read from its source and kserve 0.13's:

- v1 predict: ``POST /v1/models/<m>:predict``, ``Content-Type: application/json``, the
  client's JSON re-serialised; ``x-request-id``/``x-b3-traceid`` copied when the client sent
  them.
- v1 explain (any protocol): ``POST /v1/models/<m>:explain``, the same body, no Content-Type.
- v2 infer: ``POST /v2/models/<m>/infer``, ``Content-Type: application/json``, the body
  rebuilt from kserve's ``InferRequest``: ``id`` always present (a fresh uuid4 when the client
  sent none), inputs as ``name, shape, datatype, parameters?, data``, request ``parameters``
  when non-empty. Any non-200 from TorchServe becomes a 500 for the client.

grpc-v2 goes through TorchServe's own gRPC API: see the section at the end.
"""

from __future__ import annotations

import base64
import importlib
import json
import subprocess
import sys
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import jsonschema
import pytest
import requests
import yaml

from camserve.encode_json import load_schema
from camserve.protocols.kserve_v2 import ERROR_OUTPUT, EXPLANATION_OUTPUT
from camserve.tools.kserve_bundle import (
    KSERVE_CONFIG,
    RUNTIME_GRPC_PORT,
    RUNTIME_HTTP_PORT,
    build_bundle,
)
from harness.local_torchserve import LocalTorchServe, read_properties
from tests.conftest import CONFIG, REPO, SHAPES_DIR, held_out, png_bytes

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


# What the runtime's wrapper reads from config.properties, modelled to check the bundle.
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


CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]
ARCHIVE_CONFIG = SHAPES_DIR / "model-config.yaml"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(SHAPES_DIR, "shapes", tmp_path_factory.mktemp("kserve-bundle"))


@pytest.fixture(scope="module")
def bundle_properties(bundle) -> dict[str, str]:
    return read_properties(bundle / "config" / "config.properties")


def test_bundle_layout(bundle):
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "config/config.properties",
        "config/metrics.yaml",
        "model-store/shapes.mar",
    ]
    assert (bundle / "config" / "metrics.yaml").read_text() == (
        REPO / "config" / "metrics.yaml"
    ).read_text()


def test_bundle_ports_leave_the_runtime_its_own(bundle_properties):
    ports = torchserve_ports(bundle_properties)
    assert ports == {
        "inference": 8085,
        "management": 8086,
        "metrics": 8082,
        "grpc_inference": 7070,
        "grpc_management": 7071,
    }
    # The wrapper binds these itself; a TorchServe port on either stops the pod.
    assert not {RUNTIME_HTTP_PORT, RUNTIME_GRPC_PORT} & set(ports.values())
    assert len(set(ports.values())) == len(ports)


def test_the_wrapper_finds_torchserve_where_it_listens(bundle_properties):
    view = wrapper_view(bundle_properties)
    assert view.inference_address == bundle_properties["inference_address"]
    assert view.management_address == bundle_properties["management_address"]
    assert view.grpc_target == f"127.0.0.1:{bundle_properties['grpc_inference_port']}"
    assert bundle_properties["grpc_inference_address"] == "127.0.0.1"
    assert view.model_names == ("shapes",)


def test_bundle_is_secure_and_reads_kserve_bodies_itself(bundle_properties):
    for key in ("inference_address", "management_address", "metrics_address"):
        assert bundle_properties[key].startswith("http://127.0.0.1:"), key
    assert bundle_properties["enable_model_api"] == "false"
    # No TorchServe envelope, and no environment variable can switch one on.
    assert "service_envelope" not in bundle_properties
    assert bundle_properties["enable_envvars_config"] == "false"
    assert bundle_properties["model_store"] == "/mnt/models/model-store"
    assert bundle_properties["metrics_config"] == "/mnt/models/config/metrics.yaml"
    # The shipped file and the bundle's agree apart from the filled-in snapshot.
    shipped = read_properties(KSERVE_CONFIG)
    assert {k: v for k, v in shipped.items() if k != "model_snapshot"} == {
        k: v for k, v in bundle_properties.items() if k != "model_snapshot"
    }


def test_snapshot_carries_the_archives_batching(bundle_properties):
    settings = yaml.safe_load(ARCHIVE_CONFIG.read_text())
    [version] = json.loads(bundle_properties["model_snapshot"])["models"]["shapes"].values()
    assert version["marName"] == "shapes.mar"
    assert version["batchSize"] == settings["batchSize"] > 1
    assert version["maxBatchDelay"] == settings["maxBatchDelay"]


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory, bundle):
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


class WrapperRest:
    """The REST requests the wrapper sends to TorchServe (see the module docstring)."""

    def __init__(self, server: LocalTorchServe, model: str = "shapes") -> None:
        self.base = server.inference_url
        self.model = model

    def v2_infer(
        self, client_body: dict, request_id: str | None = None, path: str | None = None
    ) -> requests.Response:
        inputs = []
        for tensor in client_body["inputs"]:
            rebuilt = {k: tensor[k] for k in ("name", "shape", "datatype")}
            if tensor.get("parameters"):
                rebuilt["parameters"] = tensor["parameters"]
            rebuilt["data"] = tensor["data"]
            inputs.append(rebuilt)
        body = {"id": client_body.get("id") or str(uuid.uuid4()), "inputs": inputs}
        if client_body.get("parameters"):
            body["parameters"] = client_body["parameters"]
        path = path or f"/v2/models/{self.model}/infer"
        return self._post(path, body, request_id, json_type=True)

    def v1_predict(self, client_body: dict, request_id: str | None = None) -> requests.Response:
        return self._post(f"/v1/models/{self.model}:predict", client_body, request_id, True)

    def v2_under_v1(self, client_body: dict) -> requests.Response:
        """protocolVersion v1: a client's v2 request goes to the v1 route, rebuilt as above."""
        return self.v2_infer(client_body, path=f"/v1/models/{self.model}:predict")

    def v1_explain(self, client_body: dict) -> requests.Response:
        return self._post(f"/v1/models/{self.model}:explain", client_body, None, False)

    def _post(self, path, body, request_id, json_type: bool) -> requests.Response:
        headers = {"Content-Type": "application/json"} if json_type else {}
        if request_id:
            headers["x-request-id"] = request_id
        data = json.dumps(body, separators=(",", ":")).encode()
        return requests.post(self.base + path, data=data, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def wrapper(kserve_server) -> WrapperRest:
    return WrapperRest(kserve_server)


def b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def image_tensor(index: int, parameters: dict | None = None) -> dict:
    tensor = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [b64(png_bytes(held_out(index).image))],
    }
    if parameters:
        tensor["parameters"] = parameters
    return tensor


def v2_output(response: requests.Response) -> tuple[str, dict]:
    """(output name, the camserve JSON inside it) of a v2 response, checked for the shape
    kserve 0.13 needs to re-encode it."""
    assert response.status_code == 200, response.text
    v2 = response.json()
    assert v2["model_name"] == "shapes" and v2["model_version"] == "1.0" and v2["id"]
    [output] = v2["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    body = json.loads(output["data"][0])
    VALIDATOR.validate(body)
    return output["name"], body


def v2_answer(response: requests.Response) -> dict:
    name, body = v2_output(response)
    assert name == EXPLANATION_OUTPUT, body
    return body


def v2_error(response: requests.Response) -> dict:
    name, body = v2_output(response)
    assert name == ERROR_OUTPUT, body
    assert set(body) == {"code", "message", "status"}
    return body


@pytest.mark.integration
def test_v2_infer_answers_in_an_explanation_output(wrapper):
    sample = held_out(30)
    request_id = str(uuid.uuid4())
    response = wrapper.v2_infer({"id": request_id, "inputs": [image_tensor(30)]})
    assert response.json()["id"] == request_id
    body = v2_answer(response)
    assert body["predictions"][0]["label"] == CLASSES[sample.label]
    assert body["input_size"] == [64, 64] and "images" not in body


@pytest.mark.integration
def test_v2_without_an_id_gets_one(wrapper):
    # The wrapper always sends an id; TorchServe's own /v2 route may get none.
    body = {"inputs": [image_tensor(31)]}
    response = requests.post(f"{wrapper.base}/v2/models/shapes/infer", json=body, timeout=120)
    assert response.status_code == 200 and response.json()["id"]
    v2_answer(response)


@pytest.mark.integration
def test_v2_request_level_parameters_carry_the_options(wrapper):
    sample = held_out(32)
    other = CLASSES[(sample.label + 2) % len(CLASSES)]
    # As tritonclient sends them: request-level only, plus its transport flag.
    parameters = {"target": other, "topk": 2, "images": True, "binary_data_output": False}
    body = v2_answer(wrapper.v2_infer({"inputs": [image_tensor(32)], "parameters": parameters}))
    assert body["explained"] == {**body["explained"], "label": other, "requested": True}
    assert len(body["predictions"]) == 2
    assert set(body["images"]) == {
        "heatmap_png", "overlay_png", "shifted_heatmap_png", "shifted_overlay_png"
    }  # fmt: skip


@pytest.mark.integration
def test_v2_input_level_parameters_win_over_request_level(wrapper):
    body = {
        "inputs": [image_tensor(33, {"topk": 1})],
        "parameters": {"topk": 4},
        "outputs": [{"name": EXPLANATION_OUTPUT, "parameters": {"binary_data": False}}],
    }
    assert len(v2_answer(wrapper.v2_infer(body))["predictions"]) == 1


@pytest.mark.integration
def test_v2_options_as_input_tensors(wrapper):
    # The only way options survive grpc-v2; REST accepts them too.
    body = {
        "inputs": [
            image_tensor(34),
            {"name": "topk", "shape": [1], "datatype": "INT32", "data": [2]},
            {"name": "target", "shape": [1], "datatype": "BYTES", "data": ["ring"]},
        ]
    }
    answer = v2_answer(wrapper.v2_infer(body))
    assert len(answer["predictions"]) == 2 and answer["explained"]["label"] == "ring"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("tensors", "parameters", "code"),
    [
        (
            [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"GIF89a cut")]}],
            None,
            "undecodable_image",
        ),
        ([{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}], None, "missing_image"),
        ("two images", None, "missing_image"),
        ("one image", {"colour": "red"}, "unknown_option"),
        ("one image", {"topk": 0}, "bad_option"),
        ("one image", {"target": "hexagon"}, "unknown_target"),
    ],
)  # fmt: skip
def test_v2_client_mistakes_are_200_with_an_error_output(wrapper, tensors, parameters, code):
    if tensors == "two images":
        tensors = [image_tensor(35), {**image_tensor(36), "name": "image2"}]
    elif tensors == "one image":
        tensors = [image_tensor(35)]
    body = {"inputs": tensors, **({"parameters": parameters} if parameters else {})}
    error = v2_error(wrapper.v2_infer(body))
    assert error["code"] == code and 400 <= error["status"] < 500


@pytest.mark.integration
def test_v2_body_on_the_v1_route(wrapper):
    answer = v2_answer(wrapper.v2_under_v1({"inputs": [image_tensor(37)]}))
    assert answer["predictions"][0]["label"] == CLASSES[held_out(37).label]


@pytest.mark.integration
def test_v1_one_answer_per_instance(wrapper):
    samples = [held_out(i) for i in (40, 41)]
    instances = [
        b64(png_bytes(samples[0].image)),
        {"image": b64(png_bytes(samples[1].image)), "topk": 1},
    ]
    response = wrapper.v1_predict({"instances": instances}, request_id="req-1")
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [a["predictions"][0]["label"] for a in answers] == [CLASSES[s.label] for s in samples]
    assert len(answers[1]["predictions"]) == 1
    for answer in answers:
        VALIDATOR.validate(answer)


@pytest.mark.integration
def test_v1_a_bad_instance_gets_its_own_error_entry(wrapper):
    sample = held_out(42)
    instances = [{"b64": b64(b"not an image")}, {"data": b64(png_bytes(sample.image))}, 7]
    response = wrapper.v1_predict({"instances": instances})
    assert response.status_code == 200, response.text
    bad, good, odd = response.json()["predictions"]
    assert bad["error"]["code"] == "undecodable_image"
    assert good["predictions"][0]["label"] == CLASSES[sample.label]
    assert odd["error"]["code"] == "missing_image"
    VALIDATOR.validate(bad["error"])


@pytest.mark.integration
def test_v1_explain_without_content_type(wrapper):
    sample = held_out(43)
    response = wrapper.v1_explain({"instances": [b64(png_bytes(sample.image))]})
    assert response.status_code == 200, response.text
    [answer] = response.json()["explanations"]
    assert answer["explained"]["label"] == CLASSES[sample.label]


@pytest.mark.integration
def test_v1_request_level_mistake(wrapper):
    response = wrapper.v1_predict({"instances": []})
    assert response.status_code == 200
    assert response.json()["error"]["code"] == "empty_body"


@pytest.mark.integration
def test_describe_declares_the_v2_metadata(kserve_server):
    # What the wrapper polls for readiness: a READY worker (MODEL_LOAD_CUSTOMIZED=false), and
    # customizedMetadata as well with MODEL_LOAD_CUSTOMIZED=true.
    url = f"{kserve_server.management_url}/models/shapes?customized="
    [plain] = requests.get(url + "false", timeout=60).json()
    assert any(w["status"] == "READY" for w in plain["workers"])
    [described] = requests.get(url + "true", timeout=60).json()
    assert any(w["status"] == "READY" for w in described["workers"])
    metadata = described["customizedMetadata"]
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    assert [o["name"] for o in metadata["outputs"]] == [EXPLANATION_OUTPUT, ERROR_OUTPUT]


@pytest.mark.integration
def test_plain_torchserve_requests_keep_their_4xx(kserve_server):
    # The same server still answers /predictions with real statuses.
    response = requests.post(
        f"{kserve_server.inference_url}/predictions/shapes", data=b"not an image", timeout=60
    )
    assert response.status_code == 422
    assert response.json()["code"] == "undecodable_image"


@pytest.mark.integration
def test_served_with_the_archives_batching_and_concurrent_kserve_requests(kserve_server, wrapper):
    described = requests.get(f"{kserve_server.management_url}/models/shapes", timeout=30).json()
    assert described[0]["batchSize"] == yaml.safe_load(ARCHIVE_CONFIG.read_text())["batchSize"]
    indices = list(range(50, 62))
    with ThreadPoolExecutor(max_workers=len(indices)) as pool:
        responses = list(
            pool.map(lambda i: wrapper.v2_infer({"inputs": [image_tensor(i)]}), indices)
        )
    labels = [v2_answer(r)["predictions"][0]["label"] for r in responses]
    assert labels == [CLASSES[held_out(i).label] for i in indices]


@pytest.mark.integration
def test_client_mistakes_are_counted_as_camserve_errors_not_5xx(kserve_server, wrapper):
    before = _errors(kserve_server, "undecodable_image")
    bad = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(b"x")]}]}
    assert v2_error(wrapper.v2_infer(bad))["code"] == "undecodable_image"
    assert _errors(kserve_server, "undecodable_image") == before + 1


def _errors(server, reason: str) -> float:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("camserve_errors_total") and f'reason="{reason}"' in line
    )


@pytest.mark.integration
def test_camserve_metrics_are_exported_under_kserve(kserve_server, wrapper):
    v2_answer(wrapper.v2_infer({"inputs": [image_tensor(0)]}))
    metrics = requests.get(f"{kserve_server.metrics_url}/metrics", timeout=30).text
    assert any(
        line.startswith("camserve_explanations_total") and float(line.split()[-1]) >= 1
        for line in metrics.splitlines()
    )


@pytest.mark.integration
def test_the_documented_tritonclient_example_works(kserve_server, tmp_path):
    """examples/kserve_tritonclient.py (docs/deployment.md) against TorchServe's v2 route, the
    route the wrapper forwards to; by hand it also worked through the real wrapper."""
    host = kserve_server.inference_url.removeprefix("http://")
    script = REPO / "examples" / "kserve_tritonclient.py"

    def run(image: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), host, str(image)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    done = run(REPO / "examples" / "star.png")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [p["label"] for p in answer["predictions"]][:1] == ["star"]
    assert len(answer["predictions"]) == 2 and "score" in answer["zero_reference"]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    refused = run(not_an_image)
    assert refused.returncode == 1 and "refused: undecodable_image (422)" in refused.stderr


# grpc-v2 ----------------------------------------------------------------------------------------
# grpc-v2 under KServe: what camserve answers to the gRPC call the runtime's wrapper makes to
# TorchServe's own gRPC inference API, on a real TorchServe started from the bundle.
#
# The wrapper (TorchServe 0.12's kubernetes/kserve/kserve_wrapper on kserve 0.13) turns a KServe
# ``ModelInfer`` into TorchServe's ``InferenceAPIsService.Predictions`` with
# ``model_name=<m>``, no ``model_version``, and one input ``data``: the UTF-8 JSON
# ``{"id": <id>, "inputs": [{"name", "shape", "datatype", "data"}]}`` where each BYTES tensor's
# data is ``[base64(bytes_contents[0])]`` and other tensors carry their typed contents list.
# Parameters (request and input level) are dropped. It reads the reply's ``prediction`` as v2
# JSON (``id``, ``model_name``, ``outputs``).
#
# The stubs are generated at test time from the inference.proto inside TorchServe's own jar.


@pytest.fixture(scope="module")
def ts_grpc(tmp_path_factory):
    """(messages, stub class) generated from TorchServe 0.12's inference.proto."""
    import google.rpc.status_pb2
    import grpc_tools
    import ts
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("ts_grpc_stubs")
    with zipfile.ZipFile(Path(ts.__file__).parent / "frontend" / "model-server.jar") as jar:
        (out / "inference.proto").write_bytes(jar.read("proto/inference.proto"))
    includes = [
        out,
        Path(grpc_tools.__file__).parent / "_proto",
        Path(google.rpc.status_pb2.__file__).parents[2],
    ]
    args = [f"-I{path}" for path in includes]
    args += [f"--python_out={out}", f"--grpc_python_out={out}", str(out / "inference.proto")]
    assert protoc.main(["protoc", *args]) == 0
    sys.path.insert(0, str(out))
    try:
        messages = importlib.import_module("inference_pb2")
        services = importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return messages, services.InferenceAPIsServiceStub


@pytest.fixture(scope="module")
def predictions(kserve_server, ts_grpc):
    messages, stub_class = ts_grpc
    channel = grpc.insecure_channel(f"127.0.0.1:{kserve_server.properties['grpc_inference_port']}")
    stub = stub_class(channel)

    def call(client_tensors: list[dict], request_id: str = "") -> tuple[dict, object]:
        """Send what the wrapper sends for a ModelInfer carrying ``client_tensors``
        (``contents``: the typed contents list; bytes for BYTES)."""
        inputs = []
        for tensor in client_tensors:
            contents = tensor["contents"]
            if tensor["datatype"] == "BYTES":
                contents = [base64.b64encode(contents[0]).decode()]
            inputs.append(
                {**{k: tensor[k] for k in ("name", "shape", "datatype")}, "data": contents}
            )
        payload = json.dumps({"id": request_id, "inputs": inputs}).encode("utf-8")
        request = messages.PredictionsRequest(model_name="shapes", input={"data": payload})
        reply, rpc = stub.Predictions.with_call(request, timeout=120)
        return json.loads(reply.prediction.decode("utf-8")), rpc

    yield call
    channel.close()


def image(index: int, as_base64_text: bool = False) -> dict:
    raw = png_bytes(held_out(index).image)
    if as_base64_text:  # a REST client of a grpc-v2 InferenceService: kserve encodes the str
        raw = base64.b64encode(raw)
    return {"name": "image", "shape": [1], "datatype": "BYTES", "contents": [raw]}


def output(v2: dict) -> tuple[str, dict]:
    assert v2["model_name"] == "shapes"
    [out] = v2["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [1]
    body = json.loads(out["data"][0])
    VALIDATOR.validate(body)
    return out["name"], body


@pytest.mark.integration
def test_grpc_native_client_gets_the_explanation(predictions):
    v2, rpc = predictions([image(70)], request_id="grpc-1")
    assert rpc.code() == grpc.StatusCode.OK
    assert v2["id"] == "grpc-1"
    name, body = output(v2)
    assert name == EXPLANATION_OUTPUT
    assert body["predictions"][0]["label"] == CLASSES[held_out(70).label]


@pytest.mark.integration
def test_grpc_rest_client_image_encoded_twice_is_read(predictions):
    v2, _ = predictions([image(71, as_base64_text=True)])
    name, body = output(v2)
    assert name == EXPLANATION_OUTPUT, body
    assert body["predictions"][0]["label"] == CLASSES[held_out(71).label]
    assert v2["id"]  # the wrapper sends "" when the client gave no id: camserve fills one in


@pytest.mark.integration
def test_grpc_options_ride_as_input_tensors(predictions):
    tensors = [
        image(72),
        {"name": "topk", "shape": [1], "datatype": "INT32", "contents": [2]},
        {"name": "target", "shape": [1], "datatype": "BYTES", "contents": [b"star"]},
    ]
    name, body = output(predictions(tensors)[0])
    assert name == EXPLANATION_OUTPUT, body
    assert len(body["predictions"]) == 2 and body["explained"]["label"] == "star"


@pytest.mark.integration
def test_grpc_client_mistake_is_ok_with_an_error_output(predictions):
    bad = {"name": "image", "shape": [1], "datatype": "BYTES", "contents": [b"GIF89a cut"]}
    v2, rpc = predictions([bad])
    assert rpc.code() == grpc.StatusCode.OK
    name, error = output(v2)
    assert name == ERROR_OUTPUT
    assert error["code"] == "undecodable_image" and error["status"] == 422


@pytest.mark.integration
def test_grpc_non_bytes_input_is_refused_plainly(predictions):
    tensor = {"name": "x", "shape": [2], "datatype": "FP32", "contents": [0.5, 0.25]}
    name, error = output(predictions([tensor])[0])
    assert name == ERROR_OUTPUT and error["code"] == "missing_image"


# --- TorchServe's own kservev2 envelope, turned on by hand ---------------------------------


@pytest.fixture(scope="module")
def envelope_server(tmp_path_factory, model_store):
    ts = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("ts_envelope"),
        CONFIG,
        model_store,
        overrides={"service_envelope": "kservev2"},
    )
    ts.start()
    yield ts
    ts.stop()


@pytest.mark.integration
def test_an_envelope_turned_on_by_hand_gets_a_400_that_says_to_turn_it_off(envelope_server):
    """camserve has one reader per format: the envelope's split tensors are refused, with
    the setting to remove (one image or several: the envelope splits them into items that
    outnumber the requests), and the worker stays up to answer the next request."""
    url = f"{envelope_server.inference_url}/v2/models/shapes/infer"
    two = {"id": "e2", "inputs": [image_tensor(45), {**image_tensor(46), "name": "second"}]}
    for body in ({"id": "e1", "inputs": [image_tensor(44)]}, two):
        response = requests.post(url, json=body, headers=envelope_server.auth(), timeout=120)
        assert response.status_code == 400, response.text
        assert "service_envelope" in response.text
