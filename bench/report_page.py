"""The report page at scale: its size, time to first paint and scrolling, for 1,000 and 10,000
images, measured in headless Chromium with the browser's performance API.

    python -m bench.report_page                     # 1,000 and 10,000 images, 3 loads each
    python -m bench.report_page --images 200 --loads 1

The answers are real ones replayed: 24 generated shapes images explained in process (a third
of them for a class the model does not predict, so scores spread), each answer with its
pictures; image ``n`` gets answer ``n % 24`` under its own file name, and one image in a
hundred fails. They go through the same picture sink and renderer as ``camserve report``, so
the folder holds one input thumbnail and one overlay pair per image. Writes
``bench/results/<date>-report-page.json``. Timings on a busy machine are upper bounds.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.run import REPO, RESULTS, machine
from camserve.encode_json import explanation_json
from camserve.explainer import Explainer
from camserve.request import ParsedRequest, RequestOptions
from camserve.tools import report
from camserve.tools.client import Outcome
from harness.browser import chromium, console_errors, page_url
from harness.shapes.dataset import HELD_OUT_SEED, render_sample

DISTINCT = 24

TIMINGS = """
const paint = Object.fromEntries(
  performance.getEntriesByType("paint").map((e) => [e.name, e.startTime]));
const nav = performance.getEntriesByType("navigation")[0];
const ready = performance.getEntriesByName("report-ready")[0];
return {first_paint_ms: paint["first-paint"], first_contentful_paint_ms:
  paint["first-contentful-paint"], dom_content_loaded_ms: nav.domContentLoadedEventEnd,
  load_ms: nav.loadEventEnd, script_ready_ms: ready ? ready.startTime : null,
  dom_elements: document.getElementsByTagName("*").length};
"""

# Scrolls 200 px a frame for 120 frames and returns the frame intervals, in ms.
SCROLL = """
const done = arguments[arguments.length - 1];
const frames = [];
let last = performance.now();
function step(n) {
  const now = performance.now();
  frames.push(now - last);
  last = now;
  window.scrollBy(0, 200);
  if (n > 0) requestAnimationFrame(() => step(n - 1)); else done(frames.slice(1));
}
window.scrollTo(0, 0);
requestAnimationFrame(() => step(120));
"""

SORT = """
const select = document.getElementById("sort");
const start = performance.now();
select.value = "name";
select.dispatchEvent(new Event("change"));
return performance.now() - start;
"""


def answers(model_dir: Path) -> tuple[list[dict], list[Path], Path]:
    """DISTINCT real answers with their pictures, and the images they answer (as files)."""
    explainer = Explainer.from_directory(model_dir)
    folder = Path(tempfile.mkdtemp(prefix="report-bench-in-"))
    bodies, files = [], []
    for index in range(DISTINCT):
        sample = render_sample(HELD_OUT_SEED, index)
        path = folder / f"sample{index}.png"
        sample.image.save(path)
        other = explainer.labels[(sample.label + 1) % len(explainer.labels)]
        options = RequestOptions(images=True, target=other if index % 3 == 1 else None)
        prepared = explainer.prepare(ParsedRequest(path.read_bytes(), options))
        [result] = explainer.explain([prepared])
        bodies.append(explanation_json(result))
        files.append(path)
    return bodies, files, folder


def build(count: int, bodies: list[dict], files: list[Path], out: Path) -> dict:
    """A report of ``count`` images in ``out``; returns its sizes."""
    sources = [files[n % DISTINCT] for n in range(count)]
    assets = report.ReportAssets(out, sources)
    outcomes = []
    for n in range(count):
        name = Path(f"photos/batch-{n // 1000:02d}/image-{n:05d}.jpg")
        if n % 100 == 99:
            outcomes.append(Outcome(name, error="HTTP 422 undecodable_image: not an image"))
            continue
        body = copy.deepcopy(bodies[n % DISTINCT])
        outcomes.append(Outcome(name, body=body, overlays=assets(n, body)))
    entries = assets.entries(outcomes)
    page = report.write_pages(out, entries, report.RunInfo())
    pictures = list((out / report.ASSETS).iterdir())
    static = list(out.glob("page-*.html"))
    return {
        "images": count,
        "explanations": sum(len(e.cards) for e in entries),
        "index_html_bytes": page.stat().st_size,
        "static_pages": len(static),
        "static_pages_bytes": sum(p.stat().st_size for p in static),
        "asset_files": len(pictures),
        "asset_bytes": sum(p.stat().st_size for p in pictures),
    }


def without_script(page: Path) -> Path:
    """The page as a reader without scripts sees it: its first page of images. Measured with
    scripts on and the page's own script cut out, since a browser with JavaScript off would
    not run the measuring script's animation frames either."""
    text = page.read_text(encoding="utf-8")
    start, end = text.rindex("<script>"), text.rindex("</script>") + len("</script>")
    static = page.with_name("index-static.html")
    static.write_text(text[:start] + text[end:], encoding="utf-8")
    return static


def measure(page: Path, loads: int, scripts: bool) -> dict:
    """Median timings over ``loads`` loads of ``page`` in one browser (the first one cold)."""
    runs = []
    load = round(os.getloadavg()[0], 2)
    if not scripts:
        page = without_script(page)
    with chromium(1280, 900, timeout=300) as driver:
        for _ in range(loads):
            driver.get("about:blank")
            driver.get(page_url(page))
            timings = driver.execute_script(TIMINGS)
            if scripts:
                timings["sort_by_name_ms"] = driver.execute_script(SORT)
            frames = sorted(driver.execute_async_script(SCROLL))
            timings["scroll_frame_p50_ms"] = statistics.median(frames)
            timings["scroll_frame_p95_ms"] = frames[int(0.95 * (len(frames) - 1))]
            timings["scroll_frame_max_ms"] = frames[-1]
            timings["console_errors"] = len(console_errors(driver))
            runs.append(timings)
    summary = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        summary[key] = round(statistics.median(values), 1) if values else None
    return {
        "scripts": scripts, "loads": loads, "load_average_1min": load, "median": summary,
        "runs": runs,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "shapes")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<date>")
    args = parser.parse_args(argv)
    bodies, files, _ = answers(args.model_dir)
    results = []
    for count in args.images:
        with tempfile.TemporaryDirectory(prefix=f"report-bench-{count}-") as folder:
            sizes = build(count, bodies, files, Path(folder))
            page = Path(folder) / report.INDEX
            measured = [measure(page, args.loads, scripts) for scripts in (True, False)]
        results.append({**sizes, "browser": measured})
        print(json.dumps({**sizes, **{
            f"{'script' if m['scripts'] else 'no_script'}": m["median"] for m in measured
        }}))  # fmt: skip
    date = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"{date}-report-page.json"
    record = {
        "what": "camserve report page: size, paint and scroll timings (bench/report_page.py)",
        "chromium": subprocess.run(
            ["chromium", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        + ", headless, 1280x900 viewport",
        "machine": machine(),
        "note": "the machine was shared with other jobs (see load_average_1min): timings are "
        "upper bounds",
        "results": results,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
