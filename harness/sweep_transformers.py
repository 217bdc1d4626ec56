"""Every transformers image-classification family through ``camserve archive --pretrained``.

python -m harness.sweep_transformers [--only vit,cvt] [--json sweep.json]

For each ``model_type`` of transformers' ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` (and
two multi-label folders): a tiny seeded random model from its config class, with the family's
default image processor (the torchvision variant where there is one) at 64 px where it allows,
both saved with ``save_pretrained``; then the CLI's own ``archive --pretrained`` in process,
the archive unpacked and loaded as the handler loads it (``Explainer.from_directory``), two
photos explained, and the map compared with Captum's ``LayerGradCam`` at the grid. One row per
family: archived or refused (exit 2 and one line), layer, layout, compensable, the checks.
Development only: random weights, CPU; the docs' table comes from its output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import tempfile
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

LABELS = ["cat", "dog", "bird"]
SIDE = 64
VIT = dict(
    image_size=SIDE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64,
)  # fmt: skip
TOWER = dict(VIT, projection_dim=32)  # CLIP-like vision towers
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
SWIN = dict(
    image_size=SIDE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
)
FOUR_STAGES = dict(
    hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1]
)
CONV = dict(hidden_sizes=[16, 32], depths=[1, 1])

# model_type -> the config's tiny settings (besides the labels).
CONFIGS: dict[str, dict] = {
    "beit": dict(VIT, use_relative_position_bias=True),
    "bit": dict(embedding_size=16, num_groups=4, **CONV),
    "clip": dict(vision_config=TOWER, text_config=TEXT),
    "convnext": dict(num_stages=2, **CONV),
    "convnextv2": dict(num_stages=2, **CONV),
    # transformers indexes a stage's drop-path rates by the stage: depth[i] > i
    "cvt": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3]),
    "data2vec-vision": VIT,
    "deit": VIT,
    "dinat": dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3),
    "dinov2": {k: v for k, v in VIT.items() if k != "intermediate_size"} | {"mlp_ratio": 2},
    "dinov2_with_registers": {k: v for k, v in VIT.items() if k != "intermediate_size"}
    | {"mlp_ratio": 2, "num_register_tokens": 4},
    "donut-swin": SWIN,
    "efficientnet": dict(
        image_size=SIDE, width_coefficient=0.25, depth_coefficient=0.1, hidden_dim=320
    ),
    "focalnet": dict(image_size=SIDE, embed_dim=16, depths=[1, 1], hidden_sizes=[32, 64]),
    "hgnet_v2": dict(
        embedding_size=8,
        depths=[1, 1],
        hidden_sizes=[16, 32],
        stem_channels=[3, 8, 8],
        stage_in_channels=[8, 16],
        stage_mid_channels=[8, 8],
        stage_out_channels=[16, 32],
        stage_num_blocks=[1, 1],
        stage_downsample=[False, True],
        stage_downsample_strides=[2, 2],
        stage_light_block=[False, True],
        stage_kernel_size=[3, 3],
        stage_numb_of_layers=[2, 2],
    ),  # fmt: skip
    "hiera": dict(
        image_size=[SIDE, SIDE],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        num_query_pool=1,
        masked_unit_size=[8, 8],
    ),  # fmt: skip
    "ijepa": VIT,
    "imagegpt": dict(n_embd=32, n_layer=2, n_head=2, n_positions=32 * 32),
    "levit": dict(
        image_size=SIDE,
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 3],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
    ),  # fmt: skip
    "metaclip_2": dict(vision_config=TOWER, text_config=TEXT),
    "mobilenet_v1": dict(image_size=SIDE, depth_multiplier=0.25),
    "mobilenet_v2": dict(image_size=SIDE, depth_multiplier=0.35),
    "mobilevit": dict(
        image_size=SIDE, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32]
    ),
    "mobilevitv2": dict(image_size=SIDE, width_multiplier=0.25),
    "perceiver": dict(
        num_latents=8,
        d_latents=32,
        d_model=32,
        num_self_attends_per_block=1,
        num_self_attention_heads=1,
        num_cross_attention_heads=1,
        image_size=SIDE,
    ),  # fmt: skip
    "poolformer": dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    "pp_lcnet": dict(scale=0.25),
    "pvt": dict(image_size=SIDE, num_labels=len(LABELS), **FOUR_STAGES),
    "pvt_v2": dict(image_size=[SIDE, SIDE], **FOUR_STAGES),
    "regnet": dict(embedding_size=16, groups_width=8, **CONV),
    "resnet": dict(embedding_size=16, layer_type="basic", **CONV),
    "segformer": dict(decoder_hidden_size=32, **FOUR_STAGES),
    "shieldgemma2": dict(
        vision_config=dict(TOWER, image_size=SIDE),
        text_config=dict(TEXT, num_key_value_heads=1, head_dim=16),
        mm_tokens_per_image=4,
    ),
    "siglip": dict(vision_config=TOWER, text_config=TEXT),
    "siglip2": dict(vision_config=dict(TOWER, num_patches=16), text_config=TEXT),
    "swiftformer": dict(image_size=SIDE, depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32]),
    "swin": SWIN,
    "swinv2": SWIN,
    "textnet": dict(image_size=[SIDE, SIDE], stem_out_channels=8, hidden_sizes=[8, 8, 16, 16, 32]),
    "timm_wrapper": dict(architecture="resnet18"),
    "vit": VIT,
    "vit_msn": VIT,
}
# Families without a processor in IMAGE_PROCESSOR_MAPPING_NAMES: their checkpoints' class.
PROCESSORS = {"dinov2_with_registers": "BitImageProcessor", "hgnet_v2": "BitImageProcessor"}
# Extra cases: (name, model_type, config additions)
MULTI_LABEL = {"problem_type": "multi_label_classification"}
EXTRA = [
    ("resnet+multi-label", "resnet", MULTI_LABEL),
    ("vit+multi-label", "vit", MULTI_LABEL),
    # 64 final channels: its pooler's (N, 64, 1) output would read as an 8x8 grid of tokens
    ("focalnet-64", "focalnet", {"embed_dim": 32}),
    # the mapping's second class: the mean of the class and distillation heads
    ("deit+teacher", "deit", {"model_class": "DeiTForImageClassificationWithTeacher"}),
    # a stage after the first without query pooling: Hiera's tokens stay unrolled
    ("hiera-unrolled", "hiera", dict(depths=[1, 1, 1], num_heads=[1, 2, 4], num_query_pool=1)),
]
# Logits below this (peak absolute) are the library initialisation fading out: re-initialised.
FADED_LOGITS = 1e-4
MAP_TOLERANCE = 1e-5


@dataclass
class Row:
    case: str
    model_type: str
    model_class: str = ""
    processor: str = ""
    status: str = ""  # archived | refused | build failed | TRACEBACK | failed: ...
    message: str = ""
    layer: str = ""
    layout: str = ""
    compensable: bool | None = None
    preprocessing: str = ""
    map_ok: bool | None = None
    captum_ok: bool | None = None
    captum_difference: float | None = None
    score_ok: bool | None = None
    reinitialised: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def build(model_type: str, extra: dict):
    """(model, processor) of a tiny seeded configuration of ``model_type``."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
    extra = dict(extra)
    class_name = extra.pop("model_class", None) or (names if isinstance(names, str) else names[0])
    labels = {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    config = CONFIG_MAPPING[model_type](**(CONFIGS.get(model_type, {}) | labels | extra))
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    processors = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or {}
    processor_name = (
        PROCESSORS.get(model_type) or processors.get("torchvision") or processors.get("pil")
    )
    if model_type == "timm_wrapper":  # its processor is timm's data config
        import timm

        cfg = timm.models.get_pretrained_cfg(config.architecture).to_dict()
        cfg.update(input_size=(3, SIDE, SIDE), test_input_size=None)
        return model, transformers.TimmWrapperImageProcessor(pretrained_cfg=cfg)
    return model, small_processor(getattr(transformers, processor_name))


def small_processor(processor_class):
    """The processor class at 64 px: its own size rule, scaled down."""
    default = processor_class()
    kwargs: dict = {}
    size = dict(getattr(default, "size", None) or {})
    crop_pct = getattr(default, "crop_pct", None)
    if size.get("height"):
        kwargs["size"] = {"height": SIDE, "width": SIDE}
    elif size.get("shortest_edge"):
        kwargs["size"] = {"shortest_edge": SIDE if crop_pct else 73}
    if getattr(default, "crop_size", None):
        kwargs["crop_size"] = {"height": SIDE, "width": SIDE}
    try:
        return processor_class(**kwargs)
    except (TypeError, ValueError):
        return default


def reinitialise_if_faded(model) -> bool:
    """Kaiming re-initialisation (tests.library_models._fan_in) when the library's own
    initialisation gives logits that vanish; True when it was needed."""
    from tests.library_models import _fan_in

    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            logits = model(pixel_values=x).logits
    except Exception:  # noqa: BLE001 - the archive step reports what fails
        return False
    if float(logits.abs().max()) >= FADED_LOGITS:
        return False
    _fan_in(model)
    return True


def one_line(text: str) -> str:
    return " / ".join(line for line in text.strip().splitlines() if line.strip())


def run_case(case: str, model_type: str, extra: dict, work: Path) -> Row:
    from camserve.explainer import Explainer
    from camserve.grid import NCHW, GridLayer
    from camserve.request import ParsedRequest, RequestOptions
    from camserve.tools.cli import main as camserve
    from tests.library_models import jpeg_bytes, photos

    row = Row(case, model_type)
    started = time.perf_counter()
    folder, store, unpacked = work / "folder", work / "store", work / "unpacked"
    try:
        model, processor = build(model_type, extra)
        row.reinitialised = reinitialise_if_faded(model)
        row.model_class, row.processor = type(model).__name__, type(processor).__name__
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a sweep records and goes on
        row.status, row.message = "build failed", f"{type(err).__name__}: {one_line(str(err))}"
        row.seconds = time.perf_counter() - started
        return row
    out, errors = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errors):
            code = camserve(
                ["archive", "--pretrained", str(folder), "--name", "m", "--export-path", str(store)]
            )
    except BaseException:  # noqa: BLE001 - what the user would see as a traceback
        row.status, row.message = "TRACEBACK", one_line(traceback.format_exc().splitlines()[-1])
        row.notes.append(traceback.format_exc())
        row.seconds = time.perf_counter() - started
        return row
    printed = errors.getvalue().strip()
    if code != 0:
        row.status = "refused" if code == 2 and len(printed.splitlines()) == 1 else "BAD REFUSAL"
        row.message = f"exit {code}: {printed}"
        row.seconds = time.perf_counter() - started
        return row
    summary = out.getvalue()
    row.preprocessing = next(
        (line.strip() for line in summary.splitlines() if "preprocessing:" in line), ""
    )
    try:
        with zipfile.ZipFile(store / "m.mar") as archive:
            archive.extractall(unpacked)
        explainer = Explainer.from_directory(unpacked)
        layer = explainer.config.target_layer
        wrapped = explainer.model.get_submodule(layer)
        row.layer = layer
        row.layout = wrapped.layout if isinstance(wrapped, GridLayer) else NCHW
        row.compensable = explainer.compensation.compensable
        check_explanations(explainer, row, photos, jpeg_bytes, ParsedRequest, RequestOptions)
        row.status = "archived"
    except Exception as err:  # noqa: BLE001
        row.status = "TRACEBACK"
        row.message = f"after archiving: {type(err).__name__}: {one_line(str(err))}"
        row.notes.append(traceback.format_exc())
    row.seconds = time.perf_counter() - started
    return row


