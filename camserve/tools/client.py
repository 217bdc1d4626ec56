"""A client for a camserve TorchServe: post images, print a table, save the overlays.

    camserve predict examples/*.png --out overlays/

HTTP with ``requests``; bounded concurrency with a thread pool, since the work is waiting on
the server. Each image goes as a multipart form, its bytes as they are (no base64), so a file
fits up to the server's ``max_request_size`` less a few hundred bytes of form; a larger one is
refused here, before it is sent. The token comes from the ``CAMSERVE_TOKEN`` environment
variable, else TorchServe's ``key_file.json``.

A failure of one image (too large, refused, reset, timed out, a 5xx) is that image's row and
the run goes on. Only what every image would meet (no server, no token, no such model) stops
the run, and the rows already answered are kept.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3

from camserve.properties import load_properties

TOKEN_ENV = "CAMSERVE_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_FILE = Path(".run/serve/key_file.json")
MAX_CONCURRENCY = 32
# What camserve's shipped configs set (config/*.properties): 10 MiB.
DEFAULT_MAX_REQUEST_SIZE = 10 * 1024 * 1024
# TorchServe's own default when a config.properties does not set max_request_size.
TORCHSERVE_MAX_REQUEST_SIZE = 6553500


class ClientError(Exception):
    """A problem that every image would meet (no server, no token, token refused)."""


class RunStopped(ClientError):
    """A ``ClientError`` stopped the run; ``outcomes`` holds a row for every input."""

    def __init__(self, reason: ClientError, outcomes: list[Outcome]) -> None:
        super().__init__(str(reason))
        self.outcomes = outcomes


class ImageError(Exception):
    """This one image failed: ``status`` when the server answered, else ``None``."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Outcome:
    """One image's result: ``body`` on success, else ``error`` (and ``status`` when HTTP).

    ``stopped``: the image got no answer because the run stopped (see ``RunStopped``)."""

    path: Path
    body: dict | None = None
    error: str | None = None
    status: int | None = None
    overlays: tuple[Path, ...] = ()
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.body is not None


def find_token(
    token: str | None = None,
    key_file: str | Path | None = DEFAULT_KEY_FILE,
    environ: dict | None = None,
) -> str | None:
    """The inference token: explicit value, then ``$CAMSERVE_TOKEN``, then the key file."""
    if token:
        return token
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    if key_file is None or not Path(key_file).is_file():
        return None
    try:
        data = json.loads(Path(key_file).read_text())
        return data["inference"]["key"]
    except (ValueError, KeyError, TypeError) as err:
        raise ClientError(f"{key_file} is not a TorchServe key file ({err!r})") from None


def max_request_size_from_config(path: str | Path) -> int:
    """``max_request_size`` of a TorchServe ``config.properties`` (TorchServe's default,
    6553500 bytes, when the file does not set it)."""
    value = load_properties(path).get("max_request_size")
    if value is None:
        return TORCHSERVE_MAX_REQUEST_SIZE
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{path}: max_request_size={value.strip()} is not a number") from None


