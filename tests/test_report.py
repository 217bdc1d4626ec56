"""`camserve report`: a real TorchServe answers, the page opens in a real headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium; nothing is downloaded).

One report is built from held-out images, a hostile file name, a file name that is not UTF-8
and an undecodable file, and every browser test reads that page."""

from __future__ import annotations

import html.parser
import http.server
import io
import json
import os
import threading
from pathlib import Path
from unittest import mock

import pytest
from PIL import Image, ImageStat
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.ui import Select, WebDriverWait

from camserve.tools import report
from camserve.tools.cli import main
from camserve.tools.client import TOKEN_ENV, Client
from harness.browser import chromium, console_errors, page_url
from tests.conftest import held_out
from tests.live import VALIDATOR

HOSTILE = "<script>document.title='pwned'<\\script><img src=x onerror=alert(1)> \"q\" 'é日本.png"
NOT_UTF8 = os.fsdecode(b"latin-\xe9.png")
MAPS = 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("report_in")
    paths = []
    for index in range(20, 24):
        path = folder / f"shape{index}.png"
        held_out(index).image.save(path)
        paths.append(path)
    for name, index in ((HOSTILE, 24), (NOT_UTF8, 25)):
        held_out(index).image.save(folder / name, "PNG")
        paths.append(folder / name)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return [*paths[:2], broken, *paths[2:]]


