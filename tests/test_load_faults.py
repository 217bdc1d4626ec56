"""Short load and worker-crash runs on the production config (the long ones: ``make soak``).

Every answer is checked against the answer its own image got alone, so a response paired
with another request's image, or a wrong answer after the crash, fails the test.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import held_out
from tests.live import response_timeout, worker_processes
from tests.load import crash_run, expected_answers, rss_growth, run_load

pytestmark = pytest.mark.integration

CLIENTS = 16
LOAD_S = 15.0
RECOVERY_BOUND_S = 45.0  # measured ~8 s on an idle 2-core box; the CPU here is shared


@pytest.fixture(scope="module")
def images(production_server):
    kept = expected_answers(production_server, [held_out(i) for i in range(200, 248)])
    # With the trained weights nearly all are kept; a handful means the model is untrained.
    assert len(kept) >= 24, f"only {len(kept)}/48 held-out images classified correctly"
    return kept


def test_short_load_with_dynamic_batching(production_server, images, record_property):
    timeout_s = response_timeout(production_server) + 10
    report = run_load(production_server, images, CLIENTS, LOAD_S, 5000, timeout_s)
    summary = report.summary()
    record_property("load", json.dumps(summary))
    print("load:", json.dumps(summary))  # p50/p99 for the log; speed is not asserted
    assert summary["requests"] >= CLIENTS, summary
    assert summary["statuses"] == {"200": summary["requests"]}, summary
    assert summary["wrong_answers"] == 0
    assert all(o.correct for o in report.outcomes)
    rss = rss_growth(report, after_s=LOAD_S / 3)  # autograd graphs or hooks kept would grow it
    record_property("rss", json.dumps(rss))
    print("rss:", json.dumps(rss))
    assert rss["growth"] < 0.05, rss
    log = (production_server.workdir / "logs" / "model_log.log").read_text()
    batch_sizes = [
        int(line.split("camserve batch: ")[1].split(" items")[0])
        for line in log.splitlines()
        if "camserve batch: " in line
    ]
    assert max(batch_sizes) > 1, "dynamic batching never grouped requests"


def test_worker_killed_mid_load(production_server, images, record_property):
    [before] = worker_processes(production_server)
    crash = crash_run(
        production_server,
        images,
        clients=8,
        duration_s=RECOVERY_BOUND_S + 10,  # a bound; the run ends 3 s after the restart
        kill_after_s=3.0,
        recovery_bound_s=RECOVERY_BOUND_S,
    )
    record_property("crash", json.dumps(crash.__dict__))
    print("crash:", json.dumps(crash.__dict__))
    assert crash.killed_pid == before.pid and not before.is_running()
    assert crash.new_pids and before.pid not in crash.new_pids, "TorchServe did not restart it"
    assert crash.wrong_answers == 0
    assert all(code.isdigit() and int(code) >= 500 for code in crash.failed), crash.failed
    assert crash.slowest_s <= crash.timeout_s, "a request hung past the response timeout"
    assert crash.recovery_s <= RECOVERY_BOUND_S, crash
    assert crash.load["statuses"].get("200", 0) > 0
