"""What every wire format reads a request into: image bytes and validated options.

The formats themselves (TorchServe's plain body, KServe v1 and v2) live in
``camserve.protocols``; they share the option rules, the hardened JSON reader and base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from camserve.errors import (
    BAD_OPTION,
    INVALID_BASE64,
    INVALID_JSON,
    InputError,
    excerpt,
    excerpt_names,
    input_error,
)

OPTION_FIELDS = ("target", "topk", "images", "maps")
MAX_TOPK = 1000
MAX_MAPS = 5


@dataclass(frozen=True)
class RequestOptions:
    # A class index or label; a multi-label model also takes a list of them, or a string of
    # labels separated by commas (resolved against the model's labels by the explainer).
    target: int | str | list[int | str] | None = None
    topk: int | None = None
    images: bool = False
    # How many classes get a map: the explained one, then the next most probable (multi-label:
    # at most this many present labels). None: the model's default (1; multi-label 5).
    maps: int | None = None


@dataclass(frozen=True)
class ParsedRequest:
    image: bytes
    options: RequestOptions


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
    return RequestOptions(
        target=_parse_target(raw.get("target")),
        topk=_parse_count(raw.get("topk"), "topk", MAX_TOPK),
        images=_parse_flag(raw.get("images")),
        maps=_parse_count(raw.get("maps"), "maps", MAX_MAPS),
    )


def _parse_target(target):
    """A class index or label, or a list of at most ``MAX_MAPS`` of them (for a multi-label
    model; the explainer refuses a list for a single-label one). Empty: the model's choice."""
    if isinstance(target, list):
        if len(target) > MAX_MAPS:
            raise input_error(
                BAD_OPTION, f"'target' names {len(target)} labels; at most {MAX_MAPS} are explained"
            )
        for item in target:
            _check_class(item)
        return target or None
    if target is not None:
        _check_class(target)
    return None if target == "" else target


def _check_class(value) -> None:
    if not isinstance(value, int | str) or isinstance(value, bool):
        raise input_error(
            BAD_OPTION, f"'target' must be a class index or label, got {excerpt(value)}"
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
