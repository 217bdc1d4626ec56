"""Transformers: Swin, ViT and MaxViT with random weights, read through their (N, C, h, w) grid.

For each architecture: the automatic target layer and its layout, Captum equality of the map
(at the grid tap, and against Grad-CAM computed by hand from the layer's raw output), the
load-time probe's answer, and the compensated-network oracle where it answers true. Then the
refusals: layouts that cannot be read, the ViT layer after which only the class token
reaches the head, input sizes other than the trained one; and a custom transformer.
"""

from __future__ import annotations

import zipfile
from dataclasses import replace

import pytest
import torch
import torchvision
import yaml
from captum.attr import LayerGradCam
from torch import nn

from camserve.architectures import build_model
from camserve.compensation import RELATIVE_TOLERANCE, probe_compensable
from camserve.explainer import Explainer, ExplainerConfig
from camserve.gradcam import GradCam
from camserve.grid import CLS_TOKENS, NCHW, NHWC, GridLayer, attach_target, grid_tap
from camserve.layers import auto_target_layer, check_target_layer
from camserve.tools.archive import make_preprocessing, write_model_dir
from camserve.tools.cli import main as camserve
from tests.oracles import hand_grad_cam, oracle
from tests.test_architectures import _one_thread  # noqa: F401 - autouse here too

VIT_LAST = "encoder.layers.encoder_layer_11"

# architecture -> (constructor options, input side, automatic layer, layout, compensable)
EXPECTED = {
    "swin_t": ({}, 64, "norm", NHWC, True),
    "swin_s": ({}, 64, "norm", NHWC, True),
    "swin_v2_t": ({}, 64, "norm", NHWC, True),
    "vit_b_16": ({"image_size": 64}, 64, f"{VIT_LAST}.ln_1", CLS_TOKENS, False),
    "vit_b_32": ({"image_size": 64}, 64, f"{VIT_LAST}.ln_1", CLS_TOKENS, False),
    # MaxViT's partitions need stage sizes divisible by 7: 224 is its smallest input.
    "maxvit_t": ({}, 224, "blocks.3", NCHW, False),
}
# architecture -> (grid side, channels) of the map at that input
GRID = {"vit_b_16": (4, 768), "maxvit_t": (7, 512)}  # the others: (2, 768)
ARCHITECTURES = list(EXPECTED)
COMPENSABLE = [arch for arch, expected in EXPECTED.items() if expected[-1]]


