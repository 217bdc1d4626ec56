"""Reduced-scale JPEG decoding (PIL's ``draft``) against a full decode, for every source.

camserve used to decode a large JPEG at 1/2, 1/4 or 1/8 scale, never below the side the
resize needs. This measures what that shortcut does to the answer, per pipeline (torchvision,
timm, transformers, the trained ``shapes`` model) at 64, 128 and 224 px: the network input in
grey levels, the probabilities, the peak-normalised Grad-CAM map and the score. ``factor``
asks the draft for a multiple of the needed side (1: the old shortcut).

    python -m bench.jpeg_draft                       # the photo shipped with matplotlib
    python -m bench.jpeg_draft --images DIR [DIR...] # and your photos (jpg/png, any size)

Writes bench/results/<date>-jpeg-draft.json. Models other than ``shapes`` have seeded random
weights (3 classes). Nothing here is a timing.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from bench.run import RESULTS, machine
from camserve.decode import decode_image
from camserve.explainer import Explainer
from camserve.maps import peak_normalised

REPO = Path(__file__).resolve().parents[1]
FACTORS = (1, 2, 4)
PREPROCESSING_TOLERANCE = 1e-6  # docs/bring-your-own-model.md#preprocessing
LABELS = ["a", "b", "c"]


def model_dirs(work: Path) -> dict[str, Path]:
    """name -> a camserve model folder, one per source and input size."""
    import timm
    import torchvision
    import transformers
    from safetensors.torch import save_file

    from camserve.tools.archive import make_preprocessing, write_model_dir

    dirs = {"shapes (trained), 64": REPO / "models" / "shapes"}
    for side in (64, 128, 224):
        torch.manual_seed(0)
        weights = work / f"tv{side}.safetensors"
        save_file(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
        dirs[f"torchvision resnet18, {side}"] = work / f"tv{side}"
        write_model_dir(
            dirs[f"torchvision resnet18, {side}"], weights, "resnet18", labels=LABELS,
            preprocessing=make_preprocessing(side),
        )  # fmt: skip
        torch.manual_seed(0)
        weights = work / f"timm{side}.safetensors"
        save_file(timm.create_model("resnet18", num_classes=3).state_dict(), weights)
        dirs[f"timm resnet18, {side}"] = work / f"timm{side}"
        write_model_dir(
            dirs[f"timm resnet18, {side}"], weights, "timm:resnet18", labels=LABELS,
            data_config={"input_size": (side, side)},
        )  # fmt: skip
    for side in (64, 224):
        torch.manual_seed(0)
        folder = work / f"hf_vit{side}_folder"
        config = transformers.ViTConfig(
            image_size=side, patch_size=16, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=128, num_labels=3,
        )  # fmt: skip
        transformers.ViTForImageClassification(config).save_pretrained(folder)
        processor = transformers.ViTImageProcessor(size={"height": side, "width": side})
        processor.save_pretrained(folder)
        dirs[f"transformers ViT, {side}"] = work / f"hf_vit{side}"
        write_model_dir(dirs[f"transformers ViT, {side}"], pretrained=folder)
    return dirs


def photos(folders: list[Path]) -> dict[str, bytes]:
    """name -> JPEG bytes (quality 90) at the photo's own size; PNGs are encoded to JPEG."""
    import matplotlib

    paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    for folder in folders:
        paths += sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    out = {}
    for path in paths:
        image = Image.open(path).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out[f"{path.name} {image.width}x{image.height}"] = buffer.getvalue()
    return out


def needed_side(explainer: Explainer) -> int:
    """The side the old shortcut asked the draft for: the resize's shorter side."""
    preprocessing = explainer.config.preprocessing
    resize = preprocessing.resize if preprocessing.resize is not None else preprocessing.input_size
    return resize if isinstance(resize, int) else max(resize)


def compare(explainer: Explainer, data: bytes, factor: int) -> dict | None:
    """The draft's effect on one photo; None when the draft decodes at full scale anyway."""
    full_image = decode_image(data)
    drafted = decode_image(data, min_side=needed_side(explainer) * factor)
    if drafted.size == full_image.size:
        return None
    [full] = explainer.explain([explainer.prepare_image(full_image)])
    target = full.explained.index
    # The draft explains the same class, so the two maps compare even if the top-1 moved.
    [draft] = explainer.explain([explainer.prepare_image(drafted, requested_class=target)])
    preprocessing = explainer.config.preprocessing
    difference = (full.image.tensor - draft.image.tensor).abs()
    std = torch.tensor(preprocessing.std)[:, None, None]
    grey = difference * std / preprocessing.rescale_factor  # in steps of the 8-bit pixels
    maps = [peak_normalised(r.explained.grad_cam) for r in (full, draft)]
    score = full.explained.zero_reference.score - draft.explained.zero_reference.score
    return {
        "decoded": f"{drafted.width}x{drafted.height} of {full_image.width}x{full_image.height}",
        "input_max_grey_levels": round(float(grey.max()), 2),
        "input_mean_grey_levels": round(float(grey.mean()), 3),
        "input_max_abs": float(difference.max()),
        "probability_max_abs": float((full.probabilities - draft.probabilities).abs().max()),
        "top1_changed": int(draft.probabilities.argmax()) != target,
        "map_max_abs": float((maps[0] - maps[1]).abs().max()),
        "score_abs": abs(score),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = photos(args.images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="camserve-jpeg-draft-") as work:
        for name, model_dir in model_dirs(Path(work)).items():
            explainer = Explainer.from_directory(model_dir)
            for factor in FACTORS:
                effects = {
                    photo: effect
                    for photo, data in images.items()
                    if (effect := compare(explainer, data, factor)) is not None
                }
                row = summary(name, factor, effects)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "photos"}), flush=True)
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"{today}-jpeg-draft.json"
    out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": "python -m bench.jpeg_draft "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": machine(),
                "photos": list(images),
                "preprocessing_tolerance": PREPROCESSING_TOLERANCE,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


def summary(name: str, factor: int, effects: dict[str, dict]) -> dict:
    values = list(effects.values())

    def worst(key: str) -> float | None:
        return max((v[key] for v in values), default=None)

    return {
        "pipeline": name,
        "factor": factor,
        "photos_drafted": len(values),
        "input_max_grey_levels": worst("input_max_grey_levels"),
        "input_max_abs": worst("input_max_abs"),
        "probability_max_abs": worst("probability_max_abs"),
        "map_max_abs": worst("map_max_abs"),
        "score_max_abs": worst("score_abs"),
        "top1_changed": sum(v["top1_changed"] for v in values),
        "within_tolerance": all(v["input_max_abs"] <= PREPROCESSING_TOLERANCE for v in values),
        "photos": effects,
    }


if __name__ == "__main__":
    sys.exit(main())
