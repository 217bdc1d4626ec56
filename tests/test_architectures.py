"""Bring your own model: every supported torchvision CNN, with random weights at 64x64.

For each architecture: the automatic target layer, Captum equality of the map, the load-time
probe's answer, and (where it answers true) the compensated-network oracle. Then the
``camserve archive`` path: ImageNet labels, the written config, and clear errors.
"""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
import torchvision
import yaml
from captum.attr import LayerGradCam
from torch import nn

from camserve.architectures import (
    build_model,
    constructor_options,
    load_weights,
    read_state_dict,
)
from camserve.compensation import RELATIVE_TOLERANCE, probe_compensable
from camserve.explainer import Explainer, ExplainerConfig
from camserve.gradcam import GradCam
from camserve.layers import auto_target_layer
from camserve.tools.archive import build_model_archive, make_preprocessing, write_model_dir
from camserve.tools.cli import main as camserve
from tests.conftest import TINY_MODEL_SOURCE
from tests.oracles import oracle

SIZE = (64, 64)

# architecture -> (the Grad-CAM paper's layer: last spatial map before the head, compensable)
EXPECTED = {
    "resnet18": ("layer4", True),
    "resnet34": ("layer4", True),
    "resnet50": ("layer4", True),
    "resnet101": ("layer4", True),
    "vgg11": ("features", True),
    "vgg11_bn": ("features", True),
    "vgg16": ("features", True),
    "vgg16_bn": ("features", True),
    "densenet121": ("features", False),  # a functional ReLU follows norm5
    "mobilenet_v2": ("features", True),
    "mobilenet_v3_small": ("features", True),
    "mobilenet_v3_large": ("features", True),
    "efficientnet_b0": ("features", True),
    "convnext_tiny": ("features", False),  # the head's LayerNorm2d comes first
    "regnet_y_400mf": ("trunk_output", True),
    # Its head is a 1x1 convolution to the class scores, then only pooling: `classifier`
    # would be the scores themselves.
    "squeezenet1_1": ("features", True),
}
ARCHITECTURES = list(EXPECTED)
COMPENSABLE = [arch for arch, (_, ok) in EXPECTED.items() if ok]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """64x64 inputs gain nothing from a second thread, and on a shared 2-core machine
    OpenMP's waiting makes them up to 20x slower (measured: 30 ms vs 0.6 s a ResNet-34)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    """One random-weight instance per architecture, shared by this module's tests."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = torchvision.models.get_model(arch, weights=None).eval()
        return cache[arch]

    yield get
    cache.clear()


def inputs(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_target_layer(models, arch):
    assert auto_target_layer(models(arch), SIZE) == EXPECTED[arch][0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_map_equals_captum(models, arch):
    model, layer = models(arch), EXPECTED[arch][0]
    x = inputs(2, seed=1)
    result = GradCam(model, layer)(x)
    captum = LayerGradCam(model, model.get_submodule(layer))
    expected = captum.attribute(
        x, target=result.explained.classes.tolist(), relu_attributions=True
    )[:, 0]
    # 64x64 gives a 2x2 map to most, 3x3 to SqueezeNet (its pools round up).
    assert result.explained.grad_cam.shape == expected.shape
    assert expected.shape[0] == 2 and min(expected.shape[1:]) >= 2
    torch.testing.assert_close(result.explained.grad_cam, expected, atol=1e-5, rtol=0)
    # Random MobileNetV2/DenseNet maps are tiny: compare at their own scale as well.
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(
        result.explained.grad_cam / scale, expected / scale, atol=1e-5, rtol=0
    )
    assert result.explained.signed_map.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_probe_answer(models, arch):
    layer, compensable = EXPECTED[arch]
    report = probe_compensable(models(arch), layer, SIZE)
    assert report.tolerance == RELATIVE_TOLERANCE == 1e-4
    assert report.compensable is compensable, report
    if compensable:
        assert report.worst_relative_change <= RELATIVE_TOLERANCE
    else:
        # Far from the tolerance, not a rounding accident.
        assert report.worst_relative_change > 100 * RELATIVE_TOLERANCE


@pytest.mark.parametrize("arch", COMPENSABLE)
def test_compensated_network_oracle(models, arch):
    reported = oracle(models(arch), EXPECTED[arch][0], inputs(1, seed=3))
    assert reported.reference == "image_mean" and reported.offset != 0.0


class ClassMapNet(nn.Module):
    """Features, a 1x1 convolution to the class scores, ReLU and pooling: no layer with a
    weight matrix runs after the class map."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.scores = nn.Sequential(nn.Conv2d(8, classes, 1), nn.BatchNorm2d(classes), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.scores(self.features(x))).flatten(1)


class FunctionalHeadNet(ClassMapNet):
    """The same class map, then a weight matrix of the root applied functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ self.head.T


def test_a_class_score_map_is_not_the_layer_to_explain():
    torch.manual_seed(0)
    assert auto_target_layer(ClassMapNet().eval(), SIZE) == "features"
    # A root that owns a weight may apply it after any module: every map stays a candidate.
    assert auto_target_layer(FunctionalHeadNet().eval(), SIZE) == "scores"


def test_a_network_of_class_maps_only_is_refused():
    only_scores = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="learned head reads.*--target-layer"):
        auto_target_layer(only_scores.eval(), SIZE)


def test_densenet_dense_block_is_compensable(models):
    """DenseNet's last dense block feeds norm5 (eval BatchNorm) directly, which absorbs it."""
    model = models("densenet121")
    report = probe_compensable(model, "features.denseblock4", SIZE)
    assert report.compensable and report.absorbing_layer == "features.norm5"
    oracle(model, "features.denseblock4", inputs(1, seed=4))


def test_probe_tolerance_separates_a_tiny_network_from_a_nonlinear_head():
    """As in random MobileNetV2: outputs of ~1e-9 and dead channels, whose probe shift falls
    back to a fixed floor. The change is judged against the cancelled effect, not the output."""
    torch.manual_seed(0)
    linear_head = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    ).eval()
    with torch.no_grad():
        linear_head[0].weight.mul_(1e-9)
        linear_head[0].weight[:4] = 0  # dead channels
        linear_head[0].bias.zero_()  # outputs straddle zero, so a ReLU would clip
        linear_head[3].bias.zero_()
    assert probe_compensable(linear_head, "0", (16, 16)).compensable
    relu_head = nn.Sequential(*list(linear_head)[:1], nn.ReLU(), *list(linear_head)[1:]).eval()
    assert not probe_compensable(relu_head, "0", (16, 16)).compensable


