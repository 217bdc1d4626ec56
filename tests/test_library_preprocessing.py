"""The archived preprocessing equals each library's own pipeline, on real photos.

timm: ``timm.data.create_transform(**resolve_data_config(...))`` against the ``Preprocessing``
camserve.sources.timm makes of the same data config. transformers: ``AutoImageProcessor``
on a saved folder against the ``Preprocessing`` made of that folder. Both on a photo and its
crops and resizes (portrait, landscape, small, odd sizes, square).

The tolerance is camserve's own (``PREPROCESSING_TOLERANCE``, 1e-6 on the normalised network
input): float32 rounding, nothing else (timm divides by 255 where torchvision multiplies by
1/255, 1 ulp apart; transformers' torchvision backend comes out bit for bit). Then every field
of ``Preprocessing`` is changed in turn: some case must then differ from its library's output,
or refuse the change; a field that the pipeline ignored would pass unnoticed.

The archive measures the same thing on its own probe images (camserve.sources.verify): image
processors with steps of their own pass when their output is equal, and a setting camserve
does not read is refused with the measured difference.
"""

from __future__ import annotations

import re
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from transformers import AutoImageProcessor

from camserve.preprocess import Preprocessing
from camserve.sources.timm import data_config_preprocessing
from camserve.sources.transformers import processor_preprocessing
from camserve.sources.verify import PREPROCESSING_TOLERANCE as TOLERANCE
from camserve.sources.verify import PROBE_SIZES, probe_images, verify_preprocessing
from tests.library_models import photos

# name -> (timm pretrained config, overrides): bicubic and bilinear, crop_pct 0.95/0.875/0.9,
# ImageNet and 0.5 normalisation, the squash mode, a non-square input (ResizeKeepRatio).
TIMM_CASES = {
    "resnet18.a1_in1k at 64": ("resnet18.a1_in1k", {"input_size": (3, 64, 64)}),
    "resnet18.tv_in1k (bilinear)": ("resnet18.tv_in1k", {}),
    "vit_tiny (mean 0.5) at 96": (
        "vit_tiny_patch16_224.augreg_in21k_ft_in1k", {"input_size": (3, 96, 96)}
    ),
    "dm_nfnet_f0 (squash) at 64": ("dm_nfnet_f0.dm_in1k", {"input_size": (3, 64, 64)}),
    "resnet18 at 64x96 (keep ratio)": ("resnet18.a1_in1k", {"input_size": (3, 64, 96)}),
}  # fmt: skip


def transformers_processors():
    import transformers as hf

    return {
        "ViT 64x64 bilinear": hf.ViTImageProcessor(size={"height": 64, "width": 64}),
        # a margin of 11: transformers floors the offset (5), torchvision would round (6)
        "DeiT 75 -> crop 64": hf.DeiTImageProcessor(
            size={"height": 75, "width": 75}, crop_size={"height": 64, "width": 64}
        ),
        "ConvNeXt shortest edge 64, crop_pct 0.9": hf.ConvNextImageProcessor(
            size={"shortest_edge": 64}, crop_pct=0.9
        ),
        "ConvNeXt 384 (warped)": hf.ConvNextImageProcessor(size={"shortest_edge": 384}),
        "CLIP shortest edge 75, crop 64": hf.CLIPImageProcessor(
            size={"shortest_edge": 75}, crop_size={"height": 64, "width": 64}
        ),
        "BiT rescale 1/127.5, no normalisation": hf.BitImageProcessor(
            size={"shortest_edge": 70}, crop_size={"height": 64, "width": 64},
            rescale_factor=1 / 127.5, do_normalize=False,
        ),
        # Processor classes with steps of their own, accepted by measurement.
        "MobileNetV2 shortest edge 75, crop 64": hf.MobileNetV2ImageProcessor(
            size={"shortest_edge": 75}, crop_size={"height": 64, "width": 64}
        ),
        "BEiT 72x72 bicubic, crop 64": hf.BeitImageProcessor(
            size={"height": 72, "width": 72}, do_center_crop=True,
            crop_size={"height": 64, "width": 64},
        ),
        "PoolFormer shortest edge 64, crop_pct 0.9": hf.PoolFormerImageProcessor(
            size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
        ),
        "EfficientNet 64x64, include_top": hf.EfficientNetImageProcessor(
            size={"height": 64, "width": 64}
        ),
        "MobileViT shortest edge 73, crop 64, BGR": hf.MobileViTImageProcessor(
            size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}
        ),
    }  # fmt: skip


