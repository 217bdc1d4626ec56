"""Baseline for the benchmarks: the same decode, preprocessing and weights as camserve,
but a plain ``inference_mode`` forward and top-k JSON, with no explanation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from camserve.decode import decode_image
from camserve.explainer import ExplainerConfig, load_model
from camserve.gradcam import freeze
from camserve.labels import load_labels
from camserve.request import parse_item


class PlainHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.config = ExplainerConfig.from_handler_section(context.model_yaml_config["handler"])
        self.labels = load_labels(model_dir / self.config.labels)
        self.model = freeze(load_model(model_dir, self.config, len(self.labels)))
        self.initialized = True

    def handle(self, data, context):
        side = self.config.preprocessing.min_source_side
        images = [decode_image(parse_item(item).image, min_side=side) for item in data]
        x = self.config.preprocessing.batch(images)
        with torch.inference_mode():
            probabilities = self.model(x).softmax(dim=1)
        top = probabilities.topk(min(self.config.topk, len(self.labels)))
        return [
            json.dumps(
                {
                    "predictions": [
                        {"index": i, "label": self.labels[i], "probability": round(p, 6)}
                        for p, i in zip(values, indices, strict=True)
                    ]
                }
            )
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
