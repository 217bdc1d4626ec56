"""Device plumbing, checked on the CPU: TorchServe's device is honoured, the device is passed
through (never hard-coded), and `make bench-gpu` fails loudly where there is no CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

from camserve.compensation import CompensationReport
from camserve.device import pack, serving_device, to_host, unpack
from camserve.explainer import Explainer, ExplainerConfig
from camserve.preprocess import Preprocessing
from camserve.request import RequestOptions
from camserve.zero_reference import ChannelStatistics
from models.shapes.shapes_net import ShapesNet
from tests.conftest import REPO, held_out


@pytest.mark.parametrize(
    ("properties", "config", "cuda", "expected"),
    [
        ({"gpu_id": 1}, {}, True, "cuda:1"),
        ({"gpu_id": "0"}, {"deviceType": "gpu"}, True, "cuda:0"),
        ({"gpu_id": 0}, {"deviceType": "cpu"}, True, "cpu"),  # the archive asks for the CPU
        ({}, {}, True, "cpu"),  # TorchServe assigned no GPU (number_of_gpu=0, deviceType cpu)
        ({"gpu_id": 0}, {}, False, "cpu"),  # a GPU id, but no CUDA in this process
        ({"gpu_id": None}, None, False, "cpu"),
    ],
)
def test_serving_device_follows_torchserve(properties, config, cuda, expected):
    # Only torch.cuda.is_available is replaced: the decision itself is pure logic.
    with mock.patch("torch.cuda.is_available", return_value=cuda):
        assert serving_device(properties, config) == torch.device(expected)


def test_bench_gpu_without_cuda_fails_loudly(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a GPU machine
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bench-gpu needs a CUDA GPU" in done.stderr
    assert "torch.cuda.is_available() is False" in done.stderr
    assert "nothing was measured" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no results file pretending to be a measurement


def _meta_explainer(calibrated: bool, multi_label: bool = False) -> Explainer:
    """The shapes network on the meta device: tensors there have shapes but no data, so any
    tensor created on the CPU by mistake, any .item() and any early copy to the CPU fails."""
    torch.manual_seed(0)
    model = ShapesNet()
    config = ExplainerConfig(
        architecture="shapes_net",
        weights="",
        target_layer="features",
        preprocessing=Preprocessing(input_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3),
        topk=3,
        multi_label=multi_label,
    )
    calibration = ChannelStatistics(torch.rand(128), torch.rand(128)) if calibrated else None
    # The probe's verdict is a number read back at load time: given here, not measured.
    report = CompensationReport(True, "classifier", 0.0, 1e-4, "given")
    labels = [f"class{i}" for i in range(6)]
    return Explainer(model, labels, config, calibration, report, name="m", device="meta")


def explain_recording_transfers(explainer: Explainer, batch) -> tuple[list, list]:
    """Explain on the meta device; the results, and the devices of each transfer to the CPU."""
    transfers = []

    def fake_transfer(tensors):
        # Stands in for the copy to the CPU, which meta tensors cannot make: ones instead, so
        # that every class index and map count read back is a valid one.
        transfers.append([t.device.type for t in tensors])
        return [torch.ones(t.shape, dtype=t.dtype) for t in tensors]

    with mock.patch("camserve.explainer.to_host", fake_transfer):
        return explainer.explain(batch), transfers


@pytest.mark.parametrize("calibrated", [False, True], ids=["image_mean", "calibration_mean"])
def test_the_whole_batch_stays_on_the_device_until_one_transfer(calibrated):
    explainer = _meta_explainer(calibrated)
    assert {p.device.type for p in explainer.model.parameters()} == {"meta"}
    if calibrated:
        assert explainer.calibration.mean.device.type == "meta"
    batch = [
        explainer.prepare_image(held_out(i).image, RequestOptions(maps=2 + i % 2)) for i in range(3)
    ]
    results, transfers = explain_recording_transfers(explainer, batch)
    # probabilities, then classes, signed maps and score blocks of the 3 explained classes
    assert transfers == [["meta"] * (1 + 3 * 3)]
    assert [len(r.more) for r in results] == [1, 2, 1]
    assert all(r.explained.signed_map.device.type == "cpu" for r in results)


def test_a_multi_label_batch_stays_on_the_device_until_one_transfer():
    """Every image names its labels, so the batch's number of maps is known on the host: the
    one wait for the device that counting present labels needs does not happen either."""
    explainer = _meta_explainer(calibrated=True, multi_label=True)
    named = [(1, 4), (0,), (5, 2, 3)]
    batch = [explainer.prepare_image(held_out(i).image, None, labels) for i, labels in
             enumerate(named)]  # fmt: skip
    results, transfers = explain_recording_transfers(explainer, batch)
    # probabilities, 3 ranks of classes, maps and score blocks, then present flags and counts
    assert transfers == [["meta"] * (1 + 3 * 3 + 2)]
    assert all(r.present is not None and r.present.device.type == "cpu" for r in results)


def test_to_host_packs_into_one_tensor_without_losing_values_or_types():
    tensors = [
        torch.randn(2, 3),
        torch.tensor([3, 999_999_999]),
        torch.tensor([True, False]),
        torch.randn(4, dtype=torch.float64),
    ]
    assert all(a is b for a, b in zip(tensors, to_host(tensors), strict=True))  # CPU: as is
    flat = pack(tensors)
    assert flat.dim() == 1 and flat.dtype == torch.float64  # what one copy would carry
    for original, back in zip(tensors, unpack(flat, tensors), strict=True):
        assert back.dtype == original.dtype and torch.equal(back, original)


def test_log_line_names_the_device(server):
    # The real TorchServe worker of the test suite: no GPU here, so the CPU.
    log = server.workdir / "logs" / "model_log.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.exists() and "camserve shapes ready on device cpu" in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"no device line in {log}")


@pytest.mark.integration
def test_bench_gpu_harness_runs_end_to_end_on_the_cpu(tmp_path):
    # The GPU benchmark's own code path, on the CPU with the small shapes model, so that the
    # first run on a GPU does not find a harness bug: in process, TorchServe, results file.
    from bench import gpu

    assert gpu.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    [result_file] = tmp_path.glob("*-gpu-smoke.json")
    results = json.loads(result_file.read_text())
    assert results["gpu"] == {"name": None, "device": "cpu"} and "bench.gpu" in results["command"]
    for key in ("batch1", "batch2"):
        entry = results["inprocess"][key]
        assert entry["ratio_to_plain"] > 0 and set(entry["stats"]) == {"plain", "camserve"}
        assert set(entry["throughput_images_per_s"]) == {"plain", "camserve"}
    end_to_end = results["e2e"]["shapes"]
    for variant in ("plain", "camserve"):
        assert set(end_to_end["variants"][variant]["statuses"]) == {"200"}
        # Each handler's load line names its device; here that is the CPU.
        assert any("on device cpu" in line for line in results["e2e_worker_devices"][variant])
    assert {"c1_p50_latency", "c8_throughput"} <= set(end_to_end["ratios"])
    assert any(name.startswith("e2e camserve worker logged") for name in results["verdicts"])
