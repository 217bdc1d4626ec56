"""Multi-label (sigmoid) heads: which labels are explained, the oracles per label, the answer,
the overlay and the configuration errors. The model is ``shapes-multi`` (docs/multi-label.md)."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from captum.attr import LayerGradCam
from PIL import Image
from torch.overrides import TorchFunctionMode

from camserve.architectures import build_model
from camserve.encode_json import explanation_json, load_schema
from camserve.encode_png import labelled_overlays, overlay_image, overlay_png
from camserve.errors import InputError
from camserve.explainer import Explainer, ExplainerConfig, presence_thresholds
from camserve.gradcam import GradCam, PresentLabels
from camserve.request import ParsedRequest, RequestOptions
from camserve.telemetry import ScoreBaseline
from camserve.tools.archive import write_model_dir
from camserve.tools.calibrate import calibrate_model_dir
from camserve.tools.cli import main as camserve
from camserve.tools.client import Outcome, format_table, write_csv
from harness.shapes.dataset import CLASSES, HELD_OUT_SEED, render_multi_sample
from harness.shapes.evaluate import evaluate_multi
from tests.conftest import SHAPES_MULTI_DIR, TINY_MODEL_SOURCE, png_bytes
from tests.oracles import oracle

VALIDATOR = jsonschema.Draft202012Validator(load_schema())
LAYER = "features"


def multi_sample(index: int):
    return render_multi_sample(HELD_OUT_SEED, index)


def prepared(explainer, index: int, **options):
    options.setdefault("maps", None)  # the model's default, as an unset request option
    request = ParsedRequest(png_bytes(multi_sample(index).image), RequestOptions(**options))
    return explainer.prepare(request)


def captum_signed(model, x, target):
    layer = model.get_submodule(LAYER)
    return LayerGradCam(model, layer).attribute(x, target=target)[:, 0].detach()


def images(count: int, start: int = 0) -> torch.Tensor:
    from harness.shapes.train import normalise

    samples = [multi_sample(start + i) for i in range(count)]
    pixels = torch.stack([torch.from_numpy(np.array(s.image)) for s in samples])
    return normalise(pixels.permute(0, 3, 1, 2))


def ranked_present(logits: torch.Tensor, thresholds: torch.Tensor, cap: int) -> list[list[int]]:
    """The reference ranking, the slow and obvious way: present labels, most probable first."""
    result = []
    for row in logits.sigmoid():
        present = [c for c in range(len(row)) if row[c] >= thresholds[c]]
        present.sort(key=lambda c: -float(row[c]))
        result.append(present[:cap] or [int(row.argmax())])
    return result


# --- Which labels get a map: every present one, most probable first, from one forward.


@pytest.mark.parametrize(("threshold", "count"), [(0.5, 6), (0.05, 4), (0.999, 2)])
def test_every_present_label_is_explained_and_equals_captum(
    shapes_multi_explainer, threshold, count
):
    model = shapes_multi_explainer.model
    x = images(count)
    thresholds = torch.full((len(CLASSES),), threshold)
    forwards = []
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        choice = PresentLabels(thresholds, [()] * count, [5] * count)
        result = GradCam(model, LAYER).explain(x, choice)
    finally:
        handle.remove()
    assert forwards == [1]
    expected = ranked_present(result.logits, thresholds, 5)
    ranks = (result.explained, *result.extra)
    assert result.counts.tolist() == [len(labels) for labels in expected]
    assert len(ranks) == max(len(labels) for labels in expected)  # no backward nobody needs
    for rank, maps in enumerate(ranks):
        holds = [i for i, labels in enumerate(expected) if rank < len(labels)]
        assert [int(maps.classes[i]) for i in holds] == [expected[i][rank] for i in holds]
        # The map of a label is LayerGradCam with target = that label, on the logits.
        captum = captum_signed(model, x, maps.classes.tolist())
        torch.testing.assert_close(maps.signed_map[holds], captum[holds], atol=1e-5, rtol=1e-4)
    assert torch.equal(result.present, result.logits.sigmoid() >= thresholds)


def test_per_label_thresholds_decide_presence_not_rank(shapes_multi_explainer):
    model = shapes_multi_explainer.model
    x = images(4, start=10)
    logits = model(x).detach()
    top = logits.argmax(1)
    # The top label of image 0 is held to an unreachable threshold; every other label is
    # present at once: the explained label is the most probable *present* one.
    thresholds = torch.full((len(CLASSES),), 1e-6)
    thresholds[top[0]] = 1 - 1e-7
    result = GradCam(model, LAYER).explain(x[:1], PresentLabels(thresholds, [()], [5]))
    probabilities = logits[0].sigmoid()
    order = [c for c in probabilities.argsort(descending=True).tolist() if c != int(top[0])]
    assert result.explained.classes.tolist() == order[:1]
    assert [int(m.classes[0]) for m in result.extra] == order[1:5]
    assert not result.present[0, top[0]]


def test_named_labels_are_explained_in_the_order_given(shapes_multi_explainer):
    model = shapes_multi_explainer.model
    x = images(3, start=20)
    thresholds = torch.full((len(CLASSES),), 0.5)
    choice = PresentLabels(thresholds, [(4, 0, 2), (), (5,)], [5, 1, 5])
    result = GradCam(model, LAYER).explain(x, choice)
    ranks = (result.explained, *result.extra)
    assert [int(r.classes[0]) for r in ranks] == [4, 0, 2]
    assert int(result.explained.classes[2]) == 5
    assert result.counts.tolist() == [3, 1, 1]
    for maps in ranks:
        captum = captum_signed(model, x, maps.classes.tolist())
        torch.testing.assert_close(maps.signed_map[0], captum[0], atol=1e-5, rtol=1e-4)


def test_compensated_network_oracle_holds_per_label(shapes_multi_explainer):
    """Each explained label's reported offset and score are those of the real
    reparameterised network, for that label's logit."""
    explainer = shapes_multi_explainer
    index = next(i for i in range(50) if len(multi_sample(i).labels) >= 2)
    [result] = explainer.explain([prepared(explainer, index)])
    assert result.more
    x = result.image.tensor[None]
    for item in (result.explained, *result.more)[:2]:
        expected = oracle(explainer.model, LAYER, x, explainer.calibration, [item.index])
        assert item.zero_reference.score == pytest.approx(expected.score, abs=1e-6)
        assert item.zero_reference.offset == pytest.approx(expected.offset, rel=1e-5, abs=1e-7)
    # Each label has its own offset c = <alpha^c, delta>.
    assert result.explained.zero_reference.offset != result.more[0].zero_reference.offset


