"""KServe v1: ``POST /v1/models/<m>:predict`` (and ``:explain``) with ``{"instances": [...]}``.

Each instance is a base64 image or an object ``{"image": <base64>, options...}``, parsed or
refused on its own. The answer holds one entry per instance under ``predictions`` (or
``explanations`` for ``:explain``): camserve's answer, or ``{"error": {...}}`` for a refused
instance; a request-level mistake is answered with ``{"error": {...}}`` alone. Statuses follow
the KServe error contract (``camserve.protocols._kserve``).
"""

from __future__ import annotations

from collections.abc import Sequence

from camserve.errors import (
    EMPTY_BODY,
    MISSING_IMAGE,
    UNKNOWN_OPTION,
    InputError,
    excerpt_names,
    input_error,
)
from camserve.protocols import _kserve
from camserve.protocols.base import (
    JSON_MEDIA_TYPE,
    Headers,
    ModelIdentity,
    Outcome,
    Protocol,
    Reply,
    carried,
    json_text,
    outcome_json,
)
from camserve.request import OPTION_FIELDS, ParsedRequest, decode_base64, parse_options

IMAGE_FIELDS = ("image", "data", "b64")


class KServeV1(Protocol):
    def __init__(self, body: dict) -> None:
        self.body = body
        self.explain = False
        self.refusal: InputError | None = None  # the whole request refused

    @classmethod
    def claim(cls, item: object, model: ModelIdentity) -> KServeV1 | None:
        found = _kserve.json_body(item)
        return cls(found[0]) if found is not None and "instances" in found[0] else None

    def read(self, item: object, headers: Headers) -> list[ParsedRequest | InputError]:
        self.explain = headers.get("explain") == "True"
        instances = self.body["instances"]
        unknown = set(self.body) - {"instances"}
        if unknown:
            self.refusal = input_error(
                UNKNOWN_OPTION,
                f"unknown field(s) {excerpt_names(unknown)} in a v1 request; options go "
                "inside each instance",
            )
        elif not isinstance(instances, list) or not instances:
            self.refusal = input_error(EMPTY_BODY, "'instances' must be a non-empty list")
        if self.refusal is not None:
            return []
        return [_try_instance(instance) for instance in instances]

    def write(self, outcomes: Sequence[Outcome]) -> Reply:
        if self.refusal is not None:
            code, phrase = _kserve.status([self.refusal])
            body = {"error": outcome_json(self.refusal)}
            return Reply(json_text(body), JSON_MEDIA_TYPE, code, phrase, (self.refusal.code,))
        answers = [
            {"error": outcome_json(o)} if isinstance(o, InputError) else outcome_json(o)
            for o in outcomes
        ]
        code, phrase = _kserve.status([o for o in outcomes if isinstance(o, InputError)])
        key = "explanations" if self.explain else "predictions"
        return Reply(json_text({key: answers}), JSON_MEDIA_TYPE, code, phrase, **carried(outcomes))

    def refuse(self, error: InputError) -> Reply:
        self.refusal = error
        return self.write([])


def _try_instance(instance: object) -> ParsedRequest | InputError:
    try:
        return _instance(instance)
    except InputError as err:
        return err


def _instance(instance: object) -> ParsedRequest:
    """A base64 string, or an object with one image field and camserve's options."""
    if isinstance(instance, str):
        return ParsedRequest(image=decode_base64(instance), options=parse_options({}))
    if not isinstance(instance, dict):
        raise input_error(
            MISSING_IMAGE,
            "a v1 instance is a base64 image or an object {'image': <base64>, options...}",
        )
    unknown = set(instance) - set(IMAGE_FIELDS) - set(OPTION_FIELDS)
    keys = [key for key in instance if key in IMAGE_FIELDS]
    if unknown:
        raise input_error(
            UNKNOWN_OPTION,
            f"unknown field(s) {excerpt_names(unknown)} in a v1 instance; send 'image' "
            f"(base64) and the options {list(OPTION_FIELDS)}",
        )
    if len(keys) != 1:
        raise input_error(MISSING_IMAGE, "a v1 instance needs exactly one 'image' (base64)")
    encoded = instance[keys[0]]
    if isinstance(encoded, dict) and set(encoded) == {"b64"}:  # TF-serving style
        encoded = encoded["b64"]
    return ParsedRequest(image=decode_base64(encoded), options=parse_options(instance))
