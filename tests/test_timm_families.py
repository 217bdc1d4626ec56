"""timm families beyond ResNet, ConvNeXt and ViT: one model of each class of layer rule.

``harness.sweep_timm`` archives and explains one model of every timm family; these are the
families whose rule it made camserve learn (docs/bring-your-own-model.md, "timm families
checked"). Each is built small (fewer blocks where the constructor allows, 64x64 input),
with seeded random weights, and checked for: the layer and layout camserve picks, the map
against Captum's LayerGradCam at the grid and against Grad-CAM read by hand from the raw
layer, and the grid against timm's own (N, C, h, w) map (``forward_intermediates`` for a
``feature_info`` module, ``forward_features`` for the map the head reads). Then the archive
path for a model with shared tensors, and the one-line refusals.
"""

from __future__ import annotations

import pytest
import timm
import torch
from captum.attr import LayerGradCam
from safetensors.torch import save_model

from camserve.explainer import Explainer, ExplainerConfig
from camserve.layers import check_target_layer
from camserve.sources.timm import TimmSource, feature_layers
from camserve.tools.cli import main as camserve
from tests.library_models import LABELS
from tests.oracles import hand_grad_cam
from tests.test_architectures import _one_thread  # noqa: F401 - autouse here too

SIZE = 64
# name -> (constructor arguments that shrink it, the layer, its layout, why it is here)
FAMILIES = {
    # num_prefix_tokens says 1, but the class token joins after the layer (class attention)
    "cait_xxs24_224": ({"depth": 2}, "blocks.1", "tokens"),
    # feature_info names a ModuleList; a class token without num_prefix_tokens; after the
    # last block only the class token reaches the head: the block's norm1
    "coat_lite_tiny": ({}, "serial_blocks4.1.norm1", "cls_tokens"),
    # the last stage returns a tuple (map, class tokens): its last block's norm1
    "pit_ti_224": ({}, "transformers.2.blocks.3.norm1", "cls_tokens"),
    # channels last without output_fmt: feature_info's num_chs is the last axis
    "volo_d1_224": ({}, "network.4", "nhwc"),
    # forward_features ends after feature_info's last module: its last convolution and norm
    "test_efficientnet": ({}, "bn2", "nchw"),
    # forward_features returns the final norm's channels-last map (output_fmt NHWC)
    "swin_tiny_patch4_window7_224": (
        {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1), "window_size": 2},
        "norm",
        "nhwc",
    ),
    # feature_info misspells the module ("block.3" for "blocks.3"), a ModuleList (two
    # blocks: after the first, a position convolution follows)
    "twins_svt_small": ({"depths": (1, 1, 1, 2)}, "blocks.3.1", "tokens"),
}


def _model(name: str) -> torch.nn.Module:
    kwargs = FAMILIES[name][0]
    torch.manual_seed(0)
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=len(LABELS),
        pretrained_cfg_overlay={"input_size": (3, SIZE, SIZE)},
        **kwargs,
    ).eval()
    return model


@pytest.fixture(scope="module")
def explainers():
    cache: dict[str, Explainer] = {}

    def get(name: str) -> Explainer:
        if name not in cache:
            model = _model(name)
            config = ExplainerConfig(
                architecture=f"timm:{name}",
                weights="unused",
                target_layer=TimmSource().target_layer(model),
                preprocessing=TimmSource().preprocessing(model),
            )
            cache[name] = Explainer(model, LABELS, config)
        return cache[name]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_and_layout(explainers, name):
    _, layer, layout = FAMILIES[name]
    explainer = explainers(name)
    assert explainer.config.target_layer == layer
    assert check_target_layer(_model(name), layer, (SIZE, SIZE)) == layout
    assert explainer.gradcam.layer_name == (layer if layout == "nchw" else f"{layer}.grid")


@pytest.mark.parametrize("name", FAMILIES)
def test_map_equals_captum_and_grad_cam_by_hand(explainers, name):
    _, layer, layout = FAMILIES[name]
    explainer = explainers(name)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    result = explainer.gradcam(x)
    ours = result.explained.grad_cam
    assert ours.sum() > 0 and bool(ours.isfinite().all())
    tap = explainer.model.get_submodule(explainer.gradcam.layer_name)
    captum = LayerGradCam(explainer.model, tap).attribute(
        x, target=result.explained.classes, relu_attributions=True
    )[:, 0]
    by_hand = hand_grad_cam(explainer.model, layer, layout, x, result.explained.classes)
    for oracle in (captum, by_hand):
        scale = oracle.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(ours / scale, oracle / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "name", [n for n, (_, layer, _) in FAMILIES.items() if "norm1" not in layer]
)
def test_grid_equals_timms_own_feature_map(explainers, name):
    """timm's own code turns the map into (N, C, h, w): forward_intermediates reorders a
    feature_info module's tokens or channels, forward_features returns what the head reads.
    The grid camserve explains must be that map, position for position."""
    _, layer, layout = FAMILIES[name]
    explainer = explainers(name)
    model = explainer.model
    seen = []
    tap = model.get_submodule(explainer.gradcam.layer_name)
    handle = tap.register_forward_hook(lambda module, inputs, output: seen.append(output))
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            if layer == feature_layers(model)[0]:
                theirs = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
            else:
                theirs = model.forward_features(x)
                theirs = theirs.permute(0, 3, 1, 2) if layout == "nhwc" else theirs
    finally:
        handle.remove()
    torch.testing.assert_close(seen[-1], theirs)


def _weights(name: str, folder, **kwargs) -> str:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=len(LABELS), **kwargs)
    path = folder / f"{name}.safetensors"
    save_model(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return str(path)


def test_shared_tensors_archive_and_serve(tmp_path, labels_file, capsys):
    """CoaT shares its position encodings between blocks: safetensors' save_model stores
    them once, and the archive and the worker fill in the other names."""
    weights = _weights("coat_lite_tiny", tmp_path)
    from safetensors import safe_open

    with safe_open(weights, "pt") as stored:
        assert len(list(stored.keys())) < len(_model("coat_lite_tiny").state_dict())
    from camserve.tools.archive import write_model_dir

    summary = write_model_dir(
        tmp_path / "model",
        weights=weights,
        architecture="timm:coat_lite_tiny",
        labels=labels_file,
        data_config={"input_size": (SIZE, SIZE)},
    )
    assert summary.target_layer == "serial_blocks4.1.norm1"
    explainer = Explainer.from_directory(tmp_path / "model")
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    assert explainer.gradcam(x).explained.grad_cam.sum() > 0


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        # its last stage returns a list, one tensor per branch: no layer to pick
        ("crossvit_tiny_240", [], "--target-layer"),
        # attention biases for a 7x7 last stage: it does not run at 64x64
        ("efficientformer_l1", ["--input-size", "64"], "does not run at input size 64x64"),
        # attention biases sized by the input: the weights fit 224x224 only
        ("levit_128s", ["--input-size", "64"], "default input size 224x224"),
    ],
)
def test_refused_in_one_line(tmp_path, labels_file, capsys, name, options, expected):
    weights = _weights(name, tmp_path)
    argv = ["archive", "--arch", f"timm:{name}", "--weights", weights, "--labels", labels_file]
    status = camserve([*argv, *options, "--export-path", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert expected in err
