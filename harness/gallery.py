"""``make gallery``: explanations on generated ``shapes`` images, most stable first.

Each entry shows the input, the Grad-CAM map and the map under the reference shift, with
the zero-reference score. Entries come in three kinds, so the pictures show what the score
catches, not only the stable case: the top-1 class with the shipped calibration reference,
a requested class the model does not predict, and the top-1 class with the ``image_mean``
reference (as an archive without calibration would answer). Writes a PNG contact sheet
(``docs/gallery.png``), a three-entry strip for the README (``docs/overview.png``) and a
self-contained HTML page drawn by ``camserve report``'s renderer (least stable first)::

    python -m harness.gallery --count 24 --png docs/gallery.png --html .run/gallery/index.html

It runs the core in-process (no server): the same ``Explainer`` the handler uses.
"""

from __future__ import annotations

import argparse
import base64
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from camserve.encode_json import explanation_json
from camserve.encode_png import DEFAULT_COLORMAP, encode_png, network_view, overlay_image
from camserve.explainer import Explainer, Explanation
from camserve.tools import report
from harness.shapes.dataset import HELD_OUT_SEED, render_sample

PANEL = 128  # display size of each picture (the network sees 64x64)
GAP = 6
CAPTION = 34
COLUMNS = 3
BATCH = 16
PANELS = ("input", "Grad-CAM", "after the reference shift")


TOP1, REQUESTED, IMAGE_MEAN = "top-1", "asked", "image_mean"
KINDS = (TOP1, REQUESTED, IMAGE_MEAN)


@dataclass(frozen=True)
class Entry:
    index: int
    true_label: str
    kind: str  # one of KINDS
    explanation: Explanation
    panels: tuple[Image.Image, Image.Image, Image.Image]

    @property
    def score(self) -> float:
        return self.explanation.explained.zero_reference.score


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def explain_samples(explainer: Explainer, count: int, seed: int = HELD_OUT_SEED) -> list[Entry]:
    """Explain ``count`` generated images (held-out split), sorted by score, most stable first.

    Image ``i`` is explained as kind ``KINDS[i % 3]``: its top-1 class, a class it is not (the
    next one after its true class), or its top-1 class against the ``image_mean`` reference.
    """
    uncalibrated = Explainer(
        explainer.model, explainer.labels, explainer.config, None, explainer.compensation,
        name=explainer.served.name,
    )  # fmt: skip
    entries = []
    for start in range(0, count, BATCH):
        samples = [render_sample(seed, i) for i in range(start, min(count, start + BATCH))]
        for kind in KINDS:
            chosen = [
                (start + n, s) for n, s in enumerate(samples) if KINDS[(start + n) % 3] == kind
            ]
            if not chosen:
                continue
            runner = uncalibrated if kind == IMAGE_MEAN else explainer
            prepared = [
                runner.prepare_image(
                    s.image,
                    requested_class=(s.label + 1) % len(explainer.labels)
                    if kind == REQUESTED
                    else None,
                )
                for _, s in chosen
            ]
            for (index, sample), result in zip(chosen, runner.explain(prepared), strict=True):
                true_label = explainer.labels[sample.label]
                entries.append(Entry(index, true_label, kind, result, _panels(result)))
    # Stable sort: equal scores keep the generator's order, so the sheet is reproducible.
    return sorted(entries, key=lambda e: e.score)


def _panels(result: Explanation) -> tuple[Image.Image, Image.Image, Image.Image]:
    view = network_view(result.image.tensor, result.model.preprocessing).resize(
        (PANEL, PANEL), Image.NEAREST
    )
    return (
        view,
        overlay_image(result.explained.grad_cam, view),
        overlay_image(result.explained.shifted_grad_cam, view),
    )


def _caption(entry: Entry, labels: list[str]) -> tuple[str, str]:
    zr = entry.explanation.explained.zero_reference
    predicted = labels[entry.explanation.explained.index]
    probability = float(entry.explanation.probabilities[entry.explanation.explained.index])
    how = f"asked {predicted}" if entry.kind == REQUESTED else entry.kind
    first = f"#{entry.index} {entry.true_label} -> {predicted} ({probability:.2f}) [{how}]"
    verdict = "stable" if zr.stable else "UNSTABLE"
    second = f"score {zr.score:.3f} {verdict}  c={zr.offset:+.3g}"
    return first, second


def _tile(entry: Entry, labels: list[str]) -> Image.Image:
    width = 3 * PANEL + 2 * GAP
    tile = Image.new("RGB", (width, PANEL + CAPTION), "white")
    for i, panel in enumerate(entry.panels):
        tile.paste(panel, (i * (PANEL + GAP), 0))
    draw = ImageDraw.Draw(tile)
    font = _font(13)
    first, second = _caption(entry, labels)
    draw.text((2, PANEL + 2), first, fill="black", font=font)
    colour = (20, 110, 40) if entry.explanation.explained.zero_reference.stable else (180, 30, 30)
    draw.text((2, PANEL + 17), second, fill=colour, font=font)
    return tile


