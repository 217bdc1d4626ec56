"""camserve/protocols/kserve_v1.py: v1 ``instances`` -> requests, outcomes -> the v1 body
(pure logic; tests/test_kserve.py sends the wrapper's requests to a real TorchServe)."""

from __future__ import annotations

import base64
import json

import pytest

from camserve.errors import InputError
from camserve.protocols import ModelIdentity, pick_protocol
from camserve.protocols.kserve_v1 import KServeV1
from tests.conftest import StaticHeaders

PNG = b"\x89PNG\r\n\x1a\n fake but not base64"
B64 = base64.b64encode(PNG).decode()
MODEL = ModelIdentity("m", "1.0")
EXPLAIN = StaticHeaders({"explain": "True"})


def read(item: dict, headers: StaticHeaders | None = None) -> tuple[KServeV1, list]:
    protocol = pick_protocol(item, MODEL)
    assert isinstance(protocol, KServeV1)
    return protocol, protocol.read(item, headers or StaticHeaders())


def test_v1_instances_each_parsed_or_refused_on_their_own():
    body = {"instances": [B64, {"image": B64, "topk": 2}, {"b64": B64}, {"data": {"b64": B64}}, 3]}
    protocol, images = read({"body": json.dumps(body).encode()}, EXPLAIN)
    assert protocol.explain
    *good, bad = images
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
    protocol, images = read({"body": body})
    assert images == [] and protocol.refusal.code == code
    reply = protocol.write([])
    assert reply.status == 200 and json.loads(reply.body)["error"]["code"] == code
    assert reply.errors == (code,)


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
    _, [refused] = read({"body": {"instances": [instance]}})
    assert refused.code == code


def test_v1_answers_per_instance_and_explanations_key(shapes_explanation):
    protocol, _ = read({"body": {"instances": [B64, B64]}}, EXPLAIN)
    refused = InputError("bad_option", "no", 400)
    reply = protocol.write([shapes_explanation, refused])
    body = json.loads(reply.body)
    assert reply.status == 200 and list(body) == ["explanations"]
    assert body["explanations"][0]["model"] == "shapes"
    refusal = {"code": "bad_option", "message": "no", "status": 400}
    assert body["explanations"][1] == {"error": refusal}
    assert reply.errors == ("bad_option",) and reply.explanations == (shapes_explanation,)


def test_v1_server_faults_keep_their_5xx_and_a_refusal_replaces_the_answers(shapes_explanation):
    protocol, _ = read({"body": {"instances": [B64, B64]}})
    reply = protocol.write([shapes_explanation, InputError("internal_error", "boom", 500)])
    assert reply.status == 500 and reply.phrase == "camserve error"
    assert json.loads(reply.body)["predictions"][1]["error"]["code"] == "internal_error"
    refused = protocol.refuse(InputError("response_too_large", "too big", 413))
    assert refused.status == 200 and json.loads(refused.body) == {
        "error": {"code": "response_too_large", "message": "too big", "status": 413}
    }


HUGE = "\x01" * 2_000_000


@pytest.mark.parametrize(
    "body",
    [
        {"instances": [B64], HUGE: 1},  # request field
        {"instances": [{"image": B64, HUGE: 1}]},  # instance field
    ],
)
def test_v1_errors_quote_only_an_excerpt_of_what_was_sent(body):
    protocol, images = read({"body": body})
    error = protocol.refusal or next(i for i in images if isinstance(i, InputError))
    assert error.code == "unknown_option"
    assert len(error.message) < 600 and error.message.count("\\x01") <= 40
