"""(logits, map, score) -> the JSON response, whose contract is ``schema/response.schema.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from camserve.encode_png import images_json
from camserve.explainer import ExplainedImage
from camserve.preprocess import Preprocessing

SCHEMA_PATH = Path(__file__).with_name("schema") / "response.schema.json"
MAP_DECIMALS = 4


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def explanation_json(
    explained: ExplainedImage,
    labels: list[str],
    target_layer: str,
    model_name: str,
    preprocessing: Preprocessing | None = None,
) -> dict:
    """The response body; ``preprocessing`` lets the ``images`` block undo the normalisation."""
    probabilities = explained.probabilities
    top = torch.topk(probabilities, explained.topk)
    target = explained.target
    body = {
        "model": model_name,
        "predictions": [
            {"index": int(i), "label": labels[int(i)], "probability": round(float(p), 6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ],
        "explained": {
            "index": target,
            "label": labels[target],
            "probability": round(float(probabilities[target]), 6),
            "requested": explained.requested,
        },
        "target_layer": target_layer,
        "input_size": list(explained.prepared.tensor.shape[-2:]),
        "grad_cam": _map_json(explained.grad_cam),
        "zero_reference": _rounded(asdict(explained.zero_reference)),
    }
    if explained.more:
        body["more_explanations"] = [
            {
                "index": other.target,
                "label": labels[other.target],
                "probability": round(float(probabilities[other.target]), 6),
                "grad_cam": _map_json(other.grad_cam),
                "zero_reference": _rounded(asdict(other.zero_reference)),
            }
            for other in explained.more
        ]
    if explained.prepared.options.images:
        body["images"] = images_json(explained, preprocessing)
    return body


def _map_json(grad_cam: torch.Tensor) -> dict:
    peak = float(grad_cam.max())
    normalised = grad_cam / peak if peak > 0 else grad_cam
    return {"shape": list(grad_cam.shape), "empty": peak <= 0, "map": _rounded_rows(normalised)}


def _rounded_rows(grid: torch.Tensor) -> list[list[float]]:
    # Rounding in torch, then tolist(): far cheaper than formatting floats one by one.
    return torch.round(grid.double(), decimals=MAP_DECIMALS).tolist()


def _rounded(block: dict) -> dict:
    return {
        key: (
            _rounded(value)
            if isinstance(value, dict)
            else round(value, 6)
            if isinstance(value, float)
            else value
        )
        for key, value in block.items()
    }


def error_json(code: str, message: str, status: int) -> dict:
    return {"code": code, "message": message, "status": status}
