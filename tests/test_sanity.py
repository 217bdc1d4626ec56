"""The parameter-randomisation sanity check (docs/score.md#sanity-check): its stages, its
seeded re-initialisation, its similarity measures against independent implementations
(scipy, scikit-image), the verdict on a trained model and on a model that fails by
construction, and the result's trip through the calibration file into the answers."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import requests
import scipy.stats
import skimage.metrics
import torch
from torch import nn

from camserve.encode_json import explanation_json, load_schema
from camserve.explainer import Explainer, ExplainerConfig
from camserve.maps import grad_cam
from camserve.request import RequestOptions
from camserve.sanity import FAILED, PASSED, SanityResult
from camserve.tools.calibrate import CALIBRATION_FILE, calibrate_model_dir
from camserve.tools.cli import main as camserve
from camserve.tools.sanity import (
    DEFAULT_THRESHOLD,
    HEAD_THRESHOLD,
    NothingToRandomise,
    randomisation_stages,
    randomise_stage,
    run_check,
    signed_maps,
    spearman,
    ssim,
)
from harness.local_torchserve import LocalTorchServe
from harness.shapes.dataset import TRAIN_SEED, render_sample
from tests.conftest import CONFIG, SHAPES_DIR, held_out, png_bytes
from tests.fixed_path_net import FixedPathNet, LearnedBlockFixedPathNet
from tests.live import post_png
from tests.test_architectures import _one_thread  # noqa: F401 - autouse here too

SIZE = (64, 64)
FIXED_PATH_NET = Path(__file__).with_name("fixed_path_net.py")


@pytest.fixture(scope="module")
def tensors(shapes_explainer) -> list[torch.Tensor]:
    """32 images of the shapes training set, preprocessed (what calibrate keeps)."""
    preprocessing = shapes_explainer.config.preprocessing
    return [preprocessing(render_sample(TRAIN_SEED, index).image) for index in range(32)]


@pytest.fixture(scope="module")
def fixed_path_explainer(shapes_explainer) -> Explainer:
    torch.manual_seed(0)
    config = ExplainerConfig(
        architecture="FixedPathNet",
        weights="unused",
        target_layer="features",
        preprocessing=shapes_explainer.config.preprocessing,
    )
    return Explainer(FixedPathNet().eval(), shapes_explainer.labels, config, name="fixed")


class AttentionOnTop(nn.Module):
    """A target layer, then a unit that applies a child functionally (MultiheadAttention's
    out_proj never runs as a module), a normalisation, a head; plus parameters the check
    must leave alone: the root's own (an ancestor of the target) and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(8))
        self.features = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.BatchNorm2d(8), nn.ReLU())
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.features(x).flatten(2).transpose(1, 2) + self.token
        attended, _ = self.attention(tokens, tokens, tokens)
        return self.head(self.norm(attended).mean(dim=1))


def test_stages_run_from_the_head_down_to_the_target_layers_own_children(
    shapes_explainer, resnet18
):
    shapes = randomisation_stages(shapes_explainer.model, "features", SIZE)
    assert [stage.name for stage in shapes] == [
        "classifier",
        # A BatchNorm (1-D parameters) goes with the convolution before it.
        "features.12+features.13",
        "features.8+features.9",
        "features.4+features.5",
        "features.0+features.1",
    ]
    assert shapes[1].modules == ("features.12", "features.13")
    stages = randomisation_stages(resnet18, "layer4", SIZE)
    assert [stage.name for stage in stages] == ["fc", "layer4.1", "layer4.0"]
    assert "layer4.1.bn2" in stages[1].modules and "layer3.1.conv1" not in stages[2].modules


def test_stages_of_a_unit_a_normalisation_and_parameters_left_alone():
    model = AttentionOnTop().eval()
    stages = randomisation_stages(model, "features", SIZE)
    assert [stage.name for stage in stages] == [
        "head",
        "attention+norm",
        "features.0+features.1",  # the target's own children: a convolution and its BatchNorm
    ]
    assert stages[1].modules == ("attention", "attention.out_proj", "norm")
    names = {name for stage in stages for name in stage.modules}
    assert "" not in names and "unused" not in names


