"""Headless Chromium from Debian's packages (``chromium``, ``chromium-driver``), driven by
Selenium: for the report's browser tests, its screenshot and its page measurements.

The driver is named explicitly (``/usr/bin/chromedriver``), so Selenium Manager, which would
otherwise look for a driver and a browser on the network, never runs; nothing is downloaded.
Each browser gets a fresh profile in a temporary folder and the flags that keep it off the
network (no background services, component updates, sync or QUIC).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",  # screenshots of the same page compare equal
)
INSTALL_HINT = "make system-deps, or apt-get install chromium chromium-driver"


def missing() -> str | None:
    """Why no browser can start here, or None."""
    absent = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    return f"{' and '.join(absent)} not found: {INSTALL_HINT}" if absent else None


@contextlib.contextmanager
def chromium(
    width: int = 1280, height: int = 900, scripts: bool = True, timeout: float = 60.0
) -> Iterator:
    """A Selenium ``webdriver.Chrome`` on a fresh profile with a ``width`` x ``height``
    viewport, quit on exit. ``scripts=False`` turns JavaScript off for the pages it opens
    (WebDriver's own commands still run)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    profile = tempfile.mkdtemp(prefix="camserve-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    if not scripts:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        # The viewport itself at width x height (--window-size counts the window's frame).
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    """The browser console's errors since the last call (CSP violations included)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def page_url(path: Path) -> str:
    return path.resolve().as_uri()
