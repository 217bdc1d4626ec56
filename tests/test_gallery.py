"""`make gallery`: the contact sheet, the overview strip and the HTML page build and agree."""

from __future__ import annotations

import re

from PIL import Image

from harness import gallery
from tests.conftest import SHAPES_DIR


def test_gallery_builds_sorted_most_stable_first(tmp_path):
    png, strip, page = tmp_path / "g.png", tmp_path / "o.png", tmp_path / "site" / "index.html"
    entries = gallery.build(SHAPES_DIR, 4, png, page, strip)

    scores = [e.score for e in entries]
    assert len(entries) == 4 and scores == sorted(scores)
    assert sorted(e.index for e in entries) == [0, 1, 2, 3]

    sheet = Image.open(png)
    tile_w = 3 * gallery.PANEL + 2 * gallery.GAP
    assert sheet.format == "PNG"
    # Three tiles a row: two rows for four entries.
    assert sheet.width >= 3 * tile_w and sheet.height >= 2 * (gallery.PANEL + gallery.CAPTION)
    overview = Image.open(strip)
    assert overview.width == sheet.width and overview.height < sheet.height

    text = page.read_text()
    # The page is camserve report's: one card per entry, least stable first, pictures inline.
    page_scores = [
        float(s) for s in re.findall(r'<article class="card" [^>]*data-score="([0-9.]+)"', text)
    ]
    assert page_scores == [round(s, 6) for s in reversed(scores)]
    assert text.count('src="data:image/png;base64,') == 3 * len(entries)
    assert text.count('<span class="tag">requested</span>') == sum(
        e.kind == gallery.REQUESTED for e in entries
    )
    # Each entry names the true class of its generated image.
    for entry in entries:
        assert f"#{entry.index} {entry.true_label} -&gt; " in text


def test_score_figure_is_drawn_from_a_real_explanation(tmp_path):
    from camserve.explainer import Explainer
    from harness.figures import score_figure

    out = tmp_path / "score.png"
    score_figure(Explainer.from_directory(SHAPES_DIR), 1, out)
    figure = Image.open(out)
    assert figure.format == "PNG" and figure.width > 1000 and figure.height > 200
