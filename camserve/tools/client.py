"""A client for a camserve TorchServe: post images, print a table, save the overlays.

    camserve predict examples/*.png --out overlays/ --csv results.csv

HTTP with ``requests``; bounded concurrency with a thread pool, since the work is waiting on
the server. With TorchServe's inference API (``protocol="torchserve"``) each image goes as a
multipart form, its bytes as they are (no base64), so a file fits up to the server's
``max_request_size`` less a few hundred bytes of form; through a KServe endpoint
(``kserve-v1``, ``kserve-v2``) it goes base64 in a JSON body, a third larger. A request over
the limit is refused here, before it is sent. The token comes from the ``CAMSERVE_TOKEN``
environment variable, else TorchServe's ``key_file.json``.

A failure of one image (too large, refused, reset, timed out, a 5xx) is that image's row and
the run goes on. Only what every image would meet (no server, no token, no such model) stops
the run, and the rows already answered are kept.
"""

from __future__ import annotations

import base64
import json
import os
import re
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
# How the request is framed: TorchServe's /predictions, or the body KServe's TorchServe
# runtime forwards (docs/deployment.md), which camserve reads itself.
PROTOCOLS = ("torchserve", "kserve-v1", "kserve-v2")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The name of the v2 output that carries an answer, and of the one that carries a refusal.
KSERVE_ANSWER, KSERVE_ERROR = "explanation", "error"


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


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), by suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"no images ({suffixes}) found under {folder}")
    return files


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
    """Posts images to a camserve server: ``<url>/predictions/<model>`` as a multipart form
    (``protocol="torchserve"``), or a KServe v1/v2 JSON body (``kserve-v1``, ``kserve-v2``).

    ``max_request_size``: the server's limit on a request body, in bytes; a larger request
    is refused here, before it is sent (``None``: no check).
    """

    def __init__(
        self, url: str = DEFAULT_URL, model: str = "shapes", token: str | None = None,
        timeout: float = 60.0, max_request_size: int | None = DEFAULT_MAX_REQUEST_SIZE,
        protocol: str = "torchserve",
    ) -> None:  # fmt: skip
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.url = url.rstrip("/")
        self.model = model
        self.token = token
        self.timeout = timeout
        self.max_request_size = max_request_size
        self.protocol = protocol
        self._local = threading.local()  # one connection pool per thread

    def request_size(
        self, file_size: int, target: str | None = None, images: bool = True,
        maps: int | None = None,
    ) -> int:  # fmt: skip
        """The body size of a request carrying a file of ``file_size`` bytes, without reading
        the file (the frame around it has the same length whatever the file holds)."""
        framed = file_size if self.protocol == "torchserve" else 4 * -(-file_size // 3)
        return len(self._prepare(b"", target, images, maps).body) + framed

    def check_size(self, request_size: int) -> None:
        """Raise ``ImageError`` for a request over ``max_request_size``: the server would
        answer 413 or drop the connection half-way through the upload."""
        if self.max_request_size is not None and request_size > self.max_request_size:
            raise ImageError(
                f"not sent: the request would be {request_size} bytes, over the server's "
                f"max_request_size of {self.max_request_size} bytes"
            )

    def explain(
        self, image: bytes, target: str | None = None, images: bool = True,
        maps: int | None = None,
    ) -> dict:  # fmt: skip
        """One explained prediction (camserve's answer, whatever the protocol). Raises
        ``ImageError`` for this image's failure and ``ClientError`` for one that every image
        would meet."""
        request = self._prepare(image, target, images, maps)
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
                body = response.json()
            except ValueError:
                raise ImageError(f"HTTP {response.status_code}: the answer is not JSON") from None
            return body if self.protocol == "torchserve" else self._unwrap(body)
        raise self._classify(response, size)

    def _prepare(self, image: bytes, target: str | None, images: bool, maps: int | None = None):
        options: dict = {"images": images}
        if target is not None:
            options["target"] = str(target)
        if maps is not None:
            options["maps"] = int(maps)
        if self.protocol == "torchserve":
            fields = {
                k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()
            }
            return requests.Request(
                "POST",
                f"{self.url}/predictions/{self.model}",
                files={"data": ("image", image, "application/octet-stream")},
                data=fields,
                headers=self._auth(),
            ).prepare()
        encoded = base64.b64encode(image).decode("ascii")
        if self.protocol == "kserve-v1":
            path, body = (
                f"/v1/models/{self.model}:predict",
                {"instances": [{"image": encoded, **options}]},
            )
        else:
            tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}
            path, body = (
                f"/v2/models/{self.model}/infer",
                {"inputs": [tensor], "parameters": options},
            )
        return requests.Request(
            "POST",
            self.url + path,
            data=json.dumps(body, separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json", **self._auth()},
        ).prepare()

    def _unwrap(self, envelope) -> dict:
        """camserve's answer out of a KServe v1/v2 body; a refusal there is a 200 with a typed
        error (KServe turns every non-200 into a 500), raised as this image's ``ImageError``."""
        answer = error = None
        if isinstance(envelope, dict) and self.protocol == "kserve-v1":
            error = envelope.get("error")
            entries = envelope.get("predictions")
            if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], dict):
                answer = entries[0]
                error = answer.get("error") if set(answer) == {"error"} else None
        elif isinstance(envelope, dict):
            outputs = envelope.get("outputs")
            if isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], dict):
                output = outputs[0]
                data = output.get("data")
                try:
                    inner = json.loads(data[0]) if isinstance(data, list) and data else None
                except (TypeError, ValueError):
                    inner = None
                if output.get("name") == KSERVE_ERROR:
                    error = inner
                elif output.get("name") == KSERVE_ANSWER:
                    answer = inner
        if isinstance(error, dict) and "message" in error:
            raise ImageError(_error_text(error), error.get("status"))
        if isinstance(answer, dict) and error is None:
            return answer
        raise ImageError(f"the answer is not a {self.protocol} body with one explanation")

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
            message = _error_text(body)
        else:
            message = " ".join(text.split())[:300] or "no details"
        return ImageError(f"HTTP {response.status_code} {message}", response.status_code)