def random_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, **EXPECTED[arch][0]).eval()
    if hasattr(model, "heads"):
        # torchvision initialises ViT's head to zero: every gradient would be zero.
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.fixture(scope="session")
def transformers():
    """One random-weight instance per architecture, shared by this module's tests."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            cache[arch] = random_model(arch)
        return cache[arch]

    yield get
    cache.clear()


def size(arch: str) -> tuple[int, int]:
    return (EXPECTED[arch][1],) * 2


def inputs(arch: str, count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, *size(arch), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_target_layer_and_layout(transformers, arch):
    _, _, layer, layout, _ = EXPECTED[arch]
    model = transformers(arch)
    assert auto_target_layer(model, size(arch)) == layer
    assert check_target_layer(model, layer, size(arch)) == layout


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_map_equals_captum(transformers, arch):
    _, _, layer, layout, _ = EXPECTED[arch]
    model = transformers(arch)
    tap = attach_target(model, layer, size(arch))
    assert tap == (layer if layout == NCHW else f"{layer}.grid")
    x = inputs(arch, 2, seed=1)
    result = GradCam(model, tap)(x)
    captum = LayerGradCam(model, model.get_submodule(tap))
    expected = captum.attribute(
        x, target=result.explained.classes.tolist(), relu_attributions=True
    )[:, 0]
    side, channels = GRID.get(arch, (2, 768))
    assert result.explained.grad_cam.shape == expected.shape == (2, side, side)
    assert result.explained.alpha.shape == (2, channels)
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(
        result.explained.grad_cam / scale, expected / scale, atol=1e-5, rtol=0
    )
    by_hand = hand_grad_cam(model, layer, layout, x, result.explained.classes)
    torch.testing.assert_close(
        result.explained.grad_cam / scale, by_hand / scale, atol=1e-5, rtol=0
    )
    assert result.explained.grad_cam.sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_probe_answer(transformers, arch):
    *_, layer, _, compensable = EXPECTED[arch]
    report = probe_compensable(transformers(arch), layer, size(arch))
    assert report.compensable is compensable, report
    if compensable:
        assert report.absorbing_layer == "head"
        assert report.worst_relative_change <= RELATIVE_TOLERANCE
    else:
        # Far from the tolerance, not a rounding accident.
        assert report.worst_relative_change > 10 * RELATIVE_TOLERANCE, report
    if arch.startswith("vit"):
        # The next affine layer is the attention's input projection; its bias cannot absorb
        # a shift of the patch tokens that spares the class token.
        assert report.absorbing_layer == f"{VIT_LAST}.self_attention"


@pytest.mark.parametrize("arch", COMPENSABLE)
def test_compensated_network_oracle(transformers, arch):
    model = transformers(arch)
    tap = attach_target(model, EXPECTED[arch][2], size(arch))
    reported = oracle(model, tap, inputs(arch, 1, seed=3))
    assert reported.reference == "image_mean" and reported.offset != 0.0


def test_swin_probe_shifts_channels_not_rows(transformers):
    """The issue's failure: Swin's ``features`` read with dimension 1 as the channels gave a
    7x768 "map" and a probe that shifted rows, which the LayerNorm removed."""
    model = transformers("swin_t")
    assert check_target_layer(model, "features", size("swin_t")) == NHWC
    with grid_tap(model, "features", size("swin_t")) as tap:
        result = GradCam(model, tap)(inputs("swin_t", 1, seed=2))
        assert result.explained.grad_cam.shape == (1, 2, 2) and result.explained.alpha.shape == (
            1,
            768,
        )
    # The channel shift at features meets the final LayerNorm: not compensable, measured.
    report = probe_compensable(model, "features", size("swin_t"))
    assert not report.compensable and report.absorbing_layer == "head"
    assert not isinstance(model.features, GridLayer)  # the probe leaves the model as it was


@pytest.mark.parametrize("layer", [VIT_LAST, "encoder.ln"])
def test_vit_layer_that_only_the_class_token_leaves_is_refused(transformers, layer):
    model = transformers("vit_b_16")
    with pytest.raises(ValueError, match="zero gradient at every position"):
        attach_target(model, layer, size("vit_b_16"))
    assert not isinstance(model.get_submodule(layer), GridLayer)
    with pytest.raises(ValueError, match="zero gradient at every position"):
        probe_compensable(model, layer, size("vit_b_16"))


class ChannelsLast(nn.Module):
    """A custom network whose feature map is channels last, like Swin's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 96, 4, stride=4)
        self.features = nn.LayerNorm(96)
        self.head = nn.Linear(96, 5)

    def forward(self, x):
        features = self.features(self.conv(x).permute(0, 2, 3, 1))
        return self.head(features.mean(dim=(1, 2)))


def test_unknown_channels_last_layer_is_refused_unless_its_layout_is_given():
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    with pytest.raises(ValueError, match=r"outputs shape \(1, 8, 8, 96\).*--target-layout"):
        check_target_layer(model, "features", (32, 32))
    with pytest.raises(ValueError, match="known channel axis"):
        probe_compensable(model, "features", (32, 32))
    with pytest.raises(
        ValueError, match=r"read as tokens \(N, h\*w, C\).*, the given layout, it has no grid"
    ):
        check_target_layer(model, "features", (32, 32), layout="tokens")
    assert check_target_layer(model, "features", (32, 32), layout=NHWC) == NHWC
    with grid_tap(model, "features", (32, 32), NHWC) as tap:
        assert probe_compensable(model, tap, (32, 32)).compensable
        reported = oracle(model, tap, torch.randn(1, 3, 32, 32))
        assert reported.offset != 0.0


def test_token_outputs_are_refused_without_a_layout(transformers):
    model = transformers("vit_b_32")
    with pytest.raises(ValueError, match="known channel axis"):
        check_target_layer(ViTTokens(model), "vit.encoder", size("vit_b_32"))


