"""Baseline for the benchmarks: the same decode, preprocessing and weights as camserve,
but a plain ``inference_mode`` forward and top-k JSON, with no explanation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from camserve.decode import decode_image
from camserve.device import serving_device
from camserve.explainer import ExplainerConfig, load_model
from camserve.gradcam import freeze
from camserve.labels import load_labels
from camserve.protocols.plain import parse_item

log = logging.getLogger(__name__)


class PlainHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.config = ExplainerConfig.from_handler_section(context.model_yaml_config["handler"])
        self.labels = load_labels(model_dir / self.config.labels)
        self.device = serving_device(context.system_properties, context.model_yaml_config)
        model = load_model(model_dir, self.config, len(self.labels))
        self.model = freeze(model).to(self.device)
        log.info(
            "plain handler %s on device %s", context.manifest["model"]["modelName"], self.device
        )
        self.initialized = True

    def handle(self, data, context):
        images = [decode_image(parse_item(item).image) for item in data]  # in full, as camserve
        x = self.config.preprocessing.batch(images)
        with torch.inference_mode():
            probabilities = self.model(x.to(self.device)).softmax(dim=1)
            top = probabilities.topk(min(self.config.topk, len(self.labels)))
        top = top.values.cpu(), top.indices.cpu()  # one transfer, as camserve does
        return [
            json.dumps(
                {
                    "predictions": [
                        {"index": i, "label": self.labels[i], "probability": round(p, 6)}
                        for p, i in zip(values, indices, strict=True)
                    ]
                }
            )
            for values, indices in zip(top[0].tolist(), top[1].tolist(), strict=True)
        ]
