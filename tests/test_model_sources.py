"""timm and transformers models, archived the ways users have them, explained exactly.

Each path: a timm model by name with weights (safetensors, a train.py checkpoint), a folder
of timm's ``save_for_hf``, a folder of transformers' ``save_pretrained`` (ResNet, ConvNeXt,
ViT, DeiT, Swin, BEiT with and without mean pooling, Data2Vec-vision, DINOv2 with and without
registers, MobileNetV2, MobileViT, EfficientNet, PoolFormer; each with its own image processor
class), and safetensors for torchvision. For every family, with seeded random
weights saved to folders: the layer and grid, the answer against the library's own pipeline
(its preprocessing of the decoded photo, its model) and Captum, the map against Grad-CAM read
by hand from the layer's raw output, the probe's answer, and the compensated-network oracle
where the probe says compensable. Then the bad inputs (exit 2, one line), offline loading
with the network unreachable, and a worker without the extra.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import transformers
import yaml
from captum.attr import LayerGradCam
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config

from camserve.compensation import RELATIVE_TOLERANCE
from camserve.explainer import Explainer
from camserve.layers import check_target_layer
from camserve.request import ParsedRequest, RequestOptions
from camserve.sources import read_pretrained
from camserve.tools.archive import make_preprocessing, write_model_dir
from camserve.tools.cli import main as camserve
from tests.conftest import REPO, SHAPES_DIR
from tests.library_models import (
    LABELS,
    TIMM,
    TRANSFORMERS,
    jpeg_bytes,
    photos,
    save_timm_folder,
    save_transformers_folder,
    timm_model,
)
from tests.oracles import hand_grad_cam, oracle
from tests.test_architectures import _one_thread  # noqa: F401 - autouse here too

# Probabilities and peak-normalised maps against the library's own pipeline: float32
# rounding of a tiny network, the same image in and the same weights.
ANSWER_TOLERANCE = 1e-5
CASES = [f"timm:{name}" for name in TIMM] + [f"transformers:{family}" for family in TRANSFORMERS]


def expected(case: str):
    """(layer, layout, compensable) of a case."""
    source, name = case.split(":")
    return TIMM[name][1:] if source == "timm" else TRANSFORMERS[name]


def library_pipeline(case: str, folder: Path):
    """(preprocess, logits) exactly as the library's own code runs a saved folder."""
    source, _ = case.split(":")
    if source == "timm":
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        transform = create_transform(**resolve_data_config({}, model=model))
        return transform, model
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)

    def preprocess(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return preprocess, lambda x: model(pixel_values=x).logits


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    """case -> (the user's folder, the explainer loaded from camserve's model folder)."""
    cache: dict[str, tuple[Path, Explainer]] = {}

    def get(case: str) -> tuple[Path, Explainer]:
        if case not in cache:
            source, name = case.split(":")
            folder = tmp_path_factory.mktemp(name)
            if source == "timm":
                save_timm_folder(name, folder)
            else:
                save_transformers_folder(name, folder)
            model_dir = tmp_path_factory.mktemp(f"{name}_model")
            write_model_dir(model_dir, pretrained=folder)
            cache[case] = folder, Explainer.from_directory(model_dir)
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_layer_and_grid_per_family(archived, case):
    layer, layout, _ = expected(case)
    folder, explainer = archived(case)
    assert explainer.config.target_layer == layer
    fresh = read_pretrained(folder).model
    size = explainer.config.preprocessing.input_size
    assert check_target_layer(fresh, layer, size) == layout
    assert explainer.gradcam.layer_name == (layer if layout == "nchw" else f"{layer}.grid")


@pytest.mark.parametrize("case", CASES)
def test_answer_equals_the_library_pipeline_and_captum(archived, case):
    """A JPEG posted to camserve against the library's own decode, preprocessing and model,
    with Captum's LayerGradCam on that input."""
    folder, explainer = archived(case)
    preprocess, logits = library_pipeline(case, folder)
    for image in list(photos().values())[:3]:
        data = jpeg_bytes(image)
        [ours] = explainer.explain([explainer.prepare(ParsedRequest(data, RequestOptions()))])
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        x = preprocess(decoded)[None]
        torch.testing.assert_close(ours.image.tensor, x[0], atol=1e-6, rtol=0)
        with torch.no_grad():
            probabilities = logits(x).softmax(dim=1)[0]
        torch.testing.assert_close(ours.probabilities, probabilities, atol=ANSWER_TOLERANCE, rtol=0)
        tap = explainer.model.get_submodule(explainer.gradcam.layer_name)
        captum = LayerGradCam(explainer.model, tap).attribute(
            x, target=ours.explained.index, relu_attributions=True
        )[0, 0]
        scale = captum.max().clamp_min(1e-30)
        torch.testing.assert_close(
            ours.explained.grad_cam / scale, captum / scale, atol=ANSWER_TOLERANCE, rtol=0
        )


@pytest.mark.parametrize("case", CASES)
def test_map_equals_grad_cam_read_by_hand_from_the_raw_layer(archived, case):
    layer, layout, _ = expected(case)
    _, explainer = archived(case)
    size = explainer.config.preprocessing.input_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    result = explainer.gradcam(x)
    by_hand = hand_grad_cam(explainer.model, layer, layout, x, result.explained.classes)
    scale = by_hand.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(
        result.explained.grad_cam / scale, by_hand / scale, atol=1e-5, rtol=0
    )
    assert result.explained.grad_cam.sum() > 0


@pytest.mark.parametrize("case", CASES)
def test_probe_answer(archived, case):
    *_, compensable = expected(case)
    report = archived(case)[1].compensation
    assert report.compensable is compensable, report
    if compensable:
        assert report.worst_relative_change <= RELATIVE_TOLERANCE
    else:  # far from the tolerance, not a rounding accident
        assert report.worst_relative_change > 10 * RELATIVE_TOLERANCE, report


@pytest.mark.parametrize("case", [case for case in CASES if expected(case)[2]])
def test_compensated_network_oracle(archived, case):
    _, explainer = archived(case)
    size = explainer.config.preprocessing.input_size
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    reported = oracle(explainer.model, explainer.gradcam.layer_name, x)
    assert reported.offset != 0.0


def _patch_token_gradients(model, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The top-1 logit's gradient at ``layer``'s patch tokens (the class token dropped)."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(logits.max(dim=1).values.sum(), seen[-1])
    return gradient[:, 1:]


def test_why_dinov2_is_explained_at_the_last_blocks_norm1():
    """DINOv2's head reads the class token next to the patch tokens' mean. At the final
    layernorm every patch token gets the same gradient (the mean's share only: Grad-CAM there
    would ignore what the class token gathers in the last block); at the last block's norm1
    the class token's path reaches them too, and the gradient differs between positions."""
    from camserve.sources.transformers import logits_only
    from tests.library_models import transformers_model

    model = logits_only(transformers_model("dinov2")[0])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    final = _patch_token_gradients(model, "dinov2.layernorm", x)
    torch.testing.assert_close(final, final[:, :1].expand_as(final), rtol=0, atol=1e-7)
    block = _patch_token_gradients(model, "dinov2.encoder.layer.1.norm1", x)
    spread = (block - block.mean(dim=1, keepdim=True)).abs().max()
    assert spread > 100 * (final - final.mean(dim=1, keepdim=True)).abs().max() + 1e-5


# --- timm by name ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_resnet18_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("timm_weights") / "resnet18.safetensors"
    save_file(timm_model("resnet18").state_dict(), path)
    return path


def test_timm_by_name_from_safetensors(tmp_path, timm_resnet18_weights):
    summary = write_model_dir(
        tmp_path, timm_resnet18_weights, "timm:resnet18", labels=LABELS,
        data_config={"input_size": (64, 64)},
    )  # fmt: skip
    assert summary.target_layer == "layer4" and summary.compensable
    section = yaml_handler(tmp_path)
    assert section["architecture"] == "timm:resnet18"
    assert section["built_with"] == {"package": "timm", "version": timm.__version__}
    assert section["preprocessing"]["interpolation"] == "bicubic"  # resnet18.a1_in1k's
    explainer = Explainer.from_directory(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = timm_model("resnet18")(x)
    torch.testing.assert_close(explainer.gradcam(x).logits, expected_logits)


def test_timm_train_checkpoint_prefers_the_ema_weights(tmp_path):
    """timm's train.py saves args (an argparse.Namespace), the weights under state_dict and
    the EMA copy under state_dict_ema, with DataParallel's module. prefix; timm's own loader
    takes the EMA copy."""
    plain = timm_model("resnet18").state_dict()
    torch.manual_seed(7)
    ema = timm.create_model("resnet18", num_classes=3).state_dict()
    checkpoint = {
        "epoch": 12,
        "arch": "resnet18",
        "args": argparse.Namespace(lr=0.1, model="resnet18"),
        "state_dict": {f"module.{k}": v for k, v in plain.items()},
        "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth.tar")
    summary = write_model_dir(
        tmp_path / "model", tmp_path / "checkpoint.pth.tar", "timm:resnet18", labels=LABELS,
        data_config={"input_size": (64, 64)},
    )  # fmt: skip
    assert "state_dict_ema" in summary.describe()
    served = load_file(tmp_path / "model" / "model.safetensors")
    assert torch.equal(served["fc.weight"], ema["fc.weight"])


def test_timm_imagenet_head_gets_timms_class_names(tmp_path):
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "r18.safetensors")
    summary = write_model_dir(
        tmp_path / "model", tmp_path / "r18.safetensors", "timm:resnet18",
        data_config={"input_size": (64, 64)},
    )  # fmt: skip
    assert summary.num_classes == 1000 and "timm" in summary.labels_from
    names = json.loads((tmp_path / "model" / "index_to_name.json").read_text())
    assert names["0"] == "tench, Tinca tinca"  # timm's ImageNetInfo description


def test_timm_vit_weights_fix_the_input_size(tmp_path):
    save_file(timm_model("vit_tiny_patch16_224").state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="position embeddings have 17 tokens.*--input-size"):
        write_model_dir(
            tmp_path / "wrong", tmp_path / "vit.safetensors", "timm:vit_tiny_patch16_224",
            labels=LABELS,
        )  # fmt: skip
    summary = write_model_dir(
        tmp_path / "model", tmp_path / "vit.safetensors", "timm:vit_tiny_patch16_224",
        labels=LABELS, data_config={"input_size": (64, 64)},
    )  # fmt: skip
    assert summary.target_layer == "blocks.11.norm1"


# --- torchvision with safetensors, labels, problem_type --------------------------------------


# MNASNet refuses a state_dict without its format version, which safetensors cannot carry.
@pytest.mark.parametrize("arch", ["resnet18", "mnasnet0_5"])
def test_torchvision_weights_as_safetensors(tmp_path, capsys, arch):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=3).eval()
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    # Told apart by the format's header too, whatever the file is called.
    (tmp_path / "weights.bin").write_bytes((tmp_path / "weights.safetensors").read_bytes())
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    args = [
        "archive", "--arch", arch, "--weights", str(tmp_path / "weights.safetensors"),
        "--labels", str(tmp_path / "labels.txt"), "--input-size", "64",
        "--export-path", str(tmp_path / "store"), "--name", "r18",
    ]  # fmt: skip
    assert camserve(args) == 0, capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "store" / "r18.mar") as mar:
        mar.extractall(tmp_path / "unpacked")
    write_model_dir(
        tmp_path / "sniffed", tmp_path / "weights.bin", arch, labels=LABELS,
        preprocessing=make_preprocessing(64),
    )  # fmt: skip
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = model(x)
    for folder in ("unpacked", "sniffed"):
        explainer = Explainer.from_directory(tmp_path / folder)
        torch.testing.assert_close(explainer.gradcam(x).logits, expected_logits)


