"""Start, query and stop a local Prometheus scraping a local TorchServe.

Used by ``make monitor`` (``python -m harness.local_prometheus start``) and by the monitoring
tests. The scrape config and alert rules are the shipped ones in ``config/prometheus/``;
only the target, the intervals and the rule-file paths are filled in for the local run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from harness.local_torchserve import read_properties

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "config" / "prometheus"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
JOB = "torchserve"
READY_TIMEOUT_S = 60
DEFAULT_WORKDIR = Path(".run/prometheus")
# The pages `make monitor` prints: the explanation rate, the alerts, the scrape targets.
UI_PAGES = {
    "graph": "graph?g0.expr=sum%20by%20(requested)%20(camserve_explanations_total)&g0.tab=0",
    "alerts": "alerts",
    "targets": "targets",
}
INSTALL_HINT = (
    "install Debian's prometheus package (apt-get install prometheus), or run make monitor or "
    "make test, which install it"
)


def executable(name: str) -> str:
    """Path of ``prometheus`` or ``promtool``; raises FileNotFoundError with a hint."""
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found on PATH: {INSTALL_HINT}")
    return found


def local_config(
    target: str, scrape_interval: str | None = None, base: Path = SCRAPE_CONFIG
) -> dict:
    """The shipped scrape config pointed at ``target`` (host:port), rule files made absolute."""
    config = yaml.safe_load(base.read_text())
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str((base.parent / f).resolve()) for f in config.get("rule_files", [])]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    if len(jobs) != 1:
        raise ValueError(f"{base} needs exactly one scrape job named {JOB!r}")
    jobs[0]["static_configs"] = [{"targets": [target]}]
    return config


def metrics_target(config_properties: Path) -> str:
    """host:port of TorchServe's metrics endpoint, from ``metrics_address``."""
    address = read_properties(config_properties).get("metrics_address", "http://127.0.0.1:8082")
    return urllib.parse.urlsplit(address).netloc


@dataclass
class LocalPrometheus:
    """A Prometheus in ``workdir`` (config, TSDB, log, PID file) listening on loopback."""

    workdir: Path
    target: str
    port: int = 9090
    scrape_interval: str | None = None
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "prometheus.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(local_config(self.target, self.scrape_interval)))
        command = [
            executable("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(str(self.process.pid))
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=5).status_code == 200:
                    return
            except requests.RequestException as err:
                last = repr(err)
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready after {timeout}s ({last}); {self.log_tail()}")

    def api(self, path: str, **params: str) -> dict | list:
        """GET ``/api/v1/<path>`` and return its ``data``; raises on an error status."""
        body = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector."""
        return self.api("query", query=expr)["result"]

    def ui_url(self, page: str) -> str:
        """The URL of a web UI page (``alerts``, ``graph?g0.expr=up``...) that answers 200 on
        this Prometheus, after redirects. Upstream builds serve the React UI at ``/<page>``;
        Debian's 2.42 package ships only the classic UI, under ``/classic/<page>``."""
        tried = []
        for prefix in ("", "/classic"):
            url = f"{self.url}{prefix}/{page}"
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if response.status == 200:
                        return response.geturl()
                    tried.append(f"{url}: {response.status}")
            except OSError as err:
                tried.append(f"{url}: {err}")
        raise RuntimeError(f"no UI page {page!r} answers: {'; '.join(tried)}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> None:
        pid = self.process.pid if self.process is not None else _pid_from(self.pid_file)
        if pid is not None and _is_prometheus(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            # A zombie's cmdline is empty, so this also ends once our own child has exited.
            while _is_prometheus(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _is_prometheus(pid):
                os.killpg(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout)
            self.process = None
        elif pid is not None:
            # Started by an earlier LocalPrometheus of this same process: reap the zombie.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        self.pid_file.unlink(missing_ok=True)


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_prometheus(pid: int) -> bool:
    # Guards against signalling an unrelated process that reused a stale PID.
    try:
        return b"prometheus" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.local_prometheus", description=__doc__)
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--config", type=Path, default=Path("config/config.properties"))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--scrape-interval", default="5s")
    args = parser.parse_args(argv)
    prometheus = LocalPrometheus(
        args.workdir, metrics_target(args.config), args.port, args.scrape_interval
    )
    try:
        if args.command == "stop":
            prometheus.stop()
            print("Prometheus stopped")
            return 0
        if _pid_from(prometheus.pid_file) and _is_prometheus(_pid_from(prometheus.pid_file)):
            print(f"Prometheus is already running: {prometheus.url} (make monitor-stop)")
            return 0
        prometheus.start()
        # Probed, not assumed: the UI's paths depend on how Prometheus was built.
        pages = {name: prometheus.ui_url(page) for name, page in UI_PAGES.items()}
    except (FileNotFoundError, RuntimeError, TimeoutError, ValueError) as err:
        print(f"camserve monitor: error: {err}", file=sys.stderr)
        return 2
    print(f"Prometheus is up: {prometheus.url} (scraping TorchServe at {prometheus.target})")
    for name, url in pages.items():
        print(f"  {name + ':':8} {url}")
    print("Grafana: see docs/monitoring.md. Stop it with: make monitor-stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
