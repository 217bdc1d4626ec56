"""Device plumbing, checked on the CPU: TorchServe's device is honoured, the device is passed
through (never hard-coded), and `make bench-gpu` fails loudly where there is no CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from camserve.device import serving_device
from tests.conftest import REPO


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
