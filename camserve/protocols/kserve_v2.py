"""KServe v2 (the Open Inference Protocol): one image per request, over REST or gRPC.

- REST: ``POST /v2/models/<m>/infer`` with ``{"id", "inputs": [...], "parameters"?}``;
- grpc-v2: TorchServe's gRPC ``Predictions`` with one input ``data`` holding that v2 JSON as
  bytes, every BYTES element base64-encoded by the wrapper, parameters dropped.

The image is the one BYTES input whose name is not an option; options come as request-level
parameters, then option tensors, then the image's own parameters (the later win). The answer
is one BYTES output: ``explanation`` with camserve's JSON, or ``error`` with the error's JSON,
under the KServe error contract (``camserve.protocols._kserve``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import Sequence

from camserve.errors import (
    BAD_OPTION,
    INVALID_BASE64,
    MISSING_IMAGE,
    UNKNOWN_OPTION,
    InputError,
    excerpt,
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

IMAGE_INPUT = "image"  # the name camserve declares; any name that is not an option works
EXPLANATION_OUTPUT = "explanation"
ERROR_OUTPUT = "error"
# Request-level parameters that clients and codecs set about the transport, not about the
# explanation: tritonclient adds binary_data_output, the v2 codecs add content_type.
TRANSPORT_PARAMETERS = frozenset({"binary_data_output", "content_type"})


class KServeV2(Protocol):
    def __init__(self, body: dict, via_grpc: bool, model: ModelIdentity) -> None:
        self.body = body
        self.via_grpc = via_grpc
        self.model = model
        self.request_id = ""

    @classmethod
    def claim(cls, item: object, model: ModelIdentity) -> KServeV2 | None:
        found = _kserve.json_body(item)
        if found is None or "inputs" not in found[0]:
            return None
        return cls(*found, model)

    def read(self, item: object, headers: Headers) -> list[ParsedRequest | InputError]:
        # kserve 0.13 refuses a v2 response without an id: TorchServe's stands in.
        self.request_id = self.body.get("id") or headers.request_id
        try:
            return [_image(self.body, self.via_grpc)]
        except InputError as err:
            return [err]

    def write(self, outcomes: Sequence[Outcome]) -> Reply:
        [outcome] = outcomes
        failed = isinstance(outcome, InputError)
        code, phrase = _kserve.status([outcome] if failed else [])
        output = {
            "name": ERROR_OUTPUT if failed else EXPLANATION_OUTPUT,
            "datatype": "BYTES",
            "shape": [1],
            "data": [json_text(outcome_json(outcome))],
        }
        body = {
            "id": self.request_id,
            "model_name": self.model.name,
            "model_version": self.model.version,
            "outputs": [output],
        }
        return Reply(json_text(body), JSON_MEDIA_TYPE, code, phrase, **carried(outcomes))


def model_metadata(model: ModelIdentity) -> dict:
    """The v2 model metadata camserve declares: one BYTES image in, one BYTES JSON out.

    kserve 0.13's wrapper answers ``GET /v2/models/<m>`` itself, with empty inputs and
    outputs, and never asks TorchServe; TorchServe's describe API
    (``GET /models/<m>?customized=true``) returns this as ``customizedMetadata``, which the
    wrapper waits for when the pod sets ``MODEL_LOAD_CUSTOMIZED=true``.
    """
    options = {name: "parameter or input tensor" for name in OPTION_FIELDS}
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "pytorch_torchserve",
        "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1]}],
        "outputs": [
            {"name": EXPLANATION_OUTPUT, "datatype": "BYTES", "shape": [1]},
            {"name": ERROR_OUTPUT, "datatype": "BYTES", "shape": [1]},
        ],
        "parameters": options,
    }


def _image(body: dict, via_grpc: bool) -> ParsedRequest:
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise input_error(MISSING_IMAGE, "v2 'inputs' must be a list of tensors")
    images = [t for t in inputs if t.get("name") not in OPTION_FIELDS]
    if len(images) != 1:
        raise input_error(
            MISSING_IMAGE,
            f"a v2 request carries exactly one image input (BYTES, shape [1]), got "
            f"{len(images)}; send one request per image (or v1 'instances')",
        )
    [image] = images
    if image.get("datatype") != "BYTES":
        raise input_error(
            MISSING_IMAGE,
            f"the v2 image input must have datatype BYTES holding one base64 image, "
            f"got {excerpt(image.get('datatype'))}",
        )
    _check_outputs(body.get("outputs"))
    options = _parameters(body.get("parameters"), "request", TRANSPORT_PARAMETERS)
    for tensor in inputs:
        if tensor is not image:
            options[tensor["name"]] = _option_value(tensor, via_grpc)
    options.update(_parameters(image.get("parameters"), "input", frozenset({"content_type"})))
    [encoded] = _single(image, "image")
    return ParsedRequest(image=_image_bytes(encoded, via_grpc), options=parse_options(options))


def _image_bytes(encoded, via_grpc: bool) -> bytes:
    image = decode_base64(encoded)
    if via_grpc:
        # The wrapper base64-encodes every BYTES element it forwards. A native gRPC client
        # sent raw image bytes; a REST client of a grpc-v2 service sent base64 text, so
        # that arrives encoded twice. No image format's bytes are strict base64 text.
        with contextlib.suppress(binascii.Error, ValueError):
            image = base64.b64decode(image, validate=True)
    if not image:
        raise input_error(INVALID_BASE64, "the v2 image input is empty")
    return image


def _single(tensor: dict, what: str) -> list:
    data = tensor.get("data")
    if not isinstance(data, list) or len(data) != 1:
        raise input_error(
            MISSING_IMAGE if what == "image" else BAD_OPTION,
            f"the v2 {what} input must hold exactly one element (shape [1])",
        )
    return data


def _option_value(tensor: dict, via_grpc: bool):
    """An option sent as its own input tensor (the only way through grpc-v2)."""
    [value] = _single(tensor, f"'{tensor['name']}'")
    if tensor.get("datatype") == "BYTES" and via_grpc:
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as err:
            raise input_error(BAD_OPTION, f"option {excerpt(tensor['name'])}: {err}") from None
    return value


def _parameters(parameters, level: str, transport: frozenset[str]) -> dict:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise input_error(BAD_OPTION, f"v2 {level}-level 'parameters' must be an object")
    options = {k: v for k, v in parameters.items() if k not in transport}
    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise input_error(
            UNKNOWN_OPTION,
            f"unknown v2 {level}-level parameter(s) {excerpt_names(unknown)}; the options are "
            f"{list(OPTION_FIELDS)}",
        )
    return options


def _check_outputs(outputs) -> None:
    if outputs is None:
        return
    names = [o.get("name") if isinstance(o, dict) else o for o in outputs or []]
    unknown = {str(n) for n in names} - {EXPLANATION_OUTPUT}
    if unknown:
        raise input_error(
            UNKNOWN_OPTION,
            f"unknown v2 output(s) {excerpt_names(unknown)}; camserve answers with "
            f"'{EXPLANATION_OUTPUT}'",
        )
