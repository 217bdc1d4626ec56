"""The whole server profiled, plain against explained: where a request's CPU goes.

    python -m bench.profile_server --models mobilenet_v3_small resnet50
    python -m bench.profile_server --smoke

For each network, the two TorchServe servers of ``bench.e2e`` (camserve's handler and the
independent plain handler) take the same closed-loop load at concurrency 8, in blocks that
alternate between them (ABBA; with three servers each block starts one further on). Over
each block it reads:

- the CPU time (user + system, all threads, from /proc/<pid>/stat through psutil) of the
  TorchServe frontend (Java) and of the worker (Python), and the load generator's own;
- the answer bytes; per batch, the worker's metric lines (TorchServe's backend metrics are log
  lines the frontend parses) and the lines the frontend writes to its logs (``log_lines``);
- for camserve, its stage histogram sums from the metrics endpoint: decode, forward and
  Grad-CAM, score, encode, per batch.

In process, at batch 8 on the same JPEG, interleaved: decode + preprocess (camserve's and a
plain PIL + transforms.v2 one), the plain prediction, Captum's ``LayerGradCam`` alone (the
floor while Captum makes the map), ``Explainer.explain``, and the JSON encoding of both
answers. Writes ``bench/results/<date>-<name>.json`` and prints the tables for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import psutil
import requests
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from bench import e2e
from bench.ab import captum_alone
from bench.inprocess import plain_prediction
from bench.run import RESULTS, machine
from bench.timing import interleaved
from camserve.encode_json import explanation_json
from camserve.explainer import Explainer
from camserve.protocols.base import json_text
from camserve.request import ParsedRequest, RequestOptions
from harness.local_torchserve import LocalTorchServe

STAGE_SUM = re.compile(r'^camserve_stage_duration_seconds_sum\{[^}]*stage="(\w+)"[^}]*\} (\S+)$')


def frontend_pid(server: LocalTorchServe) -> int:
    """The Java process among the server's processes."""
    root = psutil.Process(server.process.pid)
    for process in [root, *root.children(recursive=True)]:
        if process.name() == "java" or "java" in (process.cmdline()[:1] or [""])[0]:
            return process.pid
    raise RuntimeError("no TorchServe frontend (java) process found")


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def log_lines(server: LocalTorchServe) -> dict[str, int]:
    """Lines so far. The frontend echoes every line of the worker's stdout: TorchServe's
    default log4j2 configuration writes each ``org.pytorch.serve`` line to the console and
    twice to ts_log.log (the logger and the root both append there). The console copy
    (torchserve.out) holds each line once: the worker's metric lines there, and the batches
    from ``PredictionTime``, which TorchServe's Python service records once per batch."""
    logs = server.workdir / "logs"
    console = (logs / "torchserve.out").read_text(errors="replace").splitlines()
    written = sum(len(path.read_text(errors="replace").splitlines()) for path in logs.glob("*.log"))
    return {
        "metric_lines": sum("[METRICS]" in line for line in console),
        "batches": sum("[METRICS]PredictionTime" in line for line in console),
        "frontend_log_lines": written + len(console),
    }


def stage_sums(server: LocalTorchServe) -> dict[str, float]:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = STAGE_SUM.match(line)
        if match:
            sums[match[1]] = sums.get(match[1], 0.0) + float(match[2])
    return sums


def snapshot(server: LocalTorchServe, pids: dict[str, int]) -> dict:
    return {
        **{f"{role}_cpu_s": cpu_seconds(pid) for role, pid in pids.items()},
        **log_lines(server),
        "stages": stage_sums(server),
    }


