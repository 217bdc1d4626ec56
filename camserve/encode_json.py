"""result -> the JSON response, whose contract is ``schema/response.schema.json``.

Numbers whose scale depends on the model (probabilities, offsets, radii, centroid shifts) keep
``SIGNIFICANT_DIGITS`` significant digits, not a fixed count of decimals: a network whose signed
map is ~1e-9 still reports a non-zero offset. Map cells are normalised to [0, 1] first, so a
fixed ``MAP_DECIMALS`` suffices there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from camserve.encode_png import background_of, images_json
from camserve.explainer import ClassExplanation, Explanation, ServedModel
from camserve.sanity import FAILED

SCHEMA_PATH = Path(__file__).with_name("schema") / "response.schema.json"
MAP_DECIMALS = 4
SIGNIFICANT_DIGITS = 6


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def explanation_json(explanation: Explanation) -> dict:
    """The response body for one image.

    A multi-label model's answer adds ``"multi_label": true`` and a ``present`` flag to every
    class it lists; a single-label answer has neither.
    """
    model = explanation.model
    # Read in place (a CPU tensor, see Explanation): a few of the C values are shown.
    probabilities = explanation.probabilities.numpy()
    explained = explanation.explained
    body = {
        "model": model.name,
        **({"multi_label": True} if model.multi_label else {}),
        "predictions": [
            _class_fields(explanation, index, probability)
            for index, probability in explanation.top()
        ],
        "explained": {
            **_class_json(explanation, explained, probabilities, with_maps=False),
            "requested": explanation.requested,
        },
        "target_layer": model.target_layer,
        "input_size": list(explanation.image.tensor.shape[-2:]),
        "grad_cam": _map_json(explained),
        "zero_reference": _zero_reference_json(explained, model),
    }
    # Every explained class gets its pictures, drawn on one background.
    background = background_of(explanation) if explanation.image.options.images else None
    if explanation.more:
        body["more_explanations"] = [
            _class_json(explanation, other, probabilities) for other in explanation.more
        ]
        if background is not None:
            for entry, other in zip(body["more_explanations"], explanation.more, strict=True):
                entry["images"] = images_json(explanation, other, background)
    if background is not None:
        body["images"] = images_json(explanation, background=background)
    return body


def _class_json(
    explanation: Explanation,
    explained: ClassExplanation,
    probabilities: np.ndarray,
    with_maps: bool = True,
) -> dict:
    body = _class_fields(explanation, explained.index, float(probabilities[explained.index]))
    if with_maps:
        body["grad_cam"] = _map_json(explained)
        body["zero_reference"] = _zero_reference_json(explained, explanation.model)
    return body


def _class_fields(explanation: Explanation, index: int, probability: float) -> dict:
    body = {
        "index": index,
        "label": explanation.model.labels[index],
        "probability": significant(probability),
    }
    present = explanation.is_present(index)
    if present is not None:
        body["present"] = present
    return body


def _map_json(explained: ClassExplanation) -> dict:
    signed = explained.signed_map.numpy()
    return {
        "shape": list(signed.shape),
        "empty": explained.zero_reference.map_empty,
        "map": display_cells(signed),
    }


def display_cells(signed: np.ndarray) -> list[list[float]]:
    """``camserve.maps.peak_normalised(ReLU(M))`` rounded to ``MAP_DECIMALS``, as lists.

    In numpy on the CPU map: a map of 49 cells is a few microseconds of arithmetic, and each
    torch call costs more than that in dispatch (eight per map were ~40% of the encoding).
    Same operations, same float32 division and the same rounding as ``torch.round``
    (``rint(x * 10**d) / 10**d``), so the same numbers (tested against the torch form).
    """
    positive = np.maximum(signed, 0)
    peak = positive.max()
    scaled = (positive / peak if peak > 0 else positive).astype(np.float64)
    return np.round(scaled, MAP_DECIMALS).tolist()


def _zero_reference_json(explained: ClassExplanation, model: ServedModel) -> dict:
    block = explained.zero_reference
    # The instance dicts, in field order (_significant_block builds new ones):
    # dataclasses.asdict deep-copies, 25x slower.
    body = _significant_block({**vars(block), "worst_case": vars(block.worst_case)})
    if model.sanity_failed:  # a model that passed, or was never checked, adds nothing
        body["sanity"] = FAILED
    return body


def significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (0.0 stays 0.0)."""
    return float(f"{value:.{digits}g}")


def _significant_block(block: dict) -> dict:
    return {
        key: (
            _significant_block(value)
            if isinstance(value, dict)
            else significant(value)
            if isinstance(value, float)
            else value
        )
        for key, value in block.items()
    }


def error_json(code: str, message: str, status: int) -> dict:
    return {"code": code, "message": message, "status": status}
