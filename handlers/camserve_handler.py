"""TorchServe adapter: decode requests, call the camserve core, encode responses.

TorchServe imports this file and requires exactly one class in it; all logic lives in
the ``camserve`` package, which the archive carries next to this file.
"""

from __future__ import annotations

import json
import logging

from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from camserve.encode_json import error_json, explanation_json
from camserve.encode_png import PNG_MEDIA_TYPE, accepts_png, overlay_png
from camserve.errors import InputError
from camserve.explainer import Explainer
from camserve.request import is_v2_input, parse_item, several_v2_inputs
from camserve.telemetry import Telemetry

log = logging.getLogger(__name__)


class CamServeHandler(BaseHandler):
    """Every item of a batch is routed on its own: /predictions and /explanations both
    return the full explained answer, and a bad item gets its own 4xx."""

    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir")
        section = (context.model_yaml_config or {}).get("handler")
        self.model_name = context.manifest["model"]["modelName"]
        self.explainer = Explainer.from_directory(model_dir, section, name=self.model_name)
        self.model = self.explainer.model
        self.telemetry = Telemetry(
            context.metrics,
            MetricTypes,
            self.model_name,
            self.explainer.labels if self.explainer.config.class_metrics else None,
        )
        self.telemetry.loaded(self.explainer.compensation.compensable)
        log.info(
            "camserve %s ready: layer %s, %s",
            self.model_name,
            self.explainer.config.target_layer,
            self.explainer.compensation.log_line(self.explainer.config.target_layer),
        )
        self.initialized = True

    def handle(self, data, context):
        if len(data) > len(context.request_processor or [None]):
            # The kservev2 envelope turns one request's inputs into several items that share
            # one HTTP status: refuse plainly (one image per v2 request) instead of a 503.
            err = several_v2_inputs(len(data))
            body = self._error(context, 0, err.code, err.message, err.status)
            return [body] * len(data)
        responses: list = [None] * len(data)
        prepared = []
        for index, item in enumerate(data):
            try:
                with self.telemetry.timed("decode"):
                    parsed = parse_item(item, json_content=_is_json(context, index))
                    prepared.append((index, self.explainer.prepare(parsed)))
            except InputError as err:
                responses[index] = self._error(context, index, err.code, err.message, err.status)
            except Exception as err:  # noqa: BLE001 - a decoder bug must not fail the batch
                log.exception("item %d could not be prepared", index)
                responses[index] = self._error(
                    context, index, "internal_error", f"request could not be read: {err}", 500
                )
        for index, result in self._explain_isolated(prepared, context, responses):
            with self.telemetry.timed("encode"):
                if _wants_png(context, index, data[index]):
                    context.set_response_content_type(index, PNG_MEDIA_TYPE)
                    responses[index] = overlay_png(result)
                else:
                    responses[index] = self._json(context, index, explanation_json(result))
            self.telemetry.explained(result.explained.zero_reference, result.explained.index)
        log.info("camserve batch: %d items, %d rejected", len(data), len(data) - len(prepared))
        return responses

    def _explain_isolated(self, prepared, context, responses):
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
                log.exception("item %d failed", index)
                responses[index] = self._error(
                    context, index, "internal_error", f"explanation failed: {err}", 500
                )
        return results

    def _error(self, context, index: int, code: str, message: str, status: int) -> str:
        self.telemetry.error(code)
        context.set_response_status(status, code, idx=index)
        return self._json(context, index, error_json(code, message, status))

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


def _is_json(context, index: int) -> bool:
    for key in ("Content-Type", "content-type", "body", "data"):
        value = context.get_request_header(index, key)
        if isinstance(value, dict):
            value = value.get("content-type")
        if isinstance(value, str) and value.split(";")[0].strip() == "application/json":
            return True
    return False
