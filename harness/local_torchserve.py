"""Start, probe and stop a local TorchServe: used by ``make serve``, the tests and the benchmarks.

    python -m harness.local_torchserve serve   # make serve: in the background, prints a request
    python -m harness.local_torchserve stop    # make stop

Each server gets its own working directory, which holds its ``TMPDIR`` (TorchServe keeps
its PID file there, so one server runs per TMPDIR), its logs and its ``key_file.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from camserve.properties import load_properties

READY_TIMEOUT_S = 180
DEFAULT_WORKDIR = Path(".run/serve")
TORCHSERVE_MAIN_CLASS = "org.pytorch.serve.ModelServer"
# TorchServe's gRPC ports when a config does not name them.
GRPC_DEFAULT_PORTS = {"grpc_inference_port": 7070, "grpc_management_port": 7071}


class AlreadyRunning(RuntimeError):
    """A TorchServe started from the same working directory is still running."""


class PortInUse(RuntimeError):
    """Another program listens on a port the server needs."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchserve_executable() -> str:
    local = Path(sys.executable).with_name("torchserve")
    return str(local) if local.exists() else (shutil.which("torchserve") or "torchserve")


def read_properties(path: str | Path) -> dict[str, str]:
    """A TorchServe config as its frontend reads it (``camserve.properties``)."""
    return load_properties(path)


def write_properties(path: str | Path, properties: dict[str, str]) -> None:
    Path(path).write_text("".join(f"{k}={v}\n" for k, v in properties.items()))


def resolve_config_path(value: str, base_config: str | Path) -> Path:
    """An absolute path for a path named in ``base_config``.

    Relative paths mean the directory TorchServe would be started from: the current one
    (the repository root for ``make serve``), else the config file's folder or its parent
    (so tests started from anywhere find ``config/metrics.yaml``).
    """
    path = Path(value)
    if path.is_absolute():
        return path
    folder = Path(base_config).resolve().parent
    for root in (Path.cwd(), folder, folder.parent):
        if (root / path).exists():
            return (root / path).resolve()
    raise FileNotFoundError(f"{value} (named in {base_config}) not found")


