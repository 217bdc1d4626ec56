"""Class labels from ``index_to_name.json`` and resolution of a requested target."""

from __future__ import annotations

import json
import re
from pathlib import Path

from camserve.errors import UNKNOWN_TARGET, excerpt, input_error


def load_labels(path: str | Path, num_classes: int | None = None) -> list[str]:
    """Read TorchServe's ``index_to_name.json``: values are names or ``[id, name]`` pairs."""
    mapping = json.loads(Path(path).read_text())
    labels = {}
    for key, value in mapping.items():
        name = value[-1] if isinstance(value, list) else value
        labels[int(key)] = str(name)
    count = num_classes if num_classes is not None else max(labels) + 1
    if sorted(labels) != list(range(count)):
        raise ValueError(f"{path} must name every class index 0..{count - 1} exactly once")
    return [labels[i] for i in range(count)]


def resolve_target(target: int | str | None, labels: list[str]) -> int | None:
    """Map a requested class (index, numeric string or label) to an index; None = top-1."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise input_error(
            UNKNOWN_TARGET, f"target must be a class index or label, got {excerpt(target)}"
        )
    if isinstance(target, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", target):
        target = int(target.strip())
    if isinstance(target, int):
        if 0 <= target < len(labels):
            return target
        raise input_error(
            UNKNOWN_TARGET, f"target index {target} is out of range 0..{len(labels) - 1}"
        )
    if isinstance(target, str):
        try:
            return labels.index(target)
        except ValueError:
            folded = [label.casefold() for label in labels]
            if target.casefold() in folded:
                return folded.index(target.casefold())
            hint = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise input_error(
                UNKNOWN_TARGET,
                f"target label {excerpt(target)} is not a class of this model ({hint})",
            ) from None
    raise input_error(
        UNKNOWN_TARGET, f"target must be a class index or label, got {excerpt(target)}"
    )
