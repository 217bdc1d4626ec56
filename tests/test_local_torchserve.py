"""`make serve` (python -m harness.local_torchserve serve) says why it cannot start, and how to
get past it, instead of a traceback: a real TorchServe already running, a port already taken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from harness.local_torchserve import (
    DEFAULT_WORKDIR,
    LocalTorchServe,
    free_port,
    read_properties,
    write_properties,
)
from tests.conftest import CONFIG, REPO


def config_on_free_ports(folder: Path, **changes: str) -> Path:
    """config/config.properties with every port free (never 8080-8082) and metrics.yaml
    found from any working directory."""
    properties = read_properties(CONFIG)
    properties.update(
        inference_address=f"http://127.0.0.1:{free_port()}",
        management_address=f"http://127.0.0.1:{free_port()}",
        metrics_address=f"http://127.0.0.1:{free_port()}",
        grpc_inference_port=str(free_port()),
        grpc_management_port=str(free_port()),
        initial_worker_port=str(20000 + free_port() % 20000),
        metrics_config=str(REPO / "config" / "metrics.yaml"),
    )
    properties.update(changes)
    path = folder / "config.properties"
    write_properties(path, properties)
    return path


def harness(command: str, cwd: Path, config: Path, store: Path) -> subprocess.CompletedProcess:
    """``python -m harness.local_torchserve COMMAND`` as `make serve` / `make stop` run it,
    with the default working directory (.run/serve) under ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "harness.local_torchserve", command,
         "--config", str(config), "--model-store", str(store)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.integration
def test_serve_while_a_server_runs_says_so_and_how_to_stop_it(tmp_path, model_store):
    config = config_on_free_ports(tmp_path)
    first = harness("serve", tmp_path, config, model_store)
    server = LocalTorchServe(tmp_path / DEFAULT_WORKDIR, config, model_store, foreground=False)
    pid = server.running_pid()
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        assert "TorchServe is up" in first.stdout and pid is not None

        again = harness("serve", tmp_path, config, model_store)
        assert again.returncode != 0
        assert f"TorchServe is already running (pid {pid}" in again.stderr
        assert "stop it with `make stop`" in again.stderr
        assert "Traceback" not in again.stderr + again.stdout
        # The running server was left alone and still answers.
        assert server.running_pid() == pid
        ping = requests.get(f"{server.inference_url}/ping", headers=server.auth(), timeout=10)
        assert ping.status_code == 200
    finally:
        stopped = harness("stop", tmp_path, config, model_store)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 60
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not psutil.pid_exists(pid)


def test_serve_on_a_taken_port_names_it(tmp_path, model_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_on_free_ports(tmp_path, inference_address=f"http://127.0.0.1:{port}")
        result = harness("serve", tmp_path, config, model_store)
    assert result.returncode != 0
    assert f"another program listens on 127.0.0.1:{port} (inference_address)" in result.stderr
    assert "make stop" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / DEFAULT_WORKDIR / "tmp" / ".model_server.pid").exists()


def test_the_stop_hint_names_the_working_directory(tmp_path):
    own = LocalTorchServe(tmp_path / "elsewhere", CONFIG, tmp_path, foreground=False)
    assert own.stop_hint() == (
        f"python -m harness.local_torchserve stop --workdir {tmp_path / 'elsewhere'}"
    )
