"""Monitoring: config/metrics.yaml, the handler's metrics, Prometheus rules and the dashboard.

The integration test runs a real TorchServe and a real Prometheus scraping it, posts a known
mix of requests, and compares what Prometheus stored with what was sent. Prometheus and
promtool must be installed (``make test`` and ``make monitor`` install Debian's package): without
them these tests fail, they do not skip.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import requests
import ts
import yaml
from PIL import Image, ImageEnhance
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from camserve import telemetry
from camserve.encode_json import load_schema
from camserve.errors import ERROR_CODES
from camserve.explainer import Explainer
from camserve.request import ParsedRequest, RequestOptions
from camserve.tools.calibrate import CALIBRATION_FILE, calibrate_model_dir, score_baseline
from camserve.zero_reference import WorstCase, ZeroReference
from harness.local_prometheus import UI_PAGES, LocalPrometheus, executable, local_config
from harness.local_prometheus import main as prometheus_main
from harness.local_torchserve import LocalTorchServe, free_port
from harness.shapes.dataset import TRAIN_SEED, render_sample
from tests.conftest import CONFIG, REPO, SHAPES_DIR, held_out, png_bytes, shapes_variant_store

METRICS_YAML = REPO / "config" / "metrics.yaml"
PROMETHEUS_DIR = REPO / "config" / "prometheus"
DASHBOARD = REPO / "config" / "grafana" / "dashboards" / "camserve.json"
GRAFANA_PROVISIONING = REPO / "config" / "grafana" / "provisioning"
MODEL = "shapes"
SETTLE_TIMEOUT_S = 60


def declared(section: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (type, dimensions) for one section of config/metrics.yaml."""
    spec = yaml.safe_load(METRICS_YAML.read_text())[section]
    return {m["name"]: (kind, m["dimensions"]) for kind, items in spec.items() for m in items}


def recorded_names() -> set[str]:
    """The series the recording rules of config/prometheus/rules.yml write."""
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"]}


def exported_names() -> set[str]:
    """Every series name TorchServe exports with our metrics.yaml, Prometheus's ``up`` and
    what the recording rules write."""
    names = {"up"} | recorded_names()
    for section in ("ts_metrics", "model_metrics"):
        for name, (kind, _) in declared(section).items():
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names.update(name + suffix for suffix in suffixes)
    return names


_PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in _PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_names() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def rule_exprs() -> list[str]:
    """The expressions of every alerting and recording rule."""
    exprs = []
    for name in ("alerts.yml", "rules.yml"):
        rules = yaml.safe_load((PROMETHEUS_DIR / name).read_text())
        exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs


# --- metrics.yaml and the recorder -------------------------------------------------------


def test_metric_names_follow_prometheus_conventions():
    for name, kind in telemetry.METRICS.items():
        assert name.startswith("camserve_") and name == name.lower()
        assert name.endswith("_total") == (kind == "counter"), name
    assert telemetry.STAGE_SECONDS.endswith("_seconds")


def test_metrics_yaml_declares_every_camserve_metric_with_model_dimensions_last():
    model_metrics = declared("model_metrics")
    for name, kind in telemetry.RECORDED.items():
        assert name in model_metrics, f"{name} is not declared in {METRICS_YAML}"
        declared_kind, dimensions = model_metrics[name]
        assert declared_kind == kind
        assert dimensions[-2:] == ["ModelName", "Level"], name
        assert "Hostname" not in dimensions  # the frontend adds it to model metrics


def test_metrics_yaml_redeclares_torchserve_defaults():
    default_yaml = Path(ts.__file__).parent / "configs" / "metrics.yaml"
    defaults = yaml.safe_load(default_yaml.read_text())
    ours = yaml.safe_load(METRICS_YAML.read_text())
    for section in ("ts_metrics", "model_metrics"):
        for kind, items in defaults[section].items():
            mine = {m["name"]: m for m in ours[section].get(kind, [])}
            for metric in items:
                assert metric["name"] in mine, f"default {section}.{kind} {metric['name']} dropped"
                assert mine[metric["name"]]["dimensions"] == metric["dimensions"]
                assert mine[metric["name"]]["unit"] == metric["unit"]


def test_error_reasons_are_the_response_error_codes():
    schema_codes = set(load_schema()["$defs"]["error"]["properties"]["code"]["enum"])
    assert set(telemetry.ERROR_REASONS) == schema_codes
    assert set(ERROR_CODES) < schema_codes
    assert telemetry.error_reason("undecodable_image") == "undecodable_image"
    assert telemetry.error_reason("something_new") == "internal_error"


@pytest.mark.parametrize(
    ("score", "band"),
    [(0.0, "0.0-0.1"), (0.0999, "0.0-0.1"), (0.1, "0.1-0.2"), (0.25, "0.2-0.3"),
     (0.95, "0.9-1.0"), (1.0, "0.9-1.0"), (1.0000001, "0.9-1.0"), (-0.0, "0.0-0.1")],
)  # fmt: skip
def test_score_band(score, band):
    assert telemetry.score_band(score) == band
    assert len(telemetry.SCORE_BANDS) == len(set(telemetry.SCORE_BANDS)) == 10


