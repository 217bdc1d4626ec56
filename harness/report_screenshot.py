"""``make report-screenshot``: a report of the shipped examples, and its picture for the docs.

Starts a TorchServe of its own (free loopback ports, ``config/config.properties``) serving
``model_store/shapes.mar``, runs ``camserve report examples/ --maps 2``, stops the server and
takes a screenshot of the page's top in headless Chromium at a fixed size::

    python -m harness.report_screenshot --out .run/report-examples --png docs/report.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from unittest import mock

from PIL import Image

from camserve.tools.cli import main as camserve
from camserve.tools.client import TOKEN_ENV
from harness.browser import chromium, console_errors, page_url
from harness.gallery import save_png
from harness.local_torchserve import LocalTorchServe

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 1180


def build_report(model_store: Path, out: Path, workdir: Path, maps: int = 2) -> Path:
    """The examples' report, from a server started and stopped here; returns index.html."""
    server = LocalTorchServe.on_free_ports(
        workdir, REPO / "config" / "config.properties", model_store
    )
    server.start()
    try:
        with mock.patch.dict(os.environ, {TOKEN_ENV: ""}):  # the server's own key file
            code = camserve(
                # Relative: the page shows examples/star.png, not this checkout's path.
                ["report", os.path.relpath(REPO / "examples"), "--url", server.inference_url,
                 "--key-file", str(server.workdir / "key_file.json"), "--out", str(out),
                 "--maps", str(maps)]
            )  # fmt: skip
    finally:
        server.stop()
    if code != 0:
        raise RuntimeError(f"camserve report exited with {code}")
    return out / "index.html"


def screenshot(page: Path, png: Path, width: int = WIDTH, height: int = HEIGHT) -> None:
    """The page's top at ``width`` x ``height``, saved small (256 colours)."""
    with chromium(width, height) as driver:
        driver.get(page_url(page))
        errors = console_errors(driver)
        if errors:
            raise RuntimeError(f"the page logged errors: {errors}")
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(shot, png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store")
    parser.add_argument("--out", type=Path, default=REPO / ".run" / "report-examples")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "report.png")
    args = parser.parse_args(argv)
    page = build_report(args.model_store, args.out, args.out.parent / "report-examples-server")
    screenshot(page, args.png)
    print(f"wrote {page} and {args.png} ({args.png.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