def test_randomisation_is_seeded_and_never_touches_the_served_weights(shapes_explainer, tensors):
    served = copy.deepcopy(shapes_explainer.model.state_dict())
    first = run_check(shapes_explainer, tensors[:8], seed=5, progress=False)
    again = run_check(shapes_explainer, tensors[:8], seed=5, progress=False)
    other = run_check(shapes_explainer, tensors[:8], seed=6, progress=False)
    assert first.to_dict() == again.to_dict()
    assert first.seed == 5 and first.images == 8
    assert first.to_dict()["steps"] != other.to_dict()["steps"]
    for name, tensor in shapes_explainer.model.state_dict().items():
        assert torch.equal(tensor, served[name]), name


def test_randomising_the_head_of_gap_linear_changes_alpha_and_the_map(shapes_explainer, tensors):
    """GAP + Linear: alpha_k = W[c, k] / (h w), so a new head is a new alpha and a new map.
    The check's Spearman numbers are scipy's on the same maps."""
    model = copy.deepcopy(shapes_explainer.model)
    head = randomisation_stages(model, "features", SIZE)[0]
    trained_weight = model.classifier.weight.clone()
    randomise_stage(model, head, seed=1)
    assert not torch.allclose(model.classifier.weight, trained_weight)
    randomised = Explainer(
        model, shapes_explainer.labels, shapes_explainer.config,
        compensation=shapes_explainer.compensation,
    )  # fmt: skip
    x = torch.stack(tensors[:8])
    trained, classes = signed_maps(shapes_explainer, tensors[:8], [None] * 8)
    maps, explained = signed_maps(randomised, tensors[:8], classes)
    assert explained == classes  # the trained model's classes, explained again
    alpha = randomised.gradcam(x, classes).explained.alpha
    expected = model.classifier.weight[classes] / 64  # h w = 8 x 8
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-8)
    trained_alpha = shapes_explainer.gradcam(x, classes).explained.alpha
    assert (alpha - trained_alpha).abs().amax() > 1e-3
    assert (maps - trained).abs().amax() > 1e-3
    for ours, (a, b) in [
        (spearman(grad_cam(trained), grad_cam(maps)), (grad_cam(trained), grad_cam(maps))),
        (spearman(trained, maps), (trained, maps)),
        (spearman(trained.abs(), maps.abs()), (trained.abs(), maps.abs())),
    ]:
        for i in range(8):
            if a[i].max() > a[i].min() and b[i].max() > b[i].min():
                reference = scipy.stats.spearmanr(a[i].flatten(), b[i].flatten()).statistic
                assert float(ours[i]) == pytest.approx(reference, abs=1e-12)


def test_spearman_ties_and_constant_maps():
    generator = torch.Generator().manual_seed(0)
    # Many ties: integer-valued maps and ReLU'd ones, as Grad-CAM maps have.
    a = torch.randint(0, 4, (5, 6, 7), generator=generator).double()
    b = torch.randn(5, 6, 7, generator=generator).clamp_min(0)
    for i, rho in enumerate(spearman(a, b)):
        reference = scipy.stats.spearmanr(a[i].flatten(), b[i].flatten()).statistic
        assert float(rho) == pytest.approx(reference, abs=1e-12)
    empty, varying = torch.zeros(1, 4, 4), torch.rand(1, 4, 4, generator=generator)
    assert spearman(empty, empty).item() == 1.0
    assert spearman(empty, varying).item() == 0.0


def test_ssim_equals_scikit_image():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(4, 1, 8, 8, generator=generator), size=SIZE, mode="bilinear"
    )[:, 0]
    noisy = (smooth + 0.2 * torch.rand(4, *SIZE, generator=generator)).clamp(0, 1)
    ours = ssim(smooth, noisy)
    for i in range(4):
        reference = skimage.metrics.structural_similarity(
            smooth[i].double().numpy(), noisy[i].double().numpy(), win_size=7, data_range=1.0
        )
        assert float(ours[i]) == pytest.approx(reference, abs=1e-9)
    assert torch.allclose(ssim(smooth, smooth), torch.ones(4, dtype=torch.float64))