class Client:
    """Posts images to ``<url>/predictions/<model>`` as a multipart form.

    ``max_request_size``: the server's limit on a request body, in bytes; a larger request
    is refused here, before it is sent (``None``: no check).
    """

    def __init__(
        self, url: str = DEFAULT_URL, model: str = "shapes", token: str | None = None,
        timeout: float = 60.0, max_request_size: int | None = DEFAULT_MAX_REQUEST_SIZE,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.model = model
        self.token = token
        self.timeout = timeout
        self.max_request_size = max_request_size
        self._local = threading.local()  # one connection pool per thread

    def request_size(self, file_size: int, target: str | None = None, images: bool = True) -> int:
        """The body size of a request carrying a file of ``file_size`` bytes, without reading
        the file (the form around it has the same length whatever the file holds)."""
        return len(self._prepare(b"", target, images).body) + file_size

    def check_size(self, request_size: int) -> None:
        """Raise ``ImageError`` for a request over ``max_request_size``: the server would
        answer 413 or drop the connection half-way through the upload."""
        if self.max_request_size is not None and request_size > self.max_request_size:
            raise ImageError(
                f"not sent: the request would be {request_size} bytes, over the server's "
                f"max_request_size of {self.max_request_size} bytes"
            )

    def explain(self, image: bytes, target: str | None = None, images: bool = True) -> dict:
        """One explained prediction. Raises ``ImageError`` for this image's failure and
        ``ClientError`` for one that every image would meet."""
        request = self._prepare(image, target, images)
        size = len(request.body)
        self.check_size(size)
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            response = session.send(request, timeout=self.timeout)
        except requests.Timeout as err:
            if isinstance(err, requests.ConnectTimeout):
                raise ClientError(f"cannot reach TorchServe at {self.url}: {err}") from None
            # One slow image is that image's problem, not the run's.
            raise ImageError(f"no answer within {self.timeout:g} s") from None
        except requests.ConnectionError as err:
            if _could_not_connect(err):
                raise ClientError(
                    f"cannot reach TorchServe at {self.url}: {_root_cause(err)}"
                ) from None
            raise ImageError(
                f"the connection broke while sending ({_root_cause(err)}); a body over the "
                "server's max_request_size ends like this"
            ) from None
        if response.ok:
            try:
                return response.json()
            except ValueError:
                raise ImageError(f"HTTP {response.status_code}: the answer is not JSON") from None
        raise self._classify(response, size)

    def _prepare(self, image: bytes, target: str | None, images: bool):
        fields = {"images": "true" if images else "false"}
        if target is not None:
            fields["target"] = str(target)
        return requests.Request(
            "POST",
            f"{self.url}/predictions/{self.model}",
            files={"data": ("image", image, "application/octet-stream")},
            data=fields,
            headers=self._auth(),
        ).prepare()

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _classify(self, response: requests.Response, size: int) -> Exception:
        text = response.text
        if "Token Authorization failed" in text:
            hint = (
                "no token was sent: set CAMSERVE_TOKEN or point --key-file at the server's "
                "key_file.json"
                if not self.token
                else "the token is wrong or expired: read it again from the server's "
                "key_file.json (make serve writes .run/serve/key_file.json)"
            )
            status = response.status_code
            return ClientError(f"TorchServe refused the request (HTTP {status}): {hint}")
        if response.status_code == 404 and "Model not found" in text:
            return ClientError(f"TorchServe at {self.url} serves no model named {self.model!r}")
        if response.status_code == 413 and not text.strip():
            # TorchServe's frontend refuses a body over max_request_size with an empty 413.
            return ImageError(
                f"HTTP 413: the server refused the {size}-byte request as too large; give "
                "the client its limit (--max-request-size or --server-config)",
                413,
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "message" in body:
            # camserve's errors name a code ("undecodable_image"); TorchServe's a type.
            code = body.get("code")
            label = code if isinstance(code, str) else body.get("type")
            message = f"{label}: {body['message']}" if label else str(body["message"])
        else:
            message = " ".join(text.split())[:300] or "no details"
        return ImageError(f"HTTP {response.status_code} {message}", response.status_code)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and what it wraps: requests and urllib3 nest the socket error in ``args``
    and ``reason`` as well as in ``__cause__``/``__context__``."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [a for a in current.args if isinstance(a, BaseException)]
        todo += [getattr(current, "reason", None), current.__cause__, current.__context__]
        todo = [t for t in todo if isinstance(t, BaseException)]


def _could_not_connect(err: requests.ConnectionError) -> bool:
    return any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in _causes(err))


def _root_cause(err: BaseException) -> str:
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno is not None:
            return f"[Errno {cause.errno}] {cause.strerror}"
    return str(err)


def overlay_paths(paths: Sequence[Path], out: Path) -> list[tuple[Path, Path]]:
    """Unique ``(overlay, shifted overlay)`` file names in ``out``, one pair per input,
    even when two inputs share a file name in different folders."""
    used: set[str] = set()
    pairs = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in used:
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        pairs.append((out / f"{stem}.overlay.png", out / f"{stem}.shifted.png"))
    return pairs


def predict_files(
    client: Client,
    paths: Sequence[Path],
    out: Path | None = None,
    target: str | None = None,
    concurrency: int = 4,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[Outcome]:
    """Explain every file with at most ``concurrency`` requests in flight, in input order.

    A per-image failure becomes that row's ``error``. A ``ClientError`` (no server, token
    refused) stops sending and raises ``RunStopped``, which carries every row: the answered
    ones, and ``stopped`` rows for the images that were not sent.
    """
    concurrency = max(1, min(int(concurrency), MAX_CONCURRENCY))
    names = overlay_paths(paths, out) if out is not None else [None] * len(paths)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    reasons: list[ClientError] = []

    def one(path: Path, pair: tuple[Path, Path] | None) -> Outcome:
        if stop.is_set():
            return Outcome(path, error="not sent: the run stopped", stopped=True)
        try:
            # Checked before reading: a file over the limit is never loaded whole.
            client.check_size(client.request_size(path.stat().st_size, target, pair is not None))
            body = client.explain(path.read_bytes(), target=target, images=pair is not None)
        except OSError as err:
            return Outcome(path, error=f"cannot read the file: {err.strerror or err}")
        except ImageError as err:
            return Outcome(path, error=str(err), status=err.status)
        except ClientError as err:
            stop.set()
            reasons.append(err)
            return Outcome(path, error=f"not sent: {err}", stopped=True)
        written: tuple[Path, ...] = ()
        if pair is not None:
            pictures = body.pop("images")
            pair[0].write_bytes(base64.b64decode(pictures["overlay_png"]))
            pair[1].write_bytes(base64.b64decode(pictures["shifted_overlay_png"]))
            written = pair
        return Outcome(path, body=body, overlays=written)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        # At most `concurrency` run at a time; results are read back in input order.
        futures = [pool.submit(one, p, n) for p, n in zip(paths, names, strict=True)]
        results: Iterable[Outcome] = (f.result() for f in futures)
        if progress is not None:
            results = progress(results)
        outcomes = list(results)
    if reasons:
        raise RunStopped(reasons[0], outcomes)
    return outcomes


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A plain-text table: file, label, probability, score, stable (or the error)."""
    header = ("file", "label", "probability", "score", "stable")
    rows = []
    for outcome in outcomes:
        if outcome.ok:
            explained = outcome.body["explained"]
            score = outcome.body["zero_reference"]
            rows.append(
                (
                    str(outcome.path),
                    explained["label"],
                    f"{explained['probability']:.3f}",
                    f"{score['score']:.3f}",
                    "yes" if score["stable"] else "no",
                )
            )
        else:
            rows.append((str(outcome.path), f"ERROR {outcome.error}", "", "", ""))
    # Error rows span the columns after the file name, so they do not widen them.
    good = [r for r in rows if not r[1].startswith("ERROR")]
    widths = [max([len(header[i])] + [len(r[i]) for r in good]) for i in range(len(header))]
    widths[0] = max([widths[0]] + [len(r[0]) for r in rows])
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        if row[1].startswith("ERROR"):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
