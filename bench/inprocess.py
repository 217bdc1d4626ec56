"""In-process comparison at batch 1 and 8: plain forward, camserve, and the alternatives.

All candidates run interleaved in the same process on the same input tensor.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torchvision
from captum.attr import IntegratedGradients, LayerGradCam
from torch import nn

from bench.e2e import TARGET_LAYERS
from bench.timing import interleaved
from camserve.encode_json import explanation_json
from camserve.explainer import Explainer, ExplainerConfig, PreparedImage
from camserve.preprocess import Preprocessing
from camserve.request import ParsedRequest, RequestOptions

SHAPES_DIR = "models/shapes"
SHAPES_MULTI_DIR = "models/shapes-multi"


def torchvision_explainer(arch: str) -> Explainer:
    """A torchvision ImageNet classifier with random weights (``torch.manual_seed(0)``)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    labels = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    config = ExplainerConfig(
        architecture=arch,
        weights="",
        target_layer=TARGET_LAYERS[arch],
        preprocessing=Preprocessing(input_size=(224, 224)),
        topk=5,
    )
    return Explainer(model, list(labels), config)


def explainers(names: list[str]) -> dict[str, Explainer]:
    return {
        name: Explainer.from_directory(SHAPES_DIR)
        if name == "shapes"
        else torchvision_explainer(name)
        for name in names
    }


def prepared_batch(
    explainer: Explainer, batch: int, seed: int = 0, options: RequestOptions | None = None
) -> list[PreparedImage]:
    size = explainer.config.preprocessing.input_size
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    options = options or RequestOptions()
    return [
        PreparedImage(
            tensor=x[i],
            options=options,
            requested_class=None,
            topk=explainer.config.topk,
        )
        for i in range(batch)
    ]


def plain_prediction(explainer: Explainer, prepared: list[PreparedImage]) -> Callable[[], object]:
    """The baseline: what the plain handler (bench/plain_handler.py) does from preprocessed
    images to its answer: stack the batch, an ``inference_mode`` forward, softmax, top-k and one
    transfer to the CPU. ``Explainer.explain`` does the same around Grad-CAM and the score, so
    the ratio is the cost of the explanation alone."""
    model, device = explainer.model, explainer.device
    k = min(explainer.config.topk, len(explainer.labels))

    def run():
        with torch.inference_mode():
            x = torch.stack([item.tensor for item in prepared]).to(device)
            top = model(x).softmax(dim=1).topk(k)
            return top.values.cpu(), top.indices.cpu()

    return run


def candidates(explainer: Explainer, batch: int, with_slow: bool = True) -> dict:
    prepared = prepared_batch(explainer, batch)
    prepared_top3 = prepared_batch(explainer, batch, options=RequestOptions(maps=3))
    x = torch.stack([p.tensor for p in prepared])
    frozen = explainer.model
    layer_name = explainer.config.target_layer
    trainable = copy.deepcopy(frozen).eval()
    for parameter in trainable.parameters():
        parameter.requires_grad_(True)
    trainable_layer = trainable.get_submodule(layer_name)
    naive_captum = LayerGradCam(trainable, trainable_layer)

    plain = plain_prediction(explainer, prepared)

    def ours():
        return explainer.explain(prepared)

    def ours_top3():
        return explainer.explain(prepared_top3)

    def captum_naive():
        with torch.no_grad():
            targets = trainable(x).argmax(dim=1).tolist()
        return naive_captum.attribute(x, target=targets, relu_attributions=True)

    runs = {
        "plain": plain,
        "camserve": ours,
        "camserve_top3": ours_top3,
        "captum_naive": captum_naive,
    }
    if with_slow:
        from pytorch_grad_cam import GradCAM

        grad_cam_package = GradCAM(model=trainable, target_layers=[trainable_layer])
        runs["grad_cam_package"] = lambda: grad_cam_package(input_tensor=x, targets=None)
        runs["torchserve_ig"] = _torchserve_integrated_gradients(trainable, x)
    return runs


def multi_label_candidates(batch: int) -> tuple[dict, dict]:
    """``shapes-multi`` on held-out images of 1 to 3 shapes: a plain sigmoid prediction,
    camserve explaining every present label (its default), and the same network served as a
    single-label model with ``maps`` = the batch's largest number of present labels, what
    explaining them cost before multi-label heads (``maps`` sets the batch's backward passes).
    Returns the candidates and what the batch held."""
    from harness.shapes.dataset import HELD_OUT_SEED, render_multi_sample

    explainer = Explainer.from_directory(SHAPES_MULTI_DIR)
    images = [render_multi_sample(HELD_OUT_SEED, i).image for i in range(batch)]
    prepared = [explainer.prepare_image(image) for image in images]
    present = [1 + len(result.more) for result in explainer.explain(prepared)]
    single_config = replace(explainer.config, multi_label=False, label_thresholds=None)
    single = Explainer(
        explainer.model, explainer.labels, single_config, explainer.calibration,
        explainer.compensation, name="shapes-multi-as-softmax",
    )  # fmt: skip
    options = RequestOptions(maps=max(present))
    as_maps = [single.prepare_image(image, options) for image in images]
    model, k = explainer.model, min(explainer.config.topk, len(explainer.labels))

    def plain():
        with torch.inference_mode():
            x = torch.stack([item.tensor for item in prepared])
            top = model(x).sigmoid().topk(k)
            return top.values.cpu(), top.indices.cpu()

    runs = {
        "plain": plain,
        "camserve": lambda: explainer.explain(prepared),
        "camserve_maps_present": lambda: single.explain(as_maps),
    }
    return runs, {"maps_per_image": present, "maps_option": max(present)}


