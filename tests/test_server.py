"""Integration: a real TorchServe, real image bytes over HTTP."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import requests

from camserve.encode_json import load_schema
from tests.conftest import held_out, png_bytes

pytestmark = pytest.mark.integration
VALIDATOR = jsonschema.Draft202012Validator(load_schema())
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


def post(server, data=None, path="predictions", headers=None, **kwargs):
    headers = {**server.auth(), **(headers or {})}
    return requests.post(
        f"{server.inference_url}/{path}/shapes", data=data, headers=headers, timeout=60, **kwargs
    )


def assert_explains(response, label):
    assert response.status_code == 200, response.text
    body = response.json()
    VALIDATOR.validate(body)
    assert body["predictions"][0]["label"] == label
    return body


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_bytes(server, fmt):
    for index in range(3):
        sample = held_out(index)
        response = post(
            server, png_bytes(sample.image, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        )
        body = assert_explains(response, CLASSES[sample.label])
        assert body["zero_reference"]["compensable"] is True
        assert body["zero_reference"]["reference"] == "calibration_mean"


def test_json_body_with_a_target(server):
    sample = held_out(4)
    other = CLASSES[(sample.label + 1) % len(CLASSES)]
    payload = {
        "image": base64.b64encode(png_bytes(sample.image)).decode(),
        "target": other,
        "topk": 6,
    }
    response = post(server, json=payload)
    body = assert_explains(response, CLASSES[sample.label])
    assert body["explained"]["label"] == other and body["explained"]["requested"] is True
    assert len(body["predictions"]) == 6


def test_multipart_form(server):
    sample = held_out(5)
    response = requests.post(
        f"{server.inference_url}/predictions/shapes",
        files={"data": ("x.png", png_bytes(sample.image), "image/png")},
        data={"target": "0"},
        headers=server.auth(),
        timeout=60,
    )
    body = assert_explains(response, CLASSES[sample.label])
    assert body["explained"]["index"] == 0


def test_explanations_endpoint_returns_the_full_answer(server):
    sample = held_out(6)
    response = post(server, png_bytes(sample.image), path="explanations")
    assert_explains(response, CLASSES[sample.label])


def test_requests_without_a_token_are_refused(server):
    data = png_bytes(held_out(0).image)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = requests.post(
            f"{server.inference_url}/predictions/shapes", data=data, headers=headers, timeout=30
        )
        assert response.status_code in (400, 401, 403)
        assert "Token Authorization failed" in response.text
    management = requests.get(f"{server.management_url}/models", timeout=30)
    assert management.status_code in (400, 401, 403)


def test_bad_image_gets_a_json_4xx(server):
    response = post(server, b"definitely not an image")
    assert response.status_code == 422
    body = response.json()
    VALIDATOR.validate(body)
    assert body["code"] == "undecodable_image" and "accepted formats" in body["message"]


def test_corrupt_image_in_a_concurrent_batch(batching_server):
    """A full batch (8, the session's batching server): 7 images, one of them cut short."""
    samples = [held_out(i) for i in range(7, 14)]
    good = png_bytes(samples[0].image)
    bodies = [png_bytes(s.image) for s in samples] + [good[: len(good) // 2]]
    paths = ["predictions", "explanations"] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(
            pool.map(
                lambda args: post(batching_server, args[0], path=args[1]),
                zip(bodies, paths, strict=True),
            )
        )
    for sample, response in zip(samples, responses[:7], strict=True):
        assert_explains(response, CLASSES[sample.label])
    assert responses[7].status_code == 422
    assert responses[7].json()["code"] == "undecodable_image"
    # TorchServe copies the worker's log line to model_log.log after it has answered.
    assert batching_server.wait_for_log("camserve batch: 8 items, 1 rejected")
    # The worker stayed up and still answers.
    assert_explains(post(batching_server, bodies[0]), CLASSES[samples[0].label])