def run_report_cli(args: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, {TOKEN_ENV: ""}),
        mock.patch("sys.stdout", out),
        mock.patch("sys.stderr", err),
    ):
        code = main(["report", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(server, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out")
    code, stdout, stderr = run_report_cli(
        [*inputs, "--url", server.inference_url, "--key-file", server.workdir / "key_file.json",
         "--out", out, "--maps", MAPS, "--concurrency", 2]
    )  # fmt: skip
    answers = [json.loads(line) for line in (out / report.ANSWERS).read_text().splitlines()]
    return out, code, stdout, stderr, answers


@pytest.fixture(scope="module")
def browser():
    # The driver is named explicitly: Selenium Manager (which would go to the network) never runs.
    with (
        mock.patch.object(SeleniumManager, "binary_paths", side_effect=AssertionError("ran")),
        chromium(1280, 900) as driver,
    ):
        yield driver


def scores_of(answer: dict) -> list[float]:
    return [z["score"] for _, z, _ in report.class_blocks(answer)]


def visible_groups(driver) -> list[dict]:
    """The shown image groups, in page order, with their shown cards."""
    return driver.execute_script(
        """return Array.from(document.querySelectorAll('#images > li'))
        .filter((g) => !g.hidden && g.offsetParent !== null)
        .map((g) => ({name: g.querySelector('.file').textContent, failed: g.dataset.failed,
          cards: Array.from(g.querySelectorAll('.card')).filter((c) => !c.hidden).map((c) => ({
            label: c.dataset.label, stable: c.dataset.stable === '1', score: +c.dataset.score,
            probability: +c.dataset.probability}))}))"""
    )


def open_report(driver, out: Path) -> None:
    driver.get(page_url(out / report.INDEX))
    console_errors(driver)  # start each test with an empty console log


@pytest.mark.integration
def test_the_run_writes_a_page_the_answers_and_the_pictures(built, inputs):
    out, code, stdout, stderr, answers = built
    assert code == 1, stderr  # the undecodable file failed, the others answered
    cards = (len(inputs) - 1) * MAPS
    assert f"{len(inputs)} image(s), {cards} explanation(s), 1 failed" in stdout
    assert "1 of 7 image(s) failed" in stderr
    assert [a["file"] for a in answers] == [report.display_name(p) for p in inputs]
    [failed] = [a for a in answers if "error" in a]
    assert failed["file"].endswith("broken.png") and "undecodable_image" in failed["error"]
    for record in answers:
        if "answer" in record:
            VALIDATOR.validate(record["answer"])  # pictures left out, the contract kept
            assert len(record["answer"]["more_explanations"]) == MAPS - 1
    pictures = sorted(p.name for p in (out / report.ASSETS).iterdir())
    assert len(pictures) == (len(inputs) - 1) * (1 + 2 * MAPS)  # input + a pair per class
    for name in pictures:
        with Image.open(out / report.ASSETS / name) as picture:
            assert max(picture.size) <= report.THUMBNAIL


@pytest.mark.integration
def test_cards_equal_explanations_least_stable_first(built, browser):
    out, _, _, _, answers = built
    open_report(browser, out)
    groups = visible_groups(browser)
    assert len(groups) == len(answers)
    explanations = sum(len(report.class_blocks(a["answer"])) for a in answers if "answer" in a)
    assert sum(len(g["cards"]) for g in groups) == explanations
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.card")) == explanations
    # Least stable first: each image by its least stable card, the failed file last.
    keys = [max(c["score"] for c in g["cards"]) for g in groups if g["failed"] == "0"]
    assert keys == sorted(keys, reverse=True) and groups[-1]["failed"] == "1"
    expected = sorted(
        (a for a in answers if "answer" in a), key=lambda a: -max(scores_of(a["answer"]))
    )
    assert [g["name"] for g in groups[:-1]] == [a["file"] for a in expected]
    # The pictures load from the report's folder (lazily: the first image's are in view).
    first = browser.find_elements(By.CSS_SELECTOR, "#images > li:first-child img")
    assert len(first) == 1 + 2 * MAPS
    WebDriverWait(browser, 60).until(
        lambda d: all(d.execute_script("return arguments[0].naturalWidth", i) > 0 for i in first)
    )
    assert console_errors(browser) == []


@pytest.mark.integration
def test_sorting_and_filtering_change_the_page(built, browser):
    out, _, _, _, answers = built
    open_report(browser, out)
    choose = {name: Select(browser.find_element(By.ID, name)) for name in
              ("sort", "class-filter", "state-filter")}  # fmt: skip

    choose["sort"].select_by_value("score-asc")
    keys = [max(c["score"] for c in g["cards"]) for g in visible_groups(browser)[:-1]]
    assert keys == sorted(keys) and len(keys) == len(answers) - 1

    choose["sort"].select_by_value("probability-desc")
    firsts = [g["cards"][0]["probability"] for g in visible_groups(browser)[:-1]]
    assert firsts == sorted(firsts, reverse=True)

    choose["sort"].select_by_value("name")
    names = [g["name"] for g in visible_groups(browser)]
    assert browser.execute_script(
        "const n = arguments[0];"
        "return n.slice(0, -1).every((x, i) => x.localeCompare(n[i + 1]) <= 0)",
        names[:-1],
    )

    cards = [c for g in visible_groups(browser) for c in g["cards"]]
    label = cards[-1]["label"]
    choose["class-filter"].select_by_value(label)
    shown = [c for g in visible_groups(browser) for c in g["cards"]]
    assert [c["label"] for c in shown] == [label] * sum(c["label"] == label for c in cards)

    choose["class-filter"].select_by_value("")
    for state, stable in (("stable", True), ("unstable", False)):
        choose["state-filter"].select_by_value(state)
        shown = [c for g in visible_groups(browser) for c in g["cards"]]
        assert len(shown) == sum(c["stable"] is stable for c in cards)
        assert all(c["stable"] is stable for c in shown)

    choose["state-filter"].select_by_value("failed")
    [failed] = visible_groups(browser)
    assert failed["failed"] == "1" and failed["name"].endswith("broken.png")
    text = browser.find_element(By.CSS_SELECTOR, "#images > li.failed .error").text
    assert "undecodable_image" in text
    assert browser.find_element(By.ID, "status").text == "Showing images 1 to 1 of 1 (of 7)."
    assert console_errors(browser) == []


@pytest.mark.integration
def test_the_controls_are_reachable_from_the_keyboard(built, browser):
    out, *_ = built
    open_report(browser, out)
    reached = set()
    for _ in range(12):  # the summary's one link, then the three controls
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.add(browser.switch_to.active_element.get_attribute("id"))
    assert {"sort", "class-filter", "state-filter"} <= reached


@pytest.mark.integration
def test_hostile_and_non_utf8_names_are_text(built, browser):
    out, *_ = built
    open_report(browser, out)
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#images .file")]
    hostile = [n for n in names if n.endswith(HOSTILE)]
    assert len(hostile) == 1  # shown whole, as text
    assert any(n.endswith("latin-\\xe9.png") for n in names)
    assert browser.title.startswith("camserve report") and "pwned" not in browser.title
    assert browser.find_elements(By.CSS_SELECTOR, 'img[src="x"]') == []
    assert len(browser.find_elements(By.TAG_NAME, "script")) == 1
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - the property raises when there is none
    alts = [e.get_attribute("alt") for e in browser.find_elements(By.CSS_SELECTOR, "img")]
    assert all(alts)  # every picture says what it shows
    assert console_errors(browser) == []


@pytest.mark.integration
def test_a_screenshot_at_a_fixed_size_is_not_blank(built, browser, tmp_path):
    out, *_ = built
    open_report(browser, out)
    browser.execute_script("document.getElementById('explanations').scrollIntoView()")
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert shot.size == (1280, 900)
    assert max(ImageStat.Stat(shot).stddev) > 30  # text, bars and pictures, not one colour
    assert len(shot.getcolors(1 << 20)) > 1000  # the overlays' colour maps


@pytest.mark.integration
def test_without_scripts_every_image_shows_least_stable_first(built):
    out, _, _, _, answers = built
    with chromium(1280, 900, scripts=False) as driver:
        driver.get(page_url(out / report.INDEX))
        # The script would have shown the controls: it did not run.
        assert not driver.find_element(By.ID, "controls").is_displayed()
        groups = visible_groups(driver)
    expected = report.default_order(
        report.entry_from_answer(n, a["file"], a["answer"]) if "answer" in a
        else report.ImageEntry(n, a["file"], error=a["error"])
        for n, a in enumerate(answers)
    )  # fmt: skip
    assert [g["name"] for g in groups] == [e.name for e in expected]
    assert sum(len(g["cards"]) for g in groups) == sum(len(e.cards) for e in expected)


@pytest.mark.integration
def test_a_large_report_is_paged(built, browser, tmp_path):
    """250 images (answers replayed from the real run): 100 a page, in the document only the
    page on show; without scripts, static pages hold the rest."""
    _, _, _, _, answers = built
    body = next(a["answer"] for a in answers if "answer" in a)
    entries = [report.entry_from_answer(n, f"image{n:03d}.png", body) for n in range(250)]
    report.write_pages(tmp_path, entries)
    assert sorted(p.name for p in tmp_path.glob("*.html")) == [
        "index.html", "page-2.html", "page-3.html"
    ]  # fmt: skip
    open_report(browser, tmp_path)
    assert len(visible_groups(browser)) == report.PAGE_SIZE
    assert browser.execute_script("return document.querySelectorAll('.image').length") == 100
    assert browser.find_element(By.ID, "page").text == "page 1 of 3"
    assert not browser.find_element(By.CSS_SELECTOR, ".static-pages").is_displayed()
    browser.find_element(By.ID, "next").click()
    names = [g["name"] for g in visible_groups(browser)]
    assert names[0] == "image100.png" and len(names) == report.PAGE_SIZE
    browser.find_element(By.ID, "next").click()
    assert len(visible_groups(browser)) == 50
    assert not browser.find_element(By.ID, "next").is_enabled()
    assert console_errors(browser) == []

    # The last static page: the same 50 images, links back, and no script at all.
    browser.get(page_url(tmp_path / "page-3.html"))
    assert [g["name"] for g in visible_groups(browser)] == [
        f"image{n}.png" for n in range(200, 250)
    ]
    links = browser.find_elements(By.CSS_SELECTOR, ".static-pages a")
    assert {a.get_attribute("href").rsplit("/", 1)[1] for a in links} == {
        "index.html", "page-2.html"
    }  # fmt: skip
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert console_errors(browser) == []


class StoppingServer(http.server.ThreadingHTTPServer):
    """Answers ``answers`` requests with a real camserve answer, then stops listening."""

    daemon_threads = True

    def __init__(self, body: dict, answers: int) -> None:
        super().__init__(("127.0.0.1", 0), StoppingHandler)
        self.body, self.left = json.dumps(body).encode(), answers


class StoppingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.left -= 1
        if self.server.left == 0:
            # Stop listening before this answer goes out: the next request finds no server.
            self.server.shutdown()
            self.server.server_close()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.server.body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.mark.integration
def test_a_run_that_stops_midway_still_writes_a_valid_report(server, inputs, browser, tmp_path):
    token = server.keys()["inference"]
    body = Client(server.inference_url, token=token).explain(
        inputs[0].read_bytes(), images=True, maps=MAPS
    )
    stand_in = StoppingServer(body, answers=2)
    thread = threading.Thread(target=stand_in.serve_forever)
    thread.start()
    try:
        url = f"http://127.0.0.1:{stand_in.server_address[1]}"
        good = [p for p in inputs if "broken" not in p.name][:5]
        code, stdout, stderr = run_report_cli(
            [*good, "--url", url, "--out", tmp_path, "--concurrency", 1, "--maps", MAPS]
        )
    finally:
        thread.join(30)
    assert code == 2, stderr
    assert "cannot reach TorchServe" in stderr and "(3 of 5 image(s) not sent)" in stderr
    assert "5 image(s), 4 explanation(s), 3 failed" in stdout

    page = (tmp_path / report.INDEX).read_text(encoding="utf-8")
    parser = html.parser.HTMLParser()
    parser.feed(page)  # well-formed enough to parse, and complete
    assert page.rstrip().endswith("</html>")
    open_report(browser, tmp_path)
    assert "The run stopped early" in browser.find_element(By.CSS_SELECTOR, ".alert").text
    groups = visible_groups(browser)
    assert [g["failed"] for g in groups] == ["0", "0", "1", "1", "1"]
    errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#images .error")]
    assert len(errors) == 3 and all("not sent" in e for e in errors)
    assert console_errors(browser) == []


# --- The page's text, without a browser -------------------------------------------------------


def test_every_string_from_outside_is_escaped():
    """Labels, model names, error messages and file names never reach the page as markup."""
    evil = '<b id="evil">x</b>"\'&'
    zero = {"reference": "image_mean", "score": 0.5, "stable": False, "threshold": 0.25,
            "worst_case": {"score": 0.7}, "region_iou": 0.5, "centroid_shift_px": None,
            "compensable": False}  # fmt: skip
    body = {
        "model": evil, "target_layer": evil,
        "predictions": [{"index": 0, "label": evil, "probability": 0.9, "present": True}],
        "explained": {"index": 0, "label": evil, "probability": 0.9, "requested": True},
        "zero_reference": zero,
    }  # fmt: skip
    entries = [
        report.entry_from_answer(0, evil, body),
        report.ImageEntry(1, evil, error=f"HTTP 422 {evil}: {evil}"),
    ]
    page = report.render_page(entries, report.RunInfo(source=evil, stopped=evil))
    assert '<b id="evil"' not in page and 'id="evil"' not in page
    assert (
        page.count(html_escaped := "&lt;b id=&quot;evil&quot;&gt;x&lt;/b&gt;&quot;&#x27;&amp;") > 5
    )
    assert html_escaped in page
    assert '<span class="tag">requested</span>' in page
    assert '<span class="tag">present</span>' in page  # a multi-label answer's flag
    assert "n/a (an empty map)" in page
    # The policy names the one script by its hash; nothing from the network may load.
    assert f"'sha256-{report._script_hash(report.SCRIPT)}'" in page
    assert (
        "default-src 'none'" in page
        and "http://" not in page.replace("http-equiv", "")
        and "https://" not in page
    )


def test_bad_arguments_are_one_line_and_status_2(tmp_path):
    code, stdout, stderr = run_report_cli(["x.png", "--out", tmp_path, "--maps", "0"])
    assert code == 2 and stdout == ""
    assert stderr == "camserve report: error: --maps must be at least 1, got 0\n"
    with pytest.raises(SystemExit) as exited:
        run_report_cli(["x.png"])  # --out is required
    assert exited.value.code == 2