def test_recorder_emits_what_torchserve_accepts(shapes_explainer, caplog):
    """TorchServe's own metrics cache, loaded from our metrics.yaml, takes every record: a
    metric with the wrong number of labels would only log an error and be lost."""
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    recorder = telemetry.Telemetry(cache, MetricTypes, MODEL)
    prepared = shapes_explainer.prepare_image(held_out(0).image)
    [result] = shapes_explainer.explain([prepared])
    baseline = telemetry.ScoreBaseline.from_scores([0.05, 0.15, 0.15, 1.0])
    sanity = shapes_explainer.sanity  # the shipped calibration file's result
    with caplog.at_level(logging.INFO):
        recorder.loaded(True, baseline, sanity)
        with recorder.handling():
            recorder.explained_batch([(result.explained.zero_reference, None, False)])
            recorder.explained_batch(
                [(result.explained.zero_reference, result.explained.index, True)]
            )
            recorder.error("unknown_target")
            recorder.error("no_such_code")
            recorder.stage("decode", 0.004)
    lines = [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]
    failures = ("Failed", "could not record")
    assert not [r for r in caplog.records if any(f in r.getMessage() for f in failures)]
    emitted = Counter()
    for line in lines:
        match = re.match(r"\[METRICS\](\w+)\.\w+:([0-9.e-]+)\|#([^|]*)\|#type:(\w+)\|", line)
        assert match, line
        name, value, dims, kind = match.groups()
        labels = dict(pair.split(":", 1) for pair in dims.split(","))
        assert list(labels)[-2:] == ["ModelName", "Level"]
        assert labels["ModelName"] == MODEL and labels["Level"] == "Model"
        assert kind == telemetry.RECORDED[name].upper()
        label = labels.get("reason") or labels.get("band") or labels.get("stage")
        label = label or labels.get("step")
        emitted[(name, label, labels.get("requested"))] += float(value)
    # loaded(): every counter series exists at 0, the gauges are set.
    assert emitted[(telemetry.COMPENSABLE, None, None)] == 1.0
    assert emitted[(telemetry.ERRORS, "unknown_target", None)] == 1
    assert emitted[(telemetry.ERRORS, "internal_error", None)] == 1
    assert emitted[(telemetry.ERRORS, "bad_option", None)] == 0 and (
        (telemetry.ERRORS, "bad_option", None) in emitted
    )
    # The same result, once as the top-1 and once as a requested class.
    unstable = 0 if result.explained.zero_reference.stable else 1
    band = telemetry.score_band(result.explained.zero_reference.score)
    for requested in ("false", "true"):
        assert emitted[(telemetry.EXPLANATIONS, None, requested)] == 1
        assert emitted[(telemetry.UNSTABLE, None, requested)] == unstable
        assert (
            emitted[(telemetry.EMPTY_MAPS, None, requested)]
            == result.explained.zero_reference.map_empty
        )
        assert emitted[(telemetry.SCORE_BANDS_METRIC, band, requested)] == 1
        assert math.isclose(
            emitted[(telemetry.SCORE_SUM, None, requested)], result.explained.zero_reference.score
        )
    assert emitted[(telemetry.STAGE_SECONDS, "decode", None)] == pytest.approx(0.004)
    bands = {key for key in emitted if key[0] == telemetry.SCORE_BANDS_METRIC}
    assert len(bands) == 2 * 10
    # The baseline: one gauge per band, and how many calibration images it holds.
    assert emitted[(telemetry.BASELINE_IMAGES, None, None)] == 4
    shares = {key[1]: emitted[key] for key in emitted if key[0] == telemetry.BASELINE_SHARE}
    assert shares == {**dict.fromkeys(telemetry.SCORE_BANDS, 0.0), "0.0-0.1": 0.25,
                      "0.1-0.2": 0.5, "0.9-1.0": 0.25}  # fmt: skip
    # The sanity check: the verdict, and the median rank correlation after each step.
    assert emitted[(telemetry.SANITY_PASSED, None, None)] == 1.0
    steps = {key[1]: emitted[key] for key in emitted if key[0] == telemetry.SANITY_RANK_CORRELATION}
    assert steps == {
        telemetry.sanity_step_label(number, step.stage): pytest.approx(step.rank_correlation.median)
        for number, step in enumerate(sanity.steps, 1)
    }
    assert "02-features.12+features.13" in steps
    # HandlerTime, which TorchServe's metrics.yaml declares, in ms.
    assert 0 < emitted[(telemetry.HANDLER_TIME, None, None)] < 60_000


def test_without_a_baseline_or_a_sanity_result_no_such_series(caplog):
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    with caplog.at_level(logging.INFO):
        telemetry.Telemetry(cache, MetricTypes, MODEL).loaded(False, None)
    emitted = recorded(caplog)
    assert emitted[(telemetry.BASELINE_IMAGES, None)] == 0
    assert (telemetry.BASELINE_IMAGES, None) in emitted
    assert not [key for key in emitted if key[0] == telemetry.BASELINE_SHARE]
    # No sanity result (an uncalibrated archive, an older calibration file): no sanity series,
    # so the sanity alert has nothing to fire on.
    sanity_metrics = (telemetry.SANITY_PASSED, telemetry.SANITY_RANK_CORRELATION)
    assert not [key for key in emitted if key[0] in sanity_metrics]


