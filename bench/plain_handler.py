"""Baseline for the benchmarks: a plain TorchServe image classifier that shares no code with
camserve, as a user would write it: PIL decode, torchvision ``transforms.v2``, an
``inference_mode`` forward, softmax and top-k JSON.

It reads the same archive files camserve's handler reads (``model-config.yaml``'s ``handler:``
section, the weights, the labels), so both serve the same network on the same preprocessing;
everything else is written here. Its archive carries no camserve code (``bench.e2e``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _network(model_dir: Path, section: dict, num_classes: int) -> torch.nn.Module:
    if section.get("model_file"):  # the user's own module, shipped in the archive
        spec = importlib.util.spec_from_file_location(
            "user_model", model_dir / section["model_file"]
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = getattr(module, section.get("model_class") or section["architecture"])(num_classes)
    else:
        model = torchvision.models.get_model(
            section["architecture"], weights=None, num_classes=num_classes
        )
    state = torch.load(model_dir / section["weights"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _transform(preprocessing: dict) -> v2.Compose:
    size = preprocessing["input_size"]
    interpolation = v2.InterpolationMode(preprocessing.get("interpolation", "bilinear"))
    steps = [v2.Resize(preprocessing.get("resize") or size, interpolation, antialias=True)]
    if preprocessing.get("center_crop"):
        steps.append(v2.CenterCrop(preprocessing["center_crop"]))
    return v2.Compose(
        [
            *steps,
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(
                mean=preprocessing.get("mean", IMAGENET_MEAN),
                std=preprocessing.get("std", IMAGENET_STD),
            ),
        ]
    )


class PlainHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        section = context.model_yaml_config["handler"]
        labels = json.loads((model_dir / section.get("labels", "index_to_name.json")).read_text())
        self.labels = [labels[str(i)] for i in range(len(labels))]
        gpu = properties.get("gpu_id")
        on_gpu = (
            torch.cuda.is_available()
            and gpu is not None
            and context.model_yaml_config.get("deviceType") != "cpu"
        )
        self.device = torch.device(f"cuda:{gpu}" if on_gpu else "cpu")
        self.model = _network(model_dir, section, len(self.labels)).to(self.device)
        self.transform = _transform(section["preprocessing"])
        self.topk = min(int(section.get("topk", 5)), len(self.labels))
        # A multi-label head scores each label on its own (sigmoid), a single-label one softmax.
        self.multi_label = bool(section.get("multi_label", False))
        log.info(
            "plain handler %s on device %s", context.manifest["model"]["modelName"], self.device
        )
        self.initialized = True

    def handle(self, data, context):
        images = [
            Image.open(io.BytesIO(item.get("data") or item.get("body"))).convert("RGB")
            for item in data
        ]
        x = torch.stack([self.transform(image) for image in images]).to(self.device)
        with torch.inference_mode():
            logits = self.model(x)
            scores = logits.sigmoid() if self.multi_label else logits.softmax(dim=1)
            top = scores.topk(self.topk)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            json.dumps(
                {
                    "predictions": [
                        {"index": i, "label": self.labels[i], "probability": round(p, 6)}
                        for p, i in zip(item_values, item_indices, strict=True)
                    ]
                }
            )
            for item_values, item_indices in zip(values, indices, strict=True)
        ]
