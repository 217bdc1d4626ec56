"""The embedded default model: a small CNN trained on generated shapes with known masks."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from camserve.architectures import build_model

SHAPES_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes"
MODEL_FILE = SHAPES_DIR / "shapes_net.py"


def shapes_net(num_classes: int = 6) -> nn.Module:
    """An untrained ShapesNet, built from the model file the archive ships."""
    return build_model("ShapesNet", num_classes, model_file=MODEL_FILE, model_class="ShapesNet")
