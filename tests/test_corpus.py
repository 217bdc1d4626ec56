"""The bad-input corpus over HTTP against a real TorchServe: every input gets its correct
answer or its defined 4xx JSON error, alone and mixed into batches with good images, and the
worker never dies."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from camserve.errors import MAX_MESSAGE_CHARS
from harness.local_torchserve import LocalTorchServe, read_properties
from tests.conftest import CONFIG, held_out, png_bytes
from tests.corpus import FRONTEND_413, OK, Case, build_corpus
from tests.live import VALIDATOR, map_distance, same_answer, worker_processes

pytestmark = pytest.mark.integration

MAX_REQUEST_SIZE = int(read_properties(CONFIG)["max_request_size"])
CASES = build_corpus(MAX_REQUEST_SIZE)
BATCH = 8
BATCHED = [c for c in CASES if c.expect != FRONTEND_413]  # the rest never reaches a worker
# Each batch: 4 corpus cases and good images to fill it up to 8.
GOOD_NEEDED = -(-len(BATCHED) // (BATCH // 2)) * BATCH - len(BATCHED)
INPUT_SIZE = (64, 64)  # the shapes model's input: the overlay's size
TIMEOUT_S = 120  # a bound that catches a hang; answers take well under a second


def post_case(server: LocalTorchServe, case: Case) -> requests.Response:
    kwargs = case.request_kwargs()
    headers = {**server.auth(), **kwargs.pop("headers", {})}
    return requests.post(
        f"{server.inference_url}/predictions/shapes", headers=headers, timeout=TIMEOUT_S, **kwargs
    )


def answer_for(server: LocalTorchServe, image_bytes: bytes) -> dict:
    response = requests.post(
        f"{server.inference_url}/predictions/shapes",
        data=image_bytes,
        headers=server.auth(),
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    return response.json()


def check(server: LocalTorchServe, case: Case, response: requests.Response) -> None:
    """The case's defined outcome; references are answered by ``server``."""
    assert response.status_code == case.status, (case.name, response.text[:300])
    if case.expect == FRONTEND_413:
        return  # TorchServe's frontend answers before any worker sees it: no JSON body
    if case.accept == "image/png" and case.expect == OK:
        assert response.headers["Content-Type"] == "image/png", case.name
        with Image.open(io.BytesIO(response.content)) as overlay:
            assert (overlay.format, overlay.size) == ("PNG", INPUT_SIZE), case.name
        return
    body = response.json()
    VALIDATOR.validate(body)
    if case.expect != OK:
        assert (body["code"], body["status"]) == (case.expect, case.status), body
        # Errors quote at most a short excerpt of what was sent.
        assert 0 < len(body["message"]) <= MAX_MESSAGE_CHARS, (case.name, len(body["message"]))
        return
    assert "predictions" in body, body
    if case.topk is not None:
        assert len(body["predictions"]) == case.topk
    if case.label is not None:
        assert body["predictions"][0]["index"] == case.label, (case.name, body["predictions"])
    if case.same_as is not None:
        reference = answer_for(server, case.same_as)
        assert same_answer(body, reference), (case.name, body["predictions"], reference)
    if case.differs_from is not None:
        # The transformation (EXIF rotation, first GIF frame) changed what was explained.
        assert map_distance(body, answer_for(server, case.differs_from)) > 0.05, case.name


@pytest.fixture(scope="module")
def workers_at_start(server) -> set[int]:
    return {p.pid for p in worker_processes(server)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_input_alone(server, workers_at_start, case):
    check(server, case, post_case(server, case))


def test_the_worker_survived_the_corpus(server, workers_at_start):
    assert workers_at_start, "no worker found"
    assert {p.pid for p in worker_processes(server)} == workers_at_start
    good = held_out(20)
    assert answer_for(server, png_bytes(good.image))["predictions"][0]["index"] == good.label


@pytest.fixture(scope="module")
def good_images(server) -> list[Case]:
    """Held-out images the model gets right when sent alone: in a mixed batch each must
    get that same answer, so a wrong one means the batch hurt it, not model error."""
    cases = []
    for index in range(100, 300):
        sample = held_out(index)
        body = png_bytes(sample.image)
        if answer_for(server, body)["predictions"][0]["index"] == sample.label:
            cases.append(
                Case(f"good_{index}", OK, 200, body=body, same_as=body, label=sample.label)
            )
        if len(cases) == GOOD_NEEDED:
            break
    assert len(cases) == GOOD_NEEDED, f"only {len(cases)} of 200 held-out images right"
    return cases


def test_bad_inputs_mixed_into_batches_leave_good_images_correct(
    batching_server, server, good_images
):
    cases = BATCHED
    half = BATCH // 2
    workers = {p.pid for p in worker_processes(batching_server)}
    goods = iter(good_images)
    with ThreadPoolExecutor(max_workers=BATCH) as pool:
        for start in range(0, len(cases), half):
            chunk = cases[start : start + half]
            good_cases = [next(goods) for _ in range(BATCH - len(chunk))]
            mixed = [c for pair in zip(chunk, good_cases, strict=False) for c in pair]
            mixed += good_cases[len(chunk) :]
            replies = list(pool.map(lambda c: post_case(batching_server, c), mixed))
            for case, reply in zip(mixed, replies, strict=True):
                # References come from the other server: batch-invariant answers.
                check(server, case, reply)
    log = (batching_server.workdir / "logs" / "model_log.log").read_text()
    full_batches = log.count(f"camserve batch: {BATCH} items")
    assert full_batches >= len(cases) // half - 1, "posts were not batched together"
    assert {p.pid for p in worker_processes(batching_server)} == workers
