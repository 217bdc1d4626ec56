"""TorchServe adapter: decode requests, call the camserve core, encode responses.

TorchServe imports this file and requires exactly one class in it; all logic lives in
the ``camserve`` package, which the archive carries next to this file.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from camserve.device import serving_device
from camserve.encode_json import error_json, explanation_json
from camserve.encode_png import PNG_MEDIA_TYPE, accepts_png, overlay_png
from camserve.errors import InputError, bounded_message
from camserve.explainer import Explainer
from camserve.kserve_protocol import (
    KServeRequest,
    encode_response,
    model_metadata,
    read_request,
)
from camserve.request import is_v2_input, parse_item, several_v2_inputs
from camserve.response_budget import check_fits, frontend_config_path, max_response_size
from camserve.telemetry import Telemetry

log = logging.getLogger(__name__)

# Set on each request by the wrapper in ``_record_repeated_fields``: the names of form
# fields the request sent more than once (TorchServe keeps only the last of them).
REPEATED_FIELDS_HEADER = "x-camserve-repeated-fields"


class CamServeHandler(BaseHandler):
    """Every item of a batch is routed on its own: /predictions and /explanations both
    return the full explained answer, and a bad item gets its own 4xx."""

    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir")
        section = (context.model_yaml_config or {}).get("handler")
        self.model_name = context.manifest["model"]["modelName"]
        # TorchServe's GPU for this worker (gpu_id), unless deviceType says cpu; else the CPU.
        self.device = serving_device(context.system_properties, context.model_yaml_config)
        self.explainer = Explainer.from_directory(
            model_dir, section, name=self.model_name, device=self.device
        )
        self.model = self.explainer.model
        self.telemetry = Telemetry(
            context.metrics,
            MetricTypes,
            self.model_name,
            self.explainer.labels if self.explainer.config.class_metrics else None,
        )
        self.telemetry.loaded(
            self.explainer.compensation.compensable, self.explainer.score_baseline
        )
        self.max_response_size, source = max_response_size(config_path=frontend_config_path())
        log.info("answers are limited to max_response_size=%d (%s)", self.max_response_size, source)
        _take_json_bodies_raw()
        _record_repeated_fields()
        log.info(
            "camserve %s ready on device %s: layer %s, %s",
            self.model_name,
            self.device,
            self.explainer.config.target_layer,
            self.explainer.compensation.log_line(self.explainer.config.target_layer),
        )
        self.initialized = True

    def handle(self, data, context):
        if context.get_request_header(0, "describe") == "True":  # GET /models/<m>?customized
            version = str(context.manifest["model"].get("modelVersion", ""))
            return [json.dumps(model_metadata(self.model_name, version))]
        with self.telemetry.handling():  # HandlerTime, as BaseHandler.handle records it
            return self._handle(data, context)

    def _handle(self, data, context):
        if len(data) > len(context.request_processor or [None]):
            # The kservev2 envelope turns one request's inputs into several items that share
            # one HTTP status: refuse plainly (one image per v2 request) instead of a 503.
            err = several_v2_inputs(len(data))
            body = self._error(context, 0, err.code, err.message, err.status)
            return [body] * len(data)
        responses: list = [None] * len(data)
        prepared = []
        # KServe v1/v2 bodies: item index -> (request, one outcome per image it carries).
        kserve: dict[int, tuple[KServeRequest, list]] = {}
        for index, item in enumerate(data):
            request = read_request(item, explain=_is_explain(context, index))
            if request is not None:
                kserve[index] = (request, self._prepare_kserve(request, index, prepared))
                continue
            try:
                with self.telemetry.timed("decode"):
                    parsed = parse_item(
                        item,
                        json_content=_is_json(context, index),
                        repeated_fields=_repeated_fields(context, index),
                    )
                    prepared.append((index, self.explainer.prepare(parsed)))
            except InputError as err:
                responses[index] = self._error(context, index, err.code, err.message, err.status)
            except Exception as err:  # noqa: BLE001 - a decoder bug must not fail the batch
                log.exception("item %d could not be prepared", index)
                responses[index] = self._error(
                    context, index, "internal_error", f"request could not be read: {err}", 500
                )
        shown = []  # the explanations that reach a client, for the metrics
        for index, result in self._explain_isolated(prepared, context, responses, kserve):
            try:
                with self.telemetry.timed("encode"):
                    if isinstance(index, tuple):  # (item, image) of a KServe request
                        kserve[index[0]][1][index[1]] = explanation_json(result)
                    else:
                        responses[index] = self._answer(context, index, data[index], result)
                explained = result.explained
                shown.append((explained.zero_reference, explained.index, result.requested))
            except InputError as err:  # the answer does not fit max_response_size
                responses[index] = self._error(context, index, err.code, err.message, err.status)
            except Exception as err:  # noqa: BLE001 - an encoder bug must not fail the batch
                log.exception("item %s could not be encoded", index)
                message = f"answer could not be encoded: {err}"
                if isinstance(index, tuple):
                    self.telemetry.error("internal_error")
                    kserve[index[0]][1][index[1]] = error_json("internal_error", message, 500)
                else:
                    responses[index] = self._error(context, index, "internal_error", message, 500)
        self.telemetry.explained_batch(shown)
        for index, (request, outcomes) in kserve.items():
            responses[index] = self._kserve_answer(context, index, request, outcomes)
        log.info("camserve batch: %d items, %d rejected", len(data), len(data) - len(prepared))
        return responses

    def _prepare_kserve(self, request: KServeRequest, index: int, prepared: list) -> list:
        """Queue a KServe request's images for explanation; the outcomes list receives
        an error JSON now for each refused image and the answers after explaining."""
        outcomes: list = [None] * len(request.images)
        if request.error:
            self.telemetry.error(request.error.code)
        for slot, image in enumerate(request.images):
            try:
                with self.telemetry.timed("decode"):
                    if isinstance(image, InputError):
                        raise image
                    prepared.append(((index, slot), self.explainer.prepare(image)))
            except InputError as err:
                self.telemetry.error(err.code)
                outcomes[slot] = error_json(err.code, err.message, err.status)
            except Exception as err:  # noqa: BLE001 - a decoder bug must not fail the batch
                log.exception("item %d image %d could not be prepared", index, slot)
                self.telemetry.error("internal_error")
                outcomes[slot] = error_json(
                    "internal_error", f"request could not be read: {err}", 500
                )
        return outcomes

    def _explain_isolated(self, prepared, context, responses, kserve):
        """Explain the batch; if it fails, retry item by item so one poison input
        cannot take the others down."""
        if not prepared:
            return []
        try:
            return list(
                zip(
                    [i for i, _ in prepared],
                    self.explainer.explain([p for _, p in prepared], self.telemetry.stage),
                    strict=True,
                )
            )
        except Exception:  # noqa: BLE001 - isolate, then report per item below
            log.exception("batch of %d failed; retrying one by one", len(prepared))
        results = []
        for index, item in prepared:
            try:
                results.append((index, self.explainer.explain([item], self.telemetry.stage)[0]))
            except Exception as err:  # noqa: BLE001
                log.exception("item %s failed", index)
                if isinstance(index, tuple):  # an image of a KServe request
                    self.telemetry.error("internal_error")
                    kserve[index[0]][1][index[1]] = error_json(
                        "internal_error", f"explanation failed: {err}", 500
                    )
                    continue
                responses[index] = self._error(
                    context, index, "internal_error", f"explanation failed: {err}", 500
                )
        return results

    def _answer(self, context, index: int, item, result) -> str | bytes:
        """The encoded answer, or ``InputError`` when it would exceed max_response_size."""
        if _wants_png(context, index, item):
            context.set_response_content_type(index, PNG_MEDIA_TYPE)
            answer = overlay_png(result)
        else:
            answer = self._json(context, index, explanation_json(result))
        # json.dumps escapes to ASCII: a str answer's length is its size in bytes.
        too_large = check_fits(len(answer), self.max_response_size)
        if too_large is not None:
            raise too_large
        return answer

    def _kserve_answer(self, context, index: int, request: KServeRequest, outcomes) -> str:
        """The KServe body; refused as a whole when it would exceed max_response_size."""
        version = str(context.manifest["model"].get("modelVersion", ""))
        request_id = context.get_request_id(index)
        status, body = encode_response(request, outcomes, self.model_name, version, request_id)
        answer = self._json(context, index, body)
        too_large = check_fits(len(answer), self.max_response_size)
        if too_large is not None:
            self.telemetry.error(too_large.code)
            request.error = too_large
            status, body = encode_response(request, [], self.model_name, version, request_id)
            answer = self._json(context, index, body)
        if status != 200:
            context.set_response_status(status, "camserve error", idx=index)
        return answer

    def _error(self, context, index: int, code: str, message: str, status: int) -> str:
        self.telemetry.error(code)
        context.set_response_status(status, code, idx=index)
        # Messages quoting library errors are bounded too: an error answer stays small.
        return self._json(context, index, error_json(code, bounded_message(message), status))

    @staticmethod
    def _json(context, index: int, body: dict) -> str:
        context.set_response_content_type(index, "application/json")
        return json.dumps(body, separators=(",", ":"))


def _wants_png(context, index: int, item) -> bool:
    """``Accept: image/png`` asks for the overlay itself; KServe v2 tensors always get JSON."""
    if is_v2_input(item):
        return False
    return accepts_png(context.get_request_header(index, "Accept")) or accepts_png(
        context.get_request_header(index, "accept")
    )


def _is_explain(context, index: int) -> bool:
    """/explanations and KServe's :explain set the ``explain`` header on their own item."""
    return context.get_request_header(index, "explain") == "True"


