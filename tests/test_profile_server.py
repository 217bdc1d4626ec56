"""The whole-server profile's own logic (bench/profile_server.py): what it counts per batch
and per request. Its TorchServe part runs in `make bench`-like runs, not here; tests never
judge speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import profile_server
from tests.conftest import SHAPES_DIR, held_out, png_bytes


def test_per_request_divides_by_requests_and_batches():
    row = profile_server.per_request(
        {
            "requests": 80, "wall_s": 4.0, "batches": 10, "frontend_cpu_s": 0.4,
            "worker_cpu_s": 1.6, "client_cpu_s": 0.08, "answer_bytes": 1100.0,
            "metric_lines": 160, "frontend_log_lines": 500, "stage_encode_s": 0.01,
        }
    )  # fmt: skip
    assert row["throughput_rps"] == 20.0 and row["requests_per_batch"] == 8.0
    assert row["frontend_cpu_ms_per_request"] == 5.0 and row["worker_cpu_ms_per_request"] == 20.0
    assert row["metric_lines_per_batch"] == 16.0 and row["frontend_log_lines_per_batch"] == 50.0
    assert row["stage_encode_ms_per_batch"] == 1.0


def test_log_lines_counts_the_console_copy_once(tmp_path):
    class Server:
        workdir = tmp_path

    logs = tmp_path / "logs"
    logs.mkdir()
    metric = "W-1-stdout org.pytorch.serve.wlm.WorkerLifeCycle - result=[METRICS]"
    (logs / "torchserve.out").write_text(
        f"{metric}HandlerTime.Milliseconds:3.0\n{metric}PredictionTime.Milliseconds:3.1\n"
        "W-1 ACCESS_LOG - POST /predictions/m 200\n"
    )
    (logs / "ts_log.log").write_text("a\nb\nc\nd\n")
    counts = profile_server.log_lines(Server())
    assert counts == {"metric_lines": 2, "batches": 1, "frontend_log_lines": 7}


@pytest.mark.integration
def test_both_handlers_answer_a_batch_in_process_and_the_metric_lines_are_counted():
    calls, metric_lines = profile_server.handlers(
        Path(SHAPES_DIR), "shapes", png_bytes(held_out(0).image), 2
    )
    assert set(calls) == {"plain_handle", "camserve_handle"}
    for answers in (calls["plain_handle"](), calls["camserve_handle"]()):
        assert len(answers) == 2 and all('"predictions"' in answer for answer in answers)
    # Two explanations: their score observations, a counter line per series, the stages and
    # HandlerTime; far fewer than one line per number in the answers.
    assert 8 <= metric_lines <= 20
