"""A multi-label model on a real TorchServe: the answer, the overlay, a batch with a bad
target, the client, the metrics and the KServe bodies, all for ``shapes-multi``."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import requests
from PIL import Image

from camserve.encode_json import load_schema
from camserve.request import ParsedRequest, RequestOptions
from camserve.tools.archive import build_archive
from camserve.tools.cli import main as camserve
from harness.local_torchserve import LocalTorchServe
from harness.shapes.dataset import HELD_OUT_SEED, render_multi_sample
from tests.conftest import CONFIG, REPO, SHAPES_MULTI_DIR, png_bytes

pytestmark = pytest.mark.integration
VALIDATOR = jsonschema.Draft202012Validator(load_schema())
MODEL = "shapes-multi"


@pytest.fixture(scope="module")
def multi_server(tmp_path_factory):
    """TorchServe serving the archive `make` builds (or a fresh one) of shapes-multi."""
    store = tmp_path_factory.mktemp("multi_store")
    built = REPO / "model_store" / f"{MODEL}.mar"
    if built.exists():
        shutil.copy2(built, store / built.name)
    else:
        build_archive(SHAPES_MULTI_DIR, MODEL, store)
    server = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("ts_multi"), CONFIG, store, models=f"{MODEL}={MODEL}.mar"
    )
    server.start(wait_for=MODEL)
    yield server
    server.stop()


def image(index: int) -> bytes:
    return png_bytes(render_multi_sample(HELD_OUT_SEED, index).image)


def post(server, path: str = f"predictions/{MODEL}", headers=None, **kwargs):
    headers = {**server.auth(), **(headers or {})}
    return requests.post(f"{server.inference_url}/{path}", headers=headers, timeout=120, **kwargs)


def explained_labels(body: dict) -> list[str]:
    return [body["explained"]["label"]] + [m["label"] for m in body.get("more_explanations", [])]


def expected_labels(explainer, png: bytes, **options) -> list[str]:
    """What the in-process explainer answers for the same bytes."""
    options.setdefault("maps", None)
    [result] = explainer.explain([explainer.prepare(ParsedRequest(png, RequestOptions(**options)))])
    return [explainer.labels[e.index] for e in (result.explained, *result.more)]


def test_answers_list_every_present_label(multi_server, shapes_multi_explainer):
    several = 0
    for index in range(6):
        png = image(index)
        response = post(multi_server, data=png, headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        VALIDATOR.validate(body)
        assert body["multi_label"] is True and body["model"] == MODEL
        assert explained_labels(body) == expected_labels(shapes_multi_explainer, png)
        present = [p["label"] for p in body["predictions"] if p["present"]]
        assert set(present) <= set(explained_labels(body))
        several += len(explained_labels(body)) > 1
    assert several


def test_a_bad_target_in_a_batch_is_that_items_400(multi_server):
    bodies = [
        {"image": base64.b64encode(image(i)).decode(), "target": target}
        for i, target in enumerate([["ring", "star"], ["ring", "hexagon"], None, "square,ring"])
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(multi_server, json=b), bodies))
    for response in responses:
        VALIDATOR.validate(response.json())
    assert [r.status_code for r in responses] == [200, 400, 200, 200]
    assert responses[1].json()["code"] == "unknown_target"
    assert explained_labels(responses[0].json()) == ["ring", "star"]
    assert explained_labels(responses[3].json()) == ["square", "ring"]
    assert responses[0].json()["explained"]["requested"] is True


def test_png_answer_has_one_labelled_overlay_per_label(multi_server):
    index = next(i for i in range(50) if len(render_multi_sample(HELD_OUT_SEED, i).labels) >= 2)
    png = image(index)
    body = post(multi_server, data=png, headers={"Content-Type": "image/png"}).json()
    response = post(
        multi_server, data=png, headers={"Content-Type": "image/png", "Accept": "image/png"}
    )
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    count = len(explained_labels(body))
    assert count >= 2 and picture.size[0] == count * 64 + (count - 1) * 4
    assert picture.size[1] > 64


def test_client_shows_every_present_label(multi_server, tmp_path, monkeypatch, capsys):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(image(index))
    monkeypatch.delenv("CAMSERVE_TOKEN", raising=False)
    code = camserve(
        ["predict", *map(str, paths), "--url", multi_server.inference_url, "--model", MODEL,
         "--key-file", str(multi_server.workdir / "key_file.json"),
         "--csv", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "overlays")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["file", "label", "probability", "present", "score", "stable"]
    with open(tmp_path / "rows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    answers = [post(multi_server, data=p.read_bytes(), headers={"Content-Type": "image/png"})
               for p in paths]  # fmt: skip
    expected = [(str(p), label) for p, a in zip(paths, answers, strict=True)
                for label in explained_labels(a.json())]  # fmt: skip
    assert [(row["file"], row["label"]) for row in rows] == expected
    assert [tuple(line.split()[:2]) for line in lines[1 : 1 + len(expected)]] == expected
    # One overlay pair per image and explained label: NAME.overlay.png for the first,
    # NAME.LABEL.overlay.png for the others.
    written = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    first = {str(p): explained_labels(a.json())[0] for p, a in zip(paths, answers, strict=True)}
    names = [f"{Path(f).stem}.overlay.png" if first[f] == label
             else f"{Path(f).stem}.{label}.overlay.png" for f, label in expected]  # fmt: skip
    assert sorted(n for n in written if not n.endswith(".shifted.png")) == sorted(names)
    assert len(written) == 2 * len(expected)
    assert f"wrote {len(expected)} overlay pair(s)" in out


SERIES = re.compile(r"^(camserve_explanations_total)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def explanation_counts(server) -> dict[str, float]:
    """``requested`` -> camserve_explanations_total of shapes-multi, from /metrics."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    counts = {}
    for line in text.splitlines():
        match = SERIES.match(line)
        if match and f'ModelName="{MODEL}"' in match["labels"]:
            requested = re.search(r'requested="(\w+)"', match["labels"])[1]
            counts[requested] = float(match["value"])
    return counts