def check_explanations(explainer, row: Row, photos, jpeg_bytes, ParsedRequest, RequestOptions):
    from captum.attr import LayerGradCam

    tap = explainer.model.get_submodule(explainer.gradcam.layer_name)
    row.map_ok = row.captum_ok = row.score_ok = True
    worst = 0.0
    for image in list(photos().values())[:2]:
        prepared = explainer.prepare(ParsedRequest(jpeg_bytes(image), RequestOptions()))
        [ours] = explainer.explain([prepared])
        grad_cam = ours.explained.grad_cam
        finite = bool(torch.isfinite(ours.explained.signed_map).all())
        row.map_ok &= finite and bool(grad_cam.abs().sum() > 0)
        captum = (
            LayerGradCam(explainer.model, tap)
            .attribute(
                ours.image.tensor[None], target=ours.explained.index, relu_attributions=True
            )[0, 0]
            .detach()
        )
        scale = float(captum.max().clamp_min(1e-30))
        difference = float((grad_cam - captum).abs().max()) / scale
        worst = max(worst, difference if math.isfinite(difference) else math.inf)
        score = ours.explained.zero_reference.score
        row.score_ok &= math.isfinite(score) and 0.0 <= score <= 1.0
    row.captum_difference = worst
    row.captum_ok = worst <= MAP_TOLERANCE