@dataclass
class LocalTorchServe:
    """A TorchServe in ``workdir`` built from a base ``config.properties``.

    ``overrides`` replace properties of the base file (ports, model store, models...).
    """

    workdir: Path
    base_config: Path
    model_store: Path
    models: str = "shapes=shapes.mar"
    overrides: dict[str, str] = field(default_factory=dict)
    foreground: bool = True
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.model_store = Path(self.model_store).resolve()
        self.properties = read_properties(self.base_config)
        self.properties["model_store"] = str(self.model_store)
        self.properties.update(self.overrides)
        if "metrics_config" in self.properties:
            # TorchServe resolves it against its cwd, which here is the server's own workdir.
            self.properties["metrics_config"] = str(
                resolve_config_path(self.properties["metrics_config"], self.base_config)
            )

    @classmethod
    def on_free_ports(cls, workdir: Path, base_config: Path, model_store: Path, **kwargs):
        overrides = kwargs.pop("overrides", {})
        ports = {
            "inference_address": f"http://127.0.0.1:{free_port()}",
            "management_address": f"http://127.0.0.1:{free_port()}",
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            # Worker sockets live at /tmp/.ts.sock.<port>: parallel servers need their own.
            "initial_worker_port": str(20000 + free_port() % 20000),
            # gRPC listens too (7070/7071 by default): a second server would fail to bind.
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
        }
        return cls(workdir, base_config, model_store, overrides={**ports, **overrides}, **kwargs)

    @property
    def inference_url(self) -> str:
        return self.properties["inference_address"]

    @property
    def management_url(self) -> str:
        return self.properties["management_address"]

    @property
    def metrics_url(self) -> str:
        return self.properties["metrics_address"]

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.properties"

    @property
    def env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        return dict(
            os.environ,
            TMPDIR=str(tmp),
            LOG_LOCATION=str(self.workdir / "logs"),
            METRICS_LOCATION=str(self.workdir / "logs"),
        )

    def running_pid(self) -> int | None:
        """The pid of the TorchServe started from this working directory, if it still runs
        (TorchServe's own PID file, read as its launcher reads it)."""
        try:
            pid = int((self.workdir / "tmp" / ".model_server.pid").read_text().split()[0])
            if TORCHSERVE_MAIN_CLASS in psutil.Process(pid).cmdline():
                return pid
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return None

    def listen_addresses(self) -> dict[str, tuple[str, int]]:
        """``{property: (host, port)}`` for every socket TorchServe will listen on."""
        addresses = {}
        for key in ("inference_address", "management_address", "metrics_address"):
            if key in self.properties:
                url = urllib.parse.urlsplit(self.properties[key])
                port = url.port or (443 if url.scheme == "https" else 80)
                addresses[key] = (url.hostname or "127.0.0.1", port)
        for key, default in GRPC_DEFAULT_PORTS.items():
            host_key = key.replace("_port", "_address")
            host = self.properties.get(host_key, "127.0.0.1")
            addresses[key] = (host, int(self.properties.get(key, default)))
        return addresses

    def ports_in_use(self) -> list[str]:
        """The listen addresses another program holds, described for a message."""
        busy = []
        for key, (host, port) in self.listen_addresses().items():
            with socket.socket() as sock:
                # SO_REUSEADDR: a port left in TIME_WAIT by a stopped server is free; a
                # listening socket still makes bind() fail.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    busy.append(f"{host}:{port} ({key})")
        return busy

    def stop_hint(self) -> str:
        if self.workdir == DEFAULT_WORKDIR.resolve():
            return "make stop"
        return f"python -m harness.local_torchserve stop --workdir {self.workdir}"

    def check_can_start(self) -> None:
        """Refuse, with the reason and the way out, what TorchServe would only write to its
        log: a server of this working directory already running, or a port already taken."""
        pid = self.running_pid()
        if pid is not None:
            raise AlreadyRunning(
                f"TorchServe is already running (pid {pid}, started from {self.workdir}); "
                f"stop it with `{self.stop_hint()}`, then start it again"
            )
        busy = self.ports_in_use()
        if busy:
            raise PortInUse(
                f"another program listens on {', '.join(busy)}: stop it (a TorchServe that "
                f"`make serve` started stops with `make stop`) or change the address in "
                f"{self.base_config}"
            )

    def start(self, wait_for: str | None = "shapes", timeout: float = READY_TIMEOUT_S) -> None:
        self.check_can_start()
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        write_properties(self.config_path, self.properties)
        command = [
            torchserve_executable(), "--start", "--ncs",
            "--ts-config", str(self.config_path),
            "--model-store", str(self.model_store),
        ]  # fmt: skip
        if self.models:
            command += ["--models", self.models]
        # TorchServe's console output goes to a log file, not the caller's terminal.
        with (self.workdir / "logs" / "torchserve.out").open("ab") as output:
            if self.foreground:
                command.append("--foreground")
                self.process = subprocess.Popen(
                    command,
                    cwd=self.workdir,
                    env=self.env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            else:
                started = subprocess.run(
                    command,
                    cwd=self.workdir,
                    env=self.env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    check=False,
                    start_new_session=True,
                )
                if started.returncode != 0:
                    raise RuntimeError(
                        f"torchserve --start exited with {started.returncode}: "
                        f"{self.console_tail(5)}"
                    )
        if wait_for:
            self.wait_ready(wait_for, timeout)

    def keys(self) -> dict[str, str]:
        """Tokens from TorchServe's key file: ``{"inference": ..., "management": ...}``."""
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict)}

    def auth(self, kind: str = "inference") -> dict[str, str]:
        # A config that turns tokens off (the KServe one) writes no key file: send none.
        if self.properties.get("disable_token_authorization", "").lower() == "true":
            return {}
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    def wait_ready(self, model: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the model answers a status query with a ready worker, bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"TorchServe exited with {self.process.returncode}; {self.log_tail()}"
                )
            try:
                response = requests.get(
                    f"{self.management_url}/models/{model}",
                    headers=self.auth("management"),
                    timeout=5,
                )
                response.raise_for_status()
                workers = response.json()[0].get("workers", [])
                if any(w.get("status") == "READY" for w in workers):
                    return
                last = f"workers {workers}"
            except (OSError, requests.RequestException, KeyError, ValueError) as err:
                last = repr(err)
            time.sleep(0.5)
        raise TimeoutError(f"model {model} not ready after {timeout}s ({last}); {self.log_tail()}")

    def wait_listening(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the management API answers at all (for a server started with no model)."""
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            try:
                requests.get(
                    f"{self.management_url}/models", headers=self.auth("management"), timeout=5
                )
                return
            except (OSError, requests.RequestException, KeyError, ValueError) as err:
                last = repr(err)  # OSError: the key file is not written yet
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not listening after {timeout}s ({last}); {self.log_tail()}")

    def console_tail(self, lines: int) -> str:
        """The last lines TorchServe's launcher printed, on one line."""
        path = self.workdir / "logs" / "torchserve.out"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return " / ".join(line.strip() for line in text[-lines:] if line.strip()) or "no output"

    def wait_for_log(self, text: str, timeout: float = 30.0, name: str = "model_log.log") -> bool:
        """Whether ``text`` appears in one of the server's logs within ``timeout`` seconds.

        TorchServe copies a worker's log lines to ``model_log.log`` after it answered, so a
        line about a request may arrive a moment after its response.
        """
        path = self.workdir / "logs" / name
        deadline = time.monotonic() + timeout
        while True:
            if path.exists() and text in path.read_text(errors="replace"):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        logs = self.workdir / "logs"
        chunks = []
        for name in ("model_log.log", "ts_log.log", "torchserve.out"):
            path = logs / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(chunks)

    def stop(self, timeout: float = 60) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout)
            self.process = None
        else:
            subprocess.run(
                [torchserve_executable(), "--stop"], cwd=self.workdir, env=self.env, check=False
            )


