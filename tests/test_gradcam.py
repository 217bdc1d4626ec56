"""Grad-CAM: Captum is the oracle, and the prediction comes from the same forward pass."""

from __future__ import annotations

import pytest
import torch
import torchvision
from captum.attr import LayerGradCam

from camserve.gradcam import GradCam
from camserve.grid import check_gradient_reaches_grid


def captum_map(model, layer_name, x, targets):
    layer = model.get_submodule(layer_name)
    return LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=True)[:, 0]


def explain_counting_forwards(model, layer, x, targets=None, **kwargs):
    """Explain ``x`` and count how many times the whole model ran forward."""
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = GradCam(model, layer)(x, targets, **kwargs)
    finally:
        handle.remove()
    return result, len(calls)


@pytest.fixture(params=["shapes", "resnet18"])
def model_and_layer(request, shapes_explainer, resnet18):
    if request.param == "shapes":
        return shapes_explainer.model, "features", (64, 64)
    return resnet18, "layer4", (96, 96)


def test_map_equals_captum_layergradcam(model_and_layer):
    model, layer, size = model_and_layer
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    result = GradCam(model, layer)(x)
    expected = captum_map(model, layer, x, result.explained.classes.tolist())
    assert result.explained.grad_cam.shape == expected.shape
    torch.testing.assert_close(result.explained.grad_cam, expected, atol=1e-5, rtol=0)
    assert result.explained.grad_cam.abs().sum() > 0


def test_logits_come_from_the_explaining_forward(model_and_layer):
    model, layer, size = model_and_layer
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    result, forwards = explain_counting_forwards(model, layer, x)
    assert forwards == 1
    with torch.inference_mode():
        plain = model(x)
    torch.testing.assert_close(result.logits, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.explained.classes, plain.argmax(1))


def test_requested_target_is_explained(shapes_explainer):
    model = shapes_explainer.model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    top1 = model(x).argmax(1)
    other = [(int(t) + 1) % 6 for t in top1]
    result = GradCam(model, "features")(x, [other[0], None])
    assert result.explained.classes.tolist() == [other[0], int(top1[1])]
    expected = captum_map(model, "features", x[:1], [other[0]])
    torch.testing.assert_close(result.explained.grad_cam[:1], expected, atol=1e-5, rtol=0)


def test_alpha_reconstructs_the_signed_map(resnet18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    captured = []
    handle = resnet18.layer4.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        result = GradCam(resnet18, "layer4")(x)
    finally:
        handle.remove()
    activations = captured[0]
    rebuilt = (result.explained.alpha[:, :, None, None] * activations).sum(1)
    torch.testing.assert_close(result.explained.signed_map, rebuilt, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.channel_mean, activations.mean((2, 3)))
    # The two-pass std equals torch's own (population) std, also for a large common offset.
    torch.testing.assert_close(result.channel_std, activations.std((2, 3), correction=0))
    shifted = type(result)(result.logits, result.explained, activations + 1e3)
    torch.testing.assert_close(
        shifted.channel_std,
        activations.double().std((2, 3), correction=0).float(),
        rtol=1e-3,
        atol=1e-4,
    )


def test_parameters_are_frozen_and_no_graph_is_left(shapes_explainer):
    gradcam = shapes_explainer.gradcam
    assert not any(p.requires_grad for p in gradcam.model.parameters())
    result = gradcam(torch.randn(1, 3, 64, 64))
    assert result.explained.signed_map.grad_fn is None and result.logits.grad_fn is None
    assert gradcam._pass is None


def test_batch_invariance(shapes_explainer):
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    batched = shapes_explainer.gradcam(x)
    for i in range(5):
        alone = shapes_explainer.gradcam(x[i : i + 1])
        torch.testing.assert_close(
            alone.explained.grad_cam[0], batched.explained.grad_cam[i], atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=1e-4)


def test_extra_class_maps_equal_captum_and_reuse_the_forward(model_and_layer):
    model, layer, size = model_and_layer
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
    result, forwards = explain_counting_forwards(model, layer, x, [None, 1], extra_classes=2)
    assert forwards == 1
    assert len(result.extra) == 2
    order = result.logits.argsort(dim=1, descending=True)
    assert result.extra[0].classes[0] == order[0, 1] and result.extra[1].classes[0] == order[0, 2]
    for maps in result.extra:
        assert not (maps.classes == result.explained.classes).any()
        expected = LayerGradCam(model, model.get_submodule(layer)).attribute(
            x, target=maps.classes.tolist()
        )[:, 0]
        torch.testing.assert_close(maps.signed_map, expected.detach(), atol=1e-5, rtol=0)


def test_loading_leaves_the_weights_untouched():
    """Nothing at load time (layer tracing, grid and gradient checks, the probe) may run the
    network in training mode: BatchNorm would learn from the probes' random inputs."""
    from camserve.explainer import Explainer
    from tests.conftest import SHAPES_DIR

    explainer = Explainer.from_directory(SHAPES_DIR)
    stored = torch.load(SHAPES_DIR / "shapes.pt", weights_only=True)
    served = explainer.model.state_dict()
    changed = [name for name, value in stored.items() if not torch.equal(value, served[name])]
    assert changed == []
    assert not explainer.model.training


def test_gradient_check_records_nothing_before_the_grid_and_restores_the_parameters():
    model = torchvision.models.resnet18(weights=None).eval()
    model.conv1.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    seen = []
    handle = model.layer3.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        check_gradient_reaches_grid(model, "layer4", (64, 64))
    finally:
        handle.remove()
    assert seen == [False]  # no graph (and no saved activations) before the grid
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
