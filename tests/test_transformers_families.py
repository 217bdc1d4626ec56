"""transformers families outside camserve's tables, through ``camserve archive --pretrained``.

One representative of each class the sweep (``python -m harness.sweep_transformers``) found:
token models whose head pools the final patch tokens (I-JEPA without a class token, CLIP with
one, SigLIP with an attention-pooling head the classifier does not read, PVTv2); BiT's final
normalisation and activation, the map its head pools, which the CNN rule passes over; token
models whose head reads the class token only (CvT and PVT, whose convolutions run inside the
attention); and the families refused in one line (a model that takes input_ids, a processor
that cuts patches itself, a timm model in transformers' wrapper, Hiera: the tokens its head
pools are no module's output, or are in its unrolled order).
Each archived one: the CLI's archive, unpacked and loaded as the handler loads it, two photos
explained, the map equal to Captum's LayerGradCam at the grid; then the oracle for the layer
itself: the classifier's input is the mean of the layer's patch tokens or map (pooled heads),
or the final sequence's patch tokens get no gradient while the chosen layer's do (class-token
heads). Tiny seeded random models at 64x64 (harness.sweep_transformers.build).
"""

from __future__ import annotations

import pytest
import torch

from camserve.sources.transformers import TransformersSource, learned_tokens
from harness.sweep_transformers import build, run_case
from tests.test_architectures import _one_thread  # noqa: F401 - autouse here too

# model_type -> (layer, layout, compensable)
POOLED = {
    "ijepa": ("ijepa.layernorm", "tokens", True),
    "clip": ("vision_model.encoder.layers.1", "cls_tokens", True),
    "siglip": ("vision_model.post_layernorm", "tokens", False),
    "pvt_v2": ("pvt_v2.encoder.layers.3.layer_norm", "tokens", True),
    # 64 final channels: its pooler's (N, 64, 1) output is no 8x8 grid of tokens
    "focalnet-64": ("focalnet.layernorm", "tokens", True),
    # a feature map: the pre-activation network's final GroupNorm and ReLU, which the CNN
    # rule (it needs a convolution) would pass over for the last stage
    "bit": ("bit.norm", "nchw", True),
}
CLASS_TOKEN = {
    "cvt": ("cvt.encoder.stages.2.layers.2.layernorm_before", "cls_tokens", False),
    "pvt": ("pvt.encoder.block.3.0.layer_norm_1", "cls_tokens", False),
}
# model_type -> what the one-line refusal says
REFUSED = {
    "imagegpt": "takes input_ids",
    "siglip2": "Siglip2ImageProcessor has no size",
    "timm_wrapper": "timm.models.save_for_hf(model.timm_model, folder)",
    # its blocks return tuples: the last sequence to finish is the MLP branch, not what the
    # head pools (the block's residual sum, which no module outputs)
    "hiera": "no single module outputs",
    # a stage after the first without query pooling: no layout reads its tokens as a grid
    "hiera-unrolled": "Hiera's unrolled order",
}
# cases that are a model_type with other config settings
VARIANTS = {
    "focalnet-64": ("focalnet", {"embed_dim": 32}),
    "hiera-unrolled": (
        "hiera",
        dict(depths=[1, 1, 1], num_heads=[1, 2, 4], num_query_pool=1),
    ),
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """model_type -> the sweep's row: archived (or refused) by the CLI, loaded, explained."""
    rows = {}

    def get(model_type: str):
        if model_type not in rows:
            family, settings = VARIANTS.get(model_type, (model_type, {}))
            rows[model_type] = run_case(model_type, family, settings, tmp_path_factory.mktemp("m"))
        return rows[model_type]

    return get


@pytest.mark.parametrize("model_type", [*POOLED, *CLASS_TOKEN])
def test_archived_explained_and_equal_to_captum(swept, model_type):
    layer, layout, compensable = {**POOLED, **CLASS_TOKEN}[model_type]
    row = swept(model_type)
    assert row.status == "archived", row.message
    assert (row.layer, row.layout, row.compensable) == (layer, layout, compensable)
    assert row.map_ok and row.score_ok
    assert row.captum_ok, row.captum_difference
    assert "preprocessing:" in row.preprocessing  # measured against the processor's own


def _run(model, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the layer's output, the classifier's input, the top logit) of one forward pass."""
    seen = {}
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3]
    handles = [
        model.get_submodule(layer).register_forward_hook(
            lambda module, inputs, output: seen.setdefault("layer", output)
        ),
        head[-1].register_forward_pre_hook(
            lambda module, inputs: seen.setdefault("head", inputs[0])
        ),
    ]
    try:
        logits = model(pixel_values=x).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen["layer"], seen["head"], logits.max(dim=1).values.sum()


@pytest.mark.parametrize("model_type", list(POOLED))
def test_the_head_averages_the_layers_patch_tokens(model_type):
    model, _ = build(*VARIANTS.get(model_type, (model_type, {})))
    layer = TransformersSource().target_layer(model)
    assert layer == POOLED[model_type][0]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output, head_input, _ = _run(model, layer, x)
    if output.dim() == 4:  # (N, C, h, w)
        mean = output.flatten(2).mean(dim=2)
    else:
        mean = output[:, learned_tokens(model) :].mean(dim=1)
    torch.testing.assert_close(head_input.flatten(1), mean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", list(CLASS_TOKEN))
def test_a_class_token_head_is_explained_where_the_patches_reach_it(model_type):
    """The final sequence (the last module output of the chosen layer's shape): only its class
    token reaches the head. At the chosen norm (the last block's attention input) the patch
    tokens get gradient."""
    model, _ = build(model_type, {})
    layer = TransformersSource().target_layer(model)
    assert layer == CLASS_TOKEN[model_type][0]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    sequences = []

    def keep(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 3:
            sequences.append(output)

    handles = [m.register_forward_hook(keep) for m in model.modules()]
    try:
        chosen, _, top = _run(model, layer, x)
    finally:
        for handle in handles:
            handle.remove()
    final = [output for output in sequences if output.shape == chosen.shape][-1]
    at_layer, at_final = torch.autograd.grad(top, [chosen, final])
    prefix = learned_tokens(model)
    assert prefix == 1
    assert bool(at_layer[:, prefix:].ne(0).any())
    assert not bool(at_final[:, prefix:].ne(0).any())
    assert bool(at_final[:, :prefix].ne(0).any())


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_refused_in_one_line(swept, model_type):
    row = swept(model_type)
    assert row.status == "refused", (row.status, row.message)  # exit 2, one line
    assert REFUSED[model_type] in row.message


def test_a_processor_for_another_size_is_refused_in_one_line(tmp_path, capfd):
    """PVT's position embeddings are for the config's 64x64: a 96x96 processor would fail in
    the model with the library's own words (a reshape); the archive says what disagrees."""
    import transformers

    from camserve.tools.cli import main as camserve

    model, _ = build("pvt", {})
    model.save_pretrained(tmp_path / "pvt")
    transformers.PvtImageProcessor(size={"height": 96, "width": 96}).save_pretrained(
        tmp_path / "pvt"
    )
    capfd.readouterr()  # save_pretrained's progress bar
    code = camserve(
        ["archive", "--pretrained", str(tmp_path / "pvt"), "--export-path", str(tmp_path)]
    )
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "does not run on its image processor's 96x96 output" in lines[0]
    assert "config.json says 64x64" in lines[0]