def _error_text(body: dict) -> str:
    """``code: message``: camserve's errors name a code ("undecodable_image"), TorchServe's a
    type."""
    code = body.get("code")
    label = code if isinstance(code, str) else body.get("type")
    return f"{label}: {body['message']}" if label else str(body["message"])


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


# Saves the pictures of one answer: called with the input's position and the answer, it
# takes what it keeps out of the answer's ``images`` blocks and returns the files it wrote.
PictureSink = Callable[[int, dict], tuple[Path, ...]]


def overlay_writer(paths: Sequence[Path], out: Path) -> PictureSink:
    """``camserve predict --out``: each input's overlay pair, as ``overlay_paths`` names it,
    and for each further explained class (every present label of a multi-label model)
    ``NAME.LABEL.overlay.png`` and ``NAME.LABEL.shifted.png``."""
    names = overlay_paths(paths, out)
    out.mkdir(parents=True, exist_ok=True)

    def write(position: int, body: dict) -> tuple[Path, ...]:
        overlay, shifted = names[position]
        written = _write_pair(body.pop("images"), overlay, shifted)
        stem = overlay.name.removesuffix(".overlay.png")
        for other in body.get("more_explanations", []):
            if "images" in other:
                label = re.sub(r"[^\w.-]", "_", other["label"])
                written += _write_pair(
                    other.pop("images"),
                    out / f"{stem}.{label}.overlay.png",
                    out / f"{stem}.{label}.shifted.png",
                )
        return written

    return write


def _write_pair(pictures: dict, overlay: Path, shifted: Path) -> tuple[Path, Path]:
    overlay.write_bytes(base64.b64decode(pictures["overlay_png"]))
    shifted.write_bytes(base64.b64decode(pictures["shifted_overlay_png"]))
    return overlay, shifted


