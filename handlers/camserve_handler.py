"""TorchServe adapter: read each item through its wire format, explain, write the answers.

TorchServe imports this file and requires exactly one class in it. The wire formats live in
``camserve.protocols``, the pipeline in ``camserve.explainer``, and what camserve relies on
inside TorchServe in ``torchserve_internals``.
"""

from __future__ import annotations

import contextlib
import json
import logging

import ts.version
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from camserve.device import serving_device
from camserve.errors import InputError
from camserve.explainer import Explainer, Explanation, PreparedImage
from camserve.handlers import torchserve_internals as internals
from camserve.protocols import ModelIdentity, Outcome, Protocol, Reply, pick_protocol
from camserve.protocols.kserve_v2 import model_metadata
from camserve.response_budget import check_fits
from camserve.telemetry import Telemetry

log = logging.getLogger(__name__)


class CamServeHandler(BaseHandler):
    """Every item of a batch gets its own answer: /predictions and /explanations both return
    the full explained answer, and a bad item gets its own error."""

    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir")
        section = (context.model_yaml_config or {}).get("handler")
        model = context.manifest["model"]
        self.identity = ModelIdentity(model["modelName"], str(model.get("modelVersion", "")))
        # TorchServe's GPU for this worker (gpu_id), unless deviceType says cpu; else the CPU.
        self.device = serving_device(context.system_properties, context.model_yaml_config)
        self.explainer = Explainer.from_directory(
            model_dir, section, name=self.identity.name, device=self.device
        )
        self.model = self.explainer.model
        self.telemetry = Telemetry(
            context.metrics,
            MetricTypes,
            self.identity.name,
            self.explainer.labels if self.explainer.config.class_metrics else None,
        )
        self.telemetry.loaded(
            self.explainer.compensation.compensable,
            self.explainer.score_baseline,
            self.explainer.sanity,
        )
        self.max_response_size, source = internals.max_response_size(
            config_path=internals.frontend_config_path()
        )
        log.info("answers are limited to max_response_size=%d (%s)", self.max_response_size, source)
        internals.install(ts.version.__version__)
        log.info("camserve %s ready on device %s", self.identity.name, self.device)
        self.initialized = True

    def handle(self, data, context):
        if context.get_request_header(0, "describe") == "True":  # GET /models/<m>?customized
            description = {**model_metadata(self.identity), "camserve": self.explainer.describe()}
            return [json.dumps(description)]
        with self.telemetry.handling():  # HandlerTime, as BaseHandler.handle records it
            replies = self._handle(data, context)
        return [internals.send(context, index, reply) for index, reply in enumerate(replies)]

    def _handle(self, data, context) -> list[Reply]:
        with self.telemetry.timed("decode"):
            protocols = [pick_protocol(item, self.identity) for item in data]
            reads = [
                self._read(protocol, item, internals.ItemHeaders(context, index))
                for index, (protocol, item) in enumerate(zip(protocols, data, strict=True))
            ]
        jobs = [job for read in reads for job in read if _is_job(job)]
        explained = iter(self._explain(jobs))
        # encode times answers: a batch of refusals only has none (docs/monitoring.md).
        with self.telemetry.timed("encode") if jobs else contextlib.nullcontext():
            replies = [
                self._write(protocol, [next(explained) if _is_job(o) else o for o in read])
                for protocol, read in zip(protocols, reads, strict=True)
            ]
        self.telemetry.errors(code for reply in replies for code in reply.errors)
        # One per answer, or per explained label of a multi-label model (Explanation.monitored).
        self.telemetry.explained_batch(
            counted for reply in replies for e in reply.explanations for counted in e.monitored()
        )
        rejected = sum(isinstance(o, InputError) for read in reads for o in read)
        log.info("camserve batch: %d items, %d rejected", len(data), rejected)
        return replies

    def _read(self, protocol: Protocol, item, headers) -> list[PreparedImage | InputError]:
        """The item's images, decoded and preprocessed, each or refused on its own."""
        try:
            requests = protocol.read(item, headers)
        except Exception as err:  # noqa: BLE001 - a reader bug must not fail the batch
            log.exception("an item could not be read")
            return [_internal_error(f"request could not be read: {err}")]
        return [self._prepare(request) for request in requests]

    def _prepare(self, request) -> PreparedImage | InputError:
        if isinstance(request, InputError):
            return request
        try:
            return self.explainer.prepare(request)
        except InputError as err:
            return err
        except Exception as err:  # noqa: BLE001 - a decoder bug must not fail the batch
            log.exception("an image could not be prepared")
            return _internal_error(f"request could not be read: {err}")

    def _explain(self, jobs: list[PreparedImage]) -> list[Outcome]:
        """Explain the batch; if it fails, retry job by job so one poison input cannot take
        the others down."""
        if not jobs:
            return []
        try:
            return self.explainer.explain(jobs, self.telemetry.stage)
        except Exception:  # noqa: BLE001 - isolate, then report per job below
            log.exception("batch of %d failed; retrying one by one", len(jobs))
        return [self._explain_alone(job) for job in jobs]

    def _explain_alone(self, job: PreparedImage) -> Explanation | InputError:
        try:
            [explanation] = self.explainer.explain([job], self.telemetry.stage)
        except Exception as err:  # noqa: BLE001
            log.exception("an image could not be explained")
            return _internal_error(f"explanation failed: {err}")
        return explanation

    def _write(self, protocol: Protocol, outcomes: list[Outcome]) -> Reply:
        """The item's reply, refused as a whole when it would exceed max_response_size."""
        try:
            reply = protocol.write(outcomes)
        except Exception as err:  # noqa: BLE001 - an encoder bug must not fail the batch
            log.exception("an answer could not be encoded")
            return protocol.refuse(_internal_error(f"answer could not be encoded: {err}"))
        too_large = check_fits(len(reply.body), self.max_response_size)
        return reply if too_large is None else protocol.refuse(too_large)


def _is_job(outcome: PreparedImage | Outcome) -> bool:
    return isinstance(outcome, PreparedImage)


def _internal_error(message: str) -> InputError:
    return InputError("internal_error", message, 500)
