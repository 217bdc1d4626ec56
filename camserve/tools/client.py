"""A small client for a camserve TorchServe: post images, print a table, save the overlays.

    camserve predict examples/*.png --out overlays/

Standard library HTTP (no extra dependency); bounded concurrency with a thread pool, since
the work is waiting on the server. The token comes from ``--token``, else the
``CAMSERVE_TOKEN`` environment variable, else TorchServe's ``key_file.json``.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "CAMSERVE_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_FILE = Path(".run/serve/key_file.json")
MAX_CONCURRENCY = 32
# A file larger than this is refused before upload: the server would refuse it anyway
# (max_request_size) and reading it whole into memory helps nobody.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


class ClientError(Exception):
    """A problem that stops the whole run (no server, no token, token refused)."""


@dataclass(frozen=True)
class Outcome:
    """One image's result: ``body`` on success, else ``error`` (and ``status`` when HTTP)."""

    path: Path
    body: dict | None = None
    error: str | None = None
    status: int | None = None
    overlays: tuple[Path, ...] = ()

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


class ServerError(Exception):
    """The server answered this one image with an error status."""

    def __init__(self, status: int | None, body: dict | None, text: str) -> None:
        self.status = status
        self.body = body
        if body and "code" in body and "message" in body:
            message = f"{body['code']}: {body['message']}"
        else:
            message = " ".join(text.split())[:300] or "no details"
        super().__init__(f"HTTP {status} {message}" if status else message)


class Client:
    """Posts images to ``<url>/predictions/<model>`` as JSON and asks for the pictures."""

    def __init__(
        self, url: str = DEFAULT_URL, model: str = "shapes", token: str | None = None,
        timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.model = model
        self.token = token
        self.timeout = timeout

    def explain(self, image: bytes, target: str | None = None, images: bool = True) -> dict:
        """One explained prediction; raises ``ClientError`` for refusals that stop the run and
        ``urllib.error.HTTPError`` (with the server's JSON error in ``.body``) for a bad image."""
        payload: dict = {"image": base64.b64encode(image).decode("ascii"), "images": images}
        if target is not None:
            payload["target"] = target
        request = urllib.request.Request(
            f"{self.url}/predictions/{self.model}",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **self._auth()},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise self._classify(err) from None
        except TimeoutError:
            # One slow image is that image's problem, not the run's.
            raise ServerError(None, None, f"no answer within {self.timeout:g} s") from None
        except (urllib.error.URLError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise ClientError(f"cannot reach TorchServe at {self.url}: {reason}") from None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _classify(self, err: urllib.error.HTTPError) -> Exception:
        text = err.read().decode("utf-8", errors="replace")
        if "Token Authorization failed" in text:
            hint = (
                "no token was sent: set CAMSERVE_TOKEN or point --key-file at the server's "
                "key_file.json"
                if not self.token
                else "the token is wrong or expired: read it again from the server's "
                "key_file.json (make serve writes .run/serve/key_file.json)"
            )
            return ClientError(f"TorchServe refused the request (HTTP {err.code}): {hint}")
        if err.code == 404 and "Model not found" in text:
            return ClientError(f"TorchServe at {self.url} serves no model named {self.model!r}")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        return ServerError(err.code, body if isinstance(body, dict) else None, text)


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

    A per-image failure (unreadable file, a 4xx from the server) becomes that row's
    ``error``; a ``ClientError`` (no server, token refused) stops the run.
    """
    concurrency = max(1, min(int(concurrency), MAX_CONCURRENCY))
    names = overlay_paths(paths, out) if out is not None else [None] * len(paths)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def one(job: tuple[Path, tuple[Path, Path] | None]) -> Outcome:
        path, pair = job
        try:
            if path.stat().st_size > MAX_UPLOAD_BYTES:
                return Outcome(path, error=f"larger than {MAX_UPLOAD_BYTES} bytes, not sent")
            body = client.explain(path.read_bytes(), target=target, images=pair is not None)
        except OSError as err:
            return Outcome(path, error=f"cannot read the file: {err.strerror or err}")
        except ServerError as err:
            return Outcome(path, error=str(err), status=err.status)
        written: tuple[Path, ...] = ()
        if pair is not None:
            images = body.pop("images")
            pair[0].write_bytes(base64.b64decode(images["overlay_png"]))
            pair[1].write_bytes(base64.b64decode(images["shifted_overlay_png"]))
            written = pair
        return Outcome(path, body=body, overlays=written)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        # map() submits everything but the pool runs at most `concurrency` at a time; results
        # come back in input order. A ClientError re-raises here and cancels the rest.
        results = pool.map(one, zip(paths, names, strict=True))
        if progress is not None:
            results = progress(results)
        try:
            return list(results)
        except ClientError:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


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
