"""The headless-Chromium harness (tests/reports/chromium.py) on tiny pages written into tmp_path.

Skipped when no Chromium is installed, unless CAIRN_REQUIRE_BROWSER=1 (as in CI), where that is a failure.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
from PIL import Image

from tests.reports.chromium import Browser, BrowserError, find_chromium, processes_of

REQUIRED = os.environ.get("CAIRN_REQUIRE_BROWSER") == "1"
MISSING = ("no Chromium found ($CAIRN_CHROMIUM, or chromium / chromium-browser / google-chrome on PATH); "
           "install Debian's `chromium` package: apt-get install chromium")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the whole module."""
    if find_chromium() is None:
        if REQUIRED:
            pytest.fail(f"CAIRN_REQUIRE_BROWSER=1 but {MISSING}", pytrace=False)
        pytest.skip(MISSING)
    with Browser() as b:
        yield b


def _png_b64(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _page(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title></head>"
                    f"<body>{body}</body></html>", encoding="utf-8")
    return path


def test_find_chromium_honours_the_override(monkeypatch, tmp_path):
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CAIRN_CHROMIUM", str(fake))
    assert find_chromium() == str(fake)
    monkeypatch.setenv("CAIRN_CHROMIUM", str(tmp_path / "absent"))
    assert find_chromium() is None  # an explicit choice that does not exist is not silently replaced


def test_good_page_has_no_errors_and_its_image_decodes(browser, tmp_path):
    src = f"data:image/png;base64,{_png_b64(37, 23)}"
    body = (f"<img id='a' src='{src}'>"
            "<table id='t'><tr><th>method</th><th>mAP</th></tr><tr><td>vlad</td><td>0.42</td></tr></table>")
    report = browser.load(_page(tmp_path, "good.html", body))
    assert report.errors == [] and report.external_requests == [] and report.ok
    [img] = browser.images()
    assert img["src"] == src[:40] and len(img["src"]) == 40
    assert img["decoded"] and img["complete"] and img["error"] is None
    assert (img["naturalWidth"], img["naturalHeight"]) == (37, 23)
    cells = browser.evaluate("Array.from(document.querySelectorAll('#t td')).map(td => td.textContent)")
    assert cells == ["vlad", "0.42"]


def test_broken_data_image_is_not_decoded(browser, tmp_path):
    garbage = base64.b64encode(b"definitely not a PNG" * 10).decode()
    browser.load(_page(tmp_path, "broken.html", f"<img src='data:image/png;base64,{garbage}'>"))
    [img] = browser.images()
    assert not img["decoded"] and img["error"]
    assert img["naturalWidth"] == 0


def test_console_error_and_assert_are_reported(browser, tmp_path):
    report = browser.load(_page(tmp_path, "console.html",
                                "<script>console.log('fine'); console.error('x'); console.assert(1 === 2, 'y')"
                                "</script>"))
    assert len(report.errors) == 2
    assert report.errors[0].startswith("console.error: x (file://") and "console.html:1" in report.errors[0]
    assert report.errors[1].startswith("console.assert: y")


def test_uncaught_exception_is_reported(browser, tmp_path):
    report = browser.load(_page(tmp_path, "throw.html", "<script>throw new Error('boom')</script><p>after</p>"))
    assert len(report.errors) == 1 and "Error: boom" in report.errors[0]
    assert report.external_requests == []


def test_external_requests_are_listed_and_never_reach_the_network(browser, tmp_path):
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            """Quiet: no request log on stderr."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    local = f"http://127.0.0.1:{server.server_port}/b.png"
    try:
        report = browser.load(_page(tmp_path, "external.html",
                                    f"<img src='http://example.com/a.png'><img src='{local}'>"
                                    "<link rel='stylesheet' href='https://cdn.example.org/x.css'>"))
        images = browser.images()
    finally:
        server.shutdown()
        server.server_close()
    assert set(report.external_requests) == {"http://example.com/a.png", local, "https://cdn.example.org/x.css"}
    assert hits == []  # even a server on this machine is not reached
    assert not any(img["decoded"] for img in images)
    assert any(e.startswith("failed to load http://example.com/a.png") for e in report.errors)


def test_missing_local_file_is_a_failed_load(browser, tmp_path):
    report = browser.load(_page(tmp_path, "missing.html", "<img src='nowhere.png'>"))
    assert report.external_requests == []
    assert len(report.errors) == 1 and "nowhere.png" in report.errors[0] and "ERR_FILE_NOT_FOUND" in report.errors[0]


def test_screenshot_is_the_first_screen(browser, tmp_path):
    browser.load(_page(tmp_path, "tall.html", "<div style='height:3000px;background:#123456'>tall</div>"))
    shot = browser.screenshot(tmp_path / "shot.png")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 900)
        assert im.convert("RGB").getpixel((640, 450)) == (0x12, 0x34, 0x56)
    with Image.open(browser.screenshot(tmp_path / "full.png", full_page=True)) as im:
        assert im.size[0] == 1280 and im.size[1] >= 3000


def test_evaluate_raises_with_the_exception_text(browser):
    with pytest.raises(BrowserError, match="nope"):
        browser.evaluate("Promise.reject(new Error('nope'))")
    assert browser.evaluate("undefined") is None
    assert browser.evaluate("Promise.resolve({a: [1, 2]})") == {"a": [1, 2]}


def test_close_leaves_no_process_behind(browser):
    with Browser() as b:
        pid = b.pid
        assert processes_of(pid)
    # the launcher exits with chromium's code once it has reaped every helper (killed, -9, if that took over 5 s)
    assert b._proc.returncode in (0, -9)
    assert processes_of(pid) == []
    b.close()  # twice is fine
    with pytest.raises(BrowserError, match="closed"):
        b.evaluate("1")


def test_a_command_that_times_out_says_so_and_the_browser_goes_on(browser):
    with pytest.raises(BrowserError, match=r"no reply to Runtime.evaluate within 0.2 s \(chromium running\); "
                                           r"stderr tail"):
        browser.evaluate("new Promise(resolve => setTimeout(() => resolve(1), 1000))", timeout=0.2)
    assert browser.evaluate("2 + 2") == 4  # the late reply to the first call is skipped, not taken for this one


def test_a_browser_that_exits_at_once_is_a_clear_error():
    with pytest.raises(BrowserError, match=r"closed its DevTools pipe \(chromium exited with 1\)"):
        Browser(executable="false")