def test_trained_shapes_passes_and_the_fixed_path_model_fails(
    shapes_explainer, fixed_path_explainer, tensors
):
    """Both measured: the verdict reads the maps after randomising the head and the last
    stage. shapes' maps lose their ranking; the fixed path's maps stay exactly as they were."""
    shapes = run_check(shapes_explainer, tensors, progress=False)
    assert shapes.verdict == PASSED and shapes.verdict_step == 2
    assert shapes.steps[1].rank_correlation.median < DEFAULT_THRESHOLD
    assert shapes.steps[0].rank_correlation.median < HEAD_THRESHOLD
    assert shapes.steps[1].peak_kept < 0.5

    fixed = run_check(fixed_path_explainer, tensors, progress=False)
    assert fixed.verdict == FAILED
    assert [step.stage for step in fixed.steps] == ["head", "colour"]
    for step in fixed.steps:
        assert step.rank_correlation.median == pytest.approx(1.0, abs=1e-12)
        assert step.rank_correlation.p90 == pytest.approx(1.0, abs=1e-12)
        assert step.ssim.median == pytest.approx(1.0) and step.peak_kept == 1.0


def test_a_learned_block_behind_a_fixed_path_to_the_logits_fails_at_the_head(
    fixed_path_explainer, tensors
):
    """The class of the fixed-path construction where the target's own block is learned:
    step 2 randomises that block, so A changes and the maps lose their ranking, yet the head
    never reaches them (alpha is the fixed projection). The head step alone catches it."""
    torch.manual_seed(0)
    model = LearnedBlockFixedPathNet().eval()
    explainer = Explainer(model, fixed_path_explainer.labels, fixed_path_explainer.config)
    result = run_check(explainer, tensors, progress=False)
    assert [step.stage for step in result.steps] == ["head", "features.0"]
    assert result.steps[0].rank_correlation.median == pytest.approx(1.0, abs=1e-12)
    # What the step-2 rule alone would have passed: the block's randomisation moves the maps.
    assert result.steps[1].rank_correlation.median < DEFAULT_THRESHOLD
    assert result.verdict == FAILED and result.head_threshold == HEAD_THRESHOLD