def profile_servers(
    workdir: Path,
    model: str,
    directory: Path,
    blocks: int,
    seconds: float,
    before_tree: Path | None = None,
) -> dict[str, dict]:
    images = e2e.jpeg_images(workdir, e2e.IMAGE_SIZE)
    servers = e2e.start_servers(workdir, model, directory, before_tree)
    totals: dict[str, dict[str, float]] = {v: {} for v in servers}
    try:
        pids = {
            v: {"frontend": frontend_pid(s), "worker": e2e.worker_pid(s)}
            for v, s in servers.items()
        }
        targets = {v: e2e.target(s, model) for v, s in servers.items()}
        e2e.loadgen(list(targets.values()), images, e2e.Load("warm", 2, 5, 20))
        load = e2e.Load("c8", 8, seconds, 100_000)
        variants = list(servers)
        # Each block starts one server further on (A B C, B C A, C A B...): with three servers,
        # ABBA would leave the middle one the only server never run twice in a row, a place
        # an A/A run measured lower (bench/e2e.py, measure_run).
        order = [v for block in range(blocks) for v in e2e.rotated(variants, block)]
        for variant in order:
            server = servers[variant]
            before = snapshot(server, pids[variant])
            [[result]] = e2e.loadgen([targets[variant]], images, load)
            after = snapshot(server, pids[variant])
            total = totals[variant]
            for key in (
                "frontend_cpu_s", "worker_cpu_s", "metric_lines", "batches", "frontend_log_lines"
            ):  # fmt: skip
                total[key] = total.get(key, 0) + after[key] - before[key]
            for stage, value in after["stages"].items():
                key = f"stage_{stage}_s"
                total[key] = total.get(key, 0) + value - before["stages"].get(stage, 0.0)
            total["requests"] = total.get("requests", 0) + result["requests"]
            total["wall_s"] = total.get("wall_s", 0) + result["wall_s"]
            total["client_cpu_s"] = total.get("client_cpu_s", 0) + result["client_cpu_s"]
            total["answer_bytes"] = result["mean_answer_bytes"]
            if set(result["statuses"]) != {"200"}:
                raise RuntimeError(f"{model} {variant}: answers {result['statuses']}")
    finally:
        for server in servers.values():
            server.stop()
    return {variant: per_request(total) for variant, total in totals.items()}


def per_request(total: dict[str, float]) -> dict:
    requests_, batches = total["requests"], max(total["batches"], 1)
    row = {
        "requests": int(requests_),
        "throughput_rps": round(requests_ / total["wall_s"], 2),
        "requests_per_batch": round(requests_ / batches, 2),
        "frontend_cpu_ms_per_request": round(1000 * total["frontend_cpu_s"] / requests_, 3),
        "worker_cpu_ms_per_request": round(1000 * total["worker_cpu_s"] / requests_, 3),
        "client_cpu_ms_per_request": round(1000 * total["client_cpu_s"] / requests_, 3),
        "answer_bytes": total["answer_bytes"],
        "metric_lines_per_batch": round(total["metric_lines"] / batches, 2),
        "frontend_log_lines_per_batch": round(total["frontend_log_lines"] / batches, 2),
    }
    for key, value in total.items():
        if key.startswith("stage_"):
            row[f"{key.removesuffix('_s')}_ms_per_batch"] = round(1000 * value / batches, 3)
    return row


class _LineCounter(logging.Handler):
    """Counts the worker's metric lines (TorchServe logs each as ``[METRICS]...``)."""

    def __init__(self) -> None:
        super().__init__()
        self.metric_lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.format(record).startswith("[METRICS]"):
            self.metric_lines += 1


def _context(directory: Path, model: str, batch: int) -> Context:
    metrics = MetricsCacheYamlImpl(config_file_path=str(e2e.REPO / "config" / "metrics.yaml"))
    metrics.initialize_cache()
    config = yaml.safe_load((directory / "model-config.yaml").read_text())
    context = Context(
        model, str(directory), {"model": {"modelName": model, "modelVersion": "1.0"}},
        batch, None, "0.12.0", metrics=metrics, model_yaml_config=config,
    )  # fmt: skip
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    context.request_ids = {i: f"req-{i}" for i in range(batch)}
    return context


def handlers(directory: Path, model: str, picture: bytes, batch: int):
    """Both handlers' ``handle`` on one batch of raw JPEG items, as the worker calls it (with
    TorchServe's own Context and metrics cache; the worker's log lines formatted and dropped,
    as the worker formats and writes them), and the camserve handler's metric lines per batch.
    """
    from bench.plain_handler import PlainHandler
    from camserve.handlers.camserve_handler import CamServeHandler

    items = [{"body": picture} for _ in range(batch)]
    made = {}
    for name, handler_class in (
        ("plain_handle", PlainHandler),
        ("camserve_handle", CamServeHandler),
    ):
        context = _context(directory, model, batch)
        handler = handler_class()
        handler.initialize(context)
        made[name] = (handler, context)
    counter, root = _LineCounter(), logging.getLogger()
    level = root.level
    root.addHandler(counter)
    root.setLevel(logging.INFO)
    try:
        made["camserve_handle"][0].handle(items, made["camserve_handle"][1])
    finally:
        root.removeHandler(counter)
        root.setLevel(level)
    lines = counter.metric_lines
    calls = {name: (lambda h=h, c=c: h.handle(items, c)) for name, (h, c) in made.items()}
    return calls, lines


