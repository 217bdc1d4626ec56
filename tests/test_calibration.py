"""Calibrated references: streaming statistics, the calibration file, and a real TorchServe
answering ``reference: calibration_mean`` for an archive built and calibrated by the CLI."""

from __future__ import annotations

import shutil
import zipfile

import jsonschema
import pytest
import torch
import torchvision
import yaml

from camserve.encode_json import load_schema
from camserve.explainer import Explainer, load_calibration
from camserve.tools.calibrate import (
    CALIBRATION_FILE,
    RunningChannelStatistics,
    activation_statistics,
    batched,
    calibrate_archive,
    calibrate_model_dir,
    sha256,
)
from camserve.tools.cli import main as camserve
from harness.local_torchserve import LocalTorchServe
from tests.conftest import CONFIG, SHAPES_DIR, held_out, png_bytes
from tests.live import post_png
from tests.oracles import oracle


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small inputs: one thread is faster on a shared 2-core machine (see test_architectures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def direct_statistics(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of each channel over all images and positions, in one go."""
    a = activations.double()
    return a.mean(dim=(0, 2, 3)), a.std(dim=(0, 2, 3), correction=0)


def test_running_statistics_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    # A large offset: a naive sum-of-squares formula would lose the std to cancellation.
    chunks = [1000 + torch.randn(n, 6, 3, 5, generator=generator) * 0.01 for n in (3, 1, 5, 2)]
    running = RunningChannelStatistics()
    for chunk in chunks:
        running.update(chunk)
    stats = running.result()
    mean, std = direct_statistics(torch.cat(chunks))
    torch.testing.assert_close(stats.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.std, std, rtol=1e-6, atol=0)
    assert stats.count == 11


def test_activation_statistics_match_a_direct_computation(shapes_explainer):
    model, layer = shapes_explainer.model, shapes_explainer.config.target_layer
    images = [held_out(i).image for i in range(10)]
    stats = activation_statistics(
        model, layer, batched(images, shapes_explainer.config.preprocessing, 4), progress=False
    )
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            model(shapes_explainer.config.preprocessing.batch(images))
    finally:
        handle.remove()
    mean, std = direct_statistics(captured[0])
    torch.testing.assert_close(stats.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.std, std, rtol=1e-5, atol=1e-6)
    assert stats.count == 10 and (stats.std > 0).any()


@pytest.fixture
def uncalibrated_shapes(tmp_path):
    folder = tmp_path / "shapes"
    shutil.copytree(SHAPES_DIR, folder, ignore=shutil.ignore_patterns(CALIBRATION_FILE))
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    config["handler"].pop("calibration", None)
    (folder / "model-config.yaml").write_text("# kept comment\n" + yaml.safe_dump(config))
    return folder


def test_calibrated_model_dir_uses_calibration_mean(uncalibrated_shapes):
    images = [held_out(i).image for i in range(12)]
    stats = calibrate_model_dir(uncalibrated_shapes, iter(images), "test", 12, 5, progress=False)
    text = (uncalibrated_shapes / "model-config.yaml").read_text()
    assert text.startswith("# kept comment\n")
    assert yaml.safe_load(text)["handler"]["calibration"] == CALIBRATION_FILE
    data = torch.load(uncalibrated_shapes / CALIBRATION_FILE, weights_only=True)
    assert data["layer"] == "features" and data["count"] == 12
    assert data["weights_sha256"] == sha256(uncalibrated_shapes / "shapes.pt")
    loaded = load_calibration(uncalibrated_shapes / CALIBRATION_FILE)
    torch.testing.assert_close(loaded.mean, stats.mean)

    explainer = Explainer.from_directory(uncalibrated_shapes)
    prepared = explainer.prepare_image(held_out(20).image)
    [result] = explainer.explain([prepared])
    score = result.explained.zero_reference
    assert score.reference == "calibration_mean"
    raw = explainer.gradcam(prepared.tensor[None])
    expected = -(raw.explained.alpha[0].double() * stats.mean).sum()
    assert score.offset == pytest.approx(float(expected), rel=1e-6, abs=1e-9)
    radius = 0.1 * (raw.explained.alpha[0].double().abs() * stats.std).sum()
    assert score.worst_case.radius == pytest.approx(float(radius), rel=1e-6, abs=1e-9)
    # The calibrated shift is a true reparameterisation of the served network.
    reported = oracle(explainer.model, "features", prepared.tensor[None], loaded)
    assert reported.reference == "calibration_mean"


def test_calibrate_command_on_a_model_dir(uncalibrated_shapes, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        held_out(i).image.save(images / f"{i}.png")
    command = ["calibrate", "--model-dir", str(uncalibrated_shapes), str(images)]
    assert camserve([*command, "--sanity-images", "2", "--sanity-seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "(3 images)" in out and "sanity check passed" in out
    calibrated = Explainer.from_directory(uncalibrated_shapes)
    assert calibrated.calibration.count == 3
    # The check's result is in the file: the first 2 images, seed 7, one step per stage.
    assert calibrated.sanity.images == 2 and calibrated.sanity.seed == 7
    assert [step.stage for step in calibrated.sanity.steps][0] == "classifier"
    assert camserve([*command, "--sanity-images", "0"]) == 2
    assert "--sanity-images must be at least 1" in capsys.readouterr().err
    assert camserve(["calibrate", "--model-dir", str(uncalibrated_shapes)]) == 2
    assert "give a folder of calibration images" in capsys.readouterr().err
    # Statistics of one layer are refused for another.
    config_path = uncalibrated_shapes / "model-config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["handler"]["target_layer"] = "features.8"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="statistics of layer 'features', but the target"):
        Explainer.from_directory(uncalibrated_shapes)


def test_shipped_shapes_calibration_matches_the_committed_weights():
    section = yaml.safe_load((SHAPES_DIR / "model-config.yaml").read_text())["handler"]
    assert section["calibration"] == CALIBRATION_FILE
    data = torch.load(SHAPES_DIR / CALIBRATION_FILE, weights_only=True)
    assert data["weights_sha256"] == sha256(SHAPES_DIR / section["weights"]), (
        "shapes.pt changed: recalibrate with `make calibrate-shapes`"
    )
    assert data["layer"] == section["target_layer"]
    assert data["mean"].shape == data["std"].shape == (128,)
    assert data["count"] >= 1000 and "shapes training set" in data["source"]


def test_calibrate_refuses_bad_input(tmp_path, model_store):
    archive = model_store / "shapes.mar"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="broken.png: .*--skip-unreadable"):
        calibrate_archive(archive, tmp_path / "images", tmp_path, progress=False)
    with pytest.raises(ValueError, match="refusing to overwrite the input archive"):
        calibrate_archive(archive, tmp_path / "images", model_store, "shapes", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        calibrate_archive(archive, tmp_path / "empty", tmp_path, progress=False)


@pytest.mark.integration
def test_archive_and_calibrate_then_serve(tmp_path, capsys):
    """The user's path: camserve archive --arch, camserve calibrate, serve, post bytes."""
    torch.manual_seed(0)
    weights = tmp_path / "my.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    store = tmp_path / "store"
    assert camserve([
        "archive", "--arch", "resnet18", "--weights", str(weights), "--input-size", "64",
        "--name", "r18", "--export-path", str(store),
    ]) == 0  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        held_out(i).image.save(images / f"{i}.{'png' if i % 2 else 'jpg'}")
    assert camserve(["calibrate", str(store / "r18.mar"), str(images), "--batch-size", "4"]) == 0
    assert "calibrated on 6 images" in capsys.readouterr().out

    calibrated = store / "r18_calibrated.mar"
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(calibrated) as mar:
        mar.extractall(unpacked)
    local = Explainer.from_directory(unpacked)
    assert local.calibration is not None and local.calibration.count == 6
    image = held_out(30).image
    [expected] = local.explain([local.prepare_image(image)])

    server = LocalTorchServe.on_free_ports(
        tmp_path / "ts", CONFIG, store, models="r18=r18_calibrated.mar"
    )
    try:
        server.start(wait_for="r18")
        response = post_png(server, "r18", png_bytes(image))
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.Draft202012Validator(load_schema()).validate(body)
    score = body["zero_reference"]
    assert score["reference"] == "calibration_mean"
    assert body["target_layer"] == "layer4" and score["compensable"] is True
    assert score["offset"] == pytest.approx(
        expected.explained.zero_reference.offset, rel=1e-4, abs=1e-6
    )
    assert body["predictions"][0]["label"] in local.labels