def _is_json(context, index: int) -> bool:
    for key in ("Content-Type", "content-type", "body", "data"):
        value = context.get_request_header(index, key)
        if isinstance(value, dict):
            value = value.get("content-type")
        if isinstance(value, str) and value.split(";")[0].strip() == "application/json":
            return True
    return False


def _repeated_fields(context, index: int) -> tuple[str, ...]:
    value = context.get_request_header(index, REPEATED_FIELDS_HEADER)
    return tuple(name for name in value.split(",") if name) if isinstance(value, str) else ()


def _take_json_bodies_raw() -> None:
    """Ask this worker's TorchServe not to parse JSON bodies before the handler: camserve's
    parser (``camserve.request.parse_json_body``) refuses repeated keys and reads UTF-16
    and a byte order mark, where TorchServe's keeps the last key and gives up silently.
    TorchServe reads this documented setting (``decode_input_request``) per request."""
    os.environ["TS_DECODE_INPUT_REQUEST"] = "false"


def _record_repeated_fields() -> None:
    """TorchServe merges each request's fields into one dict before the handler runs: of two
    form files named ``data`` only the last arrives. Wrap that merge to record the names sent
    more than once in a header the handler reads, so such a request can be refused."""
    from ts.service import Service

    merge = Service.retrieve_data_for_inference
    if getattr(merge, "records_repeated_fields", False):
        return

    def retrieve_data_for_inference(batch):
        headers, inputs, request_ids = merge(batch)
        try:
            for request, processor in zip(batch, headers, strict=True):
                names = Counter(p.get("name") for p in request.get("parameters") or [])
                repeated = ",".join(sorted(str(n) for n, count in names.items() if count > 1))
                # Set after TorchServe copied the client's headers: a client cannot forge it.
                processor.get_request_properties()[REPEATED_FIELDS_HEADER] = repeated
        except Exception:  # noqa: BLE001 - a changed TorchServe must not fail requests
            log.exception("cannot record repeated form fields; TorchServe keeps the last")
        return headers, inputs, request_ids

    retrieve_data_for_inference.records_repeated_fields = True
    Service.retrieve_data_for_inference = staticmethod(retrieve_data_for_inference)