def _torchserve_integrated_gradients(model: nn.Module, x: torch.Tensor):
    """TorchServe's own explain path: VisionHandler.get_insights (Captum IG, 15 steps)."""
    from ts.torch_handler.vision_handler import VisionHandler

    handler = VisionHandler()
    handler.model = model
    handler.ig = IntegratedGradients(model)

    def run():
        with contextlib.redirect_stdout(io.StringIO()):  # get_insights prints the shape
            return handler.get_insights(x, None, target=0)

    return run


def encode_share(explainer: Explainer, image_bytes: bytes, repeats: int = 30) -> dict:
    """Share of a batch-1 request's in-process time spent encoding the response, for plain
    JSON and for JSON with the PNG images."""
    shares = {}
    for images in (False, True):
        request = ParsedRequest(image_bytes, RequestOptions(images=images))
        totals, encodes = [], []
        for _ in range(repeats + 3):
            start = time.perf_counter()
            [result] = explainer.explain([explainer.prepare(request)])
            middle = time.perf_counter()
            body = explanation_json(result)
            json.dumps(body, separators=(",", ":"))
            end = time.perf_counter()
            totals.append(end - start)
            encodes.append(end - middle)
        total, encode = statistics.median(totals[3:]), statistics.median(encodes[3:])
        shares["with_png" if images else "json_only"] = {
            "encode_median_s": round(encode, 6),
            "request_median_s": round(total, 6),
            "encode_share": round(encode / total, 4),
        }
    return shares


def photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A smooth synthetic 12 MP photo, JPEG-encoded."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(np.sin(x / 200) + 1) * 127, (np.cos(y / 150) + 1) * 127, (x + y) % 255], axis=-1
    ).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode_speed(repeats: int = 7) -> dict:
    """Decode + preprocess of a 12 MP JPEG for a 224 network: full decode (what camserve's
    prepare() does) vs reduced-scale JPEG decoding (``min_side``, which it no longer uses:
    bench/jpeg_draft.py measures how far that moves the answer)."""
    from camserve.decode import decode_image

    data = photo_jpeg()
    preprocessing = Preprocessing(input_size=(224, 224), resize=256, center_crop=(224, 224))
    side = preprocessing.resize  # the shorter side the resize needs
    stats = interleaved(
        {
            "full_decode": lambda: preprocessing(decode_image(data)),
            "reduced_scale_decode": lambda: preprocessing(decode_image(data, min_side=side)),
        },
        repeats=repeats,
        warmup=1,
    )
    full = stats["full_decode"].median_s
    return {
        "image": "4000x3000 JPEG, quality 90",
        "stats": {k: v.to_json() for k, v in stats.items()},
        "ratio_to_full": {k: round(v.median_s / full, 3) for k, v in stats.items()},
    }


def run(models: list[str], batches: list[int], repeats: int, with_slow: bool = True) -> dict:
    results = {}
    for name, explainer in explainers(models).items():
        for batch in batches:
            stats = interleaved(
                candidates(explainer, batch, with_slow),
                repeats=repeats,
                slow_repeats={"torchserve_ig": max(2, repeats // 5)},
                # IG at batch 8 takes ~30 s a call: leave room for every fast round.
                budget_s=300.0,
            )
            results[f"{name}/batch{batch}"] = _ratios(stats)
    return results


def run_multi_label(batch: int, repeats: int) -> dict:
    """``multi_label_candidates`` timed interleaved, as ``run`` times the others."""
    runs, batch_info = multi_label_candidates(batch)
    result = _ratios(interleaved(runs, repeats=repeats, budget_s=300.0))
    camserve, maps = (result["stats"][k]["median_s"] for k in ("camserve", "camserve_maps_present"))
    return {**result, **batch_info, "ratio_to_maps_present": round(camserve / maps, 3)}


def _ratios(stats: dict) -> dict:
    plain = stats["plain"].median_s
    return {
        "stats": {k: v.to_json() for k, v in stats.items()},
        "ratio_to_plain": {k: round(v.median_s / plain, 3) for k, v in stats.items()},
    }