def test_score_baseline_round_trip_and_validation():
    baseline = telemetry.ScoreBaseline.from_scores([0.0, 0.35, 0.99, 0.35])
    assert baseline.images == 4 and sum(baseline.shares.values()) == pytest.approx(1)
    assert baseline.shares["0.3-0.4"] == 0.5
    assert telemetry.ScoreBaseline.from_dict(baseline.to_dict()) == baseline
    assert telemetry.ScoreBaseline.from_dict({"mean": 0}) is None  # calibrated before baselines
    with pytest.raises(ValueError):
        telemetry.ScoreBaseline.from_dict(
            {"score_baseline": {"0.0-0.1": 1.0}, "score_baseline_images": 1}
        )
    with pytest.raises(ValueError):
        telemetry.ScoreBaseline.from_scores([])


def test_calibrate_writes_the_baseline_the_server_will_compare_with(tmp_path):
    """`camserve calibrate`'s baseline is the band shares of the scores that the model,
    loaded with the file it wrote, gives its calibration images (top-1); without the second
    pass of images the file has no baseline, and the loaded model none either."""
    folder = tmp_path / "shapes"
    shutil.copytree(SHAPES_DIR, folder, ignore=shutil.ignore_patterns(CALIBRATION_FILE))
    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    config["handler"].pop("calibration", None)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    images = [held_out(index).image for index in range(40, 52)]
    # Two sanity images: this test is about the baseline (test_sanity.py checks the check).
    calibrate_model_dir(
        folder, iter(images), "test", 12, 5, False, baseline_images=iter(images), sanity_images=2
    )
    loaded = Explainer.from_directory(folder)
    explained = loaded.explain([loaded.prepare_image(image) for image in images])
    expected = telemetry.ScoreBaseline.from_scores(
        item.explained.zero_reference.score for item in explained
    )
    assert loaded.score_baseline == expected and expected.images == 12
    calibrate_model_dir(folder, iter(images), "test", 12, 5, False, sanity_images=2)
    assert Explainer.from_directory(folder).score_baseline is None


def test_the_shipped_shapes_model_carries_its_baseline(shapes_explainer):
    """models/shapes/calibration.pt has the top-1 score shares of its 4000 calibration images."""
    baseline = shapes_explainer.score_baseline
    assert baseline is not None and baseline.images == shapes_explainer.calibration.count == 4000
    assert sum(baseline.shares.values()) == pytest.approx(1)
    # The first 400 of those images, explained by today's code, are distributed like the
    # stored shares: a change to the score computation shifts them and must come with a new
    # baseline (`make calibrate-shapes`), or the drift alert would report the change as drift.
    # 400 held-out images give 0.0004; a score change that moved 5.6% of the mass from
    # [0.1, 0.2) to [0, 0.1) gave 0.06.
    images = [render_sample(TRAIN_SEED, index).image for index in range(400)]
    sample = score_baseline(shapes_explainer, images, batch_size=50, progress=False)
    assert population_stability(sample.shares, baseline.shares) < 0.03


def population_stability(live: dict[str, float], base: dict[str, float]) -> float:
    """The drift statistic of config/prometheus/rules.yml, in Python."""
    return sum(
        (live[band] - base[band]) * math.log((live[band] + 0.001) / (base[band] + 0.001))
        for band in telemetry.SCORE_BANDS
    )


def recorded(caplog) -> Counter:
    """(metric, first extra label) -> summed value, from TorchServe's [METRICS] log lines."""
    emitted = Counter()
    for record in caplog.records:
        match = re.match(r"\[METRICS\](\w+)\.\w+:([0-9.e-]+)\|#([^|]*)\|", record.getMessage())
        if match:
            name, value, dims = match.groups()
            labels = dict(pair.split(":", 1) for pair in dims.split(","))
            extra = [v for k, v in labels.items() if k not in ("ModelName", "Level")]
            emitted[(name, extra[0] if extra else None)] += float(value)
    return emitted


