"""Load generator, run as its own process: posts image bytes to a TorchServe on loopback.

    python -m bench.loadgen --url http://127.0.0.1:8080/predictions/shapes --token T \
        --image a.jpg --concurrency 8 --duration 20 --max-requests 2000
Prints one JSON object: latencies summary, throughput and status counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import requests


def run_load(
    url: str,
    token: str,
    bodies: list[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    timeout_s: float = 60.0,
) -> dict:
    """Closed loop: each client posts, waits for the answer, posts again; bounded in count
    and time."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    issued = [0]
    deadline = time.monotonic() + duration_s

    def client(worker: int) -> None:
        session = requests.Session()
        while True:
            with lock:
                if issued[0] >= max_requests or time.monotonic() >= deadline:
                    return
                index = issued[0]
                issued[0] += 1
            body = bodies[index % len(bodies)]
            start = time.perf_counter()
            try:
                status = session.post(
                    url, data=body, headers=headers, timeout=timeout_s
                ).status_code
            except requests.RequestException as err:
                status = type(err).__name__
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[str(status)] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + timeout_s + 5)
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "concurrency": concurrency,
        "requests": len(ordered),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ordered) / wall, 3),
        "p50_s": round(statistics.median(ordered), 5),
        "p90_s": round(quantile(0.9), 5),
        "p99_s": round(quantile(0.99), 5),
        "statuses": dict(statuses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--image", type=Path, action="append", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=1000)
    args = parser.parse_args()
    bodies = [path.read_bytes() for path in args.image]
    result = run_load(
        args.url, args.token, bodies, args.concurrency, args.duration, args.max_requests
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
