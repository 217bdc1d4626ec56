"""Class labels from ``index_to_name.json``, per-label presence thresholds of a multi-label
model, and resolution of a requested target."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from camserve.errors import BAD_OPTION, UNKNOWN_TARGET, excerpt, input_error


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
        index = _find_label(target, labels)
        if index is not None:
            return index
        hint = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        raise input_error(
            UNKNOWN_TARGET,
            f"target label {excerpt(target)} is not a class of this model ({hint})",
        )
    raise input_error(
        UNKNOWN_TARGET, f"target must be a class index or label, got {excerpt(target)}"
    )


def check_presence_threshold(value: object, what: str = "presence threshold") -> float:
    """A probability threshold strictly inside (0, 1): at 0 every label would be present,
    at 1 none could be."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"the {what} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def label_thresholds(
    mapping: Mapping[str, object], labels: list[str], default: float, source: str
) -> list[float]:
    """One presence threshold per class: ``mapping`` (label -> threshold) where it names
    the label, ``default`` elsewhere. Unknown labels and values outside (0, 1) are refused."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{source} must be a JSON object of label -> threshold")
    unknown = [name for name in mapping if name not in labels]
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(f"{source} names labels the model does not have: {shown}{more}")
    return [
        check_presence_threshold(mapping[name], f"threshold of {name!r} in {source}")
        if name in mapping
        else default
        for name in labels
    ]


def load_label_thresholds(path: str | Path, labels: list[str], default: float) -> list[float]:
    """``label_thresholds(...)`` from a JSON file."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return label_thresholds(mapping, labels, default, str(path))


def resolve_targets(target: object, labels: list[str], limit: int) -> tuple[int, ...]:
    """The labels a multi-label request names, as class indices in the order given, each once:
    a list of indices or labels, or one string with labels separated by commas (a form field;
    a label that itself holds a comma is matched whole first). Empty: the present labels."""
    if target is None:
        return ()
    if isinstance(target, str) and "," in target and _find_label(target, labels) is None:
        target = [part.strip() for part in target.split(",") if part.strip()]
    named = target if isinstance(target, list) else [target]
    if len(named) > limit:
        raise input_error(
            BAD_OPTION, f"'target' names {len(named)} labels; at most {limit} are explained"
        )
    indices = [resolve_target(item, labels) for item in named]
    return tuple(dict.fromkeys(i for i in indices if i is not None))


def _find_label(name: str, labels: list[str]) -> int | None:
    if name in labels:
        return labels.index(name)
    folded = [label.casefold() for label in labels]
    return folded.index(name.casefold()) if name.casefold() in folded else None
