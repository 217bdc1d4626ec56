"""KServe's request bodies (v1 and v2, the Open Inference Protocol) -> camserve requests,
and camserve's answers -> KServe response bodies.

Under KServe's TorchServe runtime a Python wrapper (kserve 0.13) fronts TorchServe and
forwards each request unchanged in shape (docs/deployment.md):

- v1: ``POST /v1/models/<m>:predict`` (and ``:explain``) with the client's JSON body,
  ``{"instances": [...]}``;
- v2: ``POST /v2/models/<m>/infer`` with ``{"id", "inputs": [...], "parameters"?}``;
- grpc-v2: TorchServe's gRPC ``Predictions`` with one input ``data`` holding that v2 JSON
  as bytes, every BYTES element base64-encoded by the wrapper, parameters dropped.

camserve reads these bodies itself (TorchServe's ``kserve``/``kservev2`` envelopes are off):
the envelopes drop request-level parameters and answer only the first request of a batch.

The error contract: kserve 0.13 turns every non-200 from TorchServe into a 500 with the
body flattened into a string, so a client could not tell its own mistake from a server
fault. A client mistake is therefore answered with 200 and a typed error (v1: an
``{"error": {...}}`` entry in place of that instance's answer; v2: an output named
``error`` instead of ``explanation``), while a server fault keeps its 5xx status.

Nothing here imports TorchServe.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from dataclasses import dataclass, field

from camserve.encode_json import error_json
from camserve.errors import (
    BAD_OPTION,
    EMPTY_BODY,
    INVALID_BASE64,
    MISSING_IMAGE,
    UNKNOWN_OPTION,
    InputError,
    excerpt,
    excerpt_names,
    input_error,
)
from camserve.request import (
    OPTION_FIELDS,
    ParsedRequest,
    decode_base64,
    parse_json_body,
    parse_options,
)

V1 = "v1"
V2 = "v2"
IMAGE_INPUT = "image"  # the name camserve declares; any name that is not an option works
EXPLANATION_OUTPUT = "explanation"
ERROR_OUTPUT = "error"
V1_IMAGE_FIELDS = ("image", "data", "b64")
# Request-level parameters that clients and codecs set about the transport, not about the
# explanation: tritonclient adds binary_data_output, the v2 codecs add content_type.
TRANSPORT_PARAMETERS = frozenset({"binary_data_output", "content_type"})


@dataclass
class KServeRequest:
    """One KServe request: the images it carries (v1: one per instance, v2: exactly one),
    each parsed or refused on its own, or a refusal of the whole request."""

    protocol: str
    explain: bool = False
    images: list[ParsedRequest | InputError] = field(default_factory=list)
    error: InputError | None = None
    request_id: str | None = None


def read_request(item: dict, explain: bool = False) -> KServeRequest | None:
    """The KServe request in a TorchServe item, or None when the item is not one.

    A REST body arrives as ``{"body": dict}`` (or bytes, for the wrapper's v1 explain call,
    which sends no Content-Type); the wrapper's gRPC call arrives as ``{"data": bytes}``.
    """
    if not isinstance(item, dict) or len(item) != 1:
        return None
    [(key, payload)] = item.items()
    if key not in ("body", "data"):
        return None
    body = _json_object(payload)
    if body is None:
        return None
    via_grpc = key == "data" and isinstance(payload, bytes | bytearray)
    if "inputs" in body:
        return _read_v2(body, explain, via_grpc)
    if "instances" in body:
        return _read_v1(body, explain)
    return None


def model_metadata(model_name: str, model_version: str) -> dict:
    """The v2 model metadata camserve declares: one BYTES image in, one BYTES JSON out.

    kserve 0.13's wrapper answers ``GET /v2/models/<m>`` itself, with empty inputs and
    outputs, and never asks TorchServe; TorchServe's describe API
    (``GET /models/<m>?customized=true``) returns this as ``customizedMetadata``, which the
    wrapper waits for when the pod sets ``MODEL_LOAD_CUSTOMIZED=true``.
    """
    options = {name: "parameter or input tensor" for name in OPTION_FIELDS}
    return {
        "name": model_name,
        "versions": [model_version],
        "platform": "pytorch_torchserve",
        "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1]}],
        "outputs": [
            {"name": EXPLANATION_OUTPUT, "datatype": "BYTES", "shape": [1]},
            {"name": ERROR_OUTPUT, "datatype": "BYTES", "shape": [1]},
        ],
        "parameters": options,
    }


def is_error(outcome: dict) -> bool:
    """An outcome is either camserve's answer for one image or its error JSON."""
    return set(outcome) == {"code", "message", "status"}


