"""Load generator, run as its own process: posts image bytes to TorchServe servers on loopback.

    python -m bench.loadgen --url http://127.0.0.1:8080/predictions/a --token=T1 \
        --url http://127.0.0.1:9080/predictions/b --token=T2 \
        --image a.jpg --concurrency 8 --duration 12 --max-requests 100000 --blocks 3

With several servers, the blocks alternate between them in ABBA order (A B, B A, A B, ...), so
that a slow drift of the machine falls on every server alike. Prints one JSON object: for each
server (in the order given) its blocks, each with its latency summary, throughput, status
counts and mean answer size.
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
    and time. ``latencies_s`` keeps every sample, for pooling blocks."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    answer_bytes = [0]
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
            size = 0
            try:
                response = session.post(url, data=body, headers=headers, timeout=timeout_s)
                status, size = response.status_code, len(response.content)
            except requests.RequestException as err:
                status = type(err).__name__
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[str(status)] += 1
                answer_bytes[0] += size

    started, cpu_started = time.perf_counter(), time.process_time()
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
        "mean_answer_bytes": round(answer_bytes[0] / max(len(ordered), 1), 1),
        "statuses": dict(statuses),
        # The client's own CPU: on a 2-core host it competes with the server it measures.
        "client_cpu_s": round(time.process_time() - cpu_started, 4),
        "latencies_s": [round(x, 6) for x in latencies],
    }


def abba(servers: int, blocks: int) -> list[int]:
    """The order in which ``blocks`` rounds visit ``servers`` servers: forwards, then
    backwards, and so on (A B B A A B for two servers and three blocks)."""
    order = []
    for block in range(blocks):
        ahead = list(range(servers))
        order += ahead if block % 2 == 0 else ahead[::-1]
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--token", action="append", required=True, help="one per --url")
    parser.add_argument("--image", type=Path, action="append", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per block")
    parser.add_argument("--max-requests", type=int, default=1000, help="per block")
    parser.add_argument("--blocks", type=int, default=1, help="blocks per server")
    args = parser.parse_args()
    if len(args.url) != len(args.token):
        parser.error("give one --token per --url")
    bodies = [path.read_bytes() for path in args.image]
    results: list[list[dict]] = [[] for _ in args.url]
    for index in abba(len(args.url), args.blocks):
        results[index].append(
            run_load(
                args.url[index],
                args.token[index],
                bodies,
                args.concurrency,
                args.duration,
                args.max_requests,
            )
        )
    print(json.dumps({"servers": results}))


if __name__ == "__main__":
    main()