def test_folder_labels_problem_type_and_the_labels_override(tmp_path):
    folder = save_transformers_folder("resnet", tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (folder / "config.json").write_text(json.dumps(config))
    built = read_pretrained(folder)
    assert built.problem_type == "multi_label_classification" and built.labels == LABELS
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    summary = write_model_dir(tmp_path / "model", pretrained=folder, labels=tmp_path / "labels.txt")
    assert "problem_type multi_label_classification" in summary.describe()
    names = json.loads((tmp_path / "model" / "index_to_name.json").read_text())
    assert list(names.values()) == ["red", "green", "blue"]
    with pytest.raises(ValueError, match="3 classes, but 2 labels"):
        write_model_dir(tmp_path / "other", pretrained=folder, labels=["a", "b"])


# --- bad input: exit status 2, one line, no traceback ----------------------------------------


def _mismatched_transformers_folder(tmp_path: Path) -> list[str]:
    folder = save_transformers_folder("vit", tmp_path / "vit")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=48, intermediate_size=96)
    (folder / "config.json").write_text(json.dumps(config))
    return ["--pretrained", str(folder)]


def _mismatched_timm_folder(tmp_path: Path) -> list[str]:
    folder = save_timm_folder("resnet18", tmp_path / "r18")
    config = json.loads((folder / "config.json").read_text())
    config["num_classes"] = config["model_args"]["num_classes"] = 5
    config.pop("label_names")
    (folder / "config.json").write_text(json.dumps(config))
    return ["--pretrained", str(folder)]