def _serve(server: LocalTorchServe, models: list[str]) -> int:
    model, *others = models
    server.start(wait_for=model)
    for other in others:
        server.wait_ready(other)
    key_file = server.workdir / "key_file.json"
    print(f"TorchServe is up: inference {server.inference_url}, metrics {server.metrics_url}")
    print(f"Tokens are in {key_file}. Post an image with:\n")
    print(
        f"  curl -s -H \"Authorization: Bearer $(python3 -c 'import json; print(json.load("
        f'open("{key_file}"))["inference"]["key"])\')" '
        # Without a Content-Type, curl says x-www-form-urlencoded and TorchServe answers 500.
        '-H "Content-Type: image/png" '
        f"--data-binary @examples/star.png {server.inference_url}/predictions/{model}\n"
    )
    print("Or with the client (a table, and overlay PNGs in .run/overlays):\n")
    print("  .venv/bin/camserve predict examples/*.png --out .run/overlays\n")
    if "shapes-multi" in others:
        print("The multi-label model, one row per present label:\n")
        print("  .venv/bin/camserve predict examples/multi/*.png --model shapes-multi\n")
    print("Stop it with: make stop")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("serve", "stop"))
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--config", type=Path, default=Path("config/config.properties"))
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", default="shapes=shapes.mar", help="name=file.mar,...")
    args = parser.parse_args(argv)
    server = LocalTorchServe(
        workdir=args.workdir,
        base_config=args.config,
        model_store=args.model_store,
        models=args.models,
        foreground=False,
    )
    try:
        if args.command == "serve":
            return _serve(server, [m.split("=")[0] for m in args.models.split(",")])
        server.stop()
        return 0
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"{args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
