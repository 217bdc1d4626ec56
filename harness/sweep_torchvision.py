"""Every torchvision classification model through ``camserve archive --arch NAME``.

python -m harness.sweep_torchvision [--only squeezenet1_1,mnasnet0_5] [--max-params 150e6]

For each name of ``torchvision.models.list_models(module=torchvision.models)`` (the larger
ones left out): seeded random weights saved as ``.safetensors`` (ViT's head, which torchvision
initialises to zeros, drawn at random: a zero head gives every map zero gradient), the CLI's
own ``archive --arch`` in process at 64x64 (224 for the models whose weights fix a larger
input and for AlexNet, whose map would be 1x1 at 64; 299 for Inception v3), the archive
unpacked and loaded as the handler loads it, two photos explained and the map compared with
Captum's ``LayerGradCam`` at the grid (the checks of ``harness.sweep_transformers``).
Development only: random weights, CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torchvision

from harness.sweep_transformers import Row, check_explanations, one_line, summary_line

LABELS = ["cat", "dog", "bird"]
SIZES = {"inception_v3": 299, "alexnet": 224}  # alexnet: 64 gives a 1x1 map
FULL_SIZE = ("vit_", "swin_v2", "maxvit")  # position tables or window sizes fix 224


def input_size(name: str) -> int:
    return SIZES.get(name, 224 if name.startswith(FULL_SIZE) else 64)


def parameter_count(name: str) -> int:
    """Counted on the meta device, without memory; RegNet's constructor needs real tensors."""
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name)
    except NotImplementedError:
        model = torchvision.models.get_model(name)
    return sum(p.numel() for p in model.parameters())


def run_case(name: str, work: Path) -> Row:
    from safetensors.torch import save_file

    from camserve.explainer import Explainer
    from camserve.grid import NCHW, GridLayer
    from camserve.request import ParsedRequest, RequestOptions
    from camserve.tools.cli import main as camserve
    from tests.library_models import jpeg_bytes, photos

    row, started = Row(name, name), time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(LABELS))
    head = getattr(getattr(model, "heads", None), "head", None)
    if head is not None:
        torch.nn.init.normal_(head.weight, std=0.02)
    weights = work / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    size = str(input_size(name))
    out, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errors):
        code = camserve([
            "archive", "--arch", name, "--weights", str(weights), "--labels",
            str(work / "labels.txt"), "--input-size", size, "--name", "m",
            "--export-path", str(work / "store"),
        ])  # fmt: skip
    if code != 0:
        printed = errors.getvalue().strip()
        row.status = "refused" if code == 2 and len(printed.splitlines()) == 1 else "BAD REFUSAL"
        row.message = f"exit {code}: {one_line(printed)}"
    else:
        with zipfile.ZipFile(work / "store" / "m.mar") as archive:
            archive.extractall(work / "unpacked")
        explainer = Explainer.from_directory(work / "unpacked")
        row.layer = explainer.config.target_layer
        wrapped = explainer.model.get_submodule(row.layer)
        row.layout = wrapped.layout if isinstance(wrapped, GridLayer) else NCHW
        row.compensable = explainer.compensation.compensable
        check_explanations(explainer, row, photos, jpeg_bytes, ParsedRequest, RequestOptions)
        row.status = "archived"
    row.seconds = time.perf_counter() - started
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--max-params", type=float, default=150e6, help="leave larger out")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else torchvision.models.list_models(
        module=torchvision.models
    )  # fmt: skip
    for name in names:
        count = parameter_count(name)
        if count > args.max_params:
            print(f"{name:22} left out: {count / 1e6:.0f}M parameters", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="camserve-sweep-") as work:
            row = run_case(name, Path(work))
        print(summary_line(row, width=22), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