def profile_in_process(
    directory: Path, model: str, picture: bytes, batch: int, repeats: int
) -> dict:
    """ms per batch of ``batch`` images, every candidate interleaved round after round; and
    the camserve handler's metric lines for such a batch."""
    explainer = Explainer.from_directory(directory)
    request = ParsedRequest(picture, RequestOptions())
    prepared = [explainer.prepare(request) for _ in range(batch)]
    pre = explainer.config.preprocessing
    transform = v2.Compose(
        [
            v2.Resize(pre.resize or list(pre.input_size), antialias=True),
            *([v2.CenterCrop(list(pre.center_crop))] if pre.center_crop else []),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(pre.mean), std=list(pre.std)),
        ]
    )
    explained = explainer.explain(prepared)
    top = plain_prediction(explainer, prepared)()
    labels = explainer.labels

    def plain_json():
        return [
            json.dumps(
                {
                    "predictions": [
                        {"index": i, "label": labels[i], "probability": round(p, 6)}
                        for p, i in zip(values, indices, strict=True)
                    ]
                }
            )
            for values, indices in zip(top[0].tolist(), top[1].tolist(), strict=True)
        ]

    handles, metric_lines = handlers(directory, model, picture, batch)
    # The worker writes every log line to its stdout, which the frontend reads.
    logging.basicConfig(stream=open(os.devnull, "w"), level=logging.INFO, force=True)  # noqa: SIM115
    stats = interleaved(
        {
            **handles,
            "plain_decode_preprocess": lambda: [
                transform(Image.open(io.BytesIO(picture)).convert("RGB")) for _ in range(batch)
            ],
            "camserve_decode_preprocess": lambda: [
                explainer.prepare(request) for _ in range(batch)
            ],
            "plain_prediction": plain_prediction(explainer, prepared),
            "captum_alone": captum_alone(explainer, prepared),
            "camserve_explain": lambda: explainer.explain(prepared),
            "plain_json": plain_json,
            "camserve_json": lambda: [json_text(explanation_json(e)) for e in explained],
        },
        repeats=repeats,
        warmup=3,
        budget_s=300.0,
    )
    times = {name: round(1000 * s.median_s, 3) for name, s in stats.items()}
    return {"ms_per_batch": times, "camserve_metric_lines_per_batch": metric_lines}


def table(results: dict) -> str:
    """The markdown tables docs/performance.md shows."""
    server_keys = (
        "throughput_rps", "frontend_cpu_ms_per_request", "worker_cpu_ms_per_request",
        "client_cpu_ms_per_request", "answer_bytes", "metric_lines_per_batch",
        "frontend_log_lines_per_batch", "requests_per_batch",
    )  # fmt: skip
    rows = ["| network | handler | " + " | ".join(server_keys) + " |"]
    rows.append("|---" * (2 + len(server_keys)) + "|")
    for model, value in results["models"].items():
        for variant, row in value["server"].items():
            cells = " | ".join(str(row[key]) for key in server_keys)
            rows.append(f"| {model} | {variant} | {cells} |")
    in_process = [value["in_process"]["ms_per_batch"] for value in results["models"].values()]
    rows += ["", "| network (ms per batch of 8) | " + " | ".join(in_process[0]) + " | camserve "
             "metric lines per batch |"]  # fmt: skip
    rows.append("|---" * (2 + len(in_process[0])) + "|")
    for model, value in results["models"].items():
        times = " | ".join(str(v) for v in value["in_process"]["ms_per_batch"].values())
        lines = value["in_process"]["camserve_metric_lines_per_batch"]
        rows.append(f"| {model} | {times} | {lines} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v3_small", "resnet50"])
    parser.add_argument("--blocks", type=int, default=4, help="c8 blocks per handler")
    parser.add_argument("--seconds", type=float, default=12.0, help="per block")
    parser.add_argument("--repeats", type=int, default=40, help="in-process rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="seconds, on shapes")
    parser.add_argument(
        "--before-tree", type=Path, help="another checkout: its handler as a third server"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="profile")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.blocks, args.seconds, args.repeats = ["shapes"], 1, 2.0, 3
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.UTC)
    results: dict = {
        "command": " ".join(["python", "-m", "bench.profile_server", *(argv or sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="camserve-profile-") as work:
        work_path = Path(work)
        [picture] = e2e.jpeg_images(work_path, e2e.IMAGE_SIZE, count=1)
        for model in args.models:
            directory = e2e.model_dir(model, work_path)
            results["models"][model] = {
                "server": profile_servers(
                    work_path, model, directory, args.blocks, args.seconds, args.before_tree
                ),
                "in_process": profile_in_process(
                    directory, model, picture.read_bytes(), 8, args.repeats
                ),
            }
    results["seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{started:%Y-%m-%d}-{args.name}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {path} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
