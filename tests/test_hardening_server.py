"""No input costs another request its answer, on a real TorchServe: a batching archive
(batchSize 8, long maxBatchDelay so 8 concurrent posts share one batch) behind
config/config.properties with a small ``max_response_size``, just above the size of one
``images=true`` answer."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from camserve.errors import MAX_MESSAGE_CHARS
from harness.local_torchserve import LocalTorchServe
from tests.conftest import CONFIG, held_out, png_bytes, shapes_variant_store
from tests.corpus import nested_json
from tests.live import VALIDATOR, worker_processes

pytestmark = pytest.mark.integration

BATCH = 8
# The limit is the images=true answer's size plus this. Float noise between batch
# compositions moves that size (PNG compression, digits) by up to about a hundred bytes;
# a second map (maps=2) adds about 500 bytes, five maps about 2000.
SLACK = 40
NOISE = 400
TIMEOUT_S = 120
JSON = {"Content-Type": "application/json"}


def post(server: LocalTorchServe, body: bytes, headers: dict | None = None) -> requests.Response:
    return requests.post(
        f"{server.inference_url}/predictions/shapes",
        data=body,
        headers={**server.auth(), **(headers or {})},
        timeout=TIMEOUT_S,
    )


def json_request(sample, **options) -> bytes:
    image = base64.b64encode(png_bytes(sample.image)).decode()
    return json.dumps({"image": image, **options}).encode()


def post_batch(server: LocalTorchServe, requests_: list[tuple[bytes, dict]]) -> list:
    assert len(requests_) == BATCH
    with ThreadPoolExecutor(max_workers=BATCH) as pool:
        return list(pool.map(lambda r: post(server, *r), requests_))


def good_samples(count: int, start: int = 40) -> list:
    return [held_out(i) for i in range(start, start + count)]


@pytest.fixture(scope="module")
def images_answer_size(server) -> int:
    """Bytes of the images=true answer for held-out image 30, sent alone to the default
    server (max_response_size 6553500)."""
    response = post(server, json_request(held_out(30), images=True), JSON)
    assert response.status_code == 200, response.text[:300]
    return len(response.content)


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, images_answer_size):
    store = shapes_variant_store(tmp_path_factory, "hardening", batchSize=BATCH, maxBatchDelay=5000)
    limit = images_answer_size + SLACK
    ts = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("ts_hardening"),
        CONFIG,
        store,
        overrides={"max_response_size": str(limit)},
    )
    ts.start()
    ts.limit = limit
    ts.workers = {p.pid for p in worker_processes(ts)}
    yield ts
    ts.stop()


def assert_error(response: requests.Response, code: str, status: int) -> None:
    assert response.status_code == status, response.text[:300]
    body = response.json()
    VALIDATOR.validate(body)
    assert body["code"] == code, body
    assert len(response.content) < MAX_MESSAGE_CHARS + 100  # a short excerpt, not the input


def assert_right_class(response: requests.Response, sample) -> None:
    assert response.status_code == 200, response.text[:300]
    assert response.json()["predictions"][0]["index"] == sample.label


def assert_worker_alive(server: LocalTorchServe) -> None:
    assert {p.pid for p in worker_processes(server)} == server.workers
    assert "TooLongFrameException" not in (server.workdir / "logs" / "ts_log.log").read_text()


def test_the_worker_reads_the_frontends_max_response_size(limited_server):
    config = limited_server.config_path
    assert limited_server.wait_for_log(f"max_response_size={limited_server.limit} ({config})")


def test_hostile_json_in_a_batch_leaves_the_good_images_answered(limited_server):
    """The issue's examples, in one batch with good images: each used to be a 500, or to
    kill the worker and its whole batch ("Worker died")."""
    good = good_samples(4)
    sample = held_out(0)
    image = base64.b64encode(png_bytes(sample.image)).decode()
    deep = nested_json(image, "target", 1000)
    zeros = f'{{"image": "{image}", "target": [{",".join(["0"] * 4_400_000)}]}}'.encode()
    control = json.dumps({"image": image, "target": "\x7f" * 2_300_000}, ensure_ascii=False)
    many_fields = json.dumps({"image": image, **{f"f{i}": 0 for i in range(300_000)}})
    attacks = [
        ((deep, JSON), "invalid_json", 400),
        ((zeros, JSON), "bad_option", 400),
        ((control.encode(), JSON), "unknown_target", 400),
        ((many_fields.encode(), JSON), "unknown_option", 400),
    ]
    batch = [request for request, _, _ in attacks] + [(png_bytes(s.image), {}) for s in good]
    replies = post_batch(limited_server, batch)
    for reply, (_, code, status) in zip(replies, attacks, strict=False):
        assert_error(reply, code, status)
    for reply, sample in zip(replies[len(attacks) :], good, strict=True):
        assert_right_class(reply, sample)
    assert limited_server.wait_for_log(f"camserve batch: {BATCH} items, {len(attacks)} rejected")
    assert_worker_alive(limited_server)


def test_an_answer_over_max_response_size_gets_its_own_error(limited_server):
    """At the limit: the images=true answer fits (within SLACK bytes of the limit); the
    same with more classes listed, or more maps, does not and gets response_too_large;
    everything else in the batch is answered."""
    sample = held_out(30)
    good = good_samples(3)
    batch = [
        (json_request(sample, images=True), JSON),
        (json_request(sample, images=True, topk=1000, maps=2), JSON),
        (json_request(sample, images=True, maps=5), JSON),
        (json_request(sample, maps=5, topk=1000), JSON),
        (png_bytes(sample.image), {"Accept": "image/png"}),
    ] + [(png_bytes(s.image), {}) for s in good]
    fits, more_classes, more_maps, no_images, overlay, *plain = post_batch(limited_server, batch)

    assert_right_class(fits, sample)
    assert limited_server.limit - NOISE < len(fits.content) <= limited_server.limit
    for too_large in (more_classes, more_maps):
        assert_error(too_large, "response_too_large", 413)
        assert f"max_response_size of {limited_server.limit}" in too_large.json()["message"]
    assert_right_class(no_images, sample)
    assert len(no_images.json()["more_explanations"]) == 5 - 1
    assert overlay.status_code == 200 and overlay.headers["Content-Type"] == "image/png"
    for reply, good_sample in zip(plain, good, strict=True):
        assert_right_class(reply, good_sample)
    assert_worker_alive(limited_server)
