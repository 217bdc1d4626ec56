"""camserve/kserve_protocol.py: KServe v1/v2 bodies -> requests, answers -> bodies (pure logic;
tests/test_kserve.py sends the wrapper's requests to a real TorchServe)."""

from __future__ import annotations

import base64
import json

import pytest

from camserve.encode_json import error_json
from camserve.errors import InputError
from camserve.kserve_protocol import (
    ERROR_OUTPUT,
    EXPLANATION_OUTPUT,
    V1,
    V2,
    encode_response,
    read_request,
)

PNG = b"\x89PNG\r\n\x1a\n fake but not base64"
B64 = base64.b64encode(PNG).decode()
ANSWER = {"model": "m", "predictions": []}


def v2_tensor(data, **extra) -> dict:
    return {"name": "image", "shape": [1], "datatype": "BYTES", "data": [data], **extra}


@pytest.mark.parametrize(
    "item",
    [
        {"body": b"\x89PNG raw bytes"},
        {"body": {"image": B64}},
        {"data": B64.encode()},
        {"data": b"not json {"},
        {"body": {"inputs": []}, "topk": b"3"},  # a form, not a KServe body
        {"body": b"{broken json"},
        {"body": b'{"inputs": ' * 5000},  # deeper than the parser's stack
        {"data": b'{"inputs": [], "inputs": []}'},  # a repeated key
    ],
)
def test_non_kserve_items_are_left_to_the_plain_parser(item):
    assert read_request(item) is None


def test_v2_rest_body_with_request_and_input_parameters():
    body = {
        "id": "r1",
        "inputs": [v2_tensor(B64, parameters={"topk": 1, "content_type": "str"})],
        "parameters": {"topk": 5, "target": "ring", "binary_data_output": True},
    }
    request = read_request({"body": body})
    assert request.protocol == V2 and request.request_id == "r1" and request.error is None
    [parsed] = request.images
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
    [parsed] = read_request({"body": body}).images
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
        request = read_request({"data": json.dumps(body).encode()})
        assert request.request_id is None
        [parsed] = request.images
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
    request = read_request({"body": body})
    assert request.protocol == V2 and request.images == []
    assert request.error.code == code


def test_v1_instances_each_parsed_or_refused_on_their_own():
    body = {"instances": [B64, {"image": B64, "topk": 2}, {"b64": B64}, {"data": {"b64": B64}}, 3]}
    request = read_request({"body": json.dumps(body).encode()}, explain=True)
    assert request.protocol == V1 and request.explain
    *good, bad = request.images
    assert [p.image for p in good] == [PNG] * 4 and good[1].options.topk == 2
    assert isinstance(bad, InputError) and bad.code == "missing_image"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"instances": []}, "empty_body"),
        ({"instances": "abc"}, "empty_body"),
        ({"instances": [B64], "parameters": {"topk": 1}}, "unknown_option"),
    ],
)
def test_v1_request_level_mistakes(body, code):
    request = read_request({"body": body})
    assert request.error.code == code


@pytest.mark.parametrize(
    ("instance", "code"),
    [
        ({"image": B64, "colour": 1}, "unknown_option"),
        ({"image": B64, "data": B64}, "missing_image"),
        ({"topk": 1}, "missing_image"),
        ("%%%", "invalid_base64"),
    ],
)
def test_v1_instance_mistakes(instance, code):
    [refused] = read_request({"body": {"instances": [instance]}}).images
    assert refused.code == code


def encode(request, outcomes):
    return encode_response(request, outcomes, "m", "1.0", "ts-request-id")


def test_v2_answer_and_client_error_are_200_typed_outputs():
    request = read_request({"body": {"id": "r", "inputs": [v2_tensor(B64)]}})
    status, body = encode(request, [ANSWER])
    assert status == 200 and body["id"] == "r" and body["model_version"] == "1.0"
    [output] = body["outputs"]
    assert output["name"] == EXPLANATION_OUTPUT and json.loads(output["data"][0]) == ANSWER
    status, body = encode(request, [error_json("undecodable_image", "no", 422)])
    assert status == 200 and body["outputs"][0]["name"] == ERROR_OUTPUT
    assert json.loads(body["outputs"][0]["data"][0])["status"] == 422


def test_v2_request_error_and_fallback_id():
    request = read_request({"body": {"inputs": []}})
    status, body = encode(request, [])
    assert status == 200 and body["id"] == "ts-request-id"
    assert json.loads(body["outputs"][0]["data"][0])["code"] == "missing_image"


def test_server_faults_keep_their_5xx():
    request = read_request({"body": {"inputs": [v2_tensor(B64)]}})
    status, body = encode(request, [error_json("internal_error", "boom", 500)])
    assert status == 500 and body["outputs"][0]["name"] == ERROR_OUTPUT
    request = read_request({"body": {"instances": [B64, B64]}})
    status, body = encode(request, [ANSWER, error_json("internal_error", "boom", 500)])
    assert status == 500 and body["predictions"][1]["error"]["code"] == "internal_error"


def test_v1_answers_per_instance_and_explanations_key():
    request = read_request({"body": {"instances": [B64, B64]}}, explain=True)
    status, body = encode(request, [ANSWER, error_json("bad_option", "no", 400)])
    assert status == 200
    assert body == {"explanations": [ANSWER, {"error": error_json("bad_option", "no", 400)}]}
    status, body = encode(read_request({"body": {"instances": []}}), [])
    assert status == 200 and body["error"]["code"] == "empty_body"


HUGE = "\x01" * 2_000_000


@pytest.mark.parametrize(
    "body",
    [
        {"instances": [B64], HUGE: 1},  # v1 request field
        {"instances": [{"image": B64, HUGE: 1}]},  # v1 instance field
        {"inputs": [v2_tensor(B64)], "parameters": {HUGE: 1}},  # v2 request parameter
        {"inputs": [v2_tensor(B64, parameters={HUGE: 1})]},  # v2 input parameter
        {"inputs": [v2_tensor(B64)], "outputs": [{"name": HUGE}]},  # v2 output
        {"inputs": [{**v2_tensor(B64), "datatype": HUGE}]},  # v2 datatype
    ],
)
def test_kserve_errors_quote_only_an_excerpt_of_what_was_sent(body):
    """As every other error: a message quotes a short excerpt of the value, not the value
    cut at the message's length limit."""
    request = read_request({"body": body})
    error = request.error
    if error is None:
        [error] = [image for image in request.images if isinstance(image, InputError)]
    assert error.code in ("unknown_option", "missing_image")
    assert len(error.message) < 600 and error.message.count("\\x01") <= 40