def test_nothing_to_randomise_is_refused_plainly(fixed_path_explainer, tensors):
    """With no parameters after or inside the target, there is no cascade to run:
    calibrate then writes no result (and says why) instead of a verdict made up."""

    class FixedOnly(FixedPathNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.features(x).mean(dim=(2, 3)) @ self.projection.T

    model = FixedOnly().eval()
    model.colour, model.head = nn.Identity(), nn.Identity()
    bare = Explainer(model, fixed_path_explainer.labels, fixed_path_explainer.config)
    with pytest.raises(NothingToRandomise, match="no module with parameters runs after"):
        run_check(bare, tensors[:2], progress=False)


def test_a_failed_check_marks_every_answer_and_a_passed_one_adds_nothing(
    shapes_explainer, fixed_path_explainer, tensors
):
    validator = jsonschema.Draft202012Validator(load_schema())
    result = run_check(fixed_path_explainer, tensors[:4], progress=False)
    explainer = copy.copy(fixed_path_explainer)
    explainer.set_sanity(result)
    prepared = explainer.prepare_image(held_out(0).image, RequestOptions(maps=2))
    [answer] = explainer.explain([prepared])
    body = explanation_json(answer)
    validator.validate(body)
    assert body["zero_reference"]["sanity"] == FAILED
    assert all(more["zero_reference"]["sanity"] == FAILED for more in body["more_explanations"])
    assert not fixed_path_explainer.served.sanity_failed  # the copy's flag, not the original's

    [answer] = shapes_explainer.explain([shapes_explainer.prepare_image(held_out(0).image)])
    assert shapes_explainer.sanity is not None and shapes_explainer.sanity.verdict == PASSED
    assert "sanity" not in explanation_json(answer)["zero_reference"]


def test_the_result_round_trips_through_a_weights_only_file(shapes_explainer, tensors, tmp_path):
    result = run_check(shapes_explainer, tensors[:4], progress=False)
    torch.save({"mean": torch.zeros(3), **result.to_calibration()}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert SanityResult.from_calibration(loaded) == result
    assert SanityResult.from_calibration({"mean": torch.zeros(3)}) is None  # an older file


def test_calibrate_writes_the_same_result_with_or_without_the_baseline_pass(
    shapes_explainer, tmp_path
):
    """With a baseline pass calibrate takes the trained maps from it; without, the check
    makes its own. Both give what run_check gives on the first images."""
    folder = tmp_path / "shapes"
    shutil.copytree(SHAPES_DIR, folder, ignore=shutil.ignore_patterns(CALIBRATION_FILE))
    images = [held_out(index).image for index in range(6)]
    preprocessing = shapes_explainer.config.preprocessing
    expected = run_check(shapes_explainer, [preprocessing(i) for i in images[:4]], progress=False)
    for baseline_images in (iter(images), None):
        calibrate_model_dir(
            folder, iter(images), "test", 6, 4, False, baseline_images=baseline_images,
            sanity_images=4,
        )  # fmt: skip
        assert Explainer.from_directory(folder).sanity == expected


def test_an_older_calibration_file_loads_and_serves_without_a_result(tmp_path):
    """A calibration file written before the check existed: calibration_mean as before, no
    sanity result, nothing in the answers, None in the description."""
    folder = tmp_path / "shapes"
    shutil.copytree(SHAPES_DIR, folder)
    data = torch.load(folder / CALIBRATION_FILE, weights_only=True)
    del data["sanity"]
    torch.save(data, folder / CALIBRATION_FILE)
    explainer = Explainer.from_directory(folder)
    assert explainer.sanity is None and explainer.describe()["sanity"] is None
    [answer] = explainer.explain([explainer.prepare_image(held_out(0).image)])
    block = explanation_json(answer)["zero_reference"]
    assert block["reference"] == "calibration_mean" and "sanity" not in block


def _gauges(text: str, name: str) -> dict[str, float]:
    """``name``'s samples on a Prometheus text page: label string -> value."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


@pytest.mark.integration
def test_a_failing_archive_serves_marked_described_and_exported(tmp_path, capsys):
    """The user's path on a real TorchServe: archive a model file, calibrate it with the CLI
    (the check fails, measured), serve it, post bytes. Every answer says so, the metrics
    endpoint exports the gauges, the description holds the curve, the worker logs it."""
    torch.manual_seed(0)
    weights, labels = tmp_path / "fixed.pth", tmp_path / "labels.txt"
    torch.save(FixedPathNet().state_dict(), weights)
    labels.write_text("\n".join(f"class {i}" for i in range(6)))
    store = tmp_path / "store"
    assert camserve([
        "archive", "--model-file", str(FIXED_PATH_NET), "--model-class", "FixedPathNet",
        "--weights", str(weights), "--labels", str(labels), "--input-size", "64",
        "--target-layer", "features", "--name", "fixed", "--export-path", str(store),
    ]) == 0  # fmt: skip
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        held_out(i).image.save(images / f"{i}.png")
    assert camserve(["calibrate", str(store / "fixed.mar"), str(images)]) == 0
    assert "sanity check failed" in capsys.readouterr().out

    server = LocalTorchServe.on_free_ports(
        tmp_path / "ts", CONFIG, store, models="fixed=fixed_calibrated.mar"
    )
    try:
        server.start(wait_for="fixed")
        response = post_png(server, "fixed", png_bytes(held_out(9).image))
        metrics = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
        described = requests.get(
            f"{server.management_url}/models/fixed?customized=true",
            headers=server.auth("management"),
            timeout=60,
        )
        logged = server.wait_for_log("sanity check failed")
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.Draft202012Validator(load_schema()).validate(body)
    assert body["zero_reference"]["sanity"] == FAILED
    assert list(_gauges(metrics, "camserve_sanity_passed").values()) == [0.0]
    steps = {
        re.search(r'step="([^"]+)"', labels).group(1): value
        for labels, value in _gauges(metrics, "camserve_sanity_rank_correlation").items()
    }
    assert steps == {"01-head": pytest.approx(1.0), "02-colour": pytest.approx(1.0)}
    assert described.status_code == 200, described.text
    metadata = described.json()[0]["customizedMetadata"]
    metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    sanity = metadata["camserve"]["sanity"]
    assert sanity["verdict"] == FAILED and sanity["images"] == 4
    assert [step["stage"] for step in sanity["steps"]] == ["head", "colour"]
    assert logged
