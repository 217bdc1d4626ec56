"""``camserve report``: served explanations as one self-contained page to review.

    camserve report images/ --out report/     # report/index.html, report/assets/

Images go to the server with the client of ``camserve predict`` (camserve.tools.client), with
``images=true``; each answer's pictures are saved as small files under ``DIR/assets`` as the
answers arrive, so a run of 10,000 images does not hold them in memory. The page has a
summary and then one group per image: the input, and one card per explained class (the
explained one, then each ``more_explanations`` entry) with its overlay, its overlay after the
reference shift and its numbers. Groups come least stable first, failed files last, 100 a
page; a small inline script sorts, filters and pages them, and without it the index and its
static ``page-N.html`` files read in that order.

Offline and safe by construction: no network reference of any kind, a Content-Security-Policy
that allows only the page's own files, inline style and the one script (by its hash), and
every string that comes from a file name, a label or a server message goes through
``html.escape``. ``answers.jsonl`` keeps every answer (without pictures) or error, one line
per input, in input order.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageOps

from camserve.tools.client import Client, Outcome, RunStopped, predict_files

THUMBNAIL = 160  # largest side of a stored picture, in pixels
DISPLAY = 128  # largest side of a picture on the page, in CSS pixels
PAGE_SIZE = 100  # images a page
HISTOGRAM_BANDS = 10
ASSETS = "assets"
INDEX = "index.html"
ANSWERS = "answers.jsonl"
# A picture whose PNG takes more bytes per pixel than this is stored as a JPEG instead.
PNG_BYTES_PER_PIXEL = 0.75


@dataclass(frozen=True)
class Picture:
    """A picture on the page: a path relative to it, or a ``data:`` URI, and its size."""

    src: str
    width: int
    height: int


@dataclass(frozen=True)
class ClassCard:
    """One explained class of one image, as its card shows it."""

    label: str
    probability: float
    score: float
    stable: bool
    worst_case: float
    region_iou: float
    centroid_shift_px: float | None
    compensable: bool
    reference: str
    threshold: float
    requested: bool = False
    present: bool | None = None  # multi-label answers only
    overlay: Picture | None = None
    shifted: Picture | None = None


@dataclass(frozen=True)
class ImageEntry:
    """One input: its explained classes, or the reason it has none."""

    position: int
    name: str
    cards: tuple[ClassCard, ...] = ()
    input: Picture | None = None
    error: str | None = None
    model: str | None = None
    target_layer: str | None = None
    caption: str | None = None  # a line under the name (the gallery's ground truth)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def score(self) -> float:
        """The least stable card's score: what orders the groups."""
        return max((c.score for c in self.cards), default=0.0)

    @property
    def probability(self) -> float:
        return self.cards[0].probability if self.cards else 0.0


@dataclass(frozen=True)
class RunInfo:
    """What the page says about the run."""

    title: str = "camserve report"
    started: datetime | None = None
    seconds: float | None = None
    source: str | None = None  # where the answers came from
    stopped: str | None = None  # why the run stopped early, if it did
    note: str | None = None  # a paragraph under the title


