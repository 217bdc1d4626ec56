"""TorchServe request item -> (image bytes, options).

An item is the dict TorchServe hands the handler for one HTTP request:
raw bytes arrive as ``{"body": b"..."}``, a multipart form as one key per field, and a
JSON body (``Content-Type: application/json``) as bytes, which ``parse_json_body`` reads
(the handler asks TorchServe not to parse JSON itself: its parser keeps the last of
repeated keys, knows only UTF-8 and gives up silently). A JSON body that TorchServe did
parse (an older worker, or ``decode_input_request`` forced on) is accepted as it is.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from camserve.errors import (
    BAD_OPTION,
    EMPTY_BODY,
    INVALID_BASE64,
    INVALID_JSON,
    MISSING_IMAGE,
    UNKNOWN_OPTION,
    InputError,
    excerpt,
    excerpt_names,
    input_error,
)

IMAGE_FIELDS = ("data", "body", "image", "file", "instances")
OPTION_FIELDS = ("target", "topk", "images", "maps")
MAX_TOPK = 1000
MAX_MAPS = 5


@dataclass(frozen=True)
class RequestOptions:
    target: int | str | None = None
    topk: int | None = None
    images: bool = False
    maps: int = 1  # how many classes get a map: the explained one, then the next most probable


@dataclass(frozen=True)
class ParsedRequest:
    image: bytes
    options: RequestOptions


def parse_item(
    item: dict, json_content: bool = False, repeated_fields: tuple[str, ...] = ()
) -> ParsedRequest:
    """Split one request item into image bytes and validated options.

    ``repeated_fields``: form field names the request carried more than once (TorchServe
    keeps the last one in ``item``); such a form is refused, since which one was meant is
    ambiguous.
    """
    if not isinstance(item, dict) or not item:
        raise input_error(EMPTY_BODY, "the request carried no data")
    fields = dict(item)
    if is_v2_input(fields):
        return _from_v2_input(fields)
    if repeated_fields:
        images = [name for name in repeated_fields if name in IMAGE_FIELDS]
        raise input_error(
            MISSING_IMAGE if images else BAD_OPTION,
            f"the form sent {excerpt_names(repeated_fields)} more than once; send one image "
            "as 'data' and each option once",
        )
    if len(fields) == 1 and next(iter(fields)) in ("body", "data"):
        payload = next(iter(fields.values()))
        if isinstance(payload, dict):
            return _from_json_object(payload)
        if isinstance(payload, list):
            raise input_error(INVALID_JSON, "a JSON body must be an object, not a list")
        if json_content and isinstance(payload, bytes | bytearray | str):
            return _from_json_object(parse_json_body(payload))
        return ParsedRequest(image=_as_bytes(payload), options=RequestOptions())
    return _from_form(fields)


def is_v2_input(item) -> bool:
    """An input tensor of a KServe v2 request, as TorchServe's ``kservev2`` envelope passes it:
    ``{"name", "shape", "datatype", "data", "parameters"?}`` (BYTES data already unwrapped)."""
    return (
        isinstance(item, dict)
        and {"datatype", "data"} <= set(item)
        and set(item) <= {"name", "shape", "datatype", "data", "parameters"}
    )


def several_v2_inputs(count: int) -> InputError:
    """The error for a v2 request with more than one input: they would share one status."""
    return input_error(
        MISSING_IMAGE,
        f"a v2 request carries exactly one input (one image), got {count}; "
        "send one request per image",
    )


def _from_v2_input(tensor: dict) -> ParsedRequest:
    if tensor["datatype"] != "BYTES":
        raise input_error(
            MISSING_IMAGE,
            f"a v2 input must have datatype BYTES holding one base64 image, "
            f"got {excerpt(tensor['datatype'])}",
        )
    data = tensor["data"]
    if isinstance(data, list) and len(data) == 1:  # not unwrapped by an envelope
        data = data[0]
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise input_error(BAD_OPTION, "v2 'parameters' must be an object")
    # content_type is the v2 codec's own hint; our images are always base64.
    options = {k: v for k, v in parameters.items() if k != "content_type"}
    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise input_error(
            UNKNOWN_OPTION,
            f"unknown v2 parameter(s) {excerpt_names(unknown)}; "
            f"the options are {list(OPTION_FIELDS)}",
        )
    image = data if isinstance(data, bytes | bytearray) else decode_base64(data)
    return ParsedRequest(image=bytes(image), options=parse_options(options))


def parse_json_body(payload: bytes | bytearray | str) -> dict:
    """A JSON request body -> its top-level object, or ``invalid_json``.

    Encodings are detected as RFC 8259 section 8.1 allows: UTF-8 (with or without a byte
    order mark), UTF-16 and UTF-32. A key repeated in any object is refused: which value
    was meant is ambiguous. Nesting deeper than the parser's stack is ``invalid_json``
    too, not a crash.
    """
    if isinstance(payload, str):
        payload = payload.removeprefix("\ufeff")
    try:
        body = json.loads(payload, object_pairs_hook=_refuse_repeated_keys)
    except InputError:
        raise
    except RecursionError:
        raise input_error(INVALID_JSON, "the JSON body is nested too deeply") from None
    except ValueError as err:  # includes UnicodeDecodeError
        raise input_error(INVALID_JSON, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise input_error(
            INVALID_JSON,
            f"a JSON body must be an object with an 'image' field, got {excerpt(body)}",
        )
    return body


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        repeated = {key for key, _ in pairs if key in seen or seen.add(key)}
        raise input_error(
            INVALID_JSON,
            f"the JSON body repeats the key(s) {excerpt_names(repeated)}; send each once",
        )
    return body


def _from_json_object(body: dict) -> ParsedRequest:
    encoded = _image_field(body, ("image", "data", "b64"), "a JSON body", "'image', base64")
    if isinstance(encoded, dict) and "b64" in encoded:  # TF-serving style {"b64": "..."}
        encoded = encoded["b64"]
    return ParsedRequest(image=decode_base64(encoded), options=parse_options(body))


def _from_form(fields: dict) -> ParsedRequest:
    image = _image_field(fields, IMAGE_FIELDS, "a form", "'data'")
    options = {k: _form_value(v) for k, v in fields.items() if k in OPTION_FIELDS}
    return ParsedRequest(image=_as_bytes(image), options=parse_options(options))


def _image_field(fields: dict, image_fields: tuple[str, ...], where: str, name: str):
    """The one image value among ``fields``; anything but options is refused."""
    unknown = set(fields) - set(image_fields) - set(OPTION_FIELDS)
    if unknown:
        raise input_error(
            UNKNOWN_OPTION,
            f"unknown field(s) {excerpt_names(unknown)} in {where}; send the image as {name} "
            f"and the options {list(OPTION_FIELDS)}",
        )
    keys = [key for key in fields if key in image_fields]
    if len(keys) != 1:
        raise input_error(MISSING_IMAGE, f"{where} needs exactly one image field ({name})")
    return fields[keys[0]]


def _form_value(value):
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise input_error(BAD_OPTION, "option values must be UTF-8 text") from None
    return value


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise input_error(MISSING_IMAGE, f"expected image bytes, got {type(value).__name__}")


def decode_base64(encoded) -> bytes:
    if not isinstance(encoded, str) or not encoded:
        raise input_error(INVALID_BASE64, "'image' must be a non-empty base64 string")
    if encoded.startswith("data:") and "," in encoded:  # data URL
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise input_error(INVALID_BASE64, f"'image' is not valid base64: {err}") from None


def parse_options(raw: dict) -> RequestOptions:
    target = raw.get("target")
    if target is not None and not isinstance(target, int | str) or isinstance(target, bool):
        raise input_error(
            BAD_OPTION, f"'target' must be a class index or label, got {excerpt(target)}"
        )
    if isinstance(target, str) and not target:
        target = None
    return RequestOptions(
        target=target,
        topk=_parse_count(raw.get("topk"), "topk", MAX_TOPK),
        images=_parse_flag(raw.get("images")),
        maps=_parse_count(raw.get("maps"), "maps", MAX_MAPS) or 1,
    )


def _parse_count(value, name: str, limit: int) -> int | None:
    if value is None or value == "":
        return None
    # isdigit() alone accepts "²" and other digits int() refuses.
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise input_error(
            BAD_OPTION, f"'{name}' must be an integer from 1 to {limit}, got {excerpt(value)}"
        )
    return value


def _parse_flag(value) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.lower() in ("true", "1", "yes")
    raise input_error(BAD_OPTION, f"'images' must be true or false, got {excerpt(value)}")
