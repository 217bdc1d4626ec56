"""The client and `camserve predict`: against a real TorchServe, a loopback server standing in
for the faults TorchServe gives only by chance (hangs, resets, 5xx), plus its pure logic."""

from __future__ import annotations

import http.server
import json
import socket
import struct
import threading
from pathlib import Path

import pytest
from PIL import Image

from camserve.tools.cli import main
from camserve.tools.client import (
    TOKEN_ENV,
    Client,
    ClientError,
    ImageError,
    Outcome,
    find_token,
    format_table,
    max_request_size_from_config,
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


# --- One file's failure is that file's row ---------------------------------------------------

LIMIT = 10485760  # max_request_size of config/config.properties, which the `server` fixture uses


def big_file(folder: Path, size: int = 14_000_000) -> Path:
    """A JPEG-looking file over the server's max_request_size."""
    path = folder / "big.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(size - 4))
    return path


def rows_by_file(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line for line in stdout.splitlines()[1:] if line.strip()}


def assert_good_rows(rows: dict[str, str], paths: list[Path], labels: list[int]) -> None:
    for path, label in zip(paths, labels, strict=True):
        assert rows[str(path)].split()[1] == CLASSES[label], rows[str(path)]


@pytest.mark.integration
def test_a_file_over_the_limit_is_refused_before_sending_and_the_others_answer(
    server, images, tmp_path, monkeypatch, capsys
):
    """The issue's run: `camserve predict a.png big.jpg b.png` with big.jpg over 10 MiB."""
    paths, labels = images
    big = big_file(tmp_path)
    args = [paths[0], big, paths[1], "--url", server.inference_url]
    args += ["--key-file", server.workdir / "key_file.json"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args)
    assert code == 1, stderr
    rows = rows_by_file(stdout)
    assert list(rows) == [str(paths[0]), str(big), str(paths[1])]
    assert_good_rows(rows, [paths[0], paths[1]], labels[:2])
    assert "ERROR not sent: the request would be" in rows[str(big)]
    assert f"over the server's max_request_size of {LIMIT} bytes" in rows[str(big)]
    assert "1 of 3 image(s) failed" in stderr


@pytest.mark.integration
def test_the_limit_comes_from_the_servers_config(server, images, tmp_path, monkeypatch, capsys):
    paths, labels = images
    config = tmp_path / "small.properties"
    config.write_text("# a server with a smaller limit\nmax_request_size = 2000\n")
    args = [paths[0], "--url", server.inference_url, "--server-config", config]
    args += ["--key-file", server.workdir / "key_file.json"]
    code, stdout, _ = run_cli(monkeypatch, capsys, args)
    assert code == 1
    assert "over the server's max_request_size of 2000 bytes" in stdout  # the PNG is ~2.5 KB


@pytest.mark.integration
def test_a_client_told_a_larger_limit_gets_the_servers_refusal_on_that_row(
    server, images, tmp_path, monkeypatch, capsys
):
    """Sent anyway, the big file meets TorchServe's own limit: a 413, or a connection the
    server closes during the upload. Either way it is that file's row."""
    paths, labels = images
    big = big_file(tmp_path)
    args = [paths[0], big, paths[1], paths[2], "--url", server.inference_url]
    args += ["--key-file", server.workdir / "key_file.json", "--max-request-size", 64 << 20]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args)
    assert code == 1, stderr
    rows = rows_by_file(stdout)
    assert_good_rows(rows, [paths[0], paths[1], paths[2]], labels[:3])
    refused = rows[str(big)]
    print(refused)  # which of the two this TorchServe gave (pytest -rP)
    assert ("ERROR HTTP 413" in refused and "--max-request-size" in refused) or (
        "ERROR the connection broke while sending" in refused
    ), refused


class FaultyServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server standing in for faults a real TorchServe gives only by chance:
    the uploaded bytes choose the answer (a hang, a reset, a 5xx, or a good body)."""

    daemon_threads = True


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def do_POST(self):  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"HANG" in body:
            self.release.wait(30)  # past the client's timeout
            return
        if b"RESET" in body:
            # SO_LINGER 0: closing sends a RST, as a crashed peer would.
            linger = struct.pack("ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.close_connection = True
            return
        if b"TOKEN" in body:
            self.answer(400, {"code": 400, "message": "Token Authorization failed."})
            return
        if b"FAIL" in body:
            error = {"code": 503, "type": "ServiceUnavailableException", "message": "no worker"}
            self.answer(503, error)
            return
        self.answer(200, GOOD_BODY)

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


GOOD_BODY = {
    "explained": {"label": "ring", "probability": 0.5},
    "zero_reference": {"score": 0.1, "stable": True},
}


@pytest.fixture
def faulty_url():
    httpd = FaultyServer(("127.0.0.1", 0), FaultyHandler)
    thread = threading.Thread(target=httpd.serve_forever)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    FaultyHandler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)
    FaultyHandler.release.clear()


def write_files(folder: Path, contents: dict[str, bytes]) -> list[Path]:
    paths = []
    for name, content in contents.items():
        path = folder / name
        path.write_bytes(content)
        paths.append(path)
    return paths


def test_timeouts_resets_and_5xx_are_rows_and_the_run_goes_on(
    faulty_url, tmp_path, monkeypatch, capsys
):
    paths = write_files(
        tmp_path,
        {"a.png": b"ok", "hang.png": b"HANG", "b.png": b"ok", "reset.png": b"RESET",
         "fail.png": b"FAIL", "c.png": b"ok"},
    )  # fmt: skip
    args = [*paths, "--url", faulty_url, "--timeout", "2", "--concurrency", "2"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args, token="t")
    assert code == 1, stderr
    rows = rows_by_file(stdout)
    assert list(rows) == [str(p) for p in paths]
    for name in ("a.png", "b.png", "c.png"):
        assert rows[str(tmp_path / name)].split()[1:] == ["ring", "0.500", "0.100", "yes"]
    assert "ERROR no answer within 2 s" in rows[str(tmp_path / "hang.png")]
    assert "ERROR the connection broke while sending" in rows[str(tmp_path / "reset.png")]
    assert (
        "ERROR HTTP 503 ServiceUnavailableException: no worker" in rows[str(tmp_path / "fail.png")]
    )
    assert "3 of 6 image(s) failed" in stderr


def test_a_refusal_that_stops_the_run_keeps_the_rows_already_answered(
    faulty_url, tmp_path, monkeypatch, capsys
):
    paths = write_files(
        tmp_path, {"a.png": b"ok", "b.png": b"ok", "token.png": b"TOKEN", "c.png": b"ok"}
    )
    args = [*paths, "--url", faulty_url, "--concurrency", "1"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args, token="t")
    assert code == 2
    rows = rows_by_file(stdout)
    for name in ("a.png", "b.png"):
        assert rows[str(tmp_path / name)].split()[1] == "ring"
    assert "ERROR not sent: TorchServe refused the request" in rows[str(tmp_path / "token.png")]
    assert "ERROR not sent: the run stopped" in rows[str(tmp_path / "c.png")]
    assert "token is wrong or expired" in stderr and "2 of 4 image(s) not sent" in stderr


def test_max_request_size_from_config(tmp_path):
    config = tmp_path / "config.properties"
    config.write_text("# max_request_size=1\nmax_request_size=10485760\n")
    assert max_request_size_from_config(config) == 10485760
    config.write_text("inference_address=http://127.0.0.1:8080\n")
    assert max_request_size_from_config(config) == 6553500  # TorchServe's default
    config.write_text("max_request_size=ten\n")
    with pytest.raises(ValueError, match="not a number"):
        max_request_size_from_config(config)


def test_the_size_check_counts_the_whole_form(tmp_path):
    """A request of exactly the limit is sent; one byte more is refused, before reading."""
    client = Client(max_request_size=1000)
    image = bytes(100)
    exact = client.request_size(len(image), "ring", True)
    assert exact == len(client._prepare(image, "ring", True).body)
    Client(max_request_size=exact).check_size(exact)
    with pytest.raises(
        ImageError, match=f"would be {exact + 1} bytes.*max_request_size of {exact} "
    ):
        Client(max_request_size=exact).check_size(exact + 1)


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

    def explain(self, image: bytes, target=None, images=True, maps=None) -> dict:
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


# --- KServe bodies: the client speaks v1 and v2 to the same real TorchServe ----------------------


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["kserve-v1", "kserve-v2"])
def test_kserve_protocols_get_the_same_answer_and_the_same_errors(server, images, protocol):
    """TorchServe serves KServe's v1/v2 routes itself (the bodies KServe's wrapper forwards);
    camserve answers them with its usual JSON, which the client unwraps."""
    from tests.live import VALIDATOR

    paths, labels = images
    token = server.keys()["inference"]
    client = Client(server.inference_url, "shapes", token, protocol=protocol)
    plain = Client(server.inference_url, "shapes", token)
    image = paths[0].read_bytes()
    other = CLASSES[(labels[0] + 1) % len(CLASSES)]

    answer = client.explain(image, target=other, images=True, maps=2)
    VALIDATOR.validate(answer)
    assert answer["explained"]["label"] == other and answer["explained"]["requested"] is True
    [more] = answer["more_explanations"]
    assert more["label"] == CLASSES[labels[0]] and set(more["images"]) == set(answer["images"])
    same = plain.explain(image, target=other, images=True, maps=2)
    assert answer["zero_reference"] == same["zero_reference"]
    assert answer["images"]["overlay_png"] == same["images"]["overlay_png"]

    # The size check counts the JSON body exactly (base64 and all).
    assert client.request_size(len(image), other, True, 2) == len(
        client._prepare(image, other, True, 2).body
    )
    # A refusal is a 200 with a typed error under KServe: still this image's row.
    with pytest.raises(ImageError, match="^undecodable_image: ") as refused:
        client.explain(b"GIF89a but cut", images=False)
    assert refused.value.status == 422
    with pytest.raises(ClientError, match="serves no model named 'nope'"):
        Client(server.inference_url, "nope", token, protocol=protocol).explain(image)


@pytest.mark.integration
def test_predict_over_kserve_v2(server, images, monkeypatch, capsys):
    paths, labels = images
    args = [*paths[:2], "--url", server.inference_url, "--protocol", "kserve-v2"]
    args += ["--key-file", server.workdir / "key_file.json"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args)
    assert code == 0, stderr
    assert_good_rows(rows_by_file(stdout), paths[:2], labels[:2])


def test_an_unknown_protocol_is_a_usage_error(images, monkeypatch, capsys):
    paths, _ = images
    with pytest.raises(SystemExit) as exited:
        run_cli(monkeypatch, capsys, [paths[0], "--protocol", "grpc"])
    assert exited.value.code == 2
    assert "invalid choice: 'grpc'" in capsys.readouterr().err


def test_folders_are_expanded_to_their_images(images, tmp_path, monkeypatch, capsys):
    paths, _ = images
    (paths[0].parent / "notes.txt").write_text("not an image")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the run stops at once
    code, _, stderr = run_cli(monkeypatch, capsys, [paths[0].parent, "--url", url], token="x")
    assert code == 2 and f"({len(paths)} of {len(paths)} image(s) not sent)" in stderr