class FunctionLog(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_softmax_is_never_applied_to_a_multi_label_model(shapes_multi_explainer, shapes_explainer):
    explainer = shapes_multi_explainer
    batch = [prepared(explainer, i) for i in range(4)]
    with FunctionLog() as log:
        results = explainer.explain(batch)
    assert "sigmoid" in log.names
    assert not {name for name in log.names if "softmax" in name}
    logits = explainer.model(torch.stack([item.tensor for item in batch])).detach()
    for result, row in zip(results, logits, strict=True):
        torch.testing.assert_close(result.probabilities, row.sigmoid())
    # The single-label path does use the softmax: the log sees it.
    with FunctionLog() as log:
        shapes_explainer.explain([shapes_explainer.prepare_image(multi_sample(0).image)])
    assert "softmax" in log.names


def test_batch_invariance(shapes_multi_explainer):
    explainer = shapes_multi_explainer
    batch = [prepared(explainer, i) for i in range(4)]
    together = explainer.explain(batch)
    for item, in_batch in zip(batch, together, strict=True):
        [alone] = explainer.explain([item])
        assert [e.index for e in (alone.explained, *alone.more)] == [
            e.index for e in (in_batch.explained, *in_batch.more)
        ]
        pairs = zip(
            (alone.explained, *alone.more), (in_batch.explained, *in_batch.more), strict=True
        )
        for a, b in pairs:
            torch.testing.assert_close(a.signed_map, b.signed_map, atol=1e-5, rtol=1e-4)
            assert a.zero_reference.score == pytest.approx(b.zero_reference.score, abs=1e-5)


# --- The answer.


def test_answer_lists_every_present_label(shapes_multi_explainer):
    explainer = shapes_multi_explainer
    seen_several = False
    for result in explainer.explain([prepared(explainer, index) for index in range(12)]):
        body = explanation_json(result)
        VALIDATOR.validate(body)
        assert body["multi_label"] is True
        probabilities = result.probabilities
        present = [c for c in range(len(CLASSES)) if probabilities[c] >= 0.5]
        present.sort(key=lambda c: -float(probabilities[c]))
        explained = [body["explained"], *body.get("more_explanations", [])]
        if present:
            assert [e["index"] for e in explained] == present
            assert all(e["present"] for e in explained)
        else:
            assert [e["index"] for e in explained] == [int(probabilities.argmax())]
            assert body["explained"]["present"] is False
        assert all(p["present"] == (p["probability"] >= 0.5) for p in body["predictions"])
        seen_several |= len(present) > 1
    assert seen_several


def test_maps_caps_the_present_labels_and_target_names_several(shapes_multi_explainer):
    explainer = shapes_multi_explainer
    index = next(i for i in range(50) if len(multi_sample(i).labels) == 3)
    [full] = explainer.explain([prepared(explainer, index)])
    [capped] = explainer.explain([prepared(explainer, index, maps=2)])
    assert len(capped.more) == 1 and capped.explained.index == full.explained.index
    [named] = explainer.explain([prepared(explainer, index, target=["ring", 1])])
    body = explanation_json(named)
    VALIDATOR.validate(body)
    assert [body["explained"]["label"], body["more_explanations"][0]["label"]] == [
        "ring",
        "square",
    ]
    assert body["explained"]["requested"] is True
    # A form field names several labels with commas.
    [form] = explainer.explain([prepared(explainer, index, target="ring, square")])
    assert [form.explained.index, form.more[0].index] == [5, 1]


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [
        (["ring", "hexagon"], "unknown_target", "'hexagon' is not a class"),
        ("ring,hexagon", "unknown_target", "'hexagon' is not a class"),
        ([0, 1, 2, 3, 4, 5], "bad_option", "names 6 labels; at most 5"),
        ([0, [1]], "unknown_target", "class index or label"),
    ],
)
def test_a_bad_target_list_is_that_items_error(shapes_multi_explainer, target, code, message):
    with pytest.raises(InputError) as caught:
        prepared(shapes_multi_explainer, 0, target=target)
    assert caught.value.code == code and message in caught.value.message


