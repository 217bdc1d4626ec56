"""Responses validate against the one JSON Schema in the repo."""

from __future__ import annotations

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
