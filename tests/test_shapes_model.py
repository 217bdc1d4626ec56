"""The embedded default model: deterministic data, committed weights that meet the bar."""

from __future__ import annotations

import json

import numpy as np

from harness.shapes.dataset import CLASSES, render_sample
from harness.shapes.evaluate import evaluate
from tests.conftest import SHAPES_DIR


def test_generator_is_deterministic_and_masks_cover_the_object():
    a, b = render_sample(7, 3), render_sample(7, 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask) and a.label == b.label
    c = render_sample(7, 4)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    for index in range(30):
        sample = render_sample(3, index)
        assert 40 < sample.mask.sum() < 0.5 * sample.mask.size
        assert (sample.mask | sample.ink).sum() == sample.mask.sum()  # extent covers the ink


def test_committed_weights_are_small_and_labelled():
    assert (SHAPES_DIR / "shapes.pt").stat().st_size <= 2 * 1024 * 1024
    labels = json.loads((SHAPES_DIR / "index_to_name.json").read_text())
    assert [labels[str(i)] for i in range(len(CLASSES))] == list(CLASSES)
    record = json.loads((SHAPES_DIR / "training.json").read_text())
    assert record["seed"] == 0 and "harness.shapes.train" in record["command"]


def test_accuracy_and_pointing_game_on_held_out_images(shapes_explainer):
    metrics = evaluate(shapes_explainer, count=400)
    assert metrics["accuracy"] >= 0.95
    assert metrics["pointing_game"] >= 0.90
    # An 8x8 map is blurry, but its mass must sit on the object far above chance.
    assert metrics["mass_inside_mask_mean"] > 1.5 * metrics["mask_area_fraction_mean"]