def encode_response(
    request: KServeRequest,
    outcomes: list[dict],
    model_name: str,
    model_version: str,
    fallback_id: str,
) -> tuple[int, dict]:
    """The HTTP status and KServe body for ``request``; ``outcomes`` has one answer or
    error JSON per image (none when ``request.error`` is set).

    Client mistakes (4xx codes) are answered with 200 and a typed error; a server fault
    (5xx) keeps its status, so KServe's 500 and the 5xx alerts mean a server problem.
    """
    refusal = _error(request.error) if request.error else None
    errors = [refusal] if refusal else []
    errors += [o for o in outcomes if is_error(o)]
    status = max([200] + [e["status"] for e in errors if e["status"] >= 500])
    if request.protocol == V1:
        if request.error:
            return status, {"error": refusal}
        key = "explanations" if request.explain else "predictions"
        return status, {key: [{"error": o} if is_error(o) else o for o in outcomes]}
    [outcome] = errors or outcomes
    name = ERROR_OUTPUT if is_error(outcome) else EXPLANATION_OUTPUT
    text = json.dumps(outcome, separators=(",", ":"))
    return status, {
        # kserve 0.13 refuses a v2 response without an id.
        "id": request.request_id or fallback_id,
        "model_name": model_name,
        "model_version": model_version,
        "outputs": [{"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}],
    }


def _json_object(payload) -> dict | None:
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, bytes | bytearray | str) and payload[:1] in (b"{", "{"):
        try:  # hardened parsing (depth, encodings); a bad body is left to the plain parser
            return parse_json_body(payload)
        except InputError:
            return None
    return None


def _read_v1(body: dict, explain: bool) -> KServeRequest:
    request = KServeRequest(V1, explain)
    instances = body["instances"]
    unknown = set(body) - {"instances"}
    if unknown:
        request.error = input_error(
            UNKNOWN_OPTION,
            f"unknown field(s) {excerpt_names(unknown)} in a v1 request; options go inside "
            "each instance",
        )
    elif not isinstance(instances, list) or not instances:
        request.error = input_error(EMPTY_BODY, "'instances' must be a non-empty list")
    else:
        request.images = [_try(_v1_instance, instance) for instance in instances]
    return request


def _v1_instance(instance) -> ParsedRequest:
    """A base64 string, or an object with one image field and camserve's options."""
    if isinstance(instance, str):
        return ParsedRequest(image=decode_base64(instance), options=parse_options({}))
    if not isinstance(instance, dict):
        raise input_error(
            MISSING_IMAGE,
            "a v1 instance is a base64 image or an object {'image': <base64>, options...}",
        )
    unknown = set(instance) - set(V1_IMAGE_FIELDS) - set(OPTION_FIELDS)
    keys = [key for key in instance if key in V1_IMAGE_FIELDS]
    if unknown:
        raise input_error(
            UNKNOWN_OPTION,
            f"unknown field(s) {excerpt_names(unknown)} in a v1 instance; send 'image' "
            "(base64) and the "
            f"options {list(OPTION_FIELDS)}",
        )
    if len(keys) != 1:
        raise input_error(MISSING_IMAGE, "a v1 instance needs exactly one 'image' (base64)")
    encoded = instance[keys[0]]
    if isinstance(encoded, dict) and set(encoded) == {"b64"}:  # TF-serving style
        encoded = encoded["b64"]
    return ParsedRequest(image=decode_base64(encoded), options=parse_options(instance))


def _read_v2(body: dict, explain: bool, via_grpc: bool) -> KServeRequest:
    request_id = body.get("id")
    request = KServeRequest(V2, explain, request_id=request_id if request_id else None)
    try:
        request.images = [_v2_image(body, via_grpc)]
    except InputError as err:
        request.error = err
    return request


def _v2_image(body: dict, via_grpc: bool) -> ParsedRequest:
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
    return ParsedRequest(image=_v2_image_bytes(encoded, via_grpc), options=parse_options(options))


def _v2_image_bytes(encoded, via_grpc: bool) -> bytes:
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


def _error(err: InputError) -> dict:
    return error_json(err.code, err.message, err.status)


def _try(parse, value) -> ParsedRequest | InputError:
    try:
        return parse(value)
    except InputError as err:
        return err