def display_name(path: Path | str) -> str:
    """A file name as text: bytes that are not UTF-8 show as escapes instead of failing."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def class_blocks(body: dict) -> list[tuple[dict, dict, dict | None]]:
    """(class, zero_reference, images) of each explained class of an answer: the explained
    one first, then each ``more_explanations`` entry."""
    blocks = [(body["explained"], body["zero_reference"], body.get("images"))]
    for entry in body.get("more_explanations", ()):
        blocks.append((entry, entry["zero_reference"], entry.get("images")))
    return blocks


def card(body: dict, explained: dict, zero_reference: dict, pictures=(None, None)) -> ClassCard:
    """The card of one class of an answer (``present`` from the class, else from its row in
    ``predictions``: multi-label answers carry it, single-label ones do not)."""
    present = explained.get("present")
    if present is None:
        rows = [p for p in body.get("predictions", ()) if p.get("index") == explained["index"]]
        present = rows[0].get("present") if rows else None
    return ClassCard(
        label=str(explained["label"]),
        probability=float(explained["probability"]),
        score=float(zero_reference["score"]),
        stable=bool(zero_reference["stable"]),
        worst_case=float(zero_reference["worst_case"]["score"]),
        region_iou=float(zero_reference["region_iou"]),
        centroid_shift_px=zero_reference["centroid_shift_px"],
        compensable=bool(zero_reference["compensable"]),
        reference=str(zero_reference["reference"]),
        threshold=float(zero_reference["threshold"]),
        requested=bool(explained.get("requested", False)),
        present=present,
        overlay=pictures[0],
        shifted=pictures[1],
    )


def entry_from_answer(
    position: int, name: str, body: dict, pictures: Sequence = (), input_picture=None
) -> ImageEntry:
    """An answered input; ``pictures`` holds an (overlay, shifted) pair per explained class."""
    blocks = class_blocks(body)
    pairs = list(pictures) + [(None, None)] * (len(blocks) - len(pictures))
    cards = tuple(card(body, c, z, pair) for (c, z, _), pair in zip(blocks, pairs, strict=True))
    return ImageEntry(
        position, name, cards, input_picture, None, body.get("model"), body.get("target_layer")
    )


# --- Pictures ---------------------------------------------------------------------------------


def _stored(image: Image.Image, folder: Path, stem: str, original: bytes | None = None) -> Picture:
    """``image`` as a file of at most THUMBNAIL pixels a side: a PNG while it stays small
    (``original``, the PNG it came from, as it is), else a JPEG (photographs and noisy
    pictures, where PNG keeps almost the raw size)."""
    if max(image.size) > THUMBNAIL:
        image = image.copy()
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        original = None
    budget = PNG_BYTES_PER_PIXEL * image.width * image.height
    data, suffix = original, "png"
    if data is None or len(data) > budget:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=True)
        data = buffer.getvalue()
    if len(data) > budget:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=90, subsampling=0)
        data, suffix = buffer.getvalue(), "jpg"
    (folder / f"{stem}.{suffix}").write_bytes(data)
    return Picture(f"{ASSETS}/{stem}.{suffix}", *image.size)


def input_thumbnail(path: Path, folder: Path, stem: str) -> Picture | None:
    """A thumbnail of the file as sent (EXIF rotation applied), or None when this machine
    cannot decode it: the server's answer still stands."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a reduced scale
            view = ImageOps.exif_transpose(image)
            return _stored(view.convert("RGBA" if "A" in view.getbands() else "RGB"), folder, stem)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


class ReportAssets:
    """The client's ``PictureSink`` for a report: it saves the input's thumbnail and each
    explained class's overlay pair under ``DIR/assets``, and drops the base64 pictures from
    the answer. Called from the client's worker threads."""

    def __init__(self, out: Path, paths: Sequence[Path]) -> None:
        self.folder = Path(out) / ASSETS
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.iterdir():  # this folder holds only a report's own pictures
            if stale.is_file() and stale.suffix in (".png", ".jpg"):
                stale.unlink()
        self.paths = list(paths)
        self.inputs: dict[int, Picture | None] = {}
        self.pairs: dict[int, list[tuple[Picture | None, Picture | None]]] = {}
        self._lock = threading.Lock()

    def __call__(self, position: int, body: dict) -> tuple[Path, ...]:
        stem = f"{position:06d}"
        pairs = []
        for number, (_, _, images) in enumerate(class_blocks(body)):
            pair: list[Picture | None] = []
            for key, kind in (("overlay_png", "overlay"), ("shifted_overlay_png", "shifted")):
                data = base64.b64decode(images[key]) if images else None
                if data is None:
                    pair.append(None)
                    continue
                with Image.open(io.BytesIO(data)) as picture:
                    picture.load()
                    pair.append(_stored(picture, self.folder, f"{stem}-{number}-{kind}", data))
            pairs.append(tuple(pair))
        body.pop("images", None)
        for entry in body.get("more_explanations", ()):
            entry.pop("images", None)
        thumbnail = input_thumbnail(self.paths[position], self.folder, f"{stem}-input")
        with self._lock:
            self.inputs[position] = thumbnail
            self.pairs[position] = pairs
        written = [thumbnail] + [p for pair in pairs for p in pair]
        return tuple(Path(self.folder.parent, p.src) for p in written if p is not None)

    def entries(self, outcomes: Sequence[Outcome]) -> list[ImageEntry]:
        """One entry per outcome, in input order."""
        entries = []
        for position, outcome in enumerate(outcomes):
            name = display_name(outcome.path)
            if outcome.ok:
                pairs = self.pairs.get(position, ())
                picture = self.inputs.get(position)
                entries.append(entry_from_answer(position, name, outcome.body, pairs, picture))
            else:
                entries.append(ImageEntry(position, name, error=outcome.error))
        return entries


