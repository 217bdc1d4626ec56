"""Integration: a real TorchServe serving a timm archive and a transformers archive, built by
the three commands a user runs: ``camserve archive`` (``--arch timm:NAME --weights FILE``,
``--pretrained DIR``), ``camserve calibrate``, then serve.

Each answer to a posted JPEG is checked against the library's own pipeline (its decode and
preprocessing of the photo, its model) and against Captum's LayerGradCam on that input.
"""

from __future__ import annotations

import io
import zipfile

import pytest
import requests
import torch
import transformers
from captum.attr import LayerGradCam
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from camserve.explainer import Explainer
from camserve.tools.cli import main as camserve
from harness.local_torchserve import LocalTorchServe
from tests.conftest import CONFIG
from tests.library_models import (
    LABELS,
    jpeg_bytes,
    photos,
    save_transformers_folder,
    timm_model,
)
from tests.live import VALIDATOR

pytestmark = pytest.mark.integration

# The answer rounds probabilities to 6 significant digits and map cells to 4 decimals.
PROBABILITY_TOLERANCE = 1e-5
MAP_TOLERANCE = 1e-4 + 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, {model name: (the library's preprocess, its logits, camserve's explainer)})."""
    work = tmp_path_factory.mktemp("sources_server")
    store = work / "store"
    torch.manual_seed(0)
    model = timm_model("resnet18")
    save_file(model.state_dict(), work / "resnet18.safetensors")
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    folder = save_transformers_folder("vit", work / "my-vit")
    for args in (
        ["--arch", "timm:resnet18", "--weights", str(work / "resnet18.safetensors"),
         "--labels", str(work / "labels.txt"), "--input-size", "64", "--name", "timm_r18"],
        ["--pretrained", str(folder), "--name", "hf_vit"],
    ):  # fmt: skip
        assert camserve(["archive", *args, "--export-path", str(store)]) == 0
    images = work / "calibration"
    images.mkdir()
    for i, image in enumerate(photos().values()):
        image.save(images / f"{i}.png")
    for name in ("timm_r18", "hf_vit"):
        assert camserve(["calibrate", str(store / f"{name}.mar"), str(images), "--name", name,
                         "--export-path", str(work / "calibrated")]) == 0  # fmt: skip
    store = work / "calibrated"

    timm_transform = create_transform(**resolve_data_config({}, model=model))
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    library = {
        "timm_r18": (timm_transform, model.eval()),
        "hf_vit": (
            lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0],
            lambda x: hf_model(pixel_values=x).logits,
        ),
    }
    explainers = {}
    for name in library:
        with zipfile.ZipFile(store / f"{name}.mar") as mar:
            mar.extractall(work / name)
        explainers[name] = Explainer.from_directory(work / name)

    server = LocalTorchServe.on_free_ports(
        work / "ts", CONFIG, store, models="timm_r18=timm_r18.mar,hf_vit=hf_vit.mar"
    )
    server.start(wait_for="timm_r18")
    try:
        server.wait_ready("hf_vit")
        yield server, {name: (*library[name], explainers[name]) for name in library}
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["timm_r18", "hf_vit"])
def test_served_answer_equals_the_library_pipeline_and_captum(served, name):
    server, models = served
    preprocess, logits, explainer = models[name]
    for image in list(photos().values())[:2]:
        data = jpeg_bytes(image)
        response = requests.post(
            f"{server.inference_url}/predictions/{name}",
            data=data,
            headers={**server.auth(), "Content-Type": "image/jpeg"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        VALIDATOR.validate(body)
        assert {p["label"] for p in body["predictions"]} <= set(LABELS)

        x = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None]
        with torch.no_grad():
            probabilities = logits(x).softmax(dim=1)[0]
        for prediction in body["predictions"]:
            expected = float(probabilities[prediction["index"]])
            assert abs(prediction["probability"] - expected) <= PROBABILITY_TOLERANCE
        explained = body["explained"]["index"]
        assert explained == int(probabilities.argmax())

        tap = explainer.model.get_submodule(explainer.gradcam.layer_name)
        captum = (
            LayerGradCam(explainer.model, tap)
            .attribute(x, target=explained, relu_attributions=True)[0, 0]
            .detach()
        )
        expected_map = captum / captum.max().clamp_min(1e-30)
        served_map = torch.tensor(body["grad_cam"]["map"], dtype=torch.float32)
        assert served_map.shape == expected_map.shape
        assert float((served_map - expected_map).abs().max()) <= MAP_TOLERANCE
        assert body["target_layer"] == explainer.config.target_layer
        assert body["zero_reference"]["reference"] == "calibration_mean"
