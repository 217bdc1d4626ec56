"""Responses validate against the one JSON Schema in the repo."""

from __future__ import annotations

import json

import jsonschema
import pytest

from camserve.encode_json import error_json, explanation_json, load_schema
from camserve.errors import ERROR_CODES, InputError
from camserve.request import ParsedRequest, RequestOptions
from tests.conftest import held_out, png_bytes

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def explain(explainer, options=None):
    options = options or RequestOptions()
    prepared = explainer.prepare(ParsedRequest(png_bytes(held_out(0).image), options))
    [result] = explainer.explain([prepared])
    return explanation_json(result)


def test_schema_is_valid():
    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_explanation_validates_and_is_normalised(shapes_explainer):
    body = explain(shapes_explainer)
    VALIDATOR.validate(body)
    values = [v for row in body["grad_cam"]["map"] for v in row]
    assert max(values) == 1.0 and min(values) >= 0.0
    assert body["grad_cam"]["shape"] == [8, 8]
    assert len(body["predictions"]) == shapes_explainer.config.topk
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert body["explained"]["index"] == body["predictions"][0]["index"]


def test_requested_target_and_topk(shapes_explainer):
    body = explain(shapes_explainer, RequestOptions(target="ring", topk=6))
    VALIDATOR.validate(body)
    assert body["explained"] == {**body["explained"], "label": "ring", "requested": True}
    assert len(body["predictions"]) == 6


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_validates(code):
    error = InputError(code, "why", ERROR_CODES[code])
    VALIDATOR.validate(error_json(error.code, error.message, error.status))


def test_schema_rejects_a_broken_response(shapes_explainer):
    body = explain(shapes_explainer)
    body["zero_reference"]["score"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(body)


def test_readme_shows_the_schema_file_verbatim():
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- schema:start -->\n```json\n") + len(
        "<!-- schema:start -->\n```json\n"
    )
    end = readme.index("```\n<!-- schema:end -->")
    assert readme[start:end] == (REPO / "camserve/schema/response.schema.json").read_text()


def test_maps_option_explains_the_next_classes(shapes_explainer):
    body = explain(shapes_explainer, RequestOptions(maps=3, topk=3))
    VALIDATOR.validate(body)
    more = body["more_explanations"]
    assert [m["index"] for m in more] == [p["index"] for p in body["predictions"][1:3]]
    assert all(m["grad_cam"]["shape"] == [8, 8] for m in more)
    assert "more_explanations" not in explain(shapes_explainer)


def test_images_for_every_explained_class(shapes_explainer):
    """images=true draws each more_explanations class too; it adds pictures and nothing else,
    and without maps > 1 the answer is what it was (the explained class's block only)."""
    import base64
    import io

    import numpy as np
    import torch
    from PIL import Image

    from camserve.encode_png import upsample

    pictured = explain(shapes_explainer, RequestOptions(maps=3, topk=3, images=True))
    plain = explain(shapes_explainer, RequestOptions(maps=3, topk=3))
    VALIDATOR.validate(pictured)
    assert all("images" not in m for m in plain["more_explanations"])
    stripped = {k: v for k, v in pictured.items() if k != "images"}
    stripped["more_explanations"] = [
        {k: v for k, v in m.items() if k != "images"} for m in pictured["more_explanations"]
    ]
    assert json.dumps(stripped) == json.dumps(plain)
    assert list(pictured) == [*plain, "images"]  # the explained class's block stays last

    # Each class's heatmap is its own map, upsampled (an oracle from the JSON map alone).
    for block, images in [(pictured, pictured["images"])] + [
        (m, m["images"]) for m in pictured["more_explanations"]
    ]:
        heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(images["heatmap_png"]))))
        expected = upsample(torch.tensor(block["grad_cam"]["map"]), (64, 64)).numpy() * 255
        assert np.abs(heatmap - expected).max() <= 2

    single = explain(shapes_explainer, RequestOptions(images=True))
    assert "more_explanations" not in single
    assert list(single) == [*explain(shapes_explainer), "images"]