def cases(only: set[str] | None):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    everything = [(t, t, {}) for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES] + EXTRA
    return [c for c in everything if only is None or c[0] in only or c[1] in only]


def verdict(row: Row) -> str:
    if row.status != "archived":
        return row.status
    failed = [
        name
        for name, ok in (("map", row.map_ok), ("captum", row.captum_ok), ("score", row.score_ok))
        if not ok
    ]
    return "archived" + (f" BUT {', '.join(failed)} FAILED" if failed else "")


def summary_line(row: Row, width: int = 24) -> str:
    """The printed line of a row: the case, the verdict, the time, the layer or the refusal."""
    detail = (
        f"{row.layer} {row.layout} compensable={row.compensable} "
        f"captum={row.captum_difference:.1e} {row.preprocessing}"
        if row.status == "archived"
        else row.message
    )
    return f"{row.case:{width}} {verdict(row):28} {row.seconds:5.1f}s  {detail}".rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated cases or model types")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--tracebacks", action="store_true", help="print them")
    parser.add_argument("--markdown", action="store_true", help="then the docs' table")
    args = parser.parse_args(argv)
    import logging

    from transformers.utils import logging as hf_logging

    logging.disable(logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for case, model_type, extra in cases(only):
        with tempfile.TemporaryDirectory(prefix="camserve-sweep-") as work:
            row = run_case(case, model_type, extra, Path(work))
        rows.append(row)
        print(summary_line(row), flush=True)
        if args.tracebacks and row.notes:
            print(row.notes[-1])
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if args.markdown:
        print("\n".join(markdown(rows)))
    return 0


def markdown(rows: list[Row]) -> list[str]:
    """The docs' table: one row per case, the layer or why it was refused."""
    lines = [
        "| model_type | class | layer | layout | compensable | checks |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.status == "archived":
            checks = "map, Captum, score" if verdict(row) == "archived" else verdict(row)
            cells = [f"`{row.layer}`", row.layout, "yes" if row.compensable else "no", checks]
        else:
            why = row.message.removeprefix("exit 2: camserve archive: error: ")
            why = why.replace(str(Path(tempfile.gettempdir())), "<tmp>").replace("|", "\\|")
            cells = [f"{row.status}: {why}", "", "", ""]
        name = row.case.replace("+", " + ")
        lines.append(f"| {name} | {row.model_class or '-'} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