def test_explainer_picks_the_layer_when_the_config_has_none(resnet18):
    config = ExplainerConfig(
        architecture="resnet18",
        weights="unused",
        target_layer=None,
        preprocessing=make_preprocessing(SIZE),
    )
    explainer = Explainer(resnet18, [str(i) for i in range(1000)], config)
    assert explainer.config.target_layer == "layer4"
    assert "target_layer" not in config.to_handler_section()
    assert explainer.config.to_handler_section()["target_layer"] == "layer4"


# --- camserve archive --arch ... -------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, path)
    return path


def handler_section(model_dir):
    return yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]


def test_model_dir_with_imagenet_labels_and_auto_layer(tmp_path, resnet18_weights, caplog):
    caplog.set_level("INFO")
    summary = write_model_dir(
        tmp_path, resnet18_weights, "resnet18", preprocessing=make_preprocessing(SIZE)
    )
    section = handler_section(tmp_path)
    assert section["target_layer"] == "layer4" and summary.target_layer_auto
    assert summary.compensable
    assert "picked automatically" in caplog.text and "compensable=True" in caplog.text
    assert section["preprocessing"]["center_crop"] == [64, 64]
    assert section["preprocessing"]["resize"] == round(64 * 256 / 224)
    labels = json.loads((tmp_path / "index_to_name.json").read_text())
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(labels) == 1000 and labels["0"] == categories[0] and labels["999"] == categories[999]
    # The folder serves as written: the explainer loads it and explains with the same layer.
    explainer = Explainer.from_directory(tmp_path)
    assert explainer.config.target_layer == "layer4"
    image = torchvision.transforms.v2.functional.to_pil_image(torch.rand(3, 80, 100))
    [result] = explainer.explain([explainer.prepare_image(image)])
    assert (
        result.explained.grad_cam.shape == (2, 2)
        and result.explained.zero_reference.reference == "image_mean"
    )


def test_custom_module_from_a_model_file(tmp_path):
    model_file = tmp_path / "tiny.py"
    model_file.write_text(TINY_MODEL_SOURCE)
    weights = tmp_path / "tiny.pt"
    model = build_model("Tiny", 3, model_file, "Tiny")
    torch.save(model.state_dict(), weights)
    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "model"
    summary = write_model_dir(
        out, weights, model_file=model_file, model_class="Tiny",
        labels=tmp_path / "labels.txt", preprocessing=make_preprocessing(32, crop=False),
    )  # fmt: skip
    # body ends with its ReLU; the shift after it reaches the Linear through pooling only.
    assert summary.target_layer == "body" and summary.compensable is True
    section = handler_section(out)
    assert section["model_file"] == "tiny.py" and section["model_class"] == "Tiny"
    assert (out / "tiny.py").is_file()
    assert Explainer.from_directory(out).labels == ["cat", "dog", "bird"]


