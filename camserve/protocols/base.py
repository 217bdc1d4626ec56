"""What every wire format shares: the protocol interface, the reply, and the JSON of an outcome."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol as Interface

from camserve.encode_json import error_json, explanation_json
from camserve.errors import InputError
from camserve.explainer import Explanation
from camserve.request import ParsedRequest

Outcome = Explanation | InputError
"""What became of one image: its explanation, or why it has none."""

JSON_MEDIA_TYPE = "application/json"


class Headers(Interface):
    """What the serving engine tells about one item besides its body."""

    @property
    def request_id(self) -> str: ...

    def get(self, name: str) -> object | None: ...


@dataclass(frozen=True)
class ModelIdentity:
    """The served model as KServe bodies name it."""

    name: str
    version: str


@dataclass(frozen=True)
class Reply:
    """One item's answer on the wire, and what it carries for the metrics."""

    body: str | bytes
    content_type: str
    status: int = 200
    phrase: str = "OK"  # the HTTP reason phrase when status is not 200
    errors: tuple[str, ...] = ()  # the error codes the body carries
    explanations: tuple[Explanation, ...] = ()  # the explanations the body carries


class Protocol(ABC):
    """One wire format, one instance per item (``read`` may keep what ``write`` needs)."""

    @classmethod
    @abstractmethod
    def claim(cls, item: object, model: ModelIdentity) -> Protocol | None:
        """An instance for ``item`` if it is in this format, else None."""

    @abstractmethod
    def read(self, item: object, headers: Headers) -> list[ParsedRequest | InputError]:
        """The item's images, each parsed with its options or refused on its own."""

    @abstractmethod
    def write(self, outcomes: Sequence[Outcome]) -> Reply:
        """The reply for the outcomes of what ``read`` returned, in the same order."""

    def refuse(self, error: InputError) -> Reply:
        """The reply that refuses the whole item."""
        return self.write([error])


def outcome_json(outcome: Outcome) -> dict:
    """camserve's JSON answer for one image: the explanation, or the error."""
    if isinstance(outcome, InputError):
        return error_json(outcome.code, outcome.message, outcome.status)
    return explanation_json(outcome)


def json_text(body: dict) -> str:
    # Compact, and ASCII-escaped: the text's length is its size in bytes (the size budget).
    return json.dumps(body, separators=(",", ":"))


def carried(outcomes: Sequence[Outcome]) -> dict:
    """``Reply`` keyword arguments: the errors and explanations among ``outcomes``."""
    return {
        "errors": tuple(o.code for o in outcomes if isinstance(o, InputError)),
        "explanations": tuple(o for o in outcomes if not isinstance(o, InputError)),
    }
