"""Recorded answers: every request of the corpus on every route, and what the server answered.

The recording pins the wire behaviour of the handler, so that a restructure of how items are
read and written is checked, not assumed, to leave every status, content type and body as it
was. ``tests/recorded_answers.json`` holds, per request: the HTTP status, the content type
and the body (JSON, or the PNG's pixels as base64 of the raw RGB bytes). Re-record only for a
deliberate change of the answers, and say so in the commit::

    .venv/bin/python -m tests.recorded_answers          # starts a TorchServe, rewrites the file

Numbers are compared with a small tolerance: the same image alone and inside a batch gets the
same answer only up to float noise (``tests.live.same_answer``); everything else is exact.
"""

from __future__ import annotations

import base64
import io
import json
import math
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from harness.local_torchserve import LocalTorchServe, read_properties
from tests.conftest import CONFIG, REPO, SHAPES_DIR, held_out, png_bytes
from tests.corpus import FRONTEND_413, build_corpus

RECORDING = Path(__file__).with_name("recorded_answers.json")
MODEL = "shapes"
TIMEOUT_S = 120
# Same answer alone and in a batch up to float noise: probabilities and scores to 1e-4,
# peak-normalised map cells to 1e-3 (tests.live.same_answer), overlay pixels to 2 levels.
NUMBER_TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-3
PIXEL_TOLERANCE = 2
GENERATED_ID = "<a generated uuid>"


@dataclass(frozen=True)
class Exchange:
    """One request: where it goes and how (``requests.post`` keyword arguments)."""

    name: str
    path: str
    kwargs: dict

    def post(self, server: LocalTorchServe) -> requests.Response:
        kwargs = dict(self.kwargs)
        headers = {**server.auth(), **kwargs.pop("headers", {})}
        url = server.inference_url + self.path.format(model=MODEL)
        return requests.post(url, headers=headers, timeout=TIMEOUT_S, **kwargs)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kserve_bodies() -> dict[str, tuple[str, dict, bool]]:
    """KServe v1/v2 bodies as the runtime's wrapper forwards them: name -> (path, body, json)."""
    good = [_b64(png_bytes(held_out(i).image)) for i in range(50, 54)]
    image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [good[0]]}
    v1, v1_explain, v2 = (
        "/v1/models/{model}:predict",
        "/v1/models/{model}:explain",
        ("/v2/models/{model}/infer"),
    )
    return {
        "v1_one": (v1, {"instances": [good[0]]}, True),
        "v1_options": (v1, {"instances": [{"image": good[1], "topk": 1, "maps": 2}]}, True),
        "v1_mixed": (
            v1,
            {"instances": [{"b64": _b64(b"not an image")}, {"data": good[2]}, 7, good[3]]},
            True,
        ),
        "v1_images": (v1, {"instances": [{"image": good[0], "images": True}]}, True),
        "v1_empty": (v1, {"instances": []}, True),
        "v1_unknown_field": (v1, {"instances": [good[0]], "colour": 1}, True),
        "v1_explain": (v1_explain, {"instances": [good[1]]}, False),
        "v2_one": (v2, {"id": "r1", "inputs": [image]}, True),
        "v2_parameters": (
            v2,
            {
                "id": "r2",
                "inputs": [{**image, "parameters": {"topk": 1}}],
                "parameters": {"target": "ring", "topk": 4, "binary_data_output": False},
            },
            True,
        ),  # fmt: skip
        "v2_option_tensors": (
            v2,
            {
                "id": "r3",
                "inputs": [image, {"name": "topk", "shape": [1], "datatype": "INT32", "data": [2]}],
            },
            True,
        ),  # fmt: skip
        "v2_two_images": (v2, {"id": "r4", "inputs": [image, {**image, "name": "b"}]}, True),
        "v2_fp32": (
            v2,
            {
                "id": "r5",
                "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}],
            },
            True,
        ),  # fmt: skip
        "v2_bad_image": (
            v2,
            {"id": "r6", "inputs": [{**image, "data": [_b64(b"GIF89a cut")]}]},
            True,
        ),
        "v2_unknown_output": (
            v2,
            {"id": "r7", "inputs": [image], "outputs": [{"name": "logits"}]},
            True,
        ),
        "v2_on_v1_route": (v1, {"id": "r8", "inputs": [image]}, True),
        "v2_no_id": (v2, {"inputs": [image]}, True),
    }


