"""The handler's six steps in process, on TorchServe's own Context, RequestProcessor and metrics
cache: every item of a mixed batch gets its own reply, status and content type, and a fault
in one step (explaining, encoding, the size budget) costs only its own item. Over HTTP the
same classes are proven in tests/test_corpus.py and tests/test_recorded_answers.py; the faults
here cannot be caused from outside, so they are injected."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections import Counter
from unittest import mock

import pytest
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.service import Service

from camserve.handlers.camserve_handler import CamServeHandler
from tests.conftest import REPO, SHAPES_DIR, held_out, png_bytes

PNG = png_bytes(held_out(0).image)
B64 = base64.b64encode(PNG).decode()
# An answer with images=true (~28 KB) does not fit; a JSON (~1 KB) or PNG (~7.5 KB) one does.
MAX_RESPONSE_SIZE = 15000


@pytest.fixture(scope="module")
def handler():
    merge = Service.retrieve_data_for_inference
    config = yaml.safe_load((SHAPES_DIR / "model-config.yaml").read_text())
    with mock.patch.dict(os.environ, {"TS_MAX_RESPONSE_SIZE": str(MAX_RESPONSE_SIZE)}):
        context = _context([{}], config)
        handler = CamServeHandler()
        handler.initialize(context)
        yield handler
    Service.retrieve_data_for_inference = merge  # initialize() wrapped TorchServe's merge


def _context(headers: list[dict], config: dict | None = None) -> Context:
    metrics = MetricsCacheYamlImpl(config_file_path=str(REPO / "config" / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context(
        "shapes", str(SHAPES_DIR), {"model": {"modelName": "shapes", "modelVersion": "1.0"}},
        len(headers), None, "0.12.0", metrics=metrics, model_yaml_config=config,
    )  # fmt: skip
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.request_ids = {i: f"req-{i}" for i in range(len(headers))}
    return context


def handle(handler, items: list[tuple[dict, dict]]) -> tuple[list, Context]:
    """(bodies, context) for ``items``: (the item TorchServe hands over, its headers)."""
    context = _context([headers for _, headers in items])
    bodies = handler.handle([item for item, _ in items], context)
    return bodies, context


def status(context: Context, index: int) -> int:
    return context.get_response_status(index)[0]


def content_type(context: Context, index: int) -> str:
    return context.get_response_content_type(index)


JSON = {"Content-Type": "application/json"}


def test_a_mixed_batch_gets_one_reply_per_item(handler, caplog):
    items = [
        ({"body": PNG}, {}),
        ({"body": b"not an image"}, {}),
        ({"body": json.dumps({"instances": [B64, {"b64": "bm90IGFuIGltYWdl"}]})}, JSON),
        ({"body": {"id": "v2", "inputs": [{"name": "image", "shape": [1],
                                            "datatype": "BYTES", "data": [B64]}]}}, {}),
        ({"body": json.dumps({"image": B64, "images": True}).encode()}, JSON),
        ({"body": PNG}, {"Accept": "image/png"}),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        bodies, context = handle(handler, items)
    assert len(bodies) == len(items)
    assert (status(context, 0), json.loads(bodies[0])["model"]) == (200, "shapes")
    assert status(context, 1) == 422 and json.loads(bodies[1])["code"] == "undecodable_image"
    good, bad = json.loads(bodies[2])["predictions"]
    assert status(context, 2) == 200 and good["model"] == "shapes"
    assert bad["error"]["code"] == "undecodable_image"
    [output] = json.loads(bodies[3])["outputs"]
    assert status(context, 3) == 200 and output["name"] == "explanation"
    assert status(context, 4) == 413 and json.loads(bodies[4])["code"] == "response_too_large"
    assert status(context, 5) == 200 and bodies[5][:8] == b"\x89PNG\r\n\x1a\n"
    types = [content_type(context, i) for i in range(len(items))]
    assert types == ["application/json"] * 5 + ["image/png"]
    errors = _metric_counts(caplog, "camserve_errors_total", "reason")
    assert errors == {"undecodable_image": 2, "response_too_large": 1}
    shown = _metric_counts(caplog, "camserve_explanations_total", "requested")
    assert shown == {"false": 4}  # the over-budget answer was not shown


def test_a_poison_image_costs_only_its_own_answer(handler):
    explain = handler.explainer.explain

    def fails_with_the_poison(jobs, on_stage=None):
        if any(job.options.topk == 4 for job in jobs):
            raise RuntimeError("poisoned")
        return explain(jobs, on_stage)

    items = [({"data": PNG, "topk": topk}, {}) for topk in (b"2", b"4", b"3")]
    with mock.patch.object(handler.explainer, "explain", side_effect=fails_with_the_poison):
        bodies, context = handle(handler, items)
    assert [status(context, i) for i in range(3)] == [200, 500, 200]
    assert json.loads(bodies[1])["code"] == "internal_error"
    assert "explanation failed: poisoned" in json.loads(bodies[1])["message"]
    assert [len(json.loads(bodies[i])["predictions"]) for i in (0, 2)] == [2, 3]


def test_an_encoder_fault_costs_only_its_own_answer(handler):
    from camserve.protocols import plain

    encode = plain.explanation_json

    def fails_for_topk_2(explanation):
        if explanation.image.options.topk == 2:
            raise ValueError("cannot encode")
        return encode(explanation)

    items = [({"data": PNG, "topk": topk}, {}) for topk in (b"1", b"2")]
    with mock.patch.object(plain, "explanation_json", side_effect=fails_for_topk_2):
        bodies, context = handle(handler, items)
    assert [status(context, i) for i in range(2)] == [200, 500]
    assert "answer could not be encoded: cannot encode" in json.loads(bodies[1])["message"]


def test_the_description_carries_the_v2_metadata_and_camserves_facts(handler):
    context = _context([{"describe": "True"}])
    [description] = handler.handle([{}], context)
    described = json.loads(description)
    assert described["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    facts = described["camserve"]
    sanity = facts.pop("sanity")
    assert facts == {
        "target_layer": "features", "input_size": [64, 64], "classes": 6,
        "reference": "calibration_mean", "compensable": True, "multi_label": False,
    }  # fmt: skip
    # The shipped calibration file's sanity check, whole: verdict, threshold, seed, curve.
    assert sanity == handler.explainer.sanity.to_dict() and sanity["verdict"] == "passed"
    assert [step["stage"] for step in sanity["steps"]][:2] == [
        "classifier",
        "features.12+features.13",
    ]


def _metric_counts(caplog, name: str, label: str) -> Counter:
    """Summed values of metric ``name`` by ``label``, from TorchServe's metric log lines."""
    counts: Counter = Counter()
    for record in caplog.records:
        match = re.match(rf"\[METRICS\]{name}\.\w+:([0-9.e-]+)\|#([^|]*)\|", record.getMessage())
        if match:
            labels = dict(pair.split(":", 1) for pair in match.group(2).split(","))
            counts[labels[label]] += float(match.group(1))
    return Counter({k: v for k, v in counts.items() if v})
