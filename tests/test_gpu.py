"""The GPU check kept ready: Captum equality and the compensated-network oracle on CUDA, and
the same score on the GPU as on the CPU. Skipped, with the reason, where there is no CUDA;
`make bench-gpu` fails loudly in the same situation (tests/test_device.py checks that)."""

from __future__ import annotations

import copy

import pytest
import torch

from camserve.gradcam import GradCam
from tests.oracles import oracle
from tests.test_gradcam import captum_map

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): the GPU "
    "oracles run only where torch.cuda.is_available()",
)

CUDA = torch.device("cuda:0")
# float32 on two devices (cuDNN vs oneDNN kernels): the maps agree to this, relative to the
# largest map value; the score, worst case and IoU are computed in float64 from them.
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
    assert result.signed_map.device.type == "cuda"
    expected = captum_map(model, layer, x, result.targets.tolist())
    torch.testing.assert_close(result.grad_cam, expected, atol=1e-5, rtol=0)


def test_compensated_network_oracle_on_cuda(cuda_model):
    model, layer, size = cuda_model
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3)).to(CUDA)
    reported = oracle(model, layer, x)
    assert 0.0 <= reported.score <= 1.0


def test_explainer_gives_the_same_numbers_on_cuda_and_cpu(shapes_explainer):
    from camserve.explainer import Explainer
    from tests.conftest import SHAPES_DIR, held_out

    on_cuda = Explainer.from_directory(SHAPES_DIR, device=CUDA)
    assert on_cuda.device == CUDA and next(on_cuda.model.parameters()).device.type == "cuda"
    assert on_cuda.compensation.compensable == shapes_explainer.compensation.compensable
    batch = [shapes_explainer.prepare_image(held_out(i).image) for i in range(6)]
    for cpu, gpu in zip(shapes_explainer.explain(batch), on_cuda.explain(batch), strict=True):
        assert cpu.target == gpu.target
        assert gpu.grad_cam.device.type == "cpu"  # one transfer at the end, before encoding
        scale = max(1.0, float(cpu.grad_cam.abs().max()))
        torch.testing.assert_close(gpu.grad_cam, cpu.grad_cam, atol=MAP_TOLERANCE * scale, rtol=0)
        a, b = cpu.zero_reference, gpu.zero_reference
        assert abs(a.score - b.score) <= SCORE_TOLERANCE
        assert abs(a.worst_case.score - b.worst_case.score) <= SCORE_TOLERANCE
        assert abs(a.offset - b.offset) <= MAP_TOLERANCE * scale
        assert (a.map_empty, a.stable, a.compensable) == (b.map_empty, b.stable, b.compensable)
