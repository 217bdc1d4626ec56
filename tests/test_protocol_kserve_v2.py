"""camserve/protocols/kserve_v2.py: v2 bodies (REST and gRPC) -> requests, outcomes -> the
v2 body (pure logic; tests/test_kserve.py sends the wrapper's requests to a real TorchServe)."""

from __future__ import annotations

import base64
import json

import pytest

from camserve.errors import InputError
from camserve.protocols import ModelIdentity, pick_protocol
from camserve.protocols.kserve_v2 import ERROR_OUTPUT, EXPLANATION_OUTPUT, KServeV2
from tests.conftest import StaticHeaders

PNG = b"\x89PNG\r\n\x1a\n fake but not base64"
B64 = base64.b64encode(PNG).decode()
MODEL = ModelIdentity("m", "1.0")


def v2_tensor(data, **extra) -> dict:
    return {"name": "image", "shape": [1], "datatype": "BYTES", "data": [data], **extra}


def read(item: dict) -> tuple[KServeV2, list]:
    protocol = pick_protocol(item, MODEL)
    assert isinstance(protocol, KServeV2)
    return protocol, protocol.read(item, StaticHeaders())


def test_v2_rest_body_with_request_and_input_parameters():
    body = {
        "id": "r1",
        "inputs": [v2_tensor(B64, parameters={"topk": 1, "content_type": "str"})],
        "parameters": {"topk": 5, "target": "ring", "binary_data_output": True},
    }
    protocol, [parsed] = read({"body": body})
    assert protocol.request_id == "r1"
    assert parsed.image == PNG
    assert parsed.options.topk == 1 and parsed.options.target == "ring"


def test_v2_options_as_tensors_sit_between_request_and_input_parameters():
    body = {
        "inputs": [
            v2_tensor(B64, parameters={"maps": 2}),
            {"name": "topk", "shape": [1], "datatype": "INT64", "data": [2]},
            {"name": "maps", "shape": [1], "datatype": "INT64", "data": [3]},
        ],
        "parameters": {"topk": 4},
    }
    _, [parsed] = read({"body": body})
    assert parsed.options.topk == 2 and parsed.options.maps == 2


def test_v2_through_grpc_undoes_the_wrappers_base64():
    once = base64.b64encode(PNG).decode()
    twice = base64.b64encode(B64.encode()).decode()
    label = base64.b64encode(b"star").decode()
    for data in (once, twice):
        body = {
            "id": "",
            "inputs": [
                v2_tensor(data),
                {"name": "target", "shape": [1], "datatype": "BYTES", "data": [label]},
            ],
        }
        protocol, [parsed] = read({"data": json.dumps(body).encode()})
        assert protocol.request_id == "ts-request-id"  # an empty id: TorchServe's stands in
        assert parsed.image == PNG and parsed.options.target == "star"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"inputs": []}, "missing_image"),
        ({"inputs": [v2_tensor(B64), {**v2_tensor(B64), "name": "second"}]}, "missing_image"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]}, "missing_image"),
        ({"inputs": [{**v2_tensor(B64), "data": [B64, B64]}]}, "missing_image"),
        ({"inputs": [v2_tensor("***")]}, "invalid_base64"),
        ({"inputs": [v2_tensor(B64)], "parameters": {"colour": 1}}, "unknown_option"),
        ({"inputs": [v2_tensor(B64, parameters={"colour": 1})]}, "unknown_option"),
        ({"inputs": [v2_tensor(B64)], "parameters": ["topk"]}, "bad_option"),
        ({"inputs": [v2_tensor(B64)], "parameters": {"topk": "many"}}, "bad_option"),
        ({"inputs": [v2_tensor(B64)], "outputs": [{"name": "logits"}]}, "unknown_option"),
    ],
)  # fmt: skip
def test_v2_mistakes_refuse_the_request(body, code):
    _, [refused] = read({"body": body})
    assert isinstance(refused, InputError) and refused.code == code


def written(protocol: KServeV2, outcome) -> tuple[int, str, dict]:
    reply = protocol.write([outcome])
    body = json.loads(reply.body)
    [output] = body["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    return reply.status, output["name"], json.loads(output["data"][0])


def test_v2_answer_and_client_error_are_200_typed_outputs(shapes_explanation):
    protocol, _ = read({"body": {"id": "r", "inputs": [v2_tensor(B64)]}})
    reply = protocol.write([shapes_explanation])
    body = json.loads(reply.body)
    assert reply.status == 200 and reply.content_type == "application/json"
    assert (body["id"], body["model_name"], body["model_version"]) == ("r", "m", "1.0")
    assert reply.explanations == (shapes_explanation,) and reply.errors == ()
    status, name, answer = written(protocol, shapes_explanation)
    assert name == EXPLANATION_OUTPUT and answer["model"] == "shapes"
    status, name, answer = written(protocol, InputError("undecodable_image", "no", 422))
    assert (status, name, answer["status"]) == (200, ERROR_OUTPUT, 422)


def test_v2_request_error_and_fallback_id():
    protocol, [refused] = read({"body": {"inputs": []}})
    reply = protocol.write([refused])
    body = json.loads(reply.body)
    assert reply.status == 200 and body["id"] == "ts-request-id"
    assert json.loads(body["outputs"][0]["data"][0])["code"] == "missing_image"
    assert reply.errors == ("missing_image",)


def test_server_faults_keep_their_5xx():
    protocol, _ = read({"body": {"inputs": [v2_tensor(B64)]}})
    status, name, _ = written(protocol, InputError("internal_error", "boom", 500))
    assert (status, name) == (500, ERROR_OUTPUT)
    reply = protocol.refuse(InputError("response_too_large", "too big", 413))
    assert reply.status == 200 and reply.errors == ("response_too_large",)


HUGE = "\x01" * 2_000_000


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": [v2_tensor(B64)], "parameters": {HUGE: 1}},  # request parameter
        {"inputs": [v2_tensor(B64, parameters={HUGE: 1})]},  # input parameter
        {"inputs": [v2_tensor(B64)], "outputs": [{"name": HUGE}]},  # output
        {"inputs": [{**v2_tensor(B64), "datatype": HUGE}]},  # datatype
    ],
)
def test_v2_errors_quote_only_an_excerpt_of_what_was_sent(body):
    """As every other error: a message quotes a short excerpt of the value, not the value
    cut at the message's length limit."""
    _, [error] = read({"body": body})
    assert error.code in ("unknown_option", "missing_image")
    assert len(error.message) < 600 and error.message.count("\\x01") <= 40