def _not_an_image_classifier(tmp_path: Path) -> list[str]:
    config = transformers.ViTConfig(image_size=64, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)  # fmt: skip
    transformers.ViTModel(config).save_pretrained(tmp_path / "backbone")
    return ["--pretrained", str(tmp_path / "backbone")]


def _unknown_timm_name(tmp_path: Path) -> list[str]:
    save_file(timm_model("resnet18").state_dict(), tmp_path / "w.safetensors")
    return ["--arch", "timm:resnet5o", "--weights", str(tmp_path / "w.safetensors")]


def _checkpoint_without_state_dict(tmp_path: Path) -> list[str]:
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "best_top1": 71.2}, tmp_path / "c.pth")
    return ["--arch", "timm:resnet18", "--weights", str(tmp_path / "c.pth"), "--input-size", "64"]


def _neither_layout(tmp_path: Path) -> list[str]:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"name": "something else"}')
    return ["--pretrained", str(tmp_path / "odd")]


def _processor_setting_camserve_does_not_read(tmp_path: Path) -> list[str]:
    """EfficientNet's rescale_offset (x / 255 - 1 before normalising): only the measurement
    against the processor's own output can catch it."""
    folder = save_transformers_folder("resnet", tmp_path / "r")
    transformers.EfficientNetImageProcessor(
        size={"height": 64, "width": 64}, rescale_offset=True
    ).save_pretrained(folder)
    return ["--pretrained", str(folder)]


