"""The client and `camserve predict`: against a real TorchServe, plus its pure logic."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from camserve.tools.cli import main
from camserve.tools.client import (
    TOKEN_ENV,
    Client,
    ClientError,
    Outcome,
    find_token,
    format_table,
    overlay_paths,
    predict_files,
)
from harness.local_torchserve import free_port
from tests.conftest import held_out

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


@pytest.fixture
def images(tmp_path) -> tuple[list[Path], list[int]]:
    folder = tmp_path / "in"
    folder.mkdir()
    paths, labels = [], []
    for index in range(20, 25):
        sample = held_out(index)
        path = folder / f"shape{index}.png"
        sample.image.save(path)
        paths.append(path)
        labels.append(sample.label)
    return paths, labels


def run_cli(monkeypatch, capsys, args, token=None):
    if token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, token)
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.integration
def test_predict_table_overlays_and_a_bad_image(server, images, tmp_path, monkeypatch, capsys):
    paths, labels = images
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    out = tmp_path / "out"
    args = [*paths[:2], bad, *paths[2:], "--url", server.inference_url, "--out", out]
    args += ["--key-file", server.workdir / "key_file.json", "--concurrency", "3"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args)

    assert code == 1, stderr  # one image failed
    lines = stdout.splitlines()
    assert lines[0].split() == ["file", "label", "probability", "score", "stable"]
    rows = lines[1 : 1 + len(paths) + 1]
    # Input order is kept, whatever order the answers came back in.
    assert [row.split()[0] for row in rows] == [str(p) for p in [*paths[:2], bad, *paths[2:]]]
    assert "ERROR HTTP 422 undecodable_image" in rows[2]
    for row, label in zip(rows[:2] + rows[3:], labels, strict=True):
        file, predicted, probability, score, stable = row.split()
        assert predicted == CLASSES[label]
        assert 0 <= float(probability) <= 1 and 0 <= float(score) <= 1
        assert stable in ("yes", "no")
    for path in paths:
        for suffix in (".overlay.png", ".shifted.png"):
            picture = Image.open(out / f"{path.stem}{suffix}")
            assert picture.format == "PNG" and picture.size == (64, 64)
    assert not (out / "broken.overlay.png").exists()
    assert f"wrote {len(paths)} overlay pair(s)" in stdout


@pytest.mark.integration
def test_token_from_the_environment_wins(server, images, monkeypatch, capsys):
    paths, labels = images
    token = server.keys()["inference"]
    missing = server.workdir / "no_such_key_file.json"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, [paths[0], "--url", server.inference_url, "--key-file", missing], token
    )
    assert code == 0
    assert stdout.splitlines()[1].split()[1] == CLASSES[labels[0]]


@pytest.mark.integration
def test_missing_and_wrong_tokens_are_explained(server, images, monkeypatch, capsys):
    paths, _ = images
    base = [paths[0], "--url", server.inference_url, "--key-file", server.workdir / "nope.json"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, base)
    assert code == 2 and stdout == ""
    assert "refused the request" in stderr and "no token was sent" in stderr

    code, _, stderr = run_cli(monkeypatch, capsys, base, token="not-the-token")
    assert code == 2
    assert "token is wrong or expired" in stderr


def test_unreachable_server_is_reported(images, monkeypatch, capsys):
    paths, _ = images
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, _, stderr = run_cli(monkeypatch, capsys, [paths[0], "--url", url], token="x")
    assert code == 2 and f"cannot reach TorchServe at {url}" in stderr


def test_unreadable_file_is_one_rows_error(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing.png"
    code, stdout, _ = run_cli(
        monkeypatch, capsys, [missing, "--url", f"http://127.0.0.1:{free_port()}"], token="x"
    )
    assert code == 1 and "ERROR cannot read the file" in stdout


# --- pure logic -----------------------------------------------------------------------------


def test_find_token_order(tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "from-file"}, "management": {"key": "m"}}))
    assert find_token("explicit", key_file, {TOKEN_ENV: "env"}) == "explicit"
    assert find_token(None, key_file, {TOKEN_ENV: "env"}) == "env"
    assert find_token(None, key_file, {}) == "from-file"
    assert find_token(None, tmp_path / "absent.json", {}) is None
    key_file.write_text("[]")
    with pytest.raises(ClientError, match="not a TorchServe key file"):
        find_token(None, key_file, {})


class CountingClient(Client):
    """Stands in for the HTTP call to count how many requests are in flight at once."""

    def __init__(self, concurrency: int) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        # Every `concurrency` calls meet here, so the peak is reached if the pool allows it.
        self.barrier = threading.Barrier(concurrency, timeout=20)

    def explain(self, image: bytes, target=None, images=True) -> dict:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        self.barrier.wait()
        with self.lock:
            self.in_flight -= 1
        return {"image": image.decode()}


def test_concurrency_is_bounded(tmp_path):
    paths = []
    for index in range(12):
        path = tmp_path / f"{index}.png"
        path.write_text(str(index))
        paths.append(path)
    client = CountingClient(concurrency=3)
    outcomes = predict_files(client, paths, concurrency=3)
    assert client.peak == 3
    assert [o.body["image"] for o in outcomes] == [str(i) for i in range(12)]


def test_overlay_names_are_unique(tmp_path):
    paths = [Path("a/x.png"), Path("b/x.png"), Path("x.jpg"), Path("y.png")]
    names = [pair[0].name for pair in overlay_paths(paths, tmp_path)]
    assert names == ["x.overlay.png", "x-2.overlay.png", "x-3.overlay.png", "y.overlay.png"]


def test_table_keeps_errors_on_their_row():
    good = {
        "explained": {"label": "ring", "probability": 0.91234},
        "zero_reference": {"score": 0.0312, "stable": True},
    }
    table = format_table(
        [Outcome(Path("a.png"), body=good), Outcome(Path("b.png"), error="HTTP 415 nope")]
    )
    lines = table.splitlines()
    assert lines[1].split() == ["a.png", "ring", "0.912", "0.031", "yes"]
    assert lines[2].split() == ["b.png", "ERROR", "HTTP", "415", "nope"]
