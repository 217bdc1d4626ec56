"""Every request of the corpus, on every route, alone and in a batch, gets the answer recorded
in tests/recorded_answers.json (status, content type, body; numbers up to float noise).

The recording was made before the handler's wire formats moved to ``camserve.protocols``
(issue 21): it pins that nothing a client sees changed. See tests/recorded_answers.py for how
to re-record after a deliberate change."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.recorded_answers import differences, exchanges, load_recording, recorded_form

pytestmark = pytest.mark.integration

BATCH = 8
EXCHANGES = exchanges()


@pytest.fixture(scope="module")
def recording() -> dict[str, dict]:
    recorded = load_recording()
    assert sorted(recorded) == sorted(e.name for e in EXCHANGES), "re-record: the corpus changed"
    return recorded


def test_each_request_alone_gets_its_recorded_answer(server, recording):
    changed = {}
    for exchange in EXCHANGES:
        found = differences(recording[exchange.name], recorded_form(exchange.post(server)))
        if found:
            changed[exchange.name] = found[:3]
    assert not changed, changed


def test_each_request_in_a_batch_gets_its_recorded_answer(batching_server, recording):
    changed = {}
    with ThreadPoolExecutor(max_workers=BATCH) as pool:
        for start in range(0, len(EXCHANGES), BATCH):
            chunk = EXCHANGES[start : start + BATCH]
            replies = list(pool.map(lambda e: e.post(batching_server), chunk))
            for exchange, reply in zip(chunk, replies, strict=True):
                found = differences(recording[exchange.name], recorded_form(reply))
                if found:
                    changed[exchange.name] = found[:3]
    assert not changed, changed
    log = (batching_server.workdir / "logs" / "model_log.log").read_text()
    assert log.count(f"camserve batch: {BATCH} items") >= len(EXCHANGES) // BATCH - 1
