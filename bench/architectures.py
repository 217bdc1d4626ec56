"""Per architecture: the automatic target layer, ``compensable``, and the time per explained
image at batch 1 (random weights, 224x224, 2 threads), next to a plain forward.

    python -m bench.architectures                      # all supported architectures
    python -m bench.architectures --arch resnet50 vgg16 --repeats 5
    python -m bench.architectures --arch swin_t vit_b_16 --compare-grad-cam swin_t vit_b_16
    python -m bench.architectures --arch timm:resnet50 timm:convnext_tiny transformers:vit-base
    python -m bench.architectures --arch vit_b_16 --profile vit_b_16   # where the time goes

Writes bench/results/<date>-architectures.json with the machine description and the command.
``--compare-grad-cam`` adds, per named architecture, the Pearson correlation between
camserve's map and pytorch-grad-cam's GradCAM with its documented ``reshape_transform``
(pip install -r requirements-bench.lock), on the same images, layer and class.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn

from bench.run import RESULTS, machine
from bench.timing import interleaved
from camserve.explainer import Explainer, ExplainerConfig
from camserve.grid import GridLayer
from camserve.preprocess import Preprocessing
from camserve.tools.archive import make_preprocessing

HF_VIT = "transformers:vit-base"
ARCHITECTURES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn",
    "densenet121", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
    "swin_t", "swin_s", "swin_v2_t", "vit_b_16", "vit_b_32", "maxvit_t",
    "timm:resnet50", "timm:convnext_tiny", HF_VIT,
)  # fmt: skip


def random_model(arch: str) -> nn.Module:
    """torchvision's model by name, timm's (``timm:NAME``), or transformers' ViT-B/16 at 224
    (``transformers:vit-base``, the architecture of google/vit-base-patch16-224)."""
    torch.manual_seed(0)
    if arch.startswith("timm:"):
        import timm

        return timm.create_model(arch.removeprefix("timm:"), pretrained=False).eval()
    if arch == HF_VIT:
        import transformers

        from camserve.sources.transformers import logits_only

        config = transformers.ViTConfig(num_labels=1000)  # ViT-B/16, 224x224
        return logits_only(transformers.ViTForImageClassification(config).eval())
    model = torchvision.models.get_model(arch, weights=None).eval()
    if hasattr(model, "heads"):
        # torchvision initialises ViT's head to zero, which leaves nothing to explain.
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def preprocessing_for(arch: str, model: nn.Module, size: int) -> Preprocessing:
    """The library's own pipeline: timm's data config, transformers' ViT image processor,
    torchvision's evaluation pipeline."""
    if arch.startswith("timm:"):
        from camserve.sources.timm import TimmSource

        return TimmSource().preprocessing(model)
    if arch == HF_VIT:
        return Preprocessing(
            input_size=(size, size), resize=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3,
            crop_offset="floor", backend="tensor",
        )  # fmt: skip
    return make_preprocessing(size)