@pytest.fixture(scope="module")
def images():
    return photos()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, images):
    """name -> (camserve's Preprocessing, {photo: the library's own output})."""
    built = {}
    for name, (pretrained, overrides) in TIMM_CASES.items():
        config = resolve_data_config(
            {}, pretrained_cfg={**get_pretrained_cfg(pretrained).to_dict(), **overrides}
        )
        transform = create_transform(**config)
        built[f"timm {name}"] = (
            data_config_preprocessing(config),
            {photo: transform(image) for photo, image in images.items()},
        )
    for name, processor in transformers_processors().items():
        folder = tmp_path_factory.mktemp("processor")
        processor.save_pretrained(folder)
        # The library's own reading of the folder, as a user's code would load it.
        theirs = AutoImageProcessor.from_pretrained(folder)
        built[f"transformers {name}"] = (
            processor_preprocessing(folder),
            {
                p: theirs(images=i, return_tensors="pt")["pixel_values"][0]
                for p, i in images.items()
            },
        )
    return built


def differences(preprocessing: Preprocessing, expected: dict, images: dict) -> dict[str, float]:
    """Largest absolute difference per photo (inf for another shape)."""
    out = {}
    for photo, image in images.items():
        ours = preprocessing(image)
        same_shape = ours.shape == expected[photo].shape
        out[photo] = float((ours - expected[photo]).abs().max()) if same_shape else float("inf")
    return out


def test_equal_to_the_library_pipeline_on_every_photo(cases, images):
    for name, (preprocessing, expected) in cases.items():
        worst = differences(preprocessing, expected, images)
        assert max(worst.values()) <= TOLERANCE, (name, worst)


def test_timm_translation_reads_each_data_config_field(cases):
    vit = cases["timm vit_tiny (mean 0.5) at 96"][0]
    assert vit.mean == (0.5, 0.5, 0.5) and vit.interpolation == "bicubic"
    assert vit.resize == 106 and vit.center_crop == (96, 96)  # floor(96 / 0.9)
    assert cases["timm resnet18.tv_in1k (bilinear)"][0].interpolation == "bilinear"
    squash = cases["timm dm_nfnet_f0 (squash) at 64"][0]
    assert isinstance(squash.resize, tuple) and not squash.keep_ratio
    assert cases["timm resnet18 at 64x96 (keep ratio)"][0].keep_ratio


def test_transformers_translation_reads_the_processor(cases):
    deit = cases["transformers DeiT 75 -> crop 64"][0]
    assert (deit.backend, deit.crop_offset, deit.resize) == ("tensor", "floor", (75, 75))
    convnext = cases["transformers ConvNeXt shortest edge 64, crop_pct 0.9"][0]
    assert convnext.resize == 71 and convnext.center_crop == (64, 64)  # int(64 / 0.9)
    warped = cases["transformers ConvNeXt 384 (warped)"][0]
    assert warped.resize == (384, 384) and warped.center_crop is None
    bit = cases["transformers BiT rescale 1/127.5, no normalisation"][0]
    assert bit.rescale_factor == 1 / 127.5 and bit.mean == (0.0,) * 3 and bit.std == (1.0,) * 3
    poolformer = cases["transformers PoolFormer shortest edge 64, crop_pct 0.9"][0]
    assert poolformer.resize == 71 and poolformer.center_crop == (64, 64)  # int(64 / 0.9)
    efficientnet = cases["transformers EfficientNet 64x64, include_top"][0]
    assert efficientnet.std == (0.25,) * 3  # divided by std 0.5 twice
    mobilevit = cases["transformers MobileViT shortest edge 73, crop 64, BGR"][0]
    assert mobilevit.channel_order == "bgr" and mobilevit.std == (1.0,) * 3
    beit = cases["transformers BEiT 72x72 bicubic, crop 64"][0]
    assert (beit.resize, beit.center_crop, beit.interpolation) == ((72, 72), (64, 64), "bicubic")


def _other_interpolation(p):
    return "bilinear" if p.interpolation != "bilinear" else "bicubic"


def _shrunk_crop(p):
    if p.center_crop is None:
        return None
    h, w = p.center_crop
    return replace(p, center_crop=(h - 2, w - 2), input_size=(h - 2, w - 2))


def _resized(p):
    step = 3 if isinstance(p.resize, int) else (3, 3)
    return replace(p, resize=p.resize + step if isinstance(p.resize, int) else tuple(
        r + s for r, s in zip(p.resize, step, strict=True)
    ))  # fmt: skip