def test_archive_command_writes_a_mar(tmp_path, resnet18_weights, capsys):
    code = camserve([
        "archive", "--arch", "resnet18", "--weights", str(resnet18_weights),
        "--input-size", "64", "--target-layer", "layer3", "--name", "r18",
        "--export-path", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "target layer 'layer3' (given)" in out
    with zipfile.ZipFile(tmp_path / "r18.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
        names = set(mar.namelist())
    assert config["handler"]["target_layer"] == "layer3"
    assert {"weights.pt", "index_to_name.json", "camserve/layers.py"} <= names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet5"], "unknown architecture 'resnet5' (did you mean resnet50"),
        (["--arch", "resnet34"], "do not match ResNet: 96 missing keys"),
        (["--arch", "resnet18", "--target-layer", "layer9"], "no module named 'layer9'"),
        (["--arch", "resnet18", "--target-layer", "fc"], "not an (N, K, h, w) feature map"),
        (["--arch", "resnet18", "--resize", "80", "--center-crop", "none"], "not the input size"),
        (["--arch", "resnet18", "--labels", "LABELS3"], "1000 classes, but 3 labels"),
        (["--arch", "resnet18", "--std", "0", "1", "1"], "std values must be positive"),
        (["--model-dir", "models/shapes", "--weights", "WEIGHTS"], "only apply with --arch"),
    ],
)
def test_archive_errors_are_clear(tmp_path, resnet18_weights, capsys, args, message):
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    args = [
        str(resnet18_weights) if a == "WEIGHTS" else str(tmp_path / "labels.txt")
        if a == "LABELS3" else a
        for a in args
    ]  # fmt: skip
    if "--model-dir" not in args:
        args += ["--weights", str(resnet18_weights), "--input-size", "64"]
    code = camserve(["archive", *args, "--export-path", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        ("return self.head(self.body(x)), x", "forward returns a tuple, not a logits tensor"),
        ("return {'logits': self.head(self.body(x))}", "forward returns a dict, not a logits"),
        ("return self.head(self.body(x))", None),
        ("return self.head(self.gray(x))", "a grayscale model needs a first convolution"),
    ],
)  # fmt: skip
def test_a_custom_model_camserve_cannot_serve_is_refused_in_one_line(
    tmp_path, capfd, forward, message
):
    """Forwards that return more than the logits, or that take other than 3 channels."""
    source = TINY_MODEL_SOURCE.replace("return self.head(self.body(x))", forward).replace(
        "        self.head =", "        self.gray = nn.Conv2d(1, 8, 3)\n        self.head ="
    )
    (tmp_path / "custom.py").write_text(source)
    torch.manual_seed(0)
    weights = tmp_path / "custom.pt"
    torch.save(build_model("Tiny", 3, tmp_path / "custom.py", "Tiny").state_dict(), weights)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    code = camserve([
        "archive", "--model-file", str(tmp_path / "custom.py"), "--model-class", "Tiny",
        "--weights", str(weights), "--labels", str(tmp_path / "labels.txt"),
        "--input-size", "32", "--export-path", str(tmp_path / "store"),
    ])  # fmt: skip
    err = capfd.readouterr().err
    if message is None:  # the control: a forward of the same parts that camserve serves
        assert code == 0, err
        return
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_labels_are_required_for_non_imagenet_heads(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "r18c3.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    with pytest.raises(ValueError, match="the weights have 3 classes: give their names"):
        build_model_archive("x", tmp_path, weights=weights, architecture="resnet18")


@pytest.mark.parametrize(("arch", "aux"), [("googlenet", "aux1."), ("inception_v3", "AuxLogits.")])
@pytest.mark.parametrize("aux_logits", [False, True])
def test_weights_with_or_without_auxiliary_heads_load(tmp_path, arch, aux, aux_logits):
    """torchvision's own ImageNet weights for these drop the auxiliary heads
    (``aux_logits=False``); weights trained from the default constructor keep them."""
    torch.manual_seed(0)
    trained = torchvision.models.get_model(arch, aux_logits=aux_logits, init_weights=False)
    path = tmp_path / f"{arch}.pth"
    torch.save(trained.state_dict(), path)
    state = read_state_dict(path)
    assert constructor_options(arch, state)["aux_logits"] is aux_logits
    model = load_weights(build_model(arch, 1000, state=state), state)  # strict
    assert any(key.startswith(aux) for key in model.state_dict()) is aux_logits


def test_googlenet_archive_accepts_weights_without_auxiliary_heads(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "googlenet.pth"
    trained = torchvision.models.googlenet(aux_logits=False, init_weights=False)
    torch.save(trained.state_dict(), weights)
    summary = write_model_dir(
        tmp_path / "model", weights, "googlenet", preprocessing=make_preprocessing(SIZE)
    )
    assert summary.target_layer == "inception5b" and summary.compensable
    assert Explainer.from_directory(tmp_path / "model").config.target_layer == "inception5b"