def test_a_target_list_needs_a_multi_label_model(shapes_explainer):
    request = ParsedRequest(png_bytes(multi_sample(0).image), RequestOptions(target=[1, 2]))
    with pytest.raises(InputError, match="only a multi-label model"):
        shapes_explainer.prepare(request)


def test_schema_ties_present_flags_to_multi_label(shapes_multi_explainer, shapes_explainer):
    [result] = shapes_multi_explainer.explain([prepared(shapes_multi_explainer, 0)])
    body = explanation_json(result)
    del body["predictions"][0]["present"]
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(body)
    single = explanation_json(
        shapes_explainer.explain([shapes_explainer.prepare_image(multi_sample(0).image)])[0]
    )
    VALIDATOR.validate(single)
    assert "multi_label" not in single
    single["explained"]["present"] = True
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(single)


def test_monitored_explanations_are_the_present_labels(shapes_multi_explainer):
    explainer = shapes_multi_explainer
    batch = [prepared(explainer, i) for i in range(8)]
    batch.append(prepared(explainer, 0, target=["ring"]))
    for result in explainer.explain(batch):
        monitored = result.monitored()
        explained = (result.explained, *result.more)
        assert [index for _, index, _ in monitored] == [e.index for e in explained]
        for _, index, requested in monitored:
            assert requested == (result.requested or not bool(result.present[index]))


# --- The overlay.


def test_png_answer_is_one_labelled_overlay_per_explained_label(shapes_multi_explainer):
    explainer = shapes_multi_explainer
    index = next(i for i in range(50) if len(multi_sample(i).labels) >= 2)
    [result] = explainer.explain([prepared(explainer, index)])
    explained = (result.explained, *result.more)
    assert len(explained) >= 2
    strip = Image.open(io.BytesIO(overlay_png(result))).convert("RGB")
    assert strip.width == len(explained) * 64 + (len(explained) - 1) * 4
    assert strip.height > 64  # the caption band
    from camserve.encode_png import background_of

    background = background_of(result)
    for position, item in enumerate(explained):
        panel = strip.crop((position * 68, 0, position * 68 + 64, 64))
        expected = overlay_image(item.grad_cam, background)
        assert panel.tobytes() == expected.tobytes()
        caption = strip.crop((position * 68, 64, position * 68 + 64, strip.height))
        assert caption.getextrema() != ((24, 24), (24, 24), (24, 24))  # text was drawn
    assert labelled_overlays(result, background).size == strip.size