def test_a_batch_sums_its_counters_into_one_line_per_series(caplog):
    """Counters go out once per label set with the batch's count (each line costs the worker
    and the frontend), the score sum too."""
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    recorder = telemetry.Telemetry(cache, MetricTypes, MODEL, [f"c{i}" for i in range(6)])

    def block(score: float, empty: bool = False):
        return ZeroReference(
            "calibration_mean", -0.1, score, WorstCase(0.1, 0.2, 0.2, score), 1.0, 0.0,
            score <= 0.25, 0.25, True, empty, empty,
        )  # fmt: skip

    shown = [(block(0.05), 1, False), (block(0.07), 1, False), (block(0.5, True), 2, False),
             (block(0.05), 4, True)]  # fmt: skip
    with caplog.at_level(logging.INFO):
        recorder.explained_batch(shown)
    lines = Counter()
    values = Counter()
    for record in caplog.records:
        match = re.match(r"\[METRICS\](\w+)\.\w+:([0-9.e-]+)\|#([^|]*)\|", record.getMessage())
        if match:
            labels = tuple(v for k, v in (p.split(":", 1) for p in match[3].split(",")))
            lines[match[1], labels[:-2]] += 1
            values[match[1], labels[:-2]] += float(match[2])
    assert values[telemetry.EXPLANATIONS, ("false",)] == 3
    assert values[telemetry.EXPLANATIONS, ("true",)] == 1
    assert values[telemetry.SCORE_BANDS_METRIC, ("0.0-0.1", "false")] == 2
    assert values[telemetry.SCORE_BANDS_METRIC, ("0.5-0.6", "false")] == 1
    assert (
        values[telemetry.UNSTABLE, ("false",)] == 1
        and values[telemetry.EMPTY_MAPS, ("false",)] == 1
    )
    assert values[telemetry.CLASS_EXPLANATIONS, ("c1",)] == 2
    assert values[telemetry.CLASS_UNSTABLE, ("c2",)] == 1
    assert set(lines.values()) == {1}  # one line per series, the score sum's too
    assert values[telemetry.SCORE_SUM, ("false",)] == pytest.approx(0.62)
    assert values[telemetry.SCORE_SUM, ("true",)] == pytest.approx(0.05)


@pytest.mark.parametrize("classes", [6, telemetry.MAX_CLASS_LABELS + 1])
def test_class_metrics_only_for_few_classes(shapes_explainer, caplog, classes):
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    labels = [f"class {i}, odd:name" for i in range(classes)]
    recorder = telemetry.Telemetry(cache, MetricTypes, MODEL, labels)
    [result] = shapes_explainer.explain([shapes_explainer.prepare_image(held_out(1).image)])
    with caplog.at_level(logging.INFO):
        recorder.loaded(True)
        recorder.explained_batch([(result.explained.zero_reference, 3, False)])
    emitted = recorded(caplog)
    class_series = {key for key in emitted if key[0] == telemetry.CLASS_EXPLANATIONS}
    if classes > telemetry.MAX_CLASS_LABELS:
        assert class_series == set()
        assert any("no per-class series" in r.getMessage() for r in caplog.records)
        return
    # Commas and colons would break TorchServe's metric line: they are replaced.
    assert len(class_series) == classes
    assert emitted[(telemetry.CLASS_EXPLANATIONS, "class_3__odd_name")] == 1
    unstable = emitted[(telemetry.CLASS_UNSTABLE, "class_3__odd_name")]
    assert unstable == (0 if result.explained.zero_reference.stable else 1)
    assert not [r for r in caplog.records if "Failed" in r.getMessage()]


def test_stages_timed_in_a_batch_are_one_observation_each(caplog):
    """Inside ``handling()`` every stage is observed once, with the batch's total, whether
    timed or reported; a raising block still counts; outside a batch it is recorded at once."""
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    recorder = telemetry.Telemetry(cache, MetricTypes, MODEL)
    with caplog.at_level(logging.INFO):
        with recorder.handling():
            for _ in range(3):
                with recorder.timed("decode"):
                    time.sleep(0.01)
            with pytest.raises(ValueError), recorder.timed("encode"):
                raise ValueError("an encoder bug")
            for _ in range(2):  # explain() reports its stages directly (twice when retried)
                recorder.stage("forward_gradcam", 0.01)
            assert not [r for r in caplog.records if "[METRICS]" in r.getMessage()]
        with recorder.timed("encode"):
            pass
    lines = [r.getMessage() for r in caplog.records if "stage_duration" in r.getMessage()]
    decode = [line for line in lines if "stage:decode" in line]
    # decode, encode and forward_gradcam of the batch, then encode alone
    assert len(decode) == 1 and len(lines) == 4
    assert recorded(caplog)[(telemetry.STAGE_SECONDS, "decode")] >= 0.03
    assert recorded(caplog)[(telemetry.STAGE_SECONDS, "forward_gradcam")] == pytest.approx(0.02)


def test_recorder_without_our_metrics_yaml_warns_once_and_never_raises(caplog):
    """Served with TorchServe's default metrics.yaml, predictions still work; the log says
    once per metric what is missing instead of once per request."""
    cache = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    recorder = telemetry.Telemetry(cache, MetricTypes, MODEL)
    with caplog.at_level(logging.WARNING, logger="camserve.telemetry"):
        for _ in range(3):
            recorder.error("bad_option")
            recorder.stage("encode", 0.001)
    warnings = [r.getMessage() for r in caplog.records if r.name == "camserve.telemetry"]
    assert len(warnings) == 2
    assert all("metrics_config" in message for message in warnings)


# --- Prometheus rules, Grafana dashboard ----------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable("promtool"), *args], capture_output=True, text=True, timeout=120
    )