def exchanges() -> list[Exchange]:
    """The corpus on /predictions and /explanations, and KServe bodies on their routes."""
    max_request_size = int(read_properties(CONFIG)["max_request_size"])
    found = []
    for route in ("predictions", "explanations"):
        for case in build_corpus(max_request_size):
            if case.expect != FRONTEND_413:  # refused by the frontend: no worker sees it
                path = f"/{route}/{{model}}"
                found.append(Exchange(f"{route}/{case.name}", path, case.request_kwargs()))
    for name, (path, body, json_type) in _kserve_bodies().items():
        headers = {"Content-Type": "application/json"} if json_type else {}
        data = json.dumps(body, separators=(",", ":")).encode()
        found.append(Exchange(f"kserve/{name}", path, {"data": data, "headers": headers}))
    return found


def recorded_form(response: requests.Response) -> dict:
    """What is recorded of an answer: status, content type, and the body in a comparable form."""
    content_type = response.headers.get("Content-Type", "")
    if content_type == "image/png":
        with Image.open(io.BytesIO(response.content)) as image:
            pixels = np.asarray(image.convert("RGB"))
        body = {"png_rgb": _b64(pixels.tobytes()), "size": list(image.size)}
    else:
        body = _comparable(response.json())
        if isinstance(body, dict) and "model_name" in body and not str(body["id"]).startswith("r"):
            # TorchServe's request id: a fresh uuid4 for a v2 request without an id.
            body["id"] = GENERATED_ID if _is_uuid(body["id"]) else body["id"]
    return {"status": response.status_code, "content_type": content_type, "body": body}


def _is_uuid(text) -> bool:
    try:
        uuid.UUID(str(text))
    except ValueError:
        return False
    return True


def _comparable(value):
    """JSON with base64 PNGs replaced by their pixels and v2 outputs' JSON text parsed."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key.endswith("_png") and isinstance(item, str):
                with Image.open(io.BytesIO(base64.b64decode(item))) as image:
                    out[key] = {"png_pixels": _b64(np.asarray(image).tobytes())}
            elif key == "data" and value.get("datatype") == "BYTES" and "outputs" not in value:
                out[key] = [_comparable(json.loads(text)) for text in item]
            else:
                out[key] = _comparable(item)
        return out
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    return value


def differences(expected, actual, where: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected`` beyond the tolerances (empty: the same)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            return [f"{where}: keys {sorted(expected)} != {sorted(actual)}"]
        if set(expected) == {"png_pixels"} or set(expected) == {"png_rgb", "size"}:
            return _pixel_differences(expected, actual, where)
        found = []
        for key in expected:
            found += differences(expected[key], actual[key], f"{where}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{where}: {len(expected)} items != {len(actual)}"]
        found = []
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            found += differences(a, b, f"{where}[{i}]")
        return found
    numbers = (int, float)
    if isinstance(expected, float) or isinstance(actual, float):
        if not (isinstance(expected, numbers) and isinstance(actual, numbers)):
            return [f"{where}: {expected!r} != {actual!r}"]
        if isinstance(expected, bool) or isinstance(actual, bool):
            return [f"{where}: {expected!r} != {actual!r}"]
        tolerance = MAP_TOLERANCE if ".map[" in where else NUMBER_TOLERANCE
        if not math.isclose(expected, actual, abs_tol=tolerance, rel_tol=0):
            return [f"{where}: {expected!r} != {actual!r}"]
        return []
    if type(expected) is not type(actual) or expected != actual:
        return [f"{where}: {expected!r} != {actual!r}"]
    return []


def _pixel_differences(expected: dict, actual: dict, where: str) -> list[str]:
    key = "png_pixels" if "png_pixels" in expected else "png_rgb"
    if expected.get("size") != actual.get("size"):
        return [f"{where}: size {expected.get('size')} != {actual.get('size')}"]
    a = np.frombuffer(base64.b64decode(expected[key]), np.uint8).astype(int)
    b = np.frombuffer(base64.b64decode(actual[key]), np.uint8).astype(int)
    if a.shape != b.shape:
        return [f"{where}: {a.size} bytes of pixels != {b.size}"]
    worst = int(np.abs(a - b).max()) if a.size else 0
    return [f"{where}: pixels differ by {worst} levels"] if worst > PIXEL_TOLERANCE else []


def load_recording() -> dict[str, dict]:
    return json.loads(RECORDING.read_text())


def record(server: LocalTorchServe) -> dict[str, dict]:
    return {ex.name: recorded_form(ex.post(server)) for ex in exchanges()}


def main() -> int:
    from camserve.tools.archive import build_archive

    with tempfile.TemporaryDirectory(prefix="camserve-record-") as work:
        store = Path(work) / "store"
        build_archive(SHAPES_DIR, MODEL, store)
        server = LocalTorchServe.on_free_ports(Path(work) / "ts", CONFIG, store)
        server.start()
        try:
            answers = record(server)
        finally:
            server.stop()
    RECORDING.write_text(json.dumps(answers, indent=0, sort_keys=True) + "\n")
    print(f"recorded {len(answers)} answers in {RECORDING.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