# One change per field; the test below checks that the list covers every field.
MUTATIONS = {
    "input_size": lambda p: replace(p, input_size=(p.input_size[0] + 1, p.input_size[1])),
    "resize": _resized,
    "center_crop": _shrunk_crop,
    "mean": lambda p: replace(p, mean=tuple(m + 0.01 for m in p.mean)),
    "std": lambda p: replace(p, std=tuple(s * 1.01 for s in p.std)),
    "interpolation": lambda p: replace(p, interpolation=_other_interpolation(p)),
    "keep_ratio": lambda p: replace(p, keep_ratio=not p.keep_ratio),
    "crop_offset": lambda p: replace(
        p, crop_offset="floor" if p.crop_offset == "round" else "round"
    ),
    "rescale_factor": lambda p: replace(p, rescale_factor=p.rescale_factor * 1.01),
    "backend": lambda p: replace(p, backend="tensor" if p.backend == "pil" else "pil"),
    "channel_order": lambda p: replace(
        p, channel_order="bgr" if p.channel_order == "rgb" else "rgb"
    ),
}


def test_every_field_matters(cases, images):
    """A field the pipeline ignored would leave every case equal to its library."""
    assert set(MUTATIONS) == {f.name for f in fields(Preprocessing)}
    for field_name, mutate in MUTATIONS.items():
        caught = []
        for name, (preprocessing, expected) in cases.items():
            try:
                mutated = mutate(preprocessing)
            except ValueError:  # refused: the field is checked, not ignored
                caught.append(name)
                continue
            if mutated is None:
                continue
            if max(differences(mutated, expected, images).values()) > TOLERANCE:
                caught.append(name)
        assert caught, f"changing {field_name} changed no case's output"


def test_floor_and_round_crop_offsets_differ_by_one_pixel(images):
    """A margin of 11 (75 -> 64): transformers floors the offset to 5, torchvision's
    CenterCrop rounds 5.5 to 6 (half to even: a margin of 9 gives 4 both ways)."""
    base = Preprocessing(input_size=(64, 64), resize=(75, 75), center_crop=(64, 64))
    full = replace(base, center_crop=(75, 75), input_size=(75, 75))(images["512x600"])
    floor = replace(base, crop_offset="floor")(images["512x600"])
    torch.testing.assert_close(floor, full[:, 5:69, 5:69], rtol=0, atol=0)
    torch.testing.assert_close(base(images["512x600"]), full[:, 6:70, 6:70], rtol=0, atol=0)


def test_pil_backend_equals_transformers_pil_image_processors(images):
    """``backend: pil`` is transformers' PIL backend (``...ImageProcessorPil``)."""
    import transformers as hf

    processor = hf.DeiTImageProcessorPil(
        size={"height": 75, "width": 75}, crop_size={"height": 64, "width": 64}
    )
    ours = Preprocessing(
        input_size=(64, 64), resize=(75, 75), center_crop=(64, 64), mean=(0.5,) * 3,
        std=(0.5,) * 3, interpolation="bicubic", crop_offset="floor",
    )  # fmt: skip
    for image in images.values():
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert float((ours(image) - theirs).abs().max()) <= TOLERANCE


def test_processors_camserve_cannot_reproduce_are_refused(tmp_path):
    import transformers as hf

    hf.CLIPImageProcessor(do_center_crop=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="without a fixed output size"):
        processor_preprocessing(tmp_path)


# Settings where camserve's reading differs from the class's own steps: one it does not read,
# one the class ignores (MobileViT never normalises). Only the measurement against the
# processor's own output can refuse them (camserve.sources.verify).
UNREAD_SETTINGS = {
    "EfficientNet rescale_offset": ("EfficientNetImageProcessor", {"rescale_offset": True}),
    "MobileViT do_normalize": ("MobileViTImageProcessor", {"do_normalize": True}),
}


@pytest.mark.parametrize("setting", list(UNREAD_SETTINGS))
def test_a_setting_camserve_does_not_read_is_refused_with_the_measured_difference(
    tmp_path, setting
):
    import transformers as hf

    kind, options = UNREAD_SETTINGS[setting]
    size = {"size": {"height": 64, "width": 64}, "do_center_crop": False}
    getattr(hf, kind)(**size, **options).save_pretrained(tmp_path / "on")
    getattr(hf, kind)(**size, **{k: not v for k, v in options.items()}).save_pretrained(
        tmp_path / "off"
    )
    notes: list[str] = []
    processor_preprocessing(tmp_path / "off", notes)  # the same class without the setting
    assert "probe images (tolerance 1e-06)" in notes[0]
    with pytest.raises(ValueError) as refused:
        processor_preprocessing(tmp_path / "on")
    message = str(refused.value)
    match = re.fullmatch(
        rf"{kind}: camserve's reading of its settings differs from the library's own output by "
        r"up to ([0-9.e+-]+) \(on a ([0-9]+)x([0-9]+) probe image\), above the tolerance 1e-06 "
        r"on the normalised input: .*",
        message,
    )
    assert match and "\n" not in message, message
    assert float(match.group(1)) > 100 * TOLERANCE
    assert (int(match.group(2)), int(match.group(3))) in PROBE_SIZES