# --- Configuration: declared, never guessed; refused when wrong.


def multi_section(**changes) -> dict:
    section = yaml.safe_load((SHAPES_MULTI_DIR / "model-config.yaml").read_text())["handler"]
    return {**section, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"presence_threshold": 1.0}, "strictly between 0 and 1"),
        ({"presence_threshold": 0}, "strictly between 0 and 1"),
        ({"multi_label": False}, "need multi_label: true"),
        ({"multi_label": "yes"}, "multi_label must be true or false"),
        ({"maps": 9}, "maps must be from 1 to 5"),
    ],
)
def test_bad_multi_label_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ExplainerConfig.from_handler_section(multi_section(**changes))


def test_threshold_file_must_name_known_labels(tmp_path):
    config = ExplainerConfig.from_handler_section(
        multi_section(label_thresholds="label_thresholds.json")
    )
    file = tmp_path / "label_thresholds.json"
    file.write_text('{"ring": 0.3, "hexagon": 0.5}')
    with pytest.raises(ValueError, match="labels the model does not have: 'hexagon'"):
        presence_thresholds(tmp_path, config, list(CLASSES))
    file.write_text('{"ring": 1.5}')
    with pytest.raises(ValueError, match="threshold of 'ring'.*strictly between 0 and 1"):
        presence_thresholds(tmp_path, config, list(CLASSES))
    file.write_text('{"ring": 0.01}')
    assert presence_thresholds(tmp_path, config, list(CLASSES)) == [0.5] * 5 + [0.01]
    with pytest.raises(ValueError, match="at least two outputs"):
        presence_thresholds(tmp_path, replace(config, label_thresholds=None), ["ring"])


# --- Archive flags.


def tiny_model(folder, labels: list[str]) -> list[str]:
    """A tiny custom model with one output per label; the archive arguments that build it."""
    (folder / "tiny.py").write_text(TINY_MODEL_SOURCE)
    model = build_model("Tiny", len(labels), folder / "tiny.py", "Tiny")
    torch.save(model.state_dict(), folder / "tiny.pt")
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    return [
        "archive", "--model-file", str(folder / "tiny.py"), "--model-class", "Tiny",
        "--weights", str(folder / "tiny.pt"), "--labels", str(folder / "labels.txt"),
        "--input-size", "32", "--center-crop", "none", "--export-path", str(folder / "store"),
    ]  # fmt: skip


