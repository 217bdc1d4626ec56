"""The GPU check kept ready: Captum equality and the compensated-network oracle on CUDA, and
the same score on the GPU as on the CPU. Skipped, with the reason, where there is no CUDA;
`make bench-gpu` fails loudly in the same situation (tests/test_device.py checks that)."""

from __future__ import annotations

import copy

import pytest
import torch

from camserve.explainer import Explainer
from camserve.gradcam import GradCam
from camserve.request import RequestOptions
from camserve.zero_reference import ZeroReference
from tests.conftest import SHAPES_DIR, held_out
from tests.oracles import oracle
from tests.test_gradcam import captum_map

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): the GPU "
    "oracles run only where torch.cuda.is_available()",
)

CUDA = torch.device("cuda:0")
# float32 on two devices (cuDNN vs oneDNN kernels): the signed maps agree to 1e-4 of the
# largest map value; the score, worst case and IoU, computed in float64 from them, to 1e-4
# (a map value sitting exactly on the IoU's half-peak level could still flip one cell).
MAP_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-4


@pytest.fixture(params=["shapes", "resnet18"])
def cuda_model(request, shapes_explainer, resnet18):
    if request.param == "shapes":
        model, layer, size = shapes_explainer.model, "features", (64, 64)
    else:
        model, layer, size = resnet18, "layer4", (96, 96)
    return copy.deepcopy(model).to(CUDA), layer, size


def test_map_equals_captum_on_cuda(cuda_model):
    model, layer, size = cuda_model
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1)).to(CUDA)
    result = GradCam(model, layer)(x)
    assert result.explained.signed_map.device.type == "cuda"
    expected = captum_map(model, layer, x, result.explained.classes.tolist())
    torch.testing.assert_close(result.explained.grad_cam, expected, atol=1e-5, rtol=0)


def test_compensated_network_oracle_on_cuda(cuda_model):
    model, layer, size = cuda_model
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3)).to(CUDA)
    reported = oracle(model, layer, x)
    assert 0.0 <= reported.score <= 1.0


def test_explainer_gives_the_same_numbers_on_cuda_and_cpu(shapes_explainer):
    on_cuda = Explainer.from_directory(SHAPES_DIR, device=CUDA)
    assert on_cuda.device == CUDA and next(on_cuda.model.parameters()).device == CUDA
    assert on_cuda.calibration.mean.device == CUDA
    assert on_cuda.compensation.compensable == shapes_explainer.compensation.compensable
    options = RequestOptions(maps=2)
    batch = [shapes_explainer.prepare_image(held_out(i).image, options) for i in range(6)]
    for cpu, gpu in zip(shapes_explainer.explain(batch), on_cuda.explain(batch), strict=True):
        torch.testing.assert_close(gpu.probabilities, cpu.probabilities, atol=1e-5, rtol=0)
        for a, b in zip((cpu.explained, *cpu.more), (gpu.explained, *gpu.more), strict=True):
            assert a.index == b.index
            assert b.signed_map.device.type == "cpu"  # one transfer at the end, then encoding
            scale = max(1.0, float(a.signed_map.abs().max()))
            torch.testing.assert_close(
                b.signed_map, a.signed_map, atol=MAP_TOLERANCE * scale, rtol=0
            )
            assert_same_scores(a.zero_reference, b.zero_reference, scale)


def assert_same_scores(a: ZeroReference, b: ZeroReference, scale: float) -> None:
    for name in ("score", "region_iou"):
        assert abs(getattr(a, name) - getattr(b, name)) <= SCORE_TOLERANCE, name
    assert abs(a.worst_case.score - b.worst_case.score) <= SCORE_TOLERANCE
    assert abs(a.offset - b.offset) <= MAP_TOLERANCE * scale
    assert abs(a.worst_case.radius - b.worst_case.radius) <= MAP_TOLERANCE * scale
    same = ("reference", "map_empty", "shifted_map_empty", "stable", "compensable")
    assert [getattr(a, n) for n in same] == [getattr(b, n) for n in same]


def test_calibration_statistics_are_the_same_on_cuda(tmp_path):
    import shutil

    from camserve.tools.calibrate import calibrate_model_dir

    images = [held_out(i).image for i in range(16)]
    stats = {}
    for device in ("cpu", "cuda"):
        model_dir = tmp_path / device
        shutil.copytree(SHAPES_DIR, model_dir)
        stats[device] = calibrate_model_dir(
            model_dir, images, "held-out", len(images), 8, progress=False, device=device
        )
        assert stats[device].mean.device.type == "cpu"  # saved and returned on the CPU
    torch.testing.assert_close(stats["cuda"].mean, stats["cpu"].mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["cuda"].std, stats["cpu"].std, atol=1e-5, rtol=1e-4)
