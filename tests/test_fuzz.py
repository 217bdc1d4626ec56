"""Property-based fuzzing of the request path (parse -> target -> decode -> tensor): whatever
the bytes or fields, the outcome is an answer-ready tensor or an ``InputError`` with a
documented code, never another exception. Bounded by example counts, not by wall time."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from camserve.decode import decode_image
from camserve.errors import ERROR_CODES, MAX_MESSAGE_CHARS, InputError
from camserve.labels import resolve_target
from camserve.protocols.plain import parse_item
from camserve.request import ParsedRequest
from tests.conftest import held_out, png_bytes

# Pillow warns about the corrupt metadata it skips; that is the expected outcome here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(
    max_examples=300,
    deadline=None,  # shared CPU: a slow example is not a failure, a hang is (pytest-timeout)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples on every run, so CI cannot flake on a new one
)
FUZZ_PIXELS = 1 << 20  # mutated headers may claim big canvases; keep each example cheap


def _seeds() -> list[bytes]:
    image = held_out(0).image.resize((24, 16))
    seeds = [
        png_bytes(image),
        png_bytes(image, "JPEG", quality=80),
        png_bytes(image, "GIF"),
        png_bytes(image, "WEBP", quality=80),
        png_bytes(image, "TIFF"),
        png_bytes(image, "BMP"),
        png_bytes(image.convert("RGBA"), "PNG"),
        png_bytes(image.convert("P"), "PNG", transparency=0),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds.append(png_bytes(image, "JPEG", exif=exif))
    return seeds


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image with bytes flipped, cut, inserted or deleted: mostly-plausible input
    reaches deeper into the decoders than random bytes do."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "header" and len(data) > 32:  # sizes and chunk lengths live up front
            spot = draw(st.integers(0, 31))
            data[spot] = draw(st.integers(0, 255))
    return bytes(data)


def assert_decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=FUZZ_PIXELS)
    except InputError as err:
        assert err.code in ERROR_CODES and 400 <= err.status < 500 and err.message
        return
    assert image.mode == "RGB" and image.width * image.height <= FUZZ_PIXELS
    np.asarray(image)  # pixels really materialise


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=1000)
@given(mutated_images())
def test_mutated_images_decode_or_get_a_defined_error(data):
    assert_decodes_or_refuses(data)


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_get_a_defined_error(data):
    assert_decodes_or_refuses(data)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
FORMATS = ["PNG", "TIFF", "JPEG", "GIF", "BMP", "WEBP"]


@pytest.mark.timeout(120)
@FUZZ
@given(st.sampled_from(MODES), st.sampled_from(FORMATS), st.integers(1, 9), st.integers(1, 9))
def test_every_pixel_mode_an_encoder_writes_decodes_to_rgb(mode, fmt, width, height):
    rgb = Image.fromarray(
        np.random.default_rng(width * 10 + height).integers(0, 255, (height, width, 3), np.uint8)
    )
    image = rgb.convert(mode) if mode not in ("I;16", "PA") else rgb.convert("L").convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot hold this mode: nothing to decode
    decoded = decode_image(buffer.getvalue())
    assert decoded.mode == "RGB" and decoded.size == (width, height)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
FIELD_NAMES = st.sampled_from(
    ["body", "data", "image", "b64", "target", "topk", "images", "file", "x"]
)
VALUES = JSON | st.binary(max_size=64) | st.sampled_from([png_bytes(held_out(1).image)])


@pytest.mark.timeout(120)
@FUZZ
@given(
    st.dictionaries(
        FIELD_NAMES | st.text(max_size=8),
        VALUES | st.dictionaries(FIELD_NAMES, VALUES, max_size=4),
        max_size=4,
    ),
    st.booleans(),
)
def test_any_request_item_parses_or_gets_a_defined_error(item, json_content):
    try:
        parsed = parse_item(item, json_content=json_content)
    except InputError as err:
        assert err.code in ERROR_CODES and err.status < 500
        return
    assert isinstance(parsed.image, bytes)


LABELS = ["circle", "square", "triangle", "star", "cross", "ring"]


@pytest.mark.timeout(60)
@FUZZ
@given(
    st.none()
    | st.integers()
    | st.text(max_size=30)
    | st.sampled_from(["²", "--1", " 2 ", "9" * 5000])
)
def test_any_target_resolves_or_gets_unknown_target(target):
    try:
        index = resolve_target(target, LABELS)
    except InputError as err:
        assert err.code == "unknown_target"
        return
    assert index is None or 0 <= index < len(LABELS)


@pytest.mark.timeout(300)
@settings(FUZZ, max_examples=150)
@given(
    mutated_images(),
    st.sampled_from([None, "ring", 3, "7", "-1", "²"]),
    st.sampled_from([None, 1, "2", "0"]),
)
def test_the_whole_prepare_path(shapes_explainer, data, target, topk):
    """parse -> resolve target -> decode -> preprocess, as the handler runs it."""
    item = {"data": data, "target": target, "topk": topk}
    item = {k: v for k, v in item.items() if v is not None}
    try:
        parsed = parse_item(item)
        prepared = shapes_explainer.prepare(ParsedRequest(parsed.image, parsed.options))
    except InputError as err:
        assert err.code in ERROR_CODES and err.status < 500
        return
    assert tuple(prepared.tensor.shape[1:]) == tuple(
        shapes_explainer.config.preprocessing.input_size
    )


ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32", "latin-1"])


@st.composite
def json_bodies(draw) -> bytes:
    """JSON text as a client may send it: any value or object with image and options, in
    any encoding, sometimes nested deep, with a repeated key, or with bytes cut or flipped."""
    body = draw(st.dictionaries(FIELD_NAMES, JSON, max_size=4) | JSON)
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):  # nest, beyond the parser's stack at times
        depth = draw(st.sampled_from([10, 900, 1000, 5000]))
        text = '{"image": "x", "target": ' + "[" * depth + text + "]" * depth + "}"
    if draw(st.booleans()):
        text = text.replace("{", '{"image": 1, "image": 2, ', 1)
    data = bytearray(text.encode(draw(ENCODINGS), errors="replace"))
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    return bytes(data)


@pytest.mark.timeout(120)
@FUZZ
@given(json_bodies())
def test_any_json_body_parses_or_gets_a_defined_error(body):
    try:
        parsed = parse_item({"body": body}, json_content=True)
    except InputError as err:
        assert (
            err.code in ERROR_CODES and err.status < 500 and len(err.message) <= MAX_MESSAGE_CHARS
        )
        return
    assert isinstance(parsed.image, bytes)