def _preprocessing_options_with_a_folder(tmp_path: Path) -> list[str]:
    return ["--pretrained", str(tmp_path), "--resize", "80"]


BAD_INPUTS = {
    "transformers weights that do not match config.json": (
        _mismatched_transformers_folder, "do not match its config.json"),
    "timm weights that do not match config.json": (
        _mismatched_timm_folder, r"in .*r18 do not match its config.json .*fc.weight \(3, 512\)"),
    "config.json of a backbone, not an image classifier": (
        _not_an_image_classifier, "ViTModel .*not an image classifier"),
    "a timm name that does not exist": (
        _unknown_timm_name, r"unknown timm model 'resnet5o' \(did you mean resnet50"),
    "a checkpoint without a state_dict": (
        _checkpoint_without_state_dict, "checkpoint without a state_dict"),
    "a config.json in neither layout": (_neither_layout, "neither Hub layout"),
    "a processor setting camserve does not read": (
        _processor_setting_camserve_does_not_read,
        r"EfficientNetImageProcessor: camserve's reading .* by up to [0-9.]+ \(on a [0-9]+x[0-9]+ "
        r"probe image\), above the tolerance 1e-06"),
    "preprocessing options with a folder": (
        _preprocessing_options_with_a_folder, "folder's own config decides that: drop --resize"),
}  # fmt: skip


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path, capfd, bad):
    make, message = BAD_INPUTS[bad]
    args = make(tmp_path)
    capfd.readouterr()
    status = camserve(["archive", *args, "--export-path", str(tmp_path / "store")])
    out, err = capfd.readouterr()
    assert status == 2
    assert err.startswith("camserve archive: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    assert re.search(message, err), err


# --- offline, and a worker without the extra -------------------------------------------------

NO_NETWORK = """
import json, socket, sys
attempts = []
def refuse(self, address, *args):
    attempts.append(repr(address))
    raise OSError("network unreachable (test)")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
"""

ARCHIVE_AND_LOAD = """
from camserve.explainer import Explainer
from camserve.tools.archive import make_preprocessing, write_model_dir
for name, folder in json.loads(sys.argv[1]).items():
    summary = write_model_dir(f"{sys.argv[2]}/{name}", pretrained=folder)
    # the preprocessing was measured against the library's own, offline too
    assert any("probe images" in note for note in summary.notes), summary.notes
    explainer = Explainer.from_directory(f"{sys.argv[2]}/{name}")
    assert explainer.labels == ["cat", "dog", "bird"]
print("ATTEMPTS", json.dumps(attempts))
"""


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh Python on one thread (tiny models; a busy machine's second core only waits)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_offline_with_the_network_unreachable(tmp_path):
    """Read both layouts (measuring their preprocessing against the library's) and load what
    camserve wrote, with the Hub's offline switches set, proxies pointing at a closed port and
    every socket connection refused (and recorded)."""
    folders = {
        "hf_vit": str(save_transformers_folder("vit", tmp_path / "hf_vit")),
        "timm_r18": str(save_timm_folder("resnet18", tmp_path / "timm_r18")),
    }
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    env = {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed, "NO_PROXY": "",
        "http_proxy": closed, "https_proxy": closed, "all_proxy": closed, "no_proxy": "",
    }  # fmt: skip
    done = run_python(
        NO_NETWORK + ARCHIVE_AND_LOAD, json.dumps(folders), str(tmp_path / "out"), env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    attempts = json.loads(done.stdout.split("ATTEMPTS", 1)[1])
    assert attempts == []


WITHOUT_EXTRAS = """
import importlib.abc, json, logging, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("timm", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Missing())
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.basicConfig(level=logging.INFO, handlers=[Keep()])
from camserve.explainer import Explainer
from camserve.sources import MissingExtra
from camserve.tools.cli import main
report = {}
for folder in sys.argv[1:3]:
    records.clear()
    try:
        Explainer.from_directory(folder)
        report[folder] = "loaded"
    except MissingExtra as err:
        report[folder] = [message for level, message in records if level == "ERROR"]
# The serving core imports neither package: a model of another source still loads.
report["shapes"] = len(Explainer.from_directory(sys.argv[3]).labels)
report["imported"] = [m for m in sys.modules if m.split(".")[0] in ("timm", "transformers")]
report["cli"] = main(["archive", "--arch", "timm:resnet18", "--weights", sys.argv[4]])
print("REPORT", json.dumps(report))
"""


def test_a_worker_without_the_extra_refuses_with_one_log_line(tmp_path, timm_resnet18_weights):
    """As a TorchServe worker without timm or transformers: one ERROR log line that names
    the extra, and no model (the load raises); other models still load."""
    timm_dir, hf_dir = tmp_path / "timm", tmp_path / "hf"
    write_model_dir(
        timm_dir, timm_resnet18_weights, "timm:resnet18", labels=LABELS,
        data_config={"input_size": (64, 64)},
    )  # fmt: skip
    write_model_dir(hf_dir, pretrained=save_transformers_folder("resnet", tmp_path / "folder"))
    args = (str(timm_dir), str(hf_dir), str(SHAPES_DIR), str(timm_resnet18_weights))
    done = run_python(WITHOUT_EXTRAS, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    for folder, extra in ((timm_dir, "timm"), (hf_dir, "transformers")):
        [line] = report[str(folder)]
        assert f"pip install 'camserve[{extra}]'" in line and "this model was built with" in line
    assert report["shapes"] == 6 and report["imported"] == []
    assert report["cli"] == 2
    [error] = [line for line in done.stderr.splitlines() if line.startswith("camserve archive")]
    assert "pip install 'camserve[timm]'" in error and "Traceback" not in done.stderr


def yaml_handler(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]


def test_the_archive_ships_the_librarys_folder(tmp_path):
    """The .mar carries the library's own folder layout and records who built it."""
    folder = save_transformers_folder("swin", tmp_path / "swin")
    assert camserve(["archive", "--pretrained", str(folder), "--export-path", str(tmp_path)]) == 0
    with zipfile.ZipFile(tmp_path / "swin.mar") as mar:
        names = set(mar.namelist())
        section = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    assert {"config.json", "model.safetensors", "camserve/sources/transformers.py"} <= names
    assert section["architecture"] == "transformers:SwinForImageClassification"
    assert section["built_with"] == {"package": "transformers", "version": transformers.__version__}
    assert section["preprocessing"]["crop_offset"] == "floor"
    assert section["preprocessing"]["backend"] == "tensor"
    assert section["target_layer"] == "swin.layernorm"
