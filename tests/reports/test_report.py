"""The demo's report.html: self-contained, every image decodes, its tables hold metrics.json's numbers, and it
renders in headless Chromium without errors (a screenshot of the first screen is kept in test-artifacts/)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from reports.html import SUMMARY_COLUMNS, _fmt, _get
from tests.conftest import ARTIFACTS, cairn
from tests.reports.chromium import Browser, find_chromium

pytestmark = pytest.mark.slow


class _Page(HTMLParser):
    """The report's images (src) and summary table cells (data-method row, data-key, data-value, text)."""

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.ids, self.links = [], [], set(), []
        self._method, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a)
        if tag in ("link", "script", "iframe", "a") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if tag == "tr" and "data-method" in a:
            self._method = a["data-method"]
        if tag == "td" and "data-key" in a:
            self._cell = [self._method, a["data-key"], a["data-value"], ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[3] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(tuple(self._cell))
            self._cell = None


@pytest.fixture(scope="module")
def report(small_demo):
    run = small_demo / "run"
    page = _Page()
    page.feed((run / "report.html").read_text(encoding="utf-8"))
    return run, page, json.loads((run / "metrics.json").read_text())


def test_the_report_is_self_contained_and_every_image_decodes(report):
    run, page, metrics = report
    text = (run / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "the report must not load anything"
    assert "<script" not in text
    assert all(link.startswith("#") for link in page.links), page.links
    assert len(page.images) > 20
    for img in page.images:
        head, _, data = img["src"].partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:40]
        decoded = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        decoded.load()
        assert decoded.width > 0 and decoded.height > 0 and img.get("alt")


def test_the_summary_table_holds_the_numbers_of_metrics_json(report):
    _, page, metrics = report
    cells = {(m, k): (v, t) for m, k, v, t in page.cells}
    assert {m for m, _ in cells} == set(metrics["methods"])
    for name, entry in metrics["methods"].items():
        for key, _, fmt, _ in SUMMARY_COLUMNS:
            value, text = cells[(name, key)]
            assert json.loads(value) == _get(entry, key), (name, key)
            assert text == _fmt(_get(entry, key), fmt), (name, key)
            if isinstance(_get(entry, key), float) and fmt.endswith(".3f}"):
                assert float(text) == pytest.approx(_get(entry, key), abs=5e-4 + 1e-9)  # a half rounds either way


def test_the_report_has_every_section_with_content(report):
    run, page, metrics = report
    text = (run / "report.html").read_text(encoding="utf-8")
    for section in ("summary", "cost", "curves", "classes", "confused", "grids", "gradcam", "dead", "config",
                    "definitions"):
        assert section in page.ids, section
    for alt in ("GAP vs images per second and GAP vs bytes per image", "precision-recall curves of the recognition",
                "recall at k of the retrieval"):
        assert any(img["alt"] == alt for img in page.images), alt
    grids = re.findall(r"<h3>(both right|[\w+-]+ right, [\w+-]+ wrong|both wrong): (\d+) of (\d+) queries</h3>", text)
    assert [g[0] for g in grids][0] == "both right" and len(grids) == 4
    assert sum(int(g[1]) for g in grids) == metrics["data"]["queries"]  # the four groups split the queries
    gradcams = [img for img in page.images if img["alt"].startswith("Grad-CAM of query")]
    assert 1 <= len(gradcams) <= 4
    per_class = list(csv.DictReader(open(run / "per_class.csv")))
    for name in metrics["methods"]:
        rows = [r for r in per_class if r["method"] == name]
        assert sum(int(r["queries"]) for r in rows) == metrics["data"]["queries_with_landmark"]
        right = sum(int(r["correct"]) for r in rows) / metrics["data"]["queries_with_landmark"]
        assert right == pytest.approx(metrics["methods"][name]["quality"]["landmark_accuracy"], abs=1e-6)


def test_cairn_report_rebuilds_without_recomputing(report, tmp_path):
    run, _, before = report
    records = sorted(run.glob("work/**/*.cairn/extract.json"))
    assert records
    stamps = [p.stat().st_mtime_ns for p in records]
    (run / "report.html").unlink()
    result = cairn("report", str(run), "--baseline", "sift-bovw", "--deep", "cnn-untrained", "--gradcam", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report.html" in result.stdout and (run / "report.html").is_file()
    after = json.loads((run / "metrics.json").read_text())
    assert after["methods"] == before["methods"]
    assert [p.stat().st_mtime_ns for p in records] == stamps  # no extraction ran
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "sift-bovw (baseline) vs cnn-untrained (deep)" in text and "Turned off" in text
    bad = cairn("report", str(run), "--deep", "magic")
    assert bad.returncode == 2 and "method 'magic' is not in this run" in bad.stderr
    assert "Traceback" not in bad.stderr
    result = cairn("report", str(run))  # leave the default report for the browser test
    assert result.returncode == 0, result.stderr[-2000:]


def _browser_or_skip() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CAIRN_REQUIRE_BROWSER") == "1":
            pytest.fail("CAIRN_REQUIRE_BROWSER=1 but no Chromium found: install Debian's `chromium` package "
                        "(apt-get install chromium) or set CAIRN_CHROMIUM")
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make browser`)")
    return path


def test_the_demo_report_renders_in_headless_chromium(report):
    _browser_or_skip()
    run, _, metrics = report
    with Browser() as browser:
        loaded = browser.load(str(run / "report.html"))
        assert loaded.errors == [] and loaded.external_requests == []
        images = browser.images()
        assert len(images) > 20
        bad = [i for i in images if not (i["complete"] and i["naturalWidth"] > 0 and i["decoded"])]
        assert bad == []
        rows = browser.evaluate(
            "Array.from(document.querySelectorAll('#summary-table tr[data-method]')).map(tr => "
            "[tr.dataset.method, Array.from(tr.querySelectorAll('td[data-key]')).map(td => "
            "[td.dataset.key, td.innerText.trim()])])")
        assert [r[0] for r in rows] == metrics["config"]["methods"]  # in the run's order
        for name, cells in rows:
            for key, text in cells:
                fmt = next(f for k, _, f, _ in SUMMARY_COLUMNS if k == key)
                assert text == _fmt(_get(metrics["methods"][name], key), fmt), (name, key)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "report-first-screen.png"
        browser.screenshot(str(shot))
        check_layout(browser, ARTIFACTS, "report")
    img = Image.open(shot)
    assert img.format == "PNG" and img.size == (1280, 900)
    assert len(img.convert("L").getcolors(1 << 16) or []) > 50  # not a blank page


def check_layout(browser, artifacts, prefix: str, width: int = 1400) -> None:
    """The loaded report at ``width`` px: nothing wider than the page (no sideways scrolling; the per-class
    table and the detection row used to be), every image inside the page's width, every method its own colour
    and marker in the plots; a screenshot of every section in ``artifacts`` (PREFIX-SECTION.png) to look at."""
    browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 1000, "deviceScaleFactor": 1,
                                                       "mobile": False})
    wide = browser.evaluate(
        "Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right > "
        "window.innerWidth + 1).map(e => e.tagName + '.' + e.className + ' ' + "
        "Math.round(e.getBoundingClientRect().right)).slice(0, 10)")
    assert wide == [] and browser.evaluate("document.documentElement.scrollWidth") <= width, wide
    outside = browser.evaluate(
        "Array.from(document.images).filter(i => i.getBoundingClientRect().left < 0 || "
        "i.getBoundingClientRect().right > window.innerWidth + 1).map(i => i.alt).slice(0, 10)")
    assert outside == []
    styles = browser.evaluate("Array.from(document.querySelectorAll('#summary-table tr[data-method]')).map(tr => "
                              "[tr.dataset.method, tr.dataset.colour, tr.dataset.marker])")
    assert styles and len({c for _, c, _ in styles}) == len(styles), styles  # a colour of its own
    assert len({(c, m) for _, c, m in styles}) == len(styles)
    for section in browser.evaluate("Array.from(document.querySelectorAll('h2[id]')).map(h => h.id)"):
        browser.evaluate(f"document.getElementById('{section}').scrollIntoView()")
        browser.screenshot(str(artifacts / f"{prefix}-{section}.png"))