def test_promtool_checks_the_shipped_config_and_rules(tmp_path):
    for args in (
        ("check", "config", str(PROMETHEUS_DIR / "prometheus.yml")),
        ("check", "rules", str(PROMETHEUS_DIR / "rules.yml"), str(PROMETHEUS_DIR / "alerts.yml")),
        ("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")),
    ):
        result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout + result.stderr
    # The config `make monitor` and the tests generate is valid too.
    generated = tmp_path / "prometheus.yml"
    generated.write_text(yaml.safe_dump(local_config("127.0.0.1:1234", "1s")))
    result = promtool("check", "config", str(generated))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_non_firing_unit_test():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    assert set(tests["rule_files"]) == {"rules.yml", "alerts.yml"}
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alert_names() == firing == silent


def test_promql_metric_name_extraction():
    expr = (
        'histogram_quantile(0.99, sum by (stage, le) (rate(a_bucket{ModelName=~"$model"}'
        '[$__rate_interval]))) / on (x) b_total unless label_replace(c, "d", "$1", "e", "(.*)")'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_dashboard_and_alerts_only_use_exported_metrics():
    exported = exported_names()
    exprs = dashboard_exprs() + rule_exprs()
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used - exported == set()
    # Each camserve metric appears on the dashboard: a new metric gets a panel too.
    dashboard_used = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    for name, kind in telemetry.METRICS.items():
        variants = {name} | (
            {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set()
        )
        assert dashboard_used & variants, f"{name} is on no dashboard panel"


def test_dashboard_is_provisionable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    kinds = Counter(p["type"] for p in panels)
    assert kinds["heatmap"] >= 1 and kinds["stat"] >= 1 and kinds["timeseries"] >= 4
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
            assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    # Importable through Grafana's UI: the import dialog asks for the data source and the
    # job (the inputs), and fills them in where ${DS_PROMETHEUS} and ${VAR_JOB} stand.
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert inputs["VAR_JOB"]["type"] == "constant" and inputs["VAR_JOB"]["value"] == "torchserve"
    assert {(r["type"], r["id"]) for r in dashboard["__requires"]} >= {
        ("grafana", "grafana"),
        ("datasource", "prometheus"),
        *(("panel", kind) for kind in kinds if kind != "row"),
    }
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    assert variables["job"]["current"]["value"] == "${VAR_JOB}"
    # Provisioned (no import dialog), the variables resolve themselves: the datasource
    # variable falls back to the default Prometheus, the job is a query over `up`.
    assert variables["job"]["definition"] == "label_values(up, job)"
    text = DASHBOARD.read_text()
    assert text.count("${DS_PROMETHEUS}") == 2 and text.count("${VAR_JOB}") == 2
    assert 'job="torchserve"' not in text and "$job" in text
    assert (
        promql_metric_names(
            re.sub(r"label_values\((\w+)[{,].*", r"\1", variables["model"]["definition"])
        )
        <= exported_names()
    )
    datasource = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )
    [source] = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://127.0.0.1:")
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "camserve.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


# --- A real TorchServe scraped by a real Prometheus ---------------------------------------


def metrics_target(server) -> str:
    return server.metrics_url.removeprefix("http://").rstrip("/")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Its own TorchServe, serving shapes with per-class metrics on (6 classes)."""
    store = shapes_variant_store(tmp_path_factory, "class_metrics", {"class_metrics": True})
    instance = LocalTorchServe.on_free_ports(
        tmp_path_factory.mktemp("ts_monitoring"), CONFIG, store
    )
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    instance = LocalPrometheus(
        tmp_path_factory.mktemp("prometheus"), metrics_target(server), free_port(), "1s"
    )
    instance.start()
    yield instance
    instance.stop()


def snapshot(prometheus) -> dict[tuple[str, str | None, str | None], float]:
    """(metric, stage/reason/band/class/le/step label, requested) -> value, for every camserve
    series of the model."""
    values = {}
    for series in prometheus.query(f'{{__name__=~"camserve_.*", ModelName="{MODEL}"}}'):
        labels = series["metric"]
        key = next(
            (labels[k] for k in ("stage", "reason", "band", "class", "le", "step") if k in labels),
            None,
        )
        values[(labels["__name__"], key, labels.get("requested"))] = float(series["value"][1])
    return values


def wait_for_scrape_after(prometheus, moment: float) -> None:
    """Until Prometheus holds a scrape of TorchServe that started after ``moment``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        result = prometheus.query('timestamp(up{job="torchserve"} == 1)')
        if result and float(result[0]["value"][1]) > moment:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no successful scrape after {moment}: {prometheus.log_tail()}")


def post(server, data=None, **kwargs) -> requests.Response:
    return requests.post(
        f"{server.inference_url}/predictions/{MODEL}",
        data=data,
        headers=server.auth(),
        timeout=60,
        **kwargs,
    )


def as_json(png: bytes, **options) -> dict:
    return {"json": {"image": base64.b64encode(png).decode(), **options}}


def find_empty_map_targets(explainer, count: int) -> list[tuple[bytes, int]]:
    """(PNG, target) pairs whose Grad-CAM map is empty, found with the in-process explainer."""
    found = []
    for index in range(40, 100):
        png = png_bytes(held_out(index).image)
        batch = [
            explainer.prepare(ParsedRequest(png, RequestOptions(target=target)))
            for target in range(len(explainer.labels))
        ]
        for target, result in enumerate(explainer.explain(batch)):
            if result.explained.zero_reference.map_empty:
                found.append((png, target))
                break
        if len(found) == count:
            return found
    pytest.fail(f"only {len(found)} of {count} inputs with an empty map in 60 held-out images")


def too_large_png(max_pixels: int) -> bytes:
    side = math.isqrt(max_pixels) + 1
    return png_bytes(Image.new("1", (side, side)))


def test_prometheus_counts_what_was_sent(server, prometheus, shapes_explainer):
    good = [png_bytes(held_out(index).image) for index in range(20, 24)]
    empty = find_empty_map_targets(shapes_explainer, 2)
    truncated = good[0][: len(good[0]) // 2]
    bad = [  # (request, expected error code)
        ({"data": b"\x89PNG\r\n\x1a\n not really a png"}, "undecodable_image"),
        ({"data": truncated}, "undecodable_image"),
        ({"data": too_large_png(shapes_explainer.config.max_pixels)}, "image_too_large"),
        ({"data": b'<svg xmlns="http://www.w3.org/2000/svg"></svg>'}, "unsupported_format"),
        (as_json(good[1], topk=0), "bad_option"),
        (as_json(good[2], target="hexagon"), "unknown_target"),
    ]
    explained = [{"data": png} for png in good]
    explained += [as_json(png, target=target) for png, target in empty]
    # What the server must report, from the same bytes explained in-process.
    expected_explained = [
        shapes_explainer.explain(
            [shapes_explainer.prepare(ParsedRequest(body, RequestOptions(target=target)))]
        )[0]
        for body, target in [(p, None) for p in good] + empty
    ]
    expected_results = [e.explained.zero_reference for e in expected_explained]
    labels = [telemetry.class_label_value(label) for label in shapes_explainer.labels]

    wait_for_scrape_after(prometheus, time.time() + 1)
    before = snapshot(prometheus)
    assert before.get((telemetry.COMPENSABLE, None, None)) == float(
        shapes_explainer.compensation.compensable
    )
    # The shipped sanity check's verdict and curve, exported once at load.
    assert before.get((telemetry.SANITY_PASSED, None, None)) == 1.0
    for number, step in enumerate(shapes_explainer.sanity.steps, 1):
        label = telemetry.sanity_step_label(number, step.stage)
        gauge = before.get((telemetry.SANITY_RANK_CORRELATION, label, None))
        assert gauge == pytest.approx(step.rank_correlation.median, abs=1e-4)
    for kwargs, expected in zip(explained, expected_results, strict=True):
        response = post(server, **kwargs)
        assert response.status_code == 200, response.text
        assert response.json()["grad_cam"]["empty"] == expected.map_empty
        assert response.json()["zero_reference"]["stable"] == expected.stable
    for kwargs, code in bad:
        response = post(server, **kwargs)
        assert response.status_code == ERROR_CODES[code], response.text
        assert response.json()["code"] == code

    n = len(explained)
    errors = Counter(code for _, code in bad)
    expected = {
        **{(telemetry.ERRORS, reason, None): errors[reason] for reason in telemetry.ERROR_REASONS},
        **{(f"{telemetry.STAGE_SECONDS}_count", "decode", None): n + len(bad)},  # a batch each
        **{(f"{telemetry.STAGE_SECONDS}_count", "forward_gradcam", None): n},  # one batch each
        **{(f"{telemetry.STAGE_SECONDS}_count", "score", None): n},
        **{(f"{telemetry.STAGE_SECONDS}_count", "encode", None): n},
    }
    # The good images explain the top-1 (requested="false"), the others a chosen class.
    for requested in telemetry.REQUESTED_VALUES:
        for name in (telemetry.EXPLANATIONS, telemetry.UNSTABLE, telemetry.EMPTY_MAPS):
            expected[(name, None, requested)] = 0
        for band in telemetry.SCORE_BANDS:
            expected[(telemetry.SCORE_BANDS_METRIC, band, requested)] = 0
    for item in expected_explained:
        result, requested = (
            item.explained.zero_reference,
            telemetry.REQUESTED_VALUES[item.requested],
        )
        expected[(telemetry.EXPLANATIONS, None, requested)] += 1
        expected[(telemetry.UNSTABLE, None, requested)] += not result.stable
        expected[(telemetry.EMPTY_MAPS, None, requested)] += result.map_empty
        expected[(telemetry.SCORE_BANDS_METRIC, telemetry.score_band(result.score), requested)] += 1
    assert expected[(telemetry.EXPLANATIONS, None, "true")] == len(empty)
    for label in labels:
        expected[(telemetry.CLASS_EXPLANATIONS, label, None)] = 0
        expected[(telemetry.CLASS_UNSTABLE, label, None)] = 0
    for item in expected_explained:
        expected[(telemetry.CLASS_EXPLANATIONS, labels[item.explained.index], None)] += 1
        expected[
            (telemetry.CLASS_UNSTABLE, labels[item.explained.index], None)
        ] += not item.explained.zero_reference.stable
    assert expected[(telemetry.EMPTY_MAPS, None, "true")] >= len(empty)

    def delta(after):
        return {key: after.get(key, math.nan) - before.get(key, 0.0) for key in expected}

    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        after = snapshot(prometheus)
        if delta(after) == expected:
            break
        time.sleep(0.5)
    assert delta(after) == expected
    # The score sum counter adds every explanation's score (a float increment), so with the
    # explanations counter it gives the mean score; its series exist from the load, at 0.
    assert all((telemetry.SCORE_SUM, None, r) in before for r in telemetry.REQUESTED_VALUES)
    score_sum = sum(
        after[(telemetry.SCORE_SUM, None, requested)]
        - before[(telemetry.SCORE_SUM, None, requested)]
        for requested in telemetry.REQUESTED_VALUES
    )
    assert score_sum == pytest.approx(sum(r.score for r in expected_results), abs=1e-5)
    # The archive is calibrated: its baseline is exported at load, one share per band.
    shares = {key[1]: value for key, value in after.items() if key[0] == telemetry.BASELINE_SHARE}
    assert shares == pytest.approx(shapes_explainer.score_baseline.shares)
    assert after[(telemetry.BASELINE_IMAGES, None, None)] == 4000
    # HandlerTime is recorded (ms, one batch).
    handler_time = prometheus.query(f'HandlerTime{{ModelName="{MODEL}"}}')
    assert handler_time and float(handler_time[0]["value"][1]) > 0


def dashboard_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in as the defaults would."""
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$model", MODEL)
        .replace("$job", "torchserve")
    )


def test_rules_load_and_dashboard_queries_run_in_prometheus(server, prometheus):
    # Every alert rule evaluates without error in a real Prometheus.
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        rules = [rule for g in prometheus.api("rules")["groups"] for rule in g["rules"]]
        if rules and all(rule["health"] == "ok" for rule in rules):
            break
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == alert_names() | recorded_names()
    assert all(rule["health"] == "ok" for rule in rules), rules
    # Every dashboard query runs (that each returns data is checked at the end of
    # test_alerts_on_live_traffic, when every series exists).
    for expr in dashboard_exprs():
        prometheus.query(dashboard_query(expr))


def test_make_monitor_starts_and_stops_prometheus(server, tmp_path, capsys):
    """The code path of `make monitor` / `make monitor-stop`, without the package install."""
    properties = tmp_path / "config.properties"
    properties.write_text(f"metrics_address={server.metrics_url}\n")
    port = free_port()
    args = ["--config", str(properties), "--workdir", str(tmp_path / "run"), "--port", str(port)]
    assert prometheus_main(["start", *args, "--scrape-interval", "1s"]) == 0
    instance = LocalPrometheus(tmp_path / "run", metrics_target(server), port)
    try:
        pid = int(instance.pid_file.read_text())
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        health = None
        while time.monotonic() < deadline and health != "up":
            targets = instance.api("targets")["activeTargets"]
            health = targets[0]["health"] if targets else None
            time.sleep(0.5)
        assert [t["labels"]["instance"] for t in targets] == [metrics_target(server)]
        assert health == "up"
        # Every URL it printed answers (Debian's 2.42 serves only /classic/alerts, not /alerts).
        urls = re.findall(r"http://\S+", capsys.readouterr().out)
        assert len(urls) == 1 + len(UI_PAGES)
        for url in urls:
            assert requests.get(url, timeout=10).status_code == 200, url
    finally:
        assert prometheus_main(["stop", *args]) == 0
    assert not Path(f"/proc/{pid}").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not instance.pid_file.exists()


# --- The alerts on live traffic -----------------------------------------------------------

PHASE_TIMEOUT_S = 120


def darkened(index: int) -> bytes:
    """A held-out image at 30% brightness: a shift the top-1 scores show (docs/monitoring.md:
    colour inversion and pixel noise barely move this model's score distribution)."""
    return png_bytes(ImageEnhance.Brightness(held_out(index).image).enhance(0.3))


def post_all(server, bodies: list[dict], workers: int = 4) -> list[int]:
    """Post every request (a few at a time, so TorchServe batches) and return the statuses."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda kwargs: post(server, **kwargs).status_code, bodies))


def active_alerts(prometheus) -> dict[str, str]:
    """alertname -> state (pending or firing) of every active alert."""
    return {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}


def wait_for_evaluation_after(prometheus, moment: float) -> None:
    """Until a scrape after ``moment`` is in and every rule group evaluated it."""
    wait_for_scrape_after(prometheus, moment)
    scraped = time.time()
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        groups = prometheus.api("rules")["groups"]
        evaluated = [g.get("lastEvaluation", "") for g in groups]
        if all(e and _timestamp(e) > scraped for e in evaluated):
            return
        time.sleep(0.5)
    raise TimeoutError("the rules were not evaluated after the last scrape")


def _timestamp(rfc3339: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 times (nanosecond fractions)."""
    match = re.fullmatch(r"([\d-]+T[\d:]+)(\.\d+)?(Z|[+-][\d:]+)", rfc3339)
    assert match, rfc3339
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(match[1] + zone).timestamp() + float(match[2] or 0)


def psi(prometheus) -> float | None:
    result = prometheus.query(f'camserve:zero_reference_score:psi1h{{ModelName="{MODEL}"}}')
    return float(result[0]["value"][1]) if result else None


def wait_for_alert(prometheus, name: str, send=None, rounds: int = 1) -> str:
    """Until ``name`` is active (bounded); ``send()`` runs before each of ``rounds`` checks."""
    for _ in range(rounds):
        if send is not None:
            send()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            state = active_alerts(prometheus).get(name)
            if state:
                return state
            time.sleep(0.5)
    raise AssertionError(f"{name} never became active: {active_alerts(prometheus)}")


def test_alerts_on_live_traffic(server, prometheus, shapes_explainer, capsys):
    """In-distribution traffic with chosen classes and client errors raises no alert; shifted
    traffic makes the drift alert pending; a killed worker makes the 5xx alert see it.
    Prometheus evaluates every second (test-only config); windows and `for` are the shipped
    ones, so pending is what a short test can see."""
    started = time.monotonic()
    # 1. In distribution: 120 top-1 explanations (the drift rule needs 100 in its hour), 12
    # chosen classes the model does not predict, and client errors of five kinds.
    phase_start = time.time()
    top1 = [{"data": png_bytes(held_out(index).image)} for index in range(100, 220)]
    chosen = [
        as_json(
            png_bytes(held_out(index).image), target=(held_out(index).label + 1 + index % 5) % 6
        )
        for index in range(220, 232)
    ]
    statuses = post_all(server, top1 + chosen)
    assert statuses == [200] * len(statuses)
    client_errors = [
        requests.post(
            f"{server.inference_url}/predictions/{MODEL}",
            data=b"just text",
            headers={**server.auth(), "Content-Type": "text/plain"},
            timeout=60,
        ),
        post(server, data=png_bytes(held_out(0).image)[:200]),
        post(server, **as_json(png_bytes(held_out(1).image), topk=0)),
        post(server, **as_json(png_bytes(held_out(2).image), target="hexagon")),
        requests.post(
            f"{server.inference_url}/predictions/no_such_model",
            data=b"x",
            headers=server.auth(),
            timeout=60,
        ),
    ]
    assert all(400 <= r.status_code < 500 for r in client_errors), [
        r.status_code for r in client_errors
    ]
    wait_for_evaluation_after(prometheus, time.time() + 1)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:  # the drift statistic is computed, not just absent
        count = prometheus.query(
            f'camserve:unrequested_explanations:increase1h{{ModelName="{MODEL}"}} >= 100'
        )
        if count and psi(prometheus) is not None:
            break
        time.sleep(0.5)
    in_distribution_psi = psi(prometheus)
    assert in_distribution_psi is not None and in_distribution_psi < 0.25
    wait_for_evaluation_after(prometheus, time.time() + 2)
    # No alert was pending at any evaluation of the phase (ALERTS records each of them).
    seconds = math.ceil(time.time() - phase_start)
    assert prometheus.query(f"ALERTS[{seconds}s]") == [], active_alerts(prometheus)

    # 2. Shifted: darkened images, 30 at a time, until the drift alert is pending.
    shifted = iter(range(300, 600))

    def send_shifted() -> None:
        bodies = [{"data": darkened(next(shifted))} for _ in range(30)]
        assert post_all(server, bodies) == [200] * len(bodies)
        wait_for_evaluation_after(prometheus, time.time() + 1)

    assert wait_for_alert(prometheus, "CamserveExplanationDrift", send_shifted, rounds=6)
    shifted_psi = psi(prometheus)
    assert shifted_psi > 0.25

    # 3. A worker killed while it explains a batch: its requests get 5xx from the frontend.
    from tests.live import worker_processes
    from tests.load import wait_worker_ready

    server_errors = 0
    for _ in range(4):  # a kill can land between batches; bounded retries
        [worker] = worker_processes(server)
        # A stream of 96 posts from 24 clients keeps a batch in flight when the kill lands.
        with ThreadPoolExecutor(24) as pool:
            futures = [
                pool.submit(lambda i=i: post(server, data=png_bytes(held_out(i).image)))
                for i in range(600, 696)
            ]
            time.sleep(0.5)
            os.kill(worker.pid, signal.SIGKILL)
            statuses = [future.result().status_code for future in futures]
        wait_worker_ready(server, worker.pid, PHASE_TIMEOUT_S)
        server_errors += sum(status >= 500 for status in statuses)
        if server_errors >= 8:
            break
    assert server_errors >= 5, server_errors
    assert wait_for_alert(prometheus, "TorchServeServerErrorsHigh")
    seen = prometheus.query('torchserve:requests_5xx:increase5m{job="torchserve"}')
    assert seen and float(seen[0]["value"][1]) >= server_errors

    # Every dashboard query returns data now that every series exists.
    wait_for_evaluation_after(prometheus, time.time() + 1)
    for expr in dashboard_exprs():
        assert prometheus.query(dashboard_query(expr)), f"no data: {dashboard_query(expr)}"
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\ndrift PSI: in distribution {in_distribution_psi:.4f}, shifted {shifted_psi:.4f}; "
            f"{server_errors} server errors from the kill; {elapsed:.0f} s"
        )