# --- The page ---------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def default_order(entries: Iterable[ImageEntry]) -> list[ImageEntry]:
    """Least stable first (the highest score of an image's cards), failed files last; the
    order the page has without its script, and the script's default."""
    return sorted(entries, key=lambda e: (e.failed, -e.score, e.position))


SORTS = {  # the script's orders; the first is the default
    "score-desc": "score, high to low (least stable first)",
    "score-asc": "score, low to high (most stable first)",
    "probability-desc": "probability, high to low",
    "probability-asc": "probability, low to high",
    "name": "file name",
}
STATES = {"all": "all", "unstable": "unstable only", "stable": "stable only", "failed": "failed"}


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _probability(value: float) -> str:
    """Three decimals, or two significant digits below 0.001 (not a bare 0.000)."""
    return f"{value:.3f}" if value >= 0.001 or value == 0 else f"{value:.1e}"


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.0f}%)" if whole else "none"


def _picture(picture: Picture | None, alt: str, caption: str) -> str:
    if picture is None:
        body = f'<span class="missing" role="img" aria-label="{esc(alt)}">no picture</span>'
    else:
        scale = DISPLAY / max(picture.width, picture.height)
        width, height = round(picture.width * scale), round(picture.height * scale)
        # Pixel art stays sharp when small pictures (64x64 inputs) are drawn larger.
        pixelated = ' class="px"' if scale > 1 else ""
        body = (
            f'<img src="{esc(picture.src)}" width="{width}" height="{height}" alt="{esc(alt)}"'
            f' loading="lazy"{pixelated}>'
        )
    return f"<figure>{body}<figcaption>{esc(caption)}</figcaption></figure>"


def _card_html(card: ClassCard, show_reference: bool) -> str:
    verdict = "stable" if card.stable else "unstable"
    tags = [f'<span class="tag {verdict}">{verdict}</span>']
    if card.requested:
        tags.append('<span class="tag">requested</span>')
    if card.present is not None:
        tags.append(f'<span class="tag">{"present" if card.present else "not present"}</span>')
    label = esc(card.label)
    shift = "n/a (an empty map)" if card.centroid_shift_px is None else (
        f"{card.centroid_shift_px:.1f} px"
    )  # fmt: skip
    facts = (
        ("probability", _probability(card.probability)),
        ("score", _number(card.score)),
        ("worst case", _number(card.worst_case)),
        ("region IoU", _number(card.region_iou, 2)),
        ("centroid shift", shift),
    ) + ((("reference", card.reference),) if show_reference else ())
    numbers = "".join(f"<dt>{k}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    return (
        f'<article class="card" data-label="{label}" data-stable="{int(card.stable)}" '
        f'data-score="{card.score:.6f}" data-probability="{card.probability:.6f}">'
        f'<h4>{label} {" ".join(tags)}</h4><div class="pics">'
        + _picture(card.overlay, f"Grad-CAM of {card.label}", "Grad-CAM")
        + _picture(
            card.shifted,
            f"Grad-CAM of {card.label} after the reference shift",
            "after the reference shift",
        )
        + f"</div><dl>{numbers}</dl></article>"
    )


