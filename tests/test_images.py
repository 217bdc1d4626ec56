"""Heatmap and overlay PNGs: rendering in the core, and both ways of asking for them over HTTP."""

from __future__ import annotations

import base64
import io

import jsonschema
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from camserve import encode_png
from camserve.encode_json import explanation_json, load_schema
from camserve.request import RequestOptions
from tests.conftest import held_out, png_bytes

VALIDATOR = jsonschema.Draft202012Validator(load_schema())
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]
KEYS = ("heatmap_png", "overlay_png", "shifted_heatmap_png", "shifted_overlay_png")


def decode(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))


@pytest.fixture(scope="module")
def explanation(shapes_explainer):
    # A large, non-square upload: the pictures must still come out at the network's input size.
    image = held_out(3).image.resize((150, 97))
    prepared = shapes_explainer.prepare_image(image, RequestOptions(images=True))
    [result] = shapes_explainer.explain([prepared])
    return result


def test_images_block_decodes_to_input_size(shapes_explainer, explanation):
    body = explanation_json(explanation)
    VALIDATOR.validate(body)
    height, width = body["input_size"]
    modes = {}
    for key in KEYS:
        image = decode(body["images"][key])
        assert image.format == "PNG" and image.size == (width, height)
        modes[key] = image.mode
    assert modes == {
        "heatmap_png": "L",
        "overlay_png": "RGB",
        "shifted_heatmap_png": "L",
        "shifted_overlay_png": "RGB",
    }


def test_no_images_unless_asked(shapes_explainer):
    prepared = shapes_explainer.prepare_image(held_out(3).image)
    [result] = shapes_explainer.explain([prepared])
    body = explanation_json(result)
    assert "images" not in body


def test_heatmap_is_the_upsampled_map(explanation):
    heatmap = np.asarray(
        encode_png.heatmap_image(explanation.explained.grad_cam, (64, 64)), dtype=np.float64
    )
    assert heatmap.max() == 255
    # Downsampling the heatmap back to the layer's grid recovers the map's pattern.
    h, w = explanation.explained.grad_cam.shape
    pooled = heatmap.reshape(h, 64 // h, w, 64 // w).mean(axis=(1, 3))
    grid = explanation.explained.grad_cam.numpy()
    # Bilinear smoothing may move the brightest pixel to a neighbouring cell, never far.
    peak_cell = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert grid[peak_cell[0] // (64 // h), peak_cell[1] // (64 // w)] >= 0.5 * grid.max()
    assert np.corrcoef(pooled.ravel(), grid.ravel())[0, 1] > 0.9


def test_empty_map_renders_black_and_overlay_blends():
    empty = torch.zeros(8, 8)
    assert np.asarray(encode_png.heatmap_image(empty, (64, 64))).max() == 0
    background = Image.new("RGB", (64, 64), (10, 200, 30))
    # opacity 0 is the background itself; opacity 1 is the colormap alone (its lowest colour).
    assert (
        encode_png.overlay_image(empty, background, opacity=0.0).tobytes() == background.tobytes()
    )
    low = tuple(encode_png._lookup_table("inferno")[0])
    assert encode_png.overlay_image(empty, background, opacity=1.0).getpixel((5, 5)) == low


def test_shifted_map_differs_when_the_score_is_positive(explanation):
    if explanation.explained.zero_reference.score == 0:
        assert torch.allclose(
            explanation.explained.grad_cam, explanation.explained.shifted_grad_cam
        )
        return
    a = np.asarray(encode_png.heatmap_image(explanation.explained.grad_cam, (64, 64)))
    b = np.asarray(encode_png.heatmap_image(explanation.explained.shifted_grad_cam, (64, 64)))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    ("accept", "png"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("image/png", True),
        ("image/*", True),
        ("image/png;q=0.5, application/json", False),
        ("application/json;q=0.2, image/png", True),
        ("image/png;q=0", False),
    ],
)
def test_accept_negotiation(accept, png):
    assert encode_png.accepts_png(accept) is png


# --- over HTTP, on a real TorchServe -------------------------------------------------------


def post(server, **kwargs):
    headers = {**server.auth(), **kwargs.pop("headers", {})}
    return requests.post(
        f"{server.inference_url}/predictions/shapes", headers=headers, timeout=60, **kwargs
    )


@pytest.mark.integration
def test_images_true_over_http(server):
    sample = held_out(11)
    payload = {"image": base64.b64encode(png_bytes(sample.image)).decode(), "images": True}
    response = post(server, json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    VALIDATOR.validate(body)
    assert body["predictions"][0]["label"] == CLASSES[sample.label]
    for key in KEYS:
        assert decode(body["images"][key]).size == (64, 64)
    # The form field works the same way.
    form = post(server, files={"data": ("x.png", png_bytes(sample.image))}, data={"images": "1"})
    assert form.status_code == 200 and set(form.json()["images"]) == set(KEYS)


@pytest.mark.integration
def test_accept_image_png_returns_the_overlay(server):
    sample = held_out(12)
    data = png_bytes(sample.image)
    response = post(server, data=data, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text[:200]
    assert response.headers["Content-Type"].startswith("image/png")
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    # It is the same picture as the JSON answer's overlay_png.
    payload = {"image": base64.b64encode(data).decode(), "images": True}
    overlay = decode(post(server, json=payload).json()["images"]["overlay_png"])
    assert overlay.tobytes() == image.tobytes()


@pytest.mark.integration
def test_accept_image_png_errors_stay_json(server):
    response = post(server, data=b"not an image", headers={"Accept": "image/png"})
    assert response.status_code == 422
    assert response.headers["Content-Type"].startswith("application/json")
    VALIDATOR.validate(response.json())