def test_metrics_count_present_labels_as_the_models_own(multi_server, shapes_multi_explainer):
    before = explanation_counts(multi_server)
    own = named = 0
    for index in range(10, 14):
        png = image(index)
        body = post(multi_server, data=png, headers={"Content-Type": "image/png"}).json()
        explained = [body["explained"], *body.get("more_explanations", [])]
        own += sum(e["present"] for e in explained)
        named_body = post(
            multi_server, json={"image": base64.b64encode(png).decode(), "target": ["ring", 0]}
        ).json()
        named += 1 + len(named_body["more_explanations"])
    assert own > 4  # several present labels per image
    deadline_counts = None
    for _ in range(60):  # the frontend publishes a worker's metric lines shortly after
        deadline_counts = explanation_counts(multi_server)
        if deadline_counts.get("false", 0) - before.get("false", 0) >= own:
            break
        time.sleep(0.5)
    assert deadline_counts["false"] - before.get("false", 0) == own
    assert deadline_counts["true"] - before.get("true", 0) == named


def test_kserve_bodies_carry_every_present_label(multi_server):
    index = next(i for i in range(50) if len(render_multi_sample(HELD_OUT_SEED, i).labels) >= 2)
    encoded = base64.b64encode(image(index)).decode()
    plain = post(multi_server, json={"image": encoded}).json()
    v1 = post(
        multi_server,
        path=f"v1/models/{MODEL}:predict",
        json={"instances": [{"image": encoded}, {"image": encoded, "target": ["hexagon"]}]},
    )
    assert v1.status_code == 200, v1.text
    [answer, refused] = v1.json()["predictions"]
    VALIDATOR.validate(answer)
    assert answer["multi_label"] is True and answer == plain
    assert refused["error"]["code"] == "unknown_target"
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}
    v2 = post(multi_server, path=f"v2/models/{MODEL}/infer", json={"id": "1", "inputs": [tensor]})
    assert v2.status_code == 200, v2.text
    [output] = v2.json()["outputs"]
    inner = json.loads(output["data"][0])
    VALIDATOR.validate(inner)
    assert inner == plain and len(explained_labels(inner)) >= 2
    assert all(e["present"] for e in [inner["explained"], *inner["more_explanations"]])


def test_the_description_says_multi_label(multi_server):
    url = f"{multi_server.management_url}/models/{MODEL}?customized=true"
    [described] = requests.get(url, headers=multi_server.auth("management"), timeout=60).json()
    metadata = described["customizedMetadata"]
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    facts = metadata["camserve"]
    assert facts["multi_label"] is True and facts["presence_threshold"] == 0.5
    assert facts["label_thresholds"] == {} and facts["maps"] == 5
    assert multi_server.wait_for_log(f"{MODEL} is multi-label: sigmoid probabilities")