def _entry_html(entry: ImageEntry, show_reference: bool) -> str:
    head = f'<h3 class="file">{esc(entry.name)}</h3>'
    if entry.caption:
        head += f'<p class="caption">{esc(entry.caption)}</p>'
    if entry.failed:  # the summary's table links to failed files
        return (
            f'<li class="image failed" id="image-{entry.position}" data-failed="1">{head}'
            f'<p class="error"><strong>failed:</strong> {esc(entry.error)}</p></li>'
        )
    cards = "".join(_card_html(c, show_reference) for c in entry.cards)
    return (
        f'<li class="image" data-failed="0">{head}<div class="row">'
        + _picture(entry.input, "input", "input")
        + f'<div class="cards">{cards}</div></div></li>'
    )


def _bar(fraction: float, cls: str = "") -> str:
    width = max(0.0, min(1.0, fraction)) * 100
    return f'<span class="bar {cls}" style="width:{width:.1f}%"></span>'


def _distinct(values: Iterable) -> str:
    found = sorted({str(v) for v in values if v is not None})
    return ", ".join(found) if found else "unknown"


def _summary_html(entries: Sequence[ImageEntry], run: RunInfo) -> str:
    cards = [c for e in entries for c in e.cards]
    failed = [e for e in entries if e.failed]
    stable = sum(c.stable for c in cards)
    thresholds = {c.threshold for c in cards}
    answered = len(entries) - len(failed)
    facts = [
        ("images", f"{len(entries)} ({answered} answered, {len(failed)} failed)"),
        ("explanations", str(len(cards))),
        ("stable", _share(stable, len(cards))),
        ("model", _distinct(e.model for e in entries)),
        ("target layer", _distinct(e.target_layer for e in entries)),
        ("reference", _distinct(c.reference for c in cards)),
        ("stability threshold", _distinct(f"score <= {t:g}" for t in thresholds)),
    ]
    if run.started is not None:
        took = f", {run.seconds:.1f} s" if run.seconds is not None else ""
        facts.append(("run", f"{run.started.isoformat(timespec='seconds')}{took}"))
    if run.source:
        facts.append(("server", run.source))
    pairs = "".join(f"<div><dt>{k}</dt> <dd>{esc(v)}</dd></div>" for k, v in facts)
    panels = []
    if cards:
        panels += [
            _histogram_html(cards, thresholds),
            _classes_html(cards),
            _compensable_html(cards),
        ]
    if failed:
        panels.append(_failures_html(failed))
    return (
        '<section id="summary" aria-labelledby="summary-title"><h2 id="summary-title">Summary'
        f'</h2><dl class="facts">{pairs}</dl><div class="panels">'
        + "".join(f"<div>{p}</div>" for p in panels)
        + "</div></section>"
    )


