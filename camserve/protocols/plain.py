"""TorchServe's plain body: raw image bytes, a JSON object or a multipart form; one image each.

An item is the dict TorchServe hands the handler for one HTTP request: raw bytes arrive as
``{"body": b"..."}``, a multipart form as one key per field, and a JSON body
(``Content-Type: application/json``) as bytes, which ``camserve.request.parse_json_body``
reads (TorchServe is asked not to parse JSON itself: its parser keeps the last of repeated
keys, knows only UTF-8 and gives up silently). A JSON body that TorchServe did parse (an
older worker, or ``decode_input_request`` forced on) is accepted as it is.

The answer is camserve's JSON, or the overlay itself when ``Accept`` ranks ``image/png``
first; an error is its JSON with the error's status.
"""

from __future__ import annotations

from collections.abc import Sequence

from camserve.encode_json import error_json, explanation_json
from camserve.encode_png import PNG_MEDIA_TYPE, accepts_png, overlay_png
from camserve.errors import (
    BAD_OPTION,
    EMPTY_BODY,
    INVALID_JSON,
    MISSING_IMAGE,
    UNKNOWN_OPTION,
    InputError,
    excerpt_names,
    input_error,
)
from camserve.protocols.base import (
    JSON_MEDIA_TYPE,
    Headers,
    ModelIdentity,
    Outcome,
    Protocol,
    Reply,
    json_text,
)
from camserve.request import (
    OPTION_FIELDS,
    ParsedRequest,
    RequestOptions,
    decode_base64,
    parse_json_body,
    parse_options,
)

IMAGE_FIELDS = ("data", "body", "image", "file", "instances")
# Set on each request by handlers/torchserve_internals.record_repeated_fields: the names of
# form fields the request sent more than once (TorchServe keeps only the last of them).
REPEATED_FIELDS_HEADER = "x-camserve-repeated-fields"
# A KServe v2 input tensor as TorchServe's ``kservev2`` envelope hands it over.
V2_TENSOR_FIELDS = frozenset({"name", "shape", "datatype", "data", "parameters"})


class PlainBody(Protocol):
    """One image per item; JSON answers, or the overlay PNG on ``Accept: image/png``."""

    def __init__(self) -> None:
        self.png = False

    @classmethod
    def claim(cls, item: object, model: ModelIdentity) -> PlainBody:
        return cls()

    def read(self, item: object, headers: Headers) -> list[ParsedRequest | InputError]:
        self.png = accepts_png(headers.get("Accept")) or accepts_png(headers.get("accept"))
        try:
            return [parse_item(item, json_content(headers), repeated_fields(headers))]
        except InputError as err:
            return [err]

    def write(self, outcomes: Sequence[Outcome]) -> Reply:
        [outcome] = outcomes
        if isinstance(outcome, InputError):
            body = error_json(outcome.code, outcome.message, outcome.status)
            return Reply(
                json_text(body), JSON_MEDIA_TYPE, outcome.status, outcome.code, (outcome.code,)
            )
        if self.png:
            return Reply(overlay_png(outcome), PNG_MEDIA_TYPE, explanations=(outcome,))
        return Reply(json_text(explanation_json(outcome)), JSON_MEDIA_TYPE, explanations=(outcome,))


def json_content(headers: Headers) -> bool:
    """The request said ``Content-Type: application/json`` (as a header, or as the content
    type TorchServe records for the body parameter)."""
    for key in ("Content-Type", "content-type", "body", "data"):
        value = headers.get(key)
        if isinstance(value, dict):
            value = value.get("content-type")
        if isinstance(value, str) and value.split(";")[0].strip() == JSON_MEDIA_TYPE:
            return True
    return False


def repeated_fields(headers: Headers) -> tuple[str, ...]:
    value = headers.get(REPEATED_FIELDS_HEADER)
    return tuple(name for name in value.split(",") if name) if isinstance(value, str) else ()


def parse_item(
    item: object, json_content: bool = False, repeated_fields: tuple[str, ...] = ()
) -> ParsedRequest:
    """Split one request item into image bytes and validated options.

    ``repeated_fields``: form field names the request carried more than once (TorchServe
    keeps the last one in ``item``); such a form is refused, since which one was meant is
    ambiguous.
    """
    if not isinstance(item, dict) or not item:
        raise input_error(EMPTY_BODY, "the request carried no data")
    fields = dict(item)
    if V2_TENSOR_FIELDS >= set(fields) >= {"datatype", "data"}:
        raise input_error(
            MISSING_IMAGE,
            "this is a KServe v2 tensor split out by TorchServe's kservev2 envelope; camserve "
            "reads KServe v1 and v2 bodies itself: remove service_envelope from the server's "
            "config.properties",
        )
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
