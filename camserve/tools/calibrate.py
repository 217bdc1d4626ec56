"""Per-channel activation statistics at the target layer, over a calibration image set.

``camserve calibrate`` streams images through the model in batches and keeps, for each
channel k of the target layer, the mean and std of A^k over every image and position.
With them the handler's reference becomes ``calibration_mean`` (mu_k = the dataset mean,
docs/score.md#references) and the worst-case ball uses the dataset std. The file is a plain dict
of tensors, loaded with ``weights_only=True`` by ``camserve.explainer.load_calibration``.

A second pass explains the same images (with the new statistics) and stores the shares of
the zero-reference scores of the model's own predictions (the top-1 class; on a multi-label
model every present label, as the metrics count them) in the ten score bands of
``camserve.telemetry``: the baseline that the server exports at load and the drift rule
compares live traffic with (docs/monitoring.md).

Last, the parameter-randomisation sanity check (``camserve.tools.sanity``) runs on the first
``sanity_images`` images and its curve and verdict go into the same file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import yaml
from PIL import Image
from ruamel.yaml import YAML
from torch import Tensor, nn
from tqdm import tqdm

from camserve.decode import decode_image
from camserve.device import model_device
from camserve.errors import InputError
from camserve.explainer import Explainer, Explanation, load_sanity
from camserve.preprocess import Preprocessing
from camserve.sanity import SanityResult
from camserve.telemetry import ScoreBaseline
from camserve.tools import sanity
from camserve.tools.archive import MODEL_CONFIG, build_archive
from camserve.tools.client import image_files
from camserve.zero_reference import ChannelStatistics

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.pt"


class RunningChannelStatistics:
    """Streaming per-channel mean and (population) std of (N, K, h, w) batches.

    Chan et al.'s pairwise update of (count, mean, M2) in float64: one pass, any batch size,
    and no cancellation from subtracting two large sums of squares.
    """

    def __init__(self) -> None:
        self.positions = 0
        self.images = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, activations: Tensor) -> None:
        if activations.dim() != 4:
            raise ValueError(f"expected (N, K, h, w) activations, got {tuple(activations.shape)}")
        channels = activations.shape[1]
        flat = activations.detach().double().transpose(0, 1).reshape(channels, -1)
        count = flat.shape[1]
        mean = flat.mean(dim=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = mean, m2
        else:
            if channels != self.mean.numel():
                raise ValueError(f"{channels} channels after {self.mean.numel()} before")
            delta = mean - self.mean
            total = self.positions + count
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta**2 * (self.positions * count / total)
        self.positions += count
        self.images += activations.shape[0]

    def result(self) -> ChannelStatistics:
        if self.mean is None or self.m2 is None:
            raise ValueError("no calibration images were seen")
        std = (self.m2 / self.positions).sqrt()
        return ChannelStatistics(mean=self.mean.clone(), std=std, count=self.images)


def activation_statistics(
    model: nn.Module,
    layer_name: str,
    batches: Iterable[Tensor],
    total_images: int | None = None,
    progress: bool = True,
) -> ChannelStatistics:
    """Run ``batches`` of preprocessed images through ``model`` and accumulate the
    per-channel statistics of ``layer_name``'s output (a tqdm bar counts images). The
    batches run on the model's device; the statistics come back on the CPU."""
    device = model_device(model)
    running = RunningChannelStatistics()
    layer = model.get_submodule(layer_name)
    handle = layer.register_forward_hook(lambda module, inputs, output: running.update(output))
    model.eval()
    try:
        with (
            torch.inference_mode(),
            tqdm(total=total_images, unit="img", desc="calibrating", disable=not progress) as bar,
        ):
            for batch in batches:
                model(batch.to(device))
                bar.update(batch.shape[0])
    finally:
        handle.remove()
    return running.result().to("cpu")


def read_images(
    files: Iterable[Path], max_pixels: int, skip_unreadable: bool = False
) -> Iterator[Image.Image]:
    """Decode files with the server's own decoder, so calibration sees what serving sees."""
    for path in files:
        try:
            yield decode_image(path.read_bytes(), max_pixels)
        except InputError as err:
            if not skip_unreadable:
                raise ValueError(
                    f"{path}: {err.message} (use --skip-unreadable to leave such files out)"
                ) from None
            log.warning("skipping %s: %s", path, err.message)