def test_archive_declares_a_multi_label_head(tmp_path, capsys):
    args = tiny_model(tmp_path, ["cat", "dog", "bird"])
    (tmp_path / "thresholds.json").write_text('{"bird": 0.3}')
    code = camserve(
        [*args, "--multi-label", "--threshold", "0.4", "--label-thresholds",
         str(tmp_path / "thresholds.json"), "--name", "pets"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "multi-label (sigmoid; present at p >= 0.4, per-label thresholds from" in out
    with zipfile.ZipFile(tmp_path / "store" / "pets.mar") as mar:
        section = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
        shipped = json.loads(mar.read("label_thresholds.json"))
        mar.extractall(tmp_path / "unpacked")
    assert section["multi_label"] is True and section["presence_threshold"] == 0.4
    assert section["label_thresholds"] == "label_thresholds.json" and shipped == {"bird": 0.3}
    explainer = Explainer.from_directory(tmp_path / "unpacked")
    assert explainer.thresholds == [0.4, 0.4, 0.3] and explainer.served.multi_label


@pytest.mark.parametrize(
    ("labels", "extra", "message"),
    [
        (["only"], ["--multi-label"], "--multi-label needs a model with at least two outputs"),
        (["a", "b"], ["--multi-label", "--threshold", "1.5"], "strictly between 0 and 1, got 1.5"),
        (["a", "b"], ["--multi-label", "--threshold", "0"], "strictly between 0 and 1, got 0.0"),
        (["a", "b"], ["--threshold", "0.3"], "apply only with --multi-label"),
        (
            ["a", "b"],
            ["--multi-label", "--label-thresholds", "T"],
            "names labels the model does not have: 'hexagon'",
        ),
        (["a", "b"], ["--multi-label", "--label-thresholds", "MISSING"], "does not exist"),
    ],
)
def test_bad_multi_label_archives_exit_2_with_one_line(tmp_path, capsys, labels, extra, message):
    args = tiny_model(tmp_path, labels)
    (tmp_path / "t.json").write_text('{"a": 0.5, "hexagon": 0.5}')
    extra = [
        str(tmp_path / "t.json") if a == "T" else str(tmp_path / "nope.json")
        if a == "MISSING" else a
        for a in extra
    ]  # fmt: skip
    code = camserve([*args, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_model_dir_with_a_bad_threshold_file_is_not_packed(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in SHAPES_MULTI_DIR.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    config["handler"]["label_thresholds"] = "label_thresholds.json"
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    (folder / "label_thresholds.json").write_text('{"hexagon": 0.5}')
    code = camserve(["archive", "--model-dir", str(folder), "--export-path", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "names labels the model does not have: 'hexagon'" in err, err


# --- The client's table and CSV: one row per image and label.


def test_client_rows_and_csv_list_every_explained_label(shapes_multi_explainer, tmp_path):
    explainer = shapes_multi_explainer
    index = next(i for i in range(50) if len(multi_sample(i).labels) >= 2)
    [result] = explainer.explain([prepared(explainer, index)])
    body = explanation_json(result)
    outcomes = [
        Outcome(Path("multi.png"), body=body),
        Outcome(Path("bad.png"), error="HTTP 415 nope"),
    ]
    labels = [body["explained"]["label"]] + [m["label"] for m in body["more_explanations"]]
    lines = format_table(outcomes).splitlines()
    assert lines[0].split() == ["file", "label", "probability", "present", "score", "stable"]
    assert [line.split()[1] for line in lines[1:-1]] == labels
    assert all(line.split()[3] == "yes" for line in lines[1:-1])
    assert lines[-1].split()[:2] == ["bad.png", "ERROR"]
    assert write_csv(outcomes, tmp_path / "rows.csv") == len(labels) + 1
    with open(tmp_path / "rows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows[:-1]] == labels
    assert {row["file"] for row in rows[:-1]} == {"multi.png"}
    assert all(row["present"] == "true" and row["requested"] == "false" for row in rows[:-1])
    assert rows[-1]["error"] == "HTTP 415 nope" and rows[-1]["label"] == ""


# --- Calibration: the drift baseline over present labels.


def test_calibration_baseline_counts_the_present_labels(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in SHAPES_MULTI_DIR.iterdir():
        if item.name != "calibration.pt":
            (folder / item.name).write_bytes(item.read_bytes())
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    config["handler"].pop("calibration", None)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    images = [multi_sample(i).image for i in range(12)]
    calibrate_model_dir(
        folder, iter(images), "test", len(images), 6, progress=False, baseline_images=iter(images)
    )
    explainer = Explainer.from_directory(folder)
    baseline = explainer.score_baseline
    own = [
        block.score
        for result in explainer.explain([explainer.prepare_image(image) for image in images])
        for block, _, requested in result.monitored()
        if not requested
    ]
    assert baseline.images == len(own) > len(images)  # several present labels per image
    assert baseline == ScoreBaseline.from_scores(own)
    # Images with no shape leave nothing to record: refused, not an empty baseline.
    blank = [Image.new("RGB", (64, 64), (grey, grey, grey)) for grey in (40, 128, 220)]
    with pytest.raises(ValueError, match="no calibration image has a present label"):
        calibrate_model_dir(
            folder, iter(blank), "test", 3, 6, progress=False, baseline_images=iter(blank)
        )


# --- timm and transformers: declared by the flag, or by transformers' problem_type.


def _every_label_equals_captum(explainer, labels) -> None:
    """A real photo: sigmoid probabilities of the served network, every label present (the
    thresholds are set low), and each label's map equal to Captum's for that label."""
    from tests.library_models import jpeg_bytes, photos

    image = photos()["256x256 square"]
    request = ParsedRequest(jpeg_bytes(image), RequestOptions())
    [result] = explainer.explain([explainer.prepare(request)])
    x = result.image.tensor[None]
    with torch.no_grad():
        logits = explainer.model(x)[0]
    torch.testing.assert_close(result.probabilities, logits.sigmoid(), atol=1e-6, rtol=0)
    explained = (result.explained, *result.more)
    assert sorted(e.index for e in explained) == list(range(len(labels)))
    assert [e.index for e in explained] == logits.argsort(descending=True).tolist()
    tap = explainer.model.get_submodule(explainer.gradcam.layer_name)
    for item in explained:
        captum = LayerGradCam(explainer.model, tap).attribute(x, target=item.index)[0, 0]
        scale = captum.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(
            item.signed_map / scale, captum.detach() / scale, atol=1e-5, rtol=0
        )


def test_transformers_problem_type_declares_a_multi_label_head(tmp_path):
    from tests.library_models import LABELS, save_transformers_folder

    folder = save_transformers_folder("resnet", tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (folder / "config.json").write_text(json.dumps(config))
    summary = write_model_dir(tmp_path / "model", pretrained=folder, presence_threshold=0.001)
    assert "multi-label (sigmoid; present at p >= 0.001)" in summary.describe()
    explainer = Explainer.from_directory(tmp_path / "model")
    assert explainer.config.multi_label and explainer.thresholds == [0.001] * len(LABELS)
    _every_label_equals_captum(explainer, LABELS)
    # A folder that says single-label is not turned multi-label by the flag: refused.
    config["problem_type"] = "single_label_classification"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--multi-label contradicts the folder's config.json"):
        write_model_dir(tmp_path / "other", pretrained=folder, multi_label=True)
    assert not write_model_dir(tmp_path / "plain", pretrained=folder).head.startswith("multi")


def test_timm_model_archived_with_the_multi_label_flag(tmp_path):
    from safetensors.torch import save_file

    from tests.library_models import LABELS, timm_model

    save_file(timm_model("resnet18").state_dict(), tmp_path / "resnet18.safetensors")
    write_model_dir(
        tmp_path / "model", tmp_path / "resnet18.safetensors", "timm:resnet18", labels=LABELS,
        data_config={"input_size": (64, 64)}, multi_label=True, presence_threshold=0.001,
    )  # fmt: skip
    explainer = Explainer.from_directory(tmp_path / "model")
    assert explainer.served.multi_label
    _every_label_equals_captum(explainer, LABELS)


# --- The shipped model: committed weights and record, and figures that hold.


def test_shapes_multi_weights_are_small_and_recorded():
    assert (SHAPES_MULTI_DIR / "shapes-multi.pt").stat().st_size <= 2 * 1024 * 1024
    labels = json.loads((SHAPES_MULTI_DIR / "index_to_name.json").read_text())
    assert [labels[str(i)] for i in range(len(CLASSES))] == list(CLASSES)
    record = json.loads((SHAPES_MULTI_DIR / "training.json").read_text())
    assert record["seed"] == 0 and record["multi_label"] and record["seconds"] > 0
    assert "harness.shapes.train --multi-label" in record["command"]


def test_held_out_precision_and_per_label_pointing_game(shapes_multi_explainer):
    metrics = evaluate_multi(shapes_multi_explainer, count=200)
    assert metrics["mean_average_precision"] >= 0.99
    assert metrics["exact_set_accuracy"] >= 0.95
    # Each label's map peaks on its own object, and essentially never on another one.
    assert metrics["several_objects"]["pointing_game"] >= 0.8
    assert metrics["several_objects"]["peak_on_another_object"] <= 0.02
    assert metrics["several_objects"]["peak_nearest_its_own_object"] >= 0.97


def test_multi_label_examples_are_answered_with_their_shapes(shapes_multi_explainer):
    explainer = shapes_multi_explainer
    paths = sorted((SHAPES_MULTI_DIR.parents[1] / "examples" / "multi").glob("*.png"))
    assert paths
    images = [Image.open(path).convert("RGB") for path in paths]
    for path, result in zip(paths, explainer.explain(list(map(explainer.prepare_image, images))),
                            strict=True):  # fmt: skip
        explained = {explainer.labels[e.index] for e in (result.explained, *result.more)}
        assert explained == set(path.stem.split("+")), path.name
