"""Errors that become a per-item 4xx response, and the one way their messages quote input."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

# Longest message an error carries: whatever a bug or a library puts in it, an error answer
# stays a few hundred bytes (TorchServe drops a worker's whole reply when one answer
# exceeds max_response_size, and every other request in that batch with it).
MAX_MESSAGE_CHARS = 600
# How much of a client's value a message may quote.
EXCERPT_CHARS = 40
EXCERPT_ITEMS = 5


@dataclass
class InputError(Exception):
    """A problem with one request item; the rest of the batch is unaffected."""

    code: str
    message: str
    status: int = 400

    def __post_init__(self) -> None:
        self.message = bounded_message(self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# Error codes and their HTTP statuses, documented in the README and the schema.
EMPTY_BODY = ("empty_body", 400)
INVALID_JSON = ("invalid_json", 400)
INVALID_BASE64 = ("invalid_base64", 400)
MISSING_IMAGE = ("missing_image", 400)
UNKNOWN_OPTION = ("unknown_option", 400)
BAD_OPTION = ("bad_option", 400)
UNKNOWN_TARGET = ("unknown_target", 400)
IMAGE_TOO_LARGE = ("image_too_large", 413)
UNSUPPORTED_FORMAT = ("unsupported_format", 415)
UNDECODABLE_IMAGE = ("undecodable_image", 422)
# The answer would exceed TorchServe's max_response_size (camserve.response_budget).
RESPONSE_TOO_LARGE = ("response_too_large", 413)

ERROR_CODES = {
    code: status
    for code, status in (
        EMPTY_BODY,
        INVALID_JSON,
        INVALID_BASE64,
        MISSING_IMAGE,
        UNKNOWN_OPTION,
        BAD_OPTION,
        UNKNOWN_TARGET,
        IMAGE_TOO_LARGE,
        UNSUPPORTED_FORMAT,
        UNDECODABLE_IMAGE,
        RESPONSE_TOO_LARGE,
    )
}


def input_error(kind: tuple[str, int], message: str) -> InputError:
    code, status = kind
    return InputError(code=code, message=message, status=status)


def bounded_message(message: str) -> str:
    """``message`` cut to ``MAX_MESSAGE_CHARS``: the last guard for text we did not write."""
    message = str(message)
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 30] + f"... ({len(message)} characters)"


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped description of a client's value, for an error message.

    Bounded and never recursive: strings and bytes are quoted (escaped as ``repr`` does)
    up to ``limit`` characters, with their length when cut; containers are described by
    type and size, never printed (a list nested 1000 deep overflows ``repr``'s stack, and
    one of millions of items would make the answer larger than TorchServe passes on).
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        # repr() of an integer over 4300 digits raises ValueError.
        return (
            repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
        )
    if isinstance(value, str | bytes | bytearray):
        quoted = repr(bytes(value[:limit]) if isinstance(value, bytearray) else value[:limit])
        if len(value) <= limit:
            return quoted
        return f"{quoted}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} fields"
    return f"a value of type {type(value).__name__}"


def excerpt_names(names, limit: int = EXCERPT_ITEMS) -> str:
    """The first few of some field names in sorted order, each excerpted, and the count."""
    names = list(names)
    shown = ", ".join(excerpt(name) for name in heapq.nsmallest(limit, names, key=str))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}]{more}"