def predict_files(
    client: Client,
    paths: Sequence[Path],
    out: Path | None = None,
    target: str | None = None,
    concurrency: int = 4,
    progress: Callable[[Iterable], Iterable] | None = None,
    maps: int | None = None,
    pictures: PictureSink | None = None,
) -> list[Outcome]:
    """Explain every file with at most ``concurrency`` requests in flight, in input order.

    The server draws pictures when ``out`` (overlay pairs written there) or ``pictures`` (a
    ``PictureSink``, which wins) is given. A per-image failure becomes that row's ``error``.
    A ``ClientError`` (no server, token refused) stops sending and raises ``RunStopped``,
    which carries every row: the answered ones, and ``stopped`` rows for the images that
    were not sent.
    """
    concurrency = max(1, min(int(concurrency), MAX_CONCURRENCY))
    if pictures is None and out is not None:
        pictures = overlay_writer(paths, out)
    images = pictures is not None
    stop = threading.Event()
    reasons: list[ClientError] = []

    def one(position: int, path: Path) -> Outcome:
        if stop.is_set():
            return Outcome(path, error="not sent: the run stopped", stopped=True)
        try:
            # Checked before reading: a file over the limit is never loaded whole.
            client.check_size(client.request_size(path.stat().st_size, target, images, maps))
            body = client.explain(path.read_bytes(), target=target, images=images, maps=maps)
        except OSError as err:
            return Outcome(path, error=f"cannot read the file: {err.strerror or err}")
        except ImageError as err:
            return Outcome(path, error=str(err), status=err.status)
        except ClientError as err:
            stop.set()
            reasons.append(err)
            return Outcome(path, error=f"not sent: {err}", stopped=True)
        if pictures is None:
            return Outcome(path, body=body)
        try:
            return Outcome(path, body=body, overlays=pictures(position, body))
        except (OSError, KeyError, TypeError, ValueError) as err:
            return Outcome(path, error=f"answered, but its pictures could not be saved: {err!r}")

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        # At most `concurrency` run at a time; results are read back in input order.
        futures = [pool.submit(one, n, p) for n, p in enumerate(paths)]
        results: Iterable[Outcome] = (f.result() for f in futures)
        if progress is not None:
            results = progress(results)
        outcomes = list(results)
    if reasons:
        raise RunStopped(reasons[0], outcomes)
    return outcomes


CSV_COLUMNS = (
    "file", "label", "index", "probability", "present", "requested", "score", "stable", "error",
)  # fmt: skip


def explanation_rows(body: dict) -> list[dict]:
    """One row per explained class of an answer: the explained class and, when the answer has
    them, ``more_explanations`` (every present label of a multi-label model). ``present`` is
    None for a single-label model."""
    rows = []
    for position, item in enumerate([body["explained"], *body.get("more_explanations", [])]):
        score = body["zero_reference"] if position == 0 else item["zero_reference"]
        rows.append(
            {
                "label": item["label"],
                "index": item.get("index"),
                "probability": item["probability"],
                "present": item.get("present"),
                "requested": body["explained"].get("requested"),
                "score": score["score"],
                "stable": score["stable"],
            }
        )
    return rows


def write_csv(outcomes: Sequence[Outcome], path: Path) -> int:
    """``CSV_COLUMNS``, one row per image and explained class (an error: one row with the
    message); returns the number of rows written."""
    import csv

    count = 0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for outcome in outcomes:
            rows = explanation_rows(outcome.body) if outcome.ok else [{"error": outcome.error}]
            for row in rows:
                writer.writerow(
                    {
                        "file": str(outcome.path),
                        **{k: _csv_value(v) for k, v in row.items()},
                    }
                )
                count += 1
    return count


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else value


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A plain-text table: file, label, probability, score, stable (or the error). An answer
    of a multi-label model gives one row per explained label, with a ``present`` column."""
    multi_label = any(o.ok and o.body.get("multi_label") for o in outcomes)
    header = ("file", "label", "probability", *(("present",) if multi_label else ()))
    header += ("score", "stable")
    rows = []
    for outcome in outcomes:
        if outcome.ok:
            explained = explanation_rows(outcome.body)
            for row in explained if multi_label else explained[:1]:
                present = (
                    ()
                    if not multi_label
                    else ("" if row["present"] is None else "yes" if row["present"] else "no",)
                )
                rows.append(
                    (
                        str(outcome.path),
                        row["label"],
                        f"{row['probability']:.3f}",
                        *present,
                        f"{row['score']:.3f}",
                        "yes" if row["stable"] else "no",
                    )
                )
        else:
            rows.append((str(outcome.path), f"ERROR {outcome.error}", *[""] * (len(header) - 2)))
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