SORTED = "Sorted from most stable (top left) to least."


def contact_sheet(
    entries: list[Entry], labels: list[str], columns: int = COLUMNS, order: str = SORTED
) -> Image.Image:
    """A grid of tiles in the entries' order, under a header naming the three panels."""
    tiles = [_tile(e, labels) for e in entries]
    tile_w, tile_h = tiles[0].size
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    header = 66
    sheet = Image.new(
        "RGB",
        (columns * tile_w + (columns + 1) * 3 * GAP, header + rows * (tile_h + 3 * GAP)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (3 * GAP, 4),
        "Each entry: " + " | ".join(PANELS) + ".  " + order,
        fill="black",
        font=_font(15),
    )
    draw.text(
        (3 * GAP, 22),
        "score = share of the map's mass that moves when the zero point moves (0 = none).",
        fill=(70, 70, 70),
        font=_font(13),
    )
    scale_width = min(256, sheet.width - 6 * GAP - 190)
    sheet.paste(_colour_scale(scale_width, 12), (3 * GAP + 24, 44))
    draw.text((3 * GAP, 43), "0", fill="black", font=_font(12))
    draw.text(
        (3 * GAP + 30 + scale_width, 43),
        "1  overlay colour = map / its maximum",
        fill="black",
        font=_font(12),
    )
    for n, tile in enumerate(tiles):
        row, column = divmod(n, columns)
        sheet.paste(
            tile, (3 * GAP + column * (tile_w + 3 * GAP), header + row * (tile_h + 3 * GAP))
        )
    return sheet


def _colour_scale(width: int, height: int) -> Image.Image:
    """The overlay's colormap from 0 (left) to 1 (right)."""
    row = colormaps[DEFAULT_COLORMAP](np.linspace(0.0, 1.0, width), bytes=True)[:, :3]
    return Image.fromarray(np.repeat(row[None], height, axis=0), "RGB")


def overview(entries: list[Entry], labels: list[str]) -> Image.Image:
    """Three entries for the README: the most stable, the median and the least stable."""
    picks = [entries[0], entries[len(entries) // 2], entries[-1]]
    return contact_sheet(picks, labels, 3, "Left to right: most stable, median, least stable.")


def save_png(image: Image.Image, path: Path) -> None:
    # 256 colours without dithering: a third of the size, no visible loss on these pictures.
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


def _picture(image: Image.Image) -> report.Picture:
    uri = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")
    return report.Picture(uri, *image.size)


def html_page(entries: list[Entry], labels: list[str]) -> str:
    """A self-contained page (pictures inline), drawn by ``camserve report``'s renderer: one
    card per entry, least stable first, with its sorting and filtering."""
    rows = []
    for entry in entries:
        body = explanation_json(entry.explanation)
        view, overlay, shifted = (_picture(p) for p in entry.panels)
        card = report.card(body, body["explained"], body["zero_reference"], (overlay, shifted))
        first, _ = _caption(entry, labels)
        rows.append(
            report.ImageEntry(
                entry.index, f"generated image #{entry.index}", (card,), view, None,
                body["model"], body["target_layer"], first,
            )
        )  # fmt: skip
    note = (
        f"{len(entries)} generated shapes images (held-out split), explained three ways: the "
        "top-1 class with the shipped calibration reference, a class the model does not "
        "predict (requested), and the top-1 class against the image_mean reference."
    )
    return report.render_page(rows, report.RunInfo(title="camserve gallery", note=note))


def build(
    model_dir: Path, count: int, png: Path, html_path: Path, overview_png: Path | None = None
) -> list[Entry]:
    """Explain, sort and write the contact sheet, the overview strip and the HTML page."""
    if count < 1:
        raise ValueError("count must be at least 1")
    explainer = Explainer.from_directory(model_dir)
    entries = explain_samples(explainer, count)
    for path in (png, html_path, overview_png):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    save_png(contact_sheet(entries, explainer.labels), png)
    if overview_png is not None:
        save_png(overview(entries, explainer.labels), overview_png)
    html_path.write_text(html_page(entries, explainer.labels))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/shapes"))
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--png", type=Path, default=Path("docs/gallery.png"))
    parser.add_argument("--overview", type=Path, default=Path("docs/overview.png"))
    parser.add_argument("--html", type=Path, default=Path(".run/gallery/index.html"))
    args = parser.parse_args(argv)
    entries = build(args.model_dir, args.count, args.png, args.html, args.overview)
    stable = sum(e.explanation.explained.zero_reference.stable for e in entries)
    print(f"{len(entries)} explanations, {stable} stable; scores {entries[0].score:.3f} .. "
          f"{entries[-1].score:.3f}")  # fmt: skip
    print(f"wrote {args.png}, {args.overview} and {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
