"""Verified load and worker-crash runs against a real TorchServe on loopback.

Unlike a throughput benchmark (bench/loadgen.py), every answer is checked against the
answer its own image got when sent alone, so a response paired with the wrong request, or
a wrong answer after a crash, is caught. Used by tests/test_load_faults.py (short) and by
``make soak`` (long)::

    .venv/bin/python -m tests.load --clients 32 --duration 120 --warmup 60
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests

from bench.run import machine
from harness.local_torchserve import LocalTorchServe
from tests.live import PRODUCTION_CONFIG, REPO, response_timeout, worker_processes

PROBABILITY_TOLERANCE = 1e-4  # batch composition changes float rounding, nothing more


@dataclass(frozen=True)
class Expected:
    """An image with a known class and the answer the server gives it alone."""

    body: bytes
    label: int
    probabilities: tuple[tuple[int, float], ...]


@dataclass
class Outcome:
    start: float  # monotonic seconds
    end: float
    status: int | str  # HTTP status, or the exception's name
    correct: bool | None = None  # for 200s: the answer equals the image's own

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    rss_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, pid, rss)
    started: float = 0.0
    ended: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)  # ends the run early

    def statuses(self) -> dict[str, int]:
        return dict(Counter(str(o.status) for o in self.outcomes))

    def quantile(self, q: float, outcomes: list[Outcome] | None = None) -> float:
        latencies = sorted(o.latency for o in (outcomes or self.outcomes))
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    def summary(self) -> dict:
        ok = [o for o in self.outcomes if o.status == 200]
        wall = self.ended - self.started
        return {
            "clients": self.clients,
            "wall_s": round(wall, 2),
            "requests": len(self.outcomes),
            "statuses": self.statuses(),
            "wrong_answers": sum(o.correct is False for o in self.outcomes),
            "p50_s": round(statistics.median(o.latency for o in ok), 4) if ok else None,
            "p99_s": round(self.quantile(0.99, ok), 4) if ok else None,
            "max_s": round(max(o.latency for o in self.outcomes), 4),
            "throughput_rps": round(len(ok) / wall, 2),
        }


def expected_answers(server: LocalTorchServe, samples, timeout: float = 60) -> list[Expected]:
    """Each sample sent alone; kept when the model gets its class right, so that under load
    "the class matches the image sent" is a check of pairing, not of accuracy."""
    from tests.conftest import png_bytes

    kept = []
    for sample in samples:
        body = png_bytes(sample.image)
        reply = requests.post(
            f"{server.inference_url}/predictions/shapes",
            data=body,
            headers=server.auth(),
            timeout=timeout,
        )
        reply.raise_for_status()
        predictions = reply.json()["predictions"]
        if predictions[0]["index"] == sample.label:
            pairs = tuple((p["index"], p["probability"]) for p in predictions)
            kept.append(Expected(body, sample.label, pairs))
    return kept


def matches(answer: dict, expected: Expected) -> bool:
    got = {p["index"]: p["probability"] for p in answer["predictions"]}
    return answer["predictions"][0]["index"] == expected.label and all(
        abs(got[i] - p) <= PROBABILITY_TOLERANCE for i, p in expected.probabilities if i in got
    )


def run_load(
    server: LocalTorchServe,
    images: list[Expected],
    clients: int,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
    during=None,
) -> LoadReport:
    """Closed loop, bounded in count and time: each client posts, checks, posts again.
    ``during(report)`` runs in the calling thread while the clients run (e.g. a kill)."""
    report = LoadReport(clients, duration_s)
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + duration_s
    sampling_done = threading.Event()
    url = f"{server.inference_url}/predictions/shapes"
    headers = server.auth()

    def client(number: int) -> None:
        session = requests.Session()
        while True:
            with lock:
                if (
                    issued[0] >= max_requests
                    or time.monotonic() >= deadline
                    or report.stop.is_set()
                ):
                    return
                index = issued[0]
                issued[0] += 1
            image = images[(index * 7 + number) % len(images)]
            start = time.monotonic()
            try:
                reply = session.post(url, data=image.body, headers=headers, timeout=timeout_s)
                status, correct = reply.status_code, None
                if status == 200:
                    correct = matches(reply.json(), image)
            except (requests.RequestException, ValueError) as err:
                status, correct = type(err).__name__, None
            with lock:
                report.outcomes.append(Outcome(start, time.monotonic(), status, correct))

    def sample_rss() -> None:
        while not sampling_done.wait(1.0):
            try:
                for worker in worker_processes(server):
                    report.rss_samples.append(
                        (time.monotonic(), worker.pid, worker.memory_info().rss)
                    )
            except psutil.Error:
                pass  # a worker exiting between listing and reading

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    sampler = threading.Thread(target=sample_rss, daemon=True)
    report.started = time.monotonic()
    for thread in [sampler, *threads]:
        thread.start()
    try:
        if during is not None:
            during(report)
    finally:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + timeout_s + 10)
        report.ended = time.monotonic()
        sampling_done.set()
        sampler.join(5)
    assert not any(t.is_alive() for t in threads), "a client is still waiting: a request hung"
    return report


def rss_growth(report: LoadReport, after_s: float) -> dict:
    """Worker RSS at the first sample past ``after_s`` and at the end (same worker)."""
    samples = [s for s in report.rss_samples if s[0] - report.started >= after_s]
    if not samples:
        raise ValueError(f"no RSS sample after {after_s}s")
    first, last = samples[0], samples[-1]
    if first[1] != last[1]:
        raise ValueError("the worker changed during the RSS window")
    return {
        "pid": first[1],
        "at_s": round(first[0] - report.started, 1),
        "rss_at_mb": round(first[2] / 2**20, 1),
        "rss_end_mb": round(last[2] / 2**20, 1),
        "growth": round((last[2] - first[2]) / first[2], 4),
    }


@dataclass
class CrashReport:
    killed_pid: int
    new_pids: list[int]
    recovery_s: float  # kill -> first correct answer to a request sent after the kill
    worker_ready_s: float  # kill -> TorchServe reports a READY worker again
    failed: dict[str, int]
    wrong_answers: int
    slowest_s: float
    timeout_s: float
    load: dict


def wait_worker_ready(server: LocalTorchServe, old_pid: int, bound_s: float) -> float:
    """Seconds until a new worker process is READY, bounded by ``bound_s``."""
    start = time.monotonic()
    while time.monotonic() - start < bound_s:
        try:
            reply = requests.get(
                f"{server.management_url}/models/shapes",
                headers=server.auth("management"),
                timeout=5,
            )
            workers = reply.json()[0]["workers"]
            pids = {w.get("pid") for w in workers if w.get("status") == "READY"}
            if pids and old_pid not in pids:
                return time.monotonic() - start
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no READY worker {bound_s}s after the kill")


def crash_run(
    server: LocalTorchServe,
    images: list[Expected],
    clients: int,
    duration_s: float,
    kill_after_s: float,
    recovery_bound_s: float,
) -> CrashReport:
    """SIGKILL the Python worker mid-load and watch the answers and the restart; the run
    ends a few seconds after the new worker is ready, or after ``duration_s``."""
    timeout_s = response_timeout(server) + 10
    killed: dict = {}

    def kill(report: LoadReport) -> None:
        time.sleep(kill_after_s)
        [worker] = worker_processes(server)
        killed["pid"], killed["at"] = worker.pid, time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        try:
            killed["ready_s"] = wait_worker_ready(server, worker.pid, recovery_bound_s)
        finally:
            time.sleep(3.0)  # requests sent to the new worker
            report.stop.set()

    report = run_load(server, images, clients, duration_s, 100_000, timeout_s, during=kill)
    after = [o for o in report.outcomes if o.start >= killed["at"]]
    recovered = [o.end - killed["at"] for o in after if o.status == 200 and o.correct]
    failed = Counter(str(o.status) for o in report.outcomes if o.status != 200)
    return CrashReport(
        killed_pid=killed["pid"],
        new_pids=[p.pid for p in worker_processes(server)],
        recovery_s=round(min(recovered), 3) if recovered else float("inf"),
        worker_ready_s=round(killed["ready_s"], 3),
        failed=dict(failed),
        wrong_answers=sum(o.correct is False for o in report.outcomes),
        slowest_s=round(max(o.latency for o in report.outcomes), 3),
        timeout_s=timeout_s,
        load=report.summary(),
    )


def soak(args: argparse.Namespace) -> int:
    """The long run behind ``make soak``; writes bench/results/<date>-soak.json."""
    from camserve.tools.archive import build_archive
    from harness.shapes.dataset import HELD_OUT_SEED, render_sample

    work = Path(tempfile.mkdtemp(prefix="camserve-soak-"))
    store = work / "store"
    build_archive(REPO / "models" / "shapes", "shapes", store)
    server = LocalTorchServe.on_free_ports(work / "ts", PRODUCTION_CONFIG, store)
    server.start()
    try:
        images = expected_answers(server, [render_sample(HELD_OUT_SEED, i) for i in range(64)])
        timeout_s = response_timeout(server) + 10
        report = run_load(server, images, args.clients, args.duration, 10**6, timeout_s)
        load = report.summary()
        rss = rss_growth(report, args.warmup)
        crash = crash_run(server, images, args.clients, 90.0, 5.0, 60.0)
    finally:
        server.stop()
    checks = {
        "no_5xx_under_load": not any(str(s).startswith("5") for s in load["statuses"]),
        "all_answers_correct": load["wrong_answers"] == 0 and set(load["statuses"]) == {"200"},
        "rss_growth_below_5pct": rss["growth"] < 0.05,
        "crash_no_wrong_answer": crash.wrong_answers == 0,
        "crash_failures_are_5xx": all(k.isdigit() and int(k) >= 500 for k in crash.failed),
        "crash_no_hang": crash.slowest_s <= crash.timeout_s,
        "crash_recovered_within_60s": crash.recovery_s <= 60,
    }
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": f"python -m tests.load --clients {args.clients} --duration {args.duration:g} "
        f"--warmup {args.warmup:g}",
        "machine": machine(),
        "images": len(images),
        "load": load,
        "rss": rss,
        "crash": asdict(crash),
        "checks": checks,
        "passed": all(checks.values()),
    }
    out = REPO / "bench" / "results" / f"{datetime.date.today().isoformat()}-soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="camserve soak: verified load + worker crash")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=120.0, help="load seconds")
    parser.add_argument("--warmup", type=float, default=60.0, help="RSS baseline after (s)")
    return soak(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
