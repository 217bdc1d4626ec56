"""camserve/protocols/plain.py: TorchServe's plain body and which protocol claims an item (pure
logic; the corpus in tests/test_corpus.py and tests/test_recorded_answers.py goes through a
real TorchServe). Parsing details are in tests/test_request_and_decode.py and test_hardening.py."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from camserve.errors import InputError
from camserve.protocols import KServeV1, KServeV2, ModelIdentity, PlainBody, pick_protocol
from camserve.protocols.plain import REPEATED_FIELDS_HEADER
from tests.conftest import StaticHeaders, held_out, png_bytes

PNG = png_bytes(held_out(0).image)
B64 = base64.b64encode(PNG).decode()
MODEL = ModelIdentity("m", "1.0")


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
def test_non_kserve_items_are_left_to_the_plain_body(item):
    assert isinstance(pick_protocol(item, MODEL), PlainBody)


@pytest.mark.parametrize(
    ("item", "protocol"),
    [
        ({"body": {"instances": [B64]}}, KServeV1),
        ({"body": json.dumps({"instances": [B64]}).encode()}, KServeV1),
        ({"body": {"inputs": []}}, KServeV2),
        ({"data": json.dumps({"inputs": []}).encode()}, KServeV2),
    ],
)
def test_kserve_bodies_are_claimed_by_their_protocol(item, protocol):
    assert type(pick_protocol(item, MODEL)) is protocol


def read(item, headers: dict | None = None) -> tuple[PlainBody, object]:
    protocol = pick_protocol(item, MODEL)
    [request] = protocol.read(item, StaticHeaders(headers or {}))
    return protocol, request


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json; charset=utf-16"},
        {"content-type": "application/json"},
        {"body": {"content-type": "application/json"}},
    ],
)
def test_json_is_read_when_the_headers_say_so(headers):
    body = json.dumps({"image": B64, "topk": 2}).encode("utf-16")
    _, request = read({"body": body}, headers)
    assert request.image == PNG and request.options.topk == 2
    _, raw = read({"body": body})  # without the header: the bytes are the image
    assert raw.image == body


def test_repeated_form_fields_recorded_by_the_server_are_refused():
    _, refused = read({"data": PNG, "topk": b"2"}, {REPEATED_FIELDS_HEADER: "data"})
    assert isinstance(refused, InputError) and refused.code == "missing_image"


def test_an_envelope_tensor_is_refused_with_how_to_turn_the_envelope_off():
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}
    _, refused = read(tensor)
    assert refused.code == "missing_image" and "service_envelope" in refused.message


def test_answers_are_json_or_the_overlay_png(shapes_explanation):
    protocol, _ = read({"body": PNG})
    reply = protocol.write([shapes_explanation])
    assert reply.status == 200 and reply.content_type == "application/json"
    assert json.loads(reply.body)["model"] == "shapes"
    assert reply.explanations == (shapes_explanation,)
    protocol, _ = read({"body": PNG}, {"Accept": "image/png"})
    reply = protocol.write([shapes_explanation])
    assert reply.content_type == "image/png"
    assert Image.open(io.BytesIO(reply.body)).size == (64, 64)


def test_an_error_is_its_json_with_its_status(shapes_explanation):
    protocol, _ = read({"body": PNG}, {"Accept": "image/png"})
    reply = protocol.refuse(InputError("response_too_large", "too big", 413))
    assert (reply.status, reply.phrase, reply.content_type) == (
        413, "response_too_large", "application/json",
    )  # fmt: skip
    refusal = {"code": "response_too_large", "message": "too big", "status": 413}
    assert json.loads(reply.body) == refusal
    assert reply.errors == ("response_too_large",) and reply.explanations == ()
