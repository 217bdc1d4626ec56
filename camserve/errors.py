"""Errors that become a per-item 4xx response."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class InputError(Exception):
    """A problem with one request item; the rest of the batch is unaffected."""

    code: str
    message: str
    status: int = 400

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
    )
}


def input_error(kind: tuple[str, int], message: str) -> InputError:
    code, status = kind
    return InputError(code=code, message=message, status=status)