def batched(
    images: Iterable[Image.Image], preprocessing: Preprocessing, batch_size: int
) -> Iterator[Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    pending: list[Tensor] = []
    for image in images:
        pending.append(preprocessing(image))
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def score_baseline(
    explainer: Explainer,
    images: Iterable[Image.Image],
    batch_size: int = 32,
    total_images: int | None = None,
    progress: bool = True,
    on_batch: Callable[[list[Explanation]], None] | None = None,
) -> ScoreBaseline:
    """The zero-reference scores of the model's own predictions on ``images`` (the top-1
    class; multi-label: every present label) as shares of the telemetry's bands;
    ``on_batch`` sees each batch's explanations."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    scores: list[float] = []
    iterator = iter(images)
    with tqdm(total=total_images, unit="img", desc="score baseline", disable=not progress) as bar:
        while batch := list(itertools.islice(iterator, batch_size)):
            explained = explainer.explain([explainer.prepare_image(image) for image in batch])
            scores += [
                block.score
                for item in explained
                for block, _, requested in item.monitored()
                if not requested
            ]
            if on_batch is not None:
                on_batch(explained)
            bar.update(len(batch))
    if not scores:  # only a multi-label model can predict nothing
        raise ValueError(
            "no calibration image has a present label: no drift baseline can be recorded; "
            "calibrate on images of the classes the model serves"
        )
    return ScoreBaseline.from_scores(scores)


def save_statistics(
    statistics: ChannelStatistics,
    path: str | Path,
    layer: str,
    weights: Path,
    source: str,
    baseline: ScoreBaseline | None = None,
    sanity_result: SanityResult | None = None,
) -> None:
    """Write the calibration file; metadata ties it to the layer and the exact weights."""
    torch.save(
        {
            "mean": statistics.mean.double(),
            "std": statistics.std.double(),
            "count": int(statistics.count),
            "layer": layer,
            "weights_sha256": sha256(weights),
            "source": source,
            **(baseline.to_dict() if baseline is not None else {}),
            **(sanity_result.to_calibration() if sanity_result is not None else {}),
        },
        path,
    )


def sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def calibrate_model_dir(
    model_dir: str | Path,
    images: Iterable[Image.Image],
    source: str,
    total_images: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    baseline_images: Iterable[Image.Image] | None = None,
    device: str | torch.device = "cpu",
    sanity_images: int = sanity.DEFAULT_IMAGES,
    sanity_seed: int = sanity.DEFAULT_SEED,
) -> ChannelStatistics:
    """Compute the statistics for the model in ``model_dir`` on ``device``, write
    ``calibration.pt`` there and name it under ``calibration:`` in its ``model-config.yaml``.

    ``baseline_images`` (the same images again: ``images`` is read once) add the score
    baseline; without them the file has none and the server reports no drift. The sanity
    check runs on the first ``sanity_images`` images, with their trained maps from the
    baseline's pass (without one, from the first pass and a pass of its own); 0 skips it: only
    benchmarks do, to time calibrate without it."""
    if sanity_images < 0:
        raise ValueError(f"sanity_images must be at least 0, got {sanity_images}")
    model_dir = Path(model_dir)
    section = yaml.safe_load((model_dir / MODEL_CONFIG).read_text())["handler"]
    section.pop("calibration", None)  # old statistics play no part (and may be missing)
    explainer = Explainer.from_directory(model_dir, section, device=device)
    config = explainer.config
    sample: list[Tensor] = []
    keep = 0 if baseline_images is not None else sanity_images
    statistics = activation_statistics(
        explainer.model,
        explainer.gradcam.layer_name,  # the layer's (N, C, h, w) grid (camserve.grid)
        _keeping(batched(images, config.preprocessing, batch_size), sample, keep),
        total_images,
        progress,
    )
    baseline, trained = None, None
    if baseline_images is not None:
        calibrated = Explainer(
            explainer.model, explainer.labels, config, statistics, explainer.compensation,
            device=explainer.device, thresholds=explainer.thresholds,
        )  # fmt: skip
        # The top-1 maps of this pass are the sanity check's trained maps: the reference
        # changes the score, never the map.
        explained: list[Explanation] = []
        baseline = score_baseline(
            calibrated, baseline_images, batch_size, total_images, progress,
            on_batch=lambda batch: explained.extend(batch[: sanity_images - len(explained)]),
        )  # fmt: skip
        sample = [item.image.tensor for item in explained]
        trained = (
            torch.stack([item.explained.signed_map for item in explained]),
            [item.explained.index for item in explained],
        ) if explained else None  # fmt: skip
    checked = None
    try:
        if sample:
            checked = sanity.run_check(
                explainer, sample, sanity_seed, batch_size=batch_size, progress=progress,
                trained=trained,
            )  # fmt: skip
    except sanity.NothingToRandomise as err:
        log.warning("no sanity check for %s: %s", model_dir, err)
    save_statistics(
        statistics, model_dir / CALIBRATION_FILE, config.target_layer, model_dir / config.weights,
        source, baseline, checked,
    )  # fmt: skip
    _name_calibration_in_config(model_dir / MODEL_CONFIG)
    log.info(
        "calibrated %s at %r on %d images (%s); %s",
        model_dir,
        config.target_layer,
        statistics.count,
        source,
        checked.log_line() if checked else "no sanity check",
    )
    return statistics


def _keeping(batches: Iterable[Tensor], kept: list[Tensor], count: int) -> Iterator[Tensor]:
    """Pass ``batches`` through, keeping their first ``count`` images in ``kept``."""
    for batch in batches:
        kept.extend(batch[: max(0, count - len(kept))].unbind())
        yield batch


def _name_calibration_in_config(path: Path) -> None:
    """Set ``handler.calibration`` with a round-trip YAML edit, so the file's comments survive."""
    editor = YAML()  # round-trip mode: comments, key order and flow style are kept
    config = editor.load(path)
    config.setdefault("handler", {})["calibration"] = CALIBRATION_FILE
    editor.dump(config, path)


def calibrate_archive(
    archive: str | Path,
    image_folder: str | Path,
    export_path: str | Path | None = None,
    name: str | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    skip_unreadable: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    sanity_images: int = sanity.DEFAULT_IMAGES,
    sanity_seed: int = sanity.DEFAULT_SEED,
) -> tuple[Path, ChannelStatistics, SanityResult | None]:
    """Calibrate ``archive`` on the images under ``image_folder`` and write a new archive
    (default: ``<name>_calibrated.mar`` next to the input); returns its path, the statistics
    and the sanity check's result."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    files = image_files(image_folder)
    if limit is not None:
        files = files[:limit]
    with tempfile.TemporaryDirectory(prefix="camserve-calibrate-") as work:
        unpacked = Path(work) / "model"
        try:
            with zipfile.ZipFile(archive) as mar:
                mar.extractall(unpacked)
        except zipfile.BadZipFile:
            raise ValueError(f"{archive} is not a model archive (.mar)") from None
        manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
        original = manifest["model"]["modelName"]
        name = name or f"{original}_calibrated"
        export_path = Path(export_path) if export_path is not None else archive.parent
        output = export_path / f"{name}.mar"
        if output.resolve() == archive.resolve():
            raise ValueError(f"refusing to overwrite the input archive {archive}")
        config = yaml.safe_load((unpacked / MODEL_CONFIG).read_text()).get("handler", {})
        max_pixels = int(config.get("max_pixels", 40_000_000))
        statistics = calibrate_model_dir(
            unpacked,
            read_images(files, max_pixels, skip_unreadable),
            source=f"{len(files)} files under {Path(image_folder).resolve()}",
            total_images=len(files),
            batch_size=batch_size,
            progress=progress,
            baseline_images=read_images(files, max_pixels, skip_unreadable),
            device=device,
            sanity_images=sanity_images,
            sanity_seed=sanity_seed,
        )
        checked = load_sanity(unpacked / CALIBRATION_FILE)
        version = manifest["model"].get("modelVersion", "1.0")
        return build_archive(unpacked, name, export_path, version), statistics, checked
