"""A tiny run of the benchmark harness, so that `make bench` does not rot. It checks that the
harness works and reports what it should, not how fast anything is."""

from __future__ import annotations

import json

import pytest

from bench import run

pytestmark = pytest.mark.integration


def test_bench_smoke_run_writes_results_and_chart(tmp_path):
    assert run.main(["--smoke", "--out", str(tmp_path), "--name", "smoke"]) == 0
    [result_file] = tmp_path.glob("*-smoke-smoke.json")
    results = json.loads(result_file.read_text())
    assert result_file.with_suffix(".png").stat().st_size > 1000
    assert results["machine"]["logical_cores"] >= 1 and "bench.run" in results["command"]
    for key in ("shapes/batch1", "shapes/batch2"):
        ratios = results["inprocess"][key]["ratio_to_plain"]
        assert set(ratios) == {"plain", "camserve", "camserve_top3", "captum_naive"}
        assert ratios["plain"] == 1.0 and all(r > 0 for r in ratios.values())
    multi = results["inprocess"]["shapes-multi/batch2"]
    assert set(multi["ratio_to_plain"]) == {"plain", "camserve", "camserve_maps_present"}
    assert multi["maps_option"] == max(multi["maps_per_image"]) >= 1
    assert multi["ratio_to_maps_present"] > 0
    e2e = results["e2e"]["shapes"]
    assert e2e["image_size"] == [400, 300]
    for variant in ("plain", "camserve"):
        assert set(e2e["variants"][variant]["statuses"]) == {"200"}
        assert e2e["variants"][variant]["peak_worker_rss_mb"] > 50
    # The explained answer carries the map and the score: larger than top-k alone.
    sizes = {v: e2e["variants"][v]["c1_mean_answer_bytes"] for v in ("plain", "camserve")}
    assert 0 < sizes["plain"] < sizes["camserve"]
    assert set(e2e["ratios"]) == {"c1_p50_latency", "c8_throughput", "peak_worker_rss"}
    for name, (low, high) in e2e["ratio_spread"].items():
        assert low <= e2e["ratios"][name] <= high
    assert len(e2e["runs"]) == 1 and any("median of 1 runs" in v for v in results["verdicts"])
    assert set(results["encode"]["shapes"]) == {"json_only", "with_png"}
    assert results["verdicts"]
    assert set(results["decode"]["ratio_to_full"]) == {"full_decode", "reduced_scale_decode"}


def test_sanity_cost_smoke_run_writes_the_ratio_and_the_curve(tmp_path):
    from bench import sanity_cost

    argv = ["--arch", "shapes", "--images", "4", "--sanity-images", "2", "--rounds", "1"]
    assert sanity_cost.main([*argv, "--out", str(tmp_path)]) == 0
    [result_file] = tmp_path.glob("*-sanity-cost-shapes.json")
    results = json.loads(result_file.read_text())
    assert results["machine"]["logical_cores"] >= 1 and "bench.sanity_cost" in results["command"]
    [timed] = results["rounds"]
    for variant in ("with", "without"):
        assert timed[variant]["wall_s"] > 0 and timed[variant]["cpu_s"] > 0
    ratios = results["ratio_with_to_without"]
    assert ratios["wall_median"] > 0 and ratios["cpu_median"] > 0
    assert results["sanity_result"]["images"] == 2 and results["sanity_result"]["steps"]