def _compensable_html(cards: Sequence[ClassCard]) -> str:
    rows = []
    for value in (True, False):
        group = [c for c in cards if c.compensable is value]
        if group:
            share = sum(c.stable for c in group) / len(group)
            rows.append(
                f'<tr><th scope="row">{"yes" if value else "no"}</th><td class="n">{len(group)}'
                f'</td><td class="n">{_share(sum(c.stable for c in group), len(group))}</td>'
                f"<td>{_bar(share, 'ok')}</td></tr>"
            )
    return (
        "<h3>Stable share by <code>compensable</code></h3>"
        '<p class="note">yes: the served network absorbs a shift of the layer\'s zero point '
        "exactly; no: the score describes a thought experiment.</p><table><thead><tr>"
        '<th scope="col">compensable</th>'
        '<th scope="col">explanations</th><th scope="col">stable</th><th scope="col">'
        '<span class="sr">share</span></th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )


def _histogram_html(cards: Sequence[ClassCard], thresholds: set[float]) -> str:
    counts = Counter(min(int(c.score * HISTOGRAM_BANDS), HISTOGRAM_BANDS - 1) for c in cards)
    tallest = max(counts.values())
    threshold = min(thresholds)
    rows = []
    for band in range(HISTOGRAM_BANDS):
        low, high = band / HISTOGRAM_BANDS, (band + 1) / HISTOGRAM_BANDS
        over = " bad" if low >= threshold else ""
        rows.append(
            f'<tr><th scope="row">{low:.1f} – {high:.1f}</th><td class="n">{counts[band]}</td>'
            f"<td>{_bar(counts[band] / tallest, over)}</td></tr>"
        )
    return (
        '<h3>Score distribution</h3><table class="hist"><caption>explanations per score '
        f"band; a score above {threshold:g} is unstable</caption><thead><tr>"
        '<th scope="col">score</th><th scope="col">explanations</th><th scope="col">'
        '<span class="sr">bar</span></th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
    )


def _classes_html(cards: Sequence[ClassCard]) -> str:
    by_label: dict[str, list[ClassCard]] = {}
    for c in cards:
        by_label.setdefault(c.label, []).append(c)
    rows = []
    for label in sorted(by_label, key=lambda k: (-len(by_label[k]), k)):
        group = by_label[label]
        stable = sum(c.stable for c in group)
        median = statistics.median(c.score for c in group)
        rows.append(
            f'<tr><th scope="row">{esc(label)}</th><td class="n">{len(group)}</td>'
            f'<td class="n">{_share(stable, len(group))}</td><td class="n">{median:.3f}</td>'
            f"<td>{_bar(stable / len(group), 'ok')}</td></tr>"
        )
    return (
        '<h3>Per class</h3><table><thead><tr><th scope="col">class</th>'
        '<th scope="col">explanations</th><th scope="col">stable</th>'
        '<th scope="col">median score</th><th scope="col"><span class="sr">stable share</span>'
        "</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def failure_reason(error: str) -> str:
    """What failures have in common: the message up to its first colon."""
    return error.split(": ", 1)[0]


def _failures_html(failed: Sequence[ImageEntry]) -> str:
    reasons = Counter(failure_reason(e.error) for e in failed)
    example = {}
    for e in failed:
        example.setdefault(failure_reason(e.error), e)
    rows = "".join(
        f'<tr><th scope="row">{esc(reason)}</th><td class="n">{count}</td>'
        f'<td><a href="#image-{example[reason].position}">{esc(example[reason].name)}</a></td></tr>'
        for reason, count in reasons.most_common()
    )
    return (
        f'<h3>Failed requests</h3><table><thead><tr><th scope="col">reason</th>'
        '<th scope="col">files</th><th scope="col">for example</th></tr></thead><tbody>'
        f"{rows}</tbody></table>"
    )


def _controls_html(entries: Sequence[ImageEntry]) -> str:
    labels = sorted({c.label for e in entries for c in e.cards})
    sorts = "".join(f'<option value="{k}">{esc(v)}</option>' for k, v in SORTS.items())
    classes = '<option value="">all classes</option>' + "".join(
        f'<option value="{esc(label)}">{esc(label)}</option>' for label in labels
    )
    states = "".join(f'<option value="{k}">{esc(v)}</option>' for k, v in STATES.items())
    return (
        '<div id="controls" class="controls" hidden>'
        f'<label>Sort by <select id="sort">{sorts}</select></label>'
        f'<label>Class <select id="class-filter">{classes}</select></label>'
        f'<label>Show <select id="state-filter">{states}</select></label></div>'
        '<p id="status" role="status" aria-live="polite"></p>'
    )


PAGER = (
    '<nav id="pager" class="controls" aria-label="pages" hidden>'
    '<button type="button" id="previous">previous page</button>'
    '<span id="page"></span><button type="button" id="next">next page</button></nav>'
)

STYLE = """
body{font:15px/1.4 system-ui,sans-serif;color:#1d1d1d;background:#fff;margin:0 auto;
max-width:1280px;padding:0 1em 2em}
h1{margin:.5em 0 .1em}h2{margin:.8em 0 .3em;border-bottom:2px solid #ccc}h3{margin:.9em 0 .3em}
table{border-collapse:collapse;margin:.3em 0 .8em}th,td{padding:2px 10px 2px 0;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.panels{display:flex;flex-wrap:wrap;gap:0 40px;font-size:.9em}.panels>div{max-width:34em}
.panels h3{margin-top:.5em}.note{margin:0 0 .3em;color:#444}
.facts{display:flex;flex-wrap:wrap;gap:2px 24px;margin:0}
.facts dt{display:inline;font-weight:600}.facts dd{display:inline;margin:0}
th,td{white-space:nowrap}caption{text-align:left;color:#444}
.bar{display:inline-block;height:12px;min-width:1px;background:#5a6b8c;vertical-align:middle}
td:last-child{width:100px}.bar.bad{background:#b3261e}.bar.ok{background:#2e7d32}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
.alert{border:2px solid #b3261e;padding:.5em .8em;background:#fdecea}
.controls{display:flex;flex-wrap:wrap;gap:1em;align-items:center;margin:.5em 0}
.controls[hidden],.static-pages[hidden]{display:none}select,button{font:inherit;padding:2px 6px}
ol.images{list-style:none;padding:0;margin:0}
.image{border-top:1px solid #ddd;padding:.6em 0;content-visibility:auto;
contain-intrinsic-size:auto 250px}
.file{margin:0 0 .3em;font-size:1em;overflow-wrap:anywhere}.caption{margin:0 0 .3em;color:#555}
.row,.cards,.pics{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{border:1px solid #ccc;border-radius:6px;padding:6px 8px}
.card h4{margin:0 0 4px;font-size:1em}
figure{margin:0;text-align:center;font-size:.8em;color:#444}
figure img,.missing{display:block;background:#eee}
.missing{width:128px;height:128px;line-height:128px}
img.px{image-rendering:pixelated}
.card dl{display:grid;grid-template-columns:repeat(2,max-content auto);gap:0 10px;margin:4px 0 0;
font-size:.9em;font-variant-numeric:tabular-nums}.card dd{margin:0}
.tag{font-size:.8em;border:1px solid #888;border-radius:3px;padding:0 4px;font-weight:400}
.tag.stable{border-color:#2e7d32;color:#1b5e20}
.tag.unstable{border-color:#b3261e;color:#fff;background:#b3261e}
.error{color:#8c1d18;margin:0;overflow-wrap:anywhere}
:focus-visible{outline:3px solid #1a73e8;outline-offset:2px}
""".strip()

# Sorts, filters and pages the groups the page holds; reads only data-* attributes and text,
# writes only textContent and the hidden flag, never HTML. Only the page on show is in the
# document: 10,000 laid-out groups (or their lazy pictures' observers) would slow every frame.
SCRIPT = (
    """
(() => {
  "use strict";
  const PAGE = %(page)d;
  const byId = (id) => document.getElementById(id);
  const list = byId("images");
  const groups = Array.from(list.children).concat(Array.from(byId("more-images").content.children));
  const sort = byId("sort"), label = byId("class-filter"), state = byId("state-filter");
  const status = byId("status"), pager = byId("pager"), pageText = byId("page");
  const previous = byId("previous"), next = byId("next");
  const cards = new Map(groups.map((g) => [g, Array.from(g.querySelectorAll(".card"))]));
  const names = new Map(groups.map((g) => [g, g.querySelector(".file").textContent]));
  const order = new Map(groups.map((g, i) => [g, i]));  // ties keep the page's own order
  let page = 0, shown = [];
  const keys = {
    score: (g, v) => Math.max(...v.map((c) => +c.dataset.score)),
    probability: (g, v) => +v[0].dataset.probability,
  };
  function apply() {
    const [field, direction] = sort.value.split("-");
    const want = state.value, wanted = label.value;
    const rows = [];
    for (const g of groups) {
      const failed = g.dataset.failed === "1";
      let visible = [];
      if (!failed && want !== "failed") {
        for (const c of cards.get(g)) {
          const ok = (!wanted || c.dataset.label === wanted) &&
            (want === "all" || (want === "stable") === (c.dataset.stable === "1"));
          c.hidden = !ok;
          if (ok) visible.push(c);
        }
      }
      const keep = failed ? want === "failed" || (want === "all" && !wanted) : visible.length > 0;
      const key = failed || !keys[field] ? 0 : keys[field](g, visible);
      rows.push({g, failed, keep, key, name: names.get(g), position: order.get(g)});
    }
    const sign = direction === "asc" ? 1 : -1;
    rows.sort((a, b) => (a.failed - b.failed) ||
      (field === "name" ? a.name.localeCompare(b.name) : sign * (a.key - b.key)) ||
      a.position - b.position);
    shown = rows.filter((r) => r.keep).map((r) => r.g);
    show(0);
  }
  function show(number) {
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(Math.max(0, number), pages - 1);
    const first = page * PAGE, last = Math.min(shown.length, first + PAGE);
    list.replaceChildren(...shown.slice(first, last));
    status.textContent = shown.length
      ? `Showing images ${first + 1} to ${last} of ${shown.length} (of ${groups.length}).`
      : `No image matches (of ${groups.length}).`;
    pageText.textContent = `page ${page + 1} of ${pages}`;
    pager.hidden = pages < 2;
    previous.disabled = page === 0;
    next.disabled = page === pages - 1;
  }
  for (const control of [sort, label, state]) control.addEventListener("change", apply);
  previous.addEventListener("click", () => { show(page - 1); list.scrollIntoView(); });
  next.addEventListener("click", () => { show(page + 1); list.scrollIntoView(); });
  byId("controls").hidden = false;
  for (const nav of document.querySelectorAll(".static-pages")) nav.hidden = true;
  apply();
  performance.mark("report-ready");
})();
""".strip()
    % {"page": PAGE_SIZE}
)


def _script_hash(script: str) -> str:
    return base64.b64encode(hashlib.sha256(script.encode()).digest()).decode("ascii")


def page_name(number: int) -> str:
    """The file of static page ``number`` (1 is the index)."""
    return INDEX if number == 1 else f"page-{number}.html"


def _document(title: str, body: str, script: str | None = None) -> str:
    # Nothing but the page's own files, inline style and its one script: no network request
    # can leave the page, and a script injected through a name would not run.
    scripts = f"'sha256-{_script_hash(script)}'" if script else "'none'"
    policy = (
        "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
        f"script-src {scripts}; base-uri 'none'; form-action 'none'"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n{body}"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )


def _static_pages_html(number: int, pages: int, total: int) -> str:
    """Links between the static pages: what a reader without scripts pages with."""
    first = (number - 1) * PAGE_SIZE + 1
    last = min(total, number * PAGE_SIZE)
    links = " ".join(
        f"<strong>{n}</strong>" if n == number else f'<a href="{page_name(n)}">{n}</a>'
        for n in range(1, pages + 1)
    )
    return (
        f'<nav class="static-pages" aria-label="pages"><p>Images {first} to {last} of {total}, '
        f"least stable first. Pages: {links}</p></nav>"
    )


def render_pages(entries: Sequence[ImageEntry], run: RunInfo = RunInfo()) -> dict[str, str]:
    """The report's HTML files by name: ``index.html`` (summary, then the first PAGE_SIZE
    images in ``default_order``) and, past PAGE_SIZE images, ``page-2.html``... holding the
    next ones, for readers without scripts. The index carries every image: the ones after
    its first page in a ``<template>``, which the browser parses but neither lays out nor
    loads pictures for, and which the script pages through."""
    ordered = default_order(entries)
    cards = sum(len(e.cards) for e in entries)
    mixed = len({c.reference for e in entries for c in e.cards}) > 1  # else the summary says
    groups = [_entry_html(e, mixed) for e in ordered]
    pages = max(1, -(-len(groups) // PAGE_SIZE))
    header = f"<h1>{esc(run.title)}</h1>"
    if run.note:
        header += f"<p>{esc(run.note)}</p>"
    if run.stopped:
        header += (
            f'<p class="alert" role="alert"><strong>The run stopped early:</strong> '
            f"{esc(run.stopped)}. Images not sent are listed as failed.</p>"
        )
    static = _static_pages_html(1, pages, len(groups)) if pages > 1 else ""
    index = (
        f"<header>{header}</header>\n<main>\n"
        + _summary_html(entries, run)
        + '\n<section id="explanations" aria-labelledby="explanations-title">'
        '<h2 id="explanations-title">Explanations</h2><p>Each image, then one card per '
        "explained class: the Grad-CAM overlay, the overlay after the layer's zero point moves "
        "to the reference, and the numbers. <strong>score</strong>: the share of the map's "
        "mass that moves (0 = none, 1 = all); <strong>worst case</strong>: the largest share "
        "for any shift within the allowed radius.</p>"
        "<noscript><p>Without scripts: every image, least stable first, failed files last, "
        f"{PAGE_SIZE} a page.</p></noscript>"
        + _controls_html(entries)
        + '\n<ol id="images" class="images">\n'
        + "\n".join(groups[:PAGE_SIZE])
        + '\n</ol>\n<template id="more-images">\n'
        + "\n".join(groups[PAGE_SIZE:])
        + "\n</template>\n"
        + PAGER
        + static
        + "</section>\n</main>\n"
    )
    title = f"{run.title}: {len(entries)} images, {cards} explanations"
    files = {INDEX: _document(title, index, SCRIPT)}
    for number in range(2, pages + 1):
        chunk = groups[(number - 1) * PAGE_SIZE : number * PAGE_SIZE]
        nav = _static_pages_html(number, pages, len(groups))
        body = (
            f'<header><h1>{esc(run.title)}</h1><p><a href="{INDEX}">summary and first page'
            f"</a></p></header>\n<main>{nav}\n"
            + '<ol id="images" class="images">\n'
            + "\n".join(chunk)
            + f"\n</ol>\n{nav}</main>\n"
        )
        files[page_name(number)] = _document(f"{title}, page {number}", body)
    return files


def render_page(entries: Sequence[ImageEntry], run: RunInfo = RunInfo()) -> str:
    """The index page alone (all of the report up to PAGE_SIZE images)."""
    return render_pages(entries, run)[INDEX]


def write_pages(out: Path, entries: Sequence[ImageEntry], run: RunInfo = RunInfo()) -> Path:
    """Write the report's HTML files into ``out`` (removing static pages of an older, longer
    report); returns the index."""
    files = render_pages(entries, run)
    for stale in Path(out).glob("page-*.html"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (Path(out) / name).write_text(text, encoding="utf-8")
    return Path(out) / INDEX


# --- A run ------------------------------------------------------------------------------------


@dataclass
class Report:
    """What ``run_report`` did: the page, the rows, and why the run stopped, if it did."""

    page: Path
    outcomes: list[Outcome]
    entries: list[ImageEntry] = field(default_factory=list)
    stopped: RunStopped | None = None

    @property
    def failed(self) -> int:
        return sum(e.failed for e in self.entries)


def write_answers(path: Path, outcomes: Sequence[Outcome]) -> None:
    """``answers.jsonl``: per input, in order, its answer (pictures left out) or its error."""
    with path.open("w", encoding="utf-8") as out:
        for outcome in outcomes:
            record = {"file": display_name(outcome.path)}
            record.update({"answer": outcome.body} if outcome.ok else {"error": outcome.error})
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_report(
    client: Client,
    paths: Sequence[Path],
    out: Path,
    target: str | None = None,
    maps: int | None = None,
    concurrency: int = 4,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Report:
    """Explain ``paths`` on the server and write ``out/index.html``; a run that stops
    early (``RunStopped``) still writes a page, with the images not sent as failed rows."""
    out = Path(out)
    assets = ReportAssets(out, paths)
    started = datetime.now().astimezone()
    stopped = None
    try:
        outcomes = predict_files(
            client, paths, target=target, concurrency=concurrency, progress=progress,
            maps=maps, pictures=assets,
        )  # fmt: skip
    except RunStopped as err:
        stopped, outcomes = err, err.outcomes
    seconds = (datetime.now().astimezone() - started).total_seconds()
    entries = assets.entries(outcomes)
    run = RunInfo(
        started=started,
        seconds=seconds,
        source=f"{client.url} ({client.protocol}), model {client.model}",
        stopped=str(stopped) if stopped else None,
    )
    page = write_pages(out, entries, run)
    write_answers(out / ANSWERS, outcomes)
    return Report(page, outcomes, entries, stopped)
