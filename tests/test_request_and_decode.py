"""Pure logic of request parsing, decoding and target resolution."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from camserve.decode import decode_image
from camserve.errors import InputError
from camserve.labels import resolve_target
from camserve.protocols.plain import parse_item
from camserve.request import RequestOptions
from tests.conftest import png_bytes

LABELS = ["circle", "square", "triangle"]


def small_png() -> bytes:
    return png_bytes(Image.new("RGB", (8, 6), (10, 20, 30)))


def code_of(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    return info.value.code


def test_raw_body():
    parsed = parse_item({"body": small_png()})
    assert parsed.image == small_png() and parsed.options == RequestOptions()


def test_json_body_with_options():
    encoded = base64.b64encode(small_png()).decode()
    parsed = parse_item({"body": {"image": encoded, "target": "square", "topk": 2}})
    assert parsed.image == small_png()
    assert parsed.options == RequestOptions(target="square", topk=2)


def test_multipart_form_fields_arrive_as_bytes():
    parsed = parse_item({"data": small_png(), "target": b"1", "topk": b"3"})
    assert parsed.options.target == "1" and parsed.options.topk == 3


@pytest.mark.parametrize(
    ("item", "json_content", "code"),
    [
        ({"body": b"{not json"}, True, "invalid_json"),
        ({"body": {"image": "@@@not base64@@@"}}, False, "invalid_base64"),
        ({"body": {"image": "aGVsbG8=", "colour": "red"}}, False, "unknown_option"),
        ({"body": {"target": 1}}, False, "missing_image"),
        ({"body": {"image": "aGVsbG8=", "topk": -1}}, False, "bad_option"),
        ({"body": {"image": "aGVsbG8=", "topk": 10**9}}, False, "bad_option"),
        ({"body": {"image": "aGVsbG8=", "target": [[1]]}}, False, "bad_option"),
        ({"body": {"image": "aGVsbG8=", "target": [1, True]}}, False, "bad_option"),
        ({"body": {"image": "aGVsbG8=", "target": list(range(6))}}, False, "bad_option"),
        ({"data": b"x", "foo": b"1"}, False, "unknown_option"),
        ({}, False, "empty_body"),
    ],
)
def test_bad_requests_name_the_problem(item, json_content, code):
    assert code_of(lambda: parse_item(item, json_content=json_content)) == code


def test_a_target_list_and_an_unset_maps_are_parsed_for_the_model_to_judge():
    encoded = base64.b64encode(small_png()).decode()
    parsed = parse_item({"body": {"image": encoded, "target": ["square", 0]}})
    assert parsed.options == RequestOptions(target=["square", 0], maps=None)
    assert parse_item({"body": {"image": encoded, "target": []}}).options.target is None
    assert parse_item({"data": small_png(), "maps": b"2"}).options.maps == 2


def test_resolve_target():
    assert resolve_target(None, LABELS) is None
    assert resolve_target(2, LABELS) == 2
    assert resolve_target("1", LABELS) == 1
    assert resolve_target("Triangle", LABELS) == 2
    assert code_of(lambda: resolve_target(3, LABELS)) == "unknown_target"
    assert code_of(lambda: resolve_target(-1, LABELS)) == "unknown_target"
    assert code_of(lambda: resolve_target("hexagon", LABELS)) == "unknown_target"


def test_decode_png_and_jpeg_to_rgb():
    image = Image.new("RGB", (20, 10), (200, 10, 10))
    for fmt in ("PNG", "JPEG"):
        decoded = decode_image(png_bytes(image, fmt))
        assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_decode_rejects_garbage_text_and_empty():
    assert code_of(lambda: decode_image(b"")) == "empty_body"
    assert code_of(lambda: decode_image(b"\x00\x01garbage")) == "undecodable_image"
    assert code_of(lambda: decode_image(b"<svg xmlns='x'></svg>")) == "unsupported_format"
    truncated = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    assert code_of(lambda: decode_image(truncated)) == "undecodable_image"


def test_decode_enforces_the_pixel_limit():
    data = png_bytes(Image.new("RGB", (100, 100)))
    assert code_of(lambda: decode_image(data, max_pixels=9999)) == "image_too_large"
    assert decode_image(data, max_pixels=10000).size == (100, 100)


def test_large_jpeg_is_decoded_at_a_reduced_scale_but_never_below_the_need():
    image = Image.new("RGB", (1600, 1200), (30, 120, 200))
    data = png_bytes(image, "JPEG")
    assert decode_image(data).size == (1600, 1200)
    reduced = decode_image(data, min_side=256)
    assert reduced.size == (400, 300)  # 1/4 scale: 1/8 would give 150 < 256
    assert min(decode_image(data, min_side=300).size) >= 300
    assert decode_image(png_bytes(image, "PNG"), min_side=256).size == (1600, 1200)