class ViTTokens(nn.Module):
    """torchvision's ViT inside a container camserve does not know as a family."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(x)


# --- camserve archive: a ViT's trained input size, a custom transformer -----------------------


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """vit_b_32 weights trained at 64x64: position embeddings for a 2x2 grid."""
    path = tmp_path_factory.mktemp("vit") / "vit_b_32_64px.pth"
    torch.save(random_model("vit_b_32").state_dict(), path)
    return path


def test_vit_archive_records_and_enforces_the_trained_input_size(tmp_path, vit_weights):
    with pytest.raises(ValueError, match=r"trained at 64x64 .* 2x2 grid .* --input-size 64"):
        write_model_dir(
            tmp_path / "wrong", vit_weights, "vit_b_32", preprocessing=make_preprocessing(224)
        )
    summary = write_model_dir(
        tmp_path / "vit", vit_weights, "vit_b_32", preprocessing=make_preprocessing(64)
    )
    assert summary.target_layer == f"{VIT_LAST}.ln_1" and summary.compensable is False
    config_path = tmp_path / "vit" / "model-config.yaml"
    config = yaml.safe_load(config_path.read_text())
    assert config["handler"]["preprocessing"]["center_crop"] == [64, 64]
    explainer = Explainer.from_directory(tmp_path / "vit")
    image = torchvision.transforms.v2.functional.to_pil_image(torch.rand(3, 80, 90))
    [result] = explainer.explain([explainer.prepare_image(image)])
    assert result.explained.grad_cam.shape == (2, 2) and not explainer.compensation.compensable
    # At load too: an archive whose config was edited to another size is refused.
    config["handler"]["preprocessing"]["center_crop"] = [96, 96]
    config["handler"]["preprocessing"]["input_size"] = [96, 96]
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="trained at 64x64"):
        Explainer.from_directory(tmp_path / "vit")


CUSTOM_TRANSFORMER = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, a class token, pre-norm blocks, the head on the class token."""

    def __init__(self, num_classes=3, dim=32, patch=8, tokens=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, 1 + tokens, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.blocks(tokens + self.position)
        return self.head(self.norm(tokens)[:, 0])
'''


def test_custom_transformer_with_an_explicit_layer_and_layout(tmp_path, capsys):
    model_file = tmp_path / "tiny_vit.py"
    model_file.write_text(CUSTOM_TRANSFORMER)
    torch.manual_seed(0)
    weights = tmp_path / "tiny_vit.pt"
    torch.save(build_model("TinyViT", 3, model_file, "TinyViT").state_dict(), weights)
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    common = [
        "archive", "--model-file", str(model_file), "--model-class", "TinyViT",
        "--weights", str(weights), "--labels", str(tmp_path / "labels.txt"),
        "--input-size", "32", "--export-path", str(tmp_path / "store"),
    ]  # fmt: skip
    # Automatic: refused, the model works on tokens after its patch embedding.
    assert camserve(common) == 2
    assert "works on token sequences" in capsys.readouterr().err
    # An explicit layer without its layout: refused, never guessed.
    assert camserve([*common, "--target-layer", "blocks.1.norm1"]) == 2
    assert "known channel axis" in capsys.readouterr().err
    # The last block's output reaches the head only through the class token: refused.
    layer_args = ["--target-layer", "blocks.1", "--target-layout", "cls_tokens"]
    assert camserve([*common, *layer_args]) == 2
    assert "zero gradient at every position" in capsys.readouterr().err
    layer_args = ["--target-layer", "blocks.1.norm1", "--target-layout", "cls_tokens"]
    assert camserve([*common, *layer_args]) == 0, capsys.readouterr().err
    assert "target layer 'blocks.1.norm1' (given)" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "store" / "tinyvit.mar") as mar:
        section = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
        mar.extractall(tmp_path / "unpacked")
    assert section["target_layout"] == "cls_tokens"
    explainer = Explainer.from_directory(tmp_path / "unpacked")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = explainer.gradcam(x)
    assert result.explained.grad_cam.shape == (2, 4, 4) and result.explained.alpha.shape == (2, 32)
    model = explainer.model
    expected = LayerGradCam(model, model.get_submodule(explainer.gradcam.layer_name)).attribute(
        x, target=result.explained.classes.tolist(), relu_attributions=True
    )[:, 0]
    torch.testing.assert_close(result.explained.grad_cam, expected, atol=1e-5, rtol=0)
    by_hand = hand_grad_cam(model, "blocks.1.norm1", CLS_TOKENS, x, result.explained.classes)
    torch.testing.assert_close(result.explained.grad_cam, by_hand, atol=1e-5, rtol=0)


def test_explainer_refuses_at_load_what_the_archive_refuses():
    """A model-config.yaml edited by hand gets the same checks when the archive loads."""
    torch.manual_seed(0)
    config = ExplainerConfig(
        architecture="ChannelsLast",
        weights="unused",
        target_layer="features",
        preprocessing=make_preprocessing(32, crop=False),
    )
    labels = [str(i) for i in range(5)]
    with pytest.raises(ValueError, match="known channel axis"):
        Explainer(ChannelsLast().eval(), labels, config)
    explainer = Explainer(ChannelsLast().eval(), labels, replace(config, target_layout=NHWC))
    assert explainer.gradcam.layer_name == "features.grid" and explainer.compensation.compensable
    assert explainer.config.to_handler_section()["target_layout"] == NHWC
