"""Pure logic behind the hardening: bounded error excerpts, the JSON reader, the response
budget's check (where the limit comes from: tests/test_torchserve_internals.py), and the
cheaper conversions in decoding. The same classes are proven over
HTTP on a real TorchServe in tests/test_hardening_server.py and tests/test_corpus.py."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from PIL import Image

from camserve.decode import to_rgb
from camserve.encode_json import error_json
from camserve.errors import MAX_MESSAGE_CHARS, InputError, excerpt, excerpt_names
from camserve.labels import resolve_target
from camserve.protocols.plain import parse_item
from camserve.request import parse_json_body
from camserve.response_budget import check_fits
from tests.conftest import held_out, png_bytes

B64 = base64.b64encode(png_bytes(held_out(0).image)).decode()


def deep_list(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("\x7f\x01" * 1_150_000, "... (2300000 characters)"),
        (b"\x00" * 10**6, "... (1000000 bytes)"),
        ([0] * 4_400_000, "a list of 4400000 items"),
        (deep_list(100_000), "a list of 1 items"),
        ({str(i): i for i in range(10**5)}, "an object of 100000 fields"),
        (10**5000, "an integer of 16610 bits"),
        (12, "12"),
        (None, "None"),
    ],
    ids=["control_chars", "bytes", "long_list", "deep_list", "object", "huge_int", "int", "none"],
)
def test_an_excerpt_is_short_escaped_and_never_recursive(value, shown):
    text = excerpt(value)
    assert shown in text and len(text) < 200
    assert text.isprintable()  # control characters arrive escaped


def test_excerpt_names_shows_a_few_and_counts_the_rest():
    text = excerpt_names({f"field{i}" for i in range(20_000)})
    assert text.startswith("['field0', 'field1', 'field10'") and text.endswith("and 19995 more")


def test_messages_are_bounded_whatever_made_them():
    assert len(InputError("bad_option", "x" * 10**6).message) <= MAX_MESSAGE_CHARS


@pytest.mark.parametrize(
    "target",
    ["\x7f" * 2_300_000, deep_list(5000), [0] * 4_400_000, {"a": deep_list(5000)}],
    ids=["control_chars", "deep_list", "long_list", "deep_object"],
)
def test_no_option_value_makes_a_long_message(target):
    """The issue's examples: each used to repeat its value (or overflow repr's stack)."""
    with pytest.raises(InputError) as info:
        labels = ["circle", "square"]
        resolve_target(
            parse_item({"body": {"image": B64, "target": target}}).options.target, labels
        )
    assert info.value.code in ("bad_option", "unknown_target")
    error = info.value
    assert len(json.dumps(error_json(error.code, error.message, error.status))) < 400


@pytest.mark.parametrize(
    "encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"]
)
def test_json_in_any_rfc_8259_encoding_is_read(encoding):
    body = json.dumps({"image": B64, "topk": 2}).encode(encoding)
    parsed = parse_item({"body": body}, json_content=True)
    assert parsed.options.topk == 2 and parsed.image.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (f'{{"image": "{B64}", "image": "{B64}"}}', "repeats the key(s) ['image']"),
        (f'{{"image": {{"b64": "{B64}", "b64": "x"}}}}', "repeats the key(s) ['b64']"),
        ('{"image": "x", "target": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("[1, 2]", "got a list of 2 items"),
        ('{"image": "x", ', "not valid JSON"),
        (b'{"image": "\xff"}', "not valid JSON"),
    ],
)
def test_unreadable_json_is_invalid_json(body, words):
    with pytest.raises(InputError) as info:
        parse_json_body(body.encode() if isinstance(body, str) else body)
    assert info.value.code == "invalid_json" and words in info.value.message


@pytest.mark.parametrize(
    ("repeated", "code"), [(("data",), "missing_image"), (("topk",), "bad_option")]
)
def test_a_form_field_sent_twice_is_refused(repeated, code):
    item = {"data": png_bytes(held_out(0).image), "topk": b"2"}
    with pytest.raises(InputError) as info:
        parse_item(item, repeated_fields=repeated)
    assert info.value.code == code and repr(repeated[0]) in info.value.message


def test_an_answer_of_exactly_the_limit_fits():
    """TorchServe refuses a length *above* max_response_size (CodecUtils.readLength)."""
    assert check_fits(1000, 1000) is None
    error = check_fits(1001, 1000)
    assert (error.code, error.status) == ("response_too_large", 413)
    assert "1001 bytes" in error.message and "1000" in error.message


def test_16_bit_grey_is_rescaled_like_the_arithmetic_it_replaces():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = (values.astype(np.int64) * 255 // 65535).astype(np.uint8)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32), "I")):
        assert np.array_equal(np.asarray(to_rgb(image))[..., 0], expected), image.mode


def test_alpha_is_composited_over_white_exactly():
    rgba = np.random.default_rng(0).integers(0, 256, (40, 30, 4), dtype=np.uint8)
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA")):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        expected = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(expected)), image.mode