def test_the_timm_source_measures_its_reading_of_the_data_config(monkeypatch):
    """A translation that ignored crop_pct would be refused at archive time."""
    import camserve.sources.timm as timm_source
    from tests.library_models import timm_model

    model = timm_model("resnet18")  # resnet18.a1_in1k: crop_pct 0.95, bicubic
    notes: list[str] = []
    timm_source.TimmSource().preprocessing(model, notes)
    assert "timm's create_transform for resnet18" in notes[0]
    translate = timm_source.data_config_preprocessing
    monkeypatch.setattr(
        timm_source, "data_config_preprocessing",
        lambda config: translate({**config, "crop_pct": 1.0}),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"create_transform for resnet18: .* above the tolerance"):
        timm_source.TimmSource().preprocessing(model)


def test_the_probe_images_show_each_step():
    """Seeded, of several shapes (one smaller than any crop), and varied enough that a
    one-pixel crop shift or another filter moves the output beyond the tolerance."""
    images = probe_images()
    assert [(i.width, i.height) for i in images] == list(PROBE_SIZES)
    assert probe_images() is images and min(min(size) for size in PROBE_SIZES) < 64
    base = Preprocessing(
        input_size=(64, 64), resize=(75, 75), center_crop=(64, 64), interpolation="bicubic",
        crop_offset="floor",
    )  # fmt: skip
    assert verify_preprocessing(base, base, "itself") == 0.0
    for other in (
        replace(base, crop_offset="round"),
        replace(base, interpolation="bilinear"),
        replace(base, backend="tensor"),
    ):
        with pytest.raises(ValueError, match="itself: .* above the tolerance"):
            verify_preprocessing(other, base, "itself")


def test_bgr_input_and_its_overlay_background(images):
    """``channel_order: bgr`` reverses the channels of the network input, after normalising
    in RGB order; the overlay's background turns them back."""
    from camserve.encode_png import network_view

    rgb = Preprocessing(input_size=(64, 64), resize=(64, 64), mean=(0.4, 0.5, 0.6))
    bgr = replace(rgb, channel_order="bgr")
    for image in list(images.values())[:2]:
        assert torch.equal(bgr(image), rgb(image)[[2, 1, 0]])
        assert network_view(bgr(image), bgr).tobytes() == network_view(rgb(image), rgb).tobytes()


def test_the_overlay_background_undoes_the_rescale_factor(images):
    """The network's view of an image is the resized image itself, whatever the rescale
    factor and normalisation the processor used (BiT: 1/127.5, mean and std 0.5)."""
    from camserve.encode_png import network_view

    plain = Preprocessing(input_size=(64, 64), resize=(64, 64), mean=(0, 0, 0), std=(1, 1, 1))
    bit = replace(plain, rescale_factor=1 / 127.5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    for image in list(images.values())[:2]:
        expected = np.asarray(network_view(plain(image), plain), dtype=np.int16)
        shown = np.asarray(network_view(bit(image), bit), dtype=np.int16)
        # At most float rounding at a .5 level; read as 1/255 it would be doubled and clipped.
        assert np.abs(shown - expected).max() <= 1


def test_configs_written_before_the_new_fields_read_as_before(images):
    """An old model-config.yaml (torchvision, models/shapes) gives the pipeline it always
    gave: torchvision.transforms.v2, bilinear, rounded crop, bit for bit."""
    from torchvision.transforms import v2

    old = {"input_size": [64, 64], "resize": 73, "center_crop": [64, 64], "mean": [0.5] * 3,
           "std": [0.25] * 3}  # fmt: skip
    shapes = {"input_size": [64, 64], "mean": [0.5] * 3, "std": [0.25] * 3}
    for config, steps in (
        (old, [v2.Resize(73, antialias=True), v2.CenterCrop([64, 64])]),
        (shapes, [v2.Resize([64, 64], antialias=True)]),
    ):
        pipeline = v2.Compose([
            *steps, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=config["mean"], std=config["std"]),
        ])  # fmt: skip
        ours = Preprocessing.from_dict(config)
        for image in images.values():
            assert torch.equal(ours(image), pipeline(image))