def measure(
    arch: str, repeats: int, size: int, compare: bool = False, profile: bool = False
) -> dict:
    model = random_model(arch)
    config = ExplainerConfig(
        architecture=arch,
        weights="random",
        target_layer=None,  # the automatic choice, as camserve archive makes it
        preprocessing=preprocessing_for(arch, model, size),
    )
    started = time.perf_counter()
    explainer = Explainer(model, [str(i) for i in range(1000)], config)
    load_s = time.perf_counter() - started
    image = Image.fromarray(
        torch.randint(0, 256, (size + 32, size + 48, 3), dtype=torch.uint8).numpy(), "RGB"
    )
    prepared = explainer.prepare_image(image)
    x = prepared.tensor[None]

    def plain() -> None:
        with torch.inference_mode():
            model(x)

    def explained() -> None:
        explainer.explain([prepared])

    load_before = os.getloadavg()[0]
    timings = interleaved({"plain": plain, "explained": explained}, repeats, warmup=2)
    report = explainer.compensation
    row = {
        "architecture": arch,
        "target_layer": explainer.config.target_layer,
        "compensable": report.compensable,
        "absorbing_layer": report.absorbing_layer,
        "worst_relative_change": report.worst_relative_change,
        "explained_ms_median": round(timings["explained"].median_s * 1000, 1),
        "plain_forward_ms_median": round(timings["plain"].median_s * 1000, 1),
        "ratio": round(timings["explained"].median_s / timings["plain"].median_s, 2),
        "timings": {name: stats.to_json() for name, stats in timings.items()},
        "explainer_load_s": round(load_s, 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if compare:
        row["pytorch_grad_cam"] = compare_with_pytorch_grad_cam(explainer, size)
    if profile:
        row["profile"] = profile_explained(explainer, prepared)
    return row


def profile_explained(explainer: Explainer, prepared, calls: int = 3) -> dict:
    """Where an explained image's time goes (torch.profiler, CPU): the share spent in the
    Grad-CAM backward (autograd's evaluate_function events, children included) and the
    operators with the most self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    explainer.explain([prepared])
    with torch_profile(activities=[ProfilerActivity.CPU]) as recorded:
        for _ in range(calls):
            explainer.explain([prepared])
    events = recorded.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    backward = sum(
        event.cpu_time_total
        for event in events
        if event.key.startswith("autograd::engine::evaluate_function")
    )
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:10]
    return {
        "calls": calls,
        "backward_share": round(backward / total, 3),
        "top_self_cpu": [
            {"op": event.key, "share": round(event.self_cpu_time_total / total, 3)} for event in top
        ],
    }


def compare_with_pytorch_grad_cam(explainer: Explainer, size: int, images: int = 8) -> dict:
    """Pearson correlation of camserve's map with pytorch-grad-cam's GradCAM, both at the
    input resolution, on random images, at the same layer and for the same class.

    pytorch-grad-cam gets the raw layer and the ``reshape_transform`` of its documentation
    (ViT: drop the class token and reshape the tokens; Swin: channels last to first). It
    upsamples with OpenCV and min-max scales each map: neither changes a Pearson
    correlation beyond interpolation differences."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = explainer.model
    layer = model.get_submodule(explainer.config.target_layer)
    wrapped = isinstance(layer, GridLayer)
    layer = layer.layer if wrapped else layer  # the raw layer inside camserve's grid wrapper

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 3:  # ViT: (N, 1 + h*w, C), as in its ViT example
            side = int((tensor.shape[1] - 1) ** 0.5)
            tensor = tensor[:, 1:, :].reshape(tensor.size(0), side, side, tensor.size(2))
        # As in its Swin example: (N, h, w, C) -> (N, C, h, w)
        return tensor.transpose(2, 3).transpose(1, 2)

    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(5))
    result = explainer.gradcam(x)
    ours = torch.nn.functional.interpolate(
        result.explained.grad_cam[:, None], size=(size, size), mode="bilinear", align_corners=False
    )[:, 0]
    transform = reshape_transform if wrapped else None
    with GradCAM(model=model, target_layers=[layer], reshape_transform=transform) as cam:
        theirs = cam(  # the model is frozen: the graph starts at the input
            input_tensor=x.clone().requires_grad_(True),
            targets=[ClassifierOutputTarget(int(t)) for t in result.explained.classes],
        )
    correlations = [
        float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])
        for a, b in zip(ours, torch.as_tensor(theirs), strict=True)
    ]
    return {
        "images": images,
        "layer": explainer.config.target_layer,
        "reshape_transform": "documented" if wrapped else "none",
        "pearson_min": round(min(correlations), 4),
        "pearson_median": round(sorted(correlations)[len(correlations) // 2], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--compare-grad-cam", nargs="*", default=[], metavar="ARCH",
        help="also correlate these architectures' maps with pytorch-grad-cam's",
    )  # fmt: skip
    parser.add_argument(
        "--profile", nargs="*", default=[], metavar="ARCH",
        help="also profile these architectures' explained images (torch.profiler)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for arch in args.arch:
        row = measure(
            arch, args.repeats, args.size, arch in args.compare_grad_cam, arch in args.profile
        )
        rows.append(row)
        print(
            f"{arch:20s} {row['target_layer']:14s} compensable={row['compensable']!s:5s} "
            f"explained {row['explained_ms_median']:8.1f} ms  "
            f"plain {row['plain_forward_ms_median']:8.1f} ms "
            f"(x{row['ratio']}, load {row['load_average_1min']})"
            + (f" pytorch-grad-cam {row['pytorch_grad_cam']}" if "pytorch_grad_cam" in row else ""),
            flush=True,
        )
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"{today}-architectures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.architectures "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "setup": {
            "weights": "random (torch.manual_seed(0))",
            "input": f"{args.size}x{args.size}, batch 1",
            "threads": args.threads,
            "repeats": args.repeats,
            "explained": "Explainer.explain: forward + Grad-CAM backward + zero-reference score",
            "plain": "model(x) under torch.inference_mode()",
            "note": "the machine is shared with other jobs: see load_average_1min per row",
        },
        "architectures": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
