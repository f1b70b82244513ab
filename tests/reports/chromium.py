"""Render a local HTML file in headless Chromium and check it, with no Python dependency beyond the stdlib.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``): it reads
NUL-terminated JSON commands from its fd 3 and writes NUL-terminated JSON replies and events to its fd 4.
No websocket, Selenium or Playwright is involved; the only requirement is a ``chromium`` binary (Debian's
``chromium`` package, ``apt-get install chromium``).

The browser is cut off from the network (host resolution fails for every name, and http(s)/ws(s) requests are
blocked inside the page), so a report's ``external_requests`` lists what a page *tried* to fetch from outside;
a self-contained page has none.

Typical use in a test::

    with Browser() as browser:
        report = browser.load(tmp_path / "report.html")
        assert report.errors == [] and report.external_requests == []
        assert all(img["decoded"] for img in browser.images())
        browser.screenshot(tmp_path / "first-screen.png")
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")  # looked up on PATH, in this order
VIEWPORT = (1280, 900)  # CSS pixels of the page's viewport; screenshots of the first screen have this size
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")  # what a self-contained page may load
BLOCKED_URLS = ("http://*", "https://*", "ws://*", "wss://*", "ftp://*")  # refused inside the page

# Awaits img.decode() for every <img>, each bounded by a timeout (a lazy image that never loads must not hang).
_IMAGES_JS = """
(async () => {
  const timeout = (ms) => new Promise((_, reject) => setTimeout(() => reject(new Error('timeout')), ms));
  return Promise.all(Array.from(document.querySelectorAll('img')).map(async (img) => {
    let decoded = true, error = null;
    try { await Promise.race([img.decode(), timeout(%d)]); }
    catch (e) { decoded = false; error = String(e && e.message || e); }
    return {src: (img.currentSrc || img.getAttribute('src') || '').slice(0, 40), complete: img.complete,
            naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight, decoded: decoded, error: error};
  }));
})()
"""


class BrowserError(RuntimeError):
    """Chromium failed, exited, timed out, or a command or a page script raised."""


def find_chromium() -> str | None:
    """The Chromium executable to use: ``$CAIRN_CHROMIUM`` when set (None if it is not executable), else the
    first of ``chromium``, ``chromium-browser``, ``google-chrome`` found on PATH, else None."""
    override = os.environ.get("CAIRN_CHROMIUM", "").strip()
    if override:
        return shutil.which(override)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageReport:
    """What went wrong while a page loaded."""

    url: str  # the URL that was loaded
    errors: list[str] = field(default_factory=list)  # console errors/asserts, exceptions, log errors, failed loads
    external_requests: list[str] = field(default_factory=list)  # URLs requested outside file:/data:/blob:/about:

    @property
    def ok(self) -> bool:
        """True when the page logged no error and asked for nothing outside itself."""
        return not self.errors and not self.external_requests


def processes_of(pid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pid`` or whose parent is ``pid`` (chromium's
    crashpad handlers leave the group but stay the launcher's children). Linux /proc; [] elsewhere."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if pid in (int(fields[1]), int(fields[2])) and fields[0] not in ("Z", "X"):
            pids.append(int(entry.parent.name))
    return pids


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGKILL what is left of chromium's process group (it runs in its own session), reap the main process,
    and wait up to ``grace`` seconds for the helpers (zygote, renderer) to be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
        log.warning("chromium %d did not exit after SIGKILL", proc.pid)
    # helpers orphaned by the browser are reparented to init, which reaps them; wait until it has
    deadline = time.monotonic() + grace
    while processes_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _reap(proc: subprocess.Popen, profile: str) -> None:
    """End chromium's process group and remove its temporary profile."""
    _kill_group(proc)
    shutil.rmtree(profile, ignore_errors=True)


# Runs chromium with the DevTools pipe on fds 3 and 4 and, as a child subreaper (Linux), reaps every process
# chromium leaves behind: its zygotes outlive the browser for a moment and, reparented to an init that does
# not reap promptly (containers, CI runners), would linger as zombies. Exits with chromium's exit code once
# the whole tree is gone.
_LAUNCHER = r"""
import contextlib, ctypes, os, subprocess, sys
cmd, msg = int(sys.argv[1]), int(sys.argv[2])
os.dup2(cmd, 3)
os.dup2(msg, 4)
os.close(cmd)
os.close(msg)
with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of chromium come to us
child = subprocess.Popen(sys.argv[3:], pass_fds=(3, 4))
os.close(3)
os.close(4)
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child.pid:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code)
"""


def _high_fd(fd: int) -> int:
    """A close-on-exec duplicate of fd numbered 10 or above (never 3 or 4), closing fd."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """A headless Chromium with one page, driven over ``--remote-debugging-pipe``.

    Use as a context manager (or call ``close()``): closing ends Chromium and every process it started and
    removes its temporary profile.
    """

    def __init__(self, executable: str | None = None, timeout: float = 30.0, headless: str = "--headless=new",
                 extra_args: tuple[str, ...] = ()) -> None:
        """Start Chromium and open a page. ``executable`` defaults to ``find_chromium()``; ``timeout`` (seconds)
        bounds the start-up and each protocol command; ``extra_args`` are appended to the command line."""
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError("no Chromium found: install Debian's `chromium` package (apt-get install "
                               "chromium) or point $CAIRN_CHROMIUM at a Chromium executable")
        self.timeout = timeout
        self._next_id = 0
        self._buf = bytearray()
        self._scan = 0  # where the search for the next NUL in _buf resumes
        self._events: collections.deque[dict] = collections.deque(maxlen=100_000)
        self._closed = False
        self._profile = tempfile.mkdtemp(prefix="cairn-chromium-")
        self._stderr = open(os.path.join(self._profile, "stderr.log"), "w+b")  # closed in close()
        cmd_r, cmd_w = os.pipe()  # we write commands, chromium reads them on its fd 3
        msg_r, msg_w = os.pipe()  # chromium writes messages on its fd 4, we read them
        cmd_r, msg_w = _high_fd(cmd_r), _high_fd(msg_w)
        width, height = VIEWPORT
        args = [
            exe, headless, "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            f"--user-data-dir={self._profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
            "--force-device-scale-factor=1", "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage",
            # no network: every host name fails to resolve, and the background services stay off
            "--host-resolver-rules=MAP * ~NOTFOUND", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
            "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--disable-breakpad",
            "--disable-crash-reporter", "--no-pings", "--metrics-recording-only", "--password-store=basic",
            "--use-mock-keychain",
            "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
            *extra_args, "about:blank",
        ]
        # Popen keeps passed fds under their own numbers, so a small launcher moves them to 3 and 4, starts
        # chromium and reaps it and its orphaned helpers (see _LAUNCHER); its pid is the process group's.
        try:
            launcher = [sys.executable, "-I", "-c", _LAUNCHER, str(cmd_r), str(msg_w)]
            self._proc = subprocess.Popen([*launcher, *args], pass_fds=(cmd_r, msg_w),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=self._stderr, start_new_session=True)
        except BaseException:
            for fd in (cmd_r, cmd_w, msg_r, msg_w):
                os.close(fd)
            self._stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        os.close(cmd_r)
        os.close(msg_w)
        self._w, self._r = cmd_w, msg_r
        # a Browser that is never closed still dies, at garbage collection or interpreter exit
        self._finalizer = weakref.finalize(self, _reap, self._proc, self._profile)
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                self.send(f"{domain}.enable")
            self.send("Network.setBlockedURLs", {"urls": list(BLOCKED_URLS)})
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    # ---- protocol -------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The process id of chromium's launcher, which is also the id of the process group of every process
        the browser runs."""
        return self._proc.pid

    def stderr_tail(self, n: int = 4000) -> str:
        """The last n characters Chromium wrote to stderr, without its D-Bus complaints (there is no bus in
        a container or CI runner, and Chromium logs every failed attempt to reach one)."""
        try:
            with open(self._stderr.name, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * n))
                text = f.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [line for line in text.splitlines() if ":ERROR:dbus/" not in line]
        return "\n".join(lines)[-n:]

    def _fail(self, what: str, exiting: bool = False) -> BrowserError:
        """An error saying what failed, whether chromium still runs, and the tail of its stderr; ``exiting``
        waits a moment for a browser that closed its pipe to exit, so that its exit code can be told."""
        if exiting:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=2)
        code = self._proc.poll()
        state = "running" if code is None else f"exited with {code}"
        return BrowserError(f"{what} (chromium {state}); stderr tail:\n{self.stderr_tail()}")

    def _read_message(self, deadline: float) -> dict:
        """The next message from fd 4, waiting until ``deadline`` (time.monotonic())."""
        while True:
            end = self._buf.find(b"\0", self._scan)
            if end >= 0:
                raw = bytes(self._buf[:end])
                del self._buf[:end + 1]
                self._scan = 0
                return json.loads(raw)
            self._scan = len(self._buf)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise self._fail("chromium closed its DevTools pipe", exiting=True)
            self._buf += chunk

    def _pump(self, deadline: float) -> bool:
        """Read one message into the event buffer (replies are not expected here); False on timeout."""
        try:
            msg = self._read_message(deadline)
        except TimeoutError:
            return False
        if "method" in msg:
            self._events.append(msg)
        return True

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None
             ) -> dict:
        """Send one DevTools command and return its result; events that arrive meanwhile are buffered.

        ``session`` sends it to the page (except ``Target.*``/``Browser.*`` commands, which go to the browser).
        Raises BrowserError on a protocol error or after ``timeout`` seconds (default: the Browser's).
        """
        if self._closed:
            raise BrowserError("the browser is closed")
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self._session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._w, data):]
        except OSError as e:
            raise self._fail(f"cannot send {method}: {e}") from e
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                reply = self._read_message(deadline)
            except TimeoutError:
                raise self._fail(f"no reply to {method} within {timeout or self.timeout:g} s") from None
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def _page_events(self) -> list[dict]:
        return [e for e in self._events if e.get("sessionId") == self._session]

    # ---- pages ----------------------------------------------------------------------------------------------

    def load(self, path_or_url: str | os.PathLike, timeout: float = 60.0, settle: float = 0.25) -> PageReport:
        """Navigate the page to a file (or URL) and wait for its load event, then ``settle`` seconds of quiet.

        Returns the console errors and asserts, uncaught exceptions, error log entries, failed loads and
        external requests seen since the navigation started.
        """
        url = _to_url(path_or_url)
        self._events.clear()
        deadline = time.monotonic() + timeout
        nav = self.send("Page.navigate", {"url": url}, timeout=timeout)
        report = PageReport(url=url)
        if nav.get("errorText"):
            report.errors.append(f"navigation to {url} failed: {nav['errorText']}")
            return report
        loader = nav.get("loaderId")
        while not self._loaded(nav.get("frameId"), loader):
            if time.monotonic() >= deadline:
                raise self._fail(f"{url} did not fire its load event within {timeout:g} s")
            self._pump(deadline)
        quiet_until = time.monotonic() + settle
        while time.monotonic() < deadline and self._pump(min(quiet_until, deadline)):
            quiet_until = time.monotonic() + settle
        _collect(self._page_events(), report)
        return report

    def _loaded(self, frame_id: str | None, loader: str | None) -> bool:
        """Whether Page.loadEventFired came after our frame committed the navigation with ``loader``."""
        committed = False
        for event in self._page_events():
            if event["method"] == "Page.frameNavigated":
                frame = event["params"]["frame"]
                if frame.get("id") == frame_id and (loader is None or frame.get("loaderId") == loader):
                    committed = True
            elif event["method"] == "Page.loadEventFired" and committed:
                return True
        return False

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited; undefined is None).

        Raises BrowserError with the exception's text when the expression throws or its promise rejects.
        """
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate raised: {_exception_text(result['exceptionDetails'])}")
        return result.get("result", {}).get("value")

    def images(self, timeout: float = 10.0) -> list[dict]:
        """Every <img> in the document, in order: ``src`` (first 40 characters), ``complete``,
        ``naturalWidth``, ``naturalHeight``, ``decoded`` (whether ``img.decode()`` resolved within ``timeout``
        seconds) and ``error`` (why it did not, else None)."""
        return self.evaluate(_IMAGES_JS % int(timeout * 1000), timeout=timeout + self.timeout)

    def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (the first screen, 1280x900) or of the whole page to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", params)["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    # ---- lifetime -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Ask Chromium to quit, kill its process group if it does not within a few seconds, reap it, and
        remove the temporary profile. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._proc.poll() is None:
                with contextlib.suppress(BrowserError):
                    self.send("Browser.close", timeout=5)
        finally:
            self._closed = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            for fd in (self._w, self._r):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._stderr.close()
            self._finalizer()  # kills what is left of the process group, removes the profile

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_url(path_or_url: str | os.PathLike) -> str:
    text = os.fspath(path_or_url)
    if isinstance(text, str) and ("://" in text or text.startswith(("data:", "about:"))):
        return text
    return Path(text).resolve().as_uri()


def _remote_text(obj: dict) -> str:
    """A console argument (a Runtime.RemoteObject) as text."""
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "?")


def _where(url: str | None, line: int | None) -> str:
    return f" ({url}:{line + 1})" if url and line is not None else (f" ({url})" if url else "")


def _exception_text(details: dict) -> str:
    exc = details.get("exception") or {}
    return exc.get("description") or details.get("text") or "unknown exception"


def _collect(events: list[dict], report: PageReport) -> None:
    """Fill ``report`` from the page's buffered DevTools events, in the order they arrived."""
    urls: dict[str, str] = {}
    for event in events:
        method, p = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            frames = (p.get("stackTrace") or {}).get("callFrames") or [{}]
            text = " ".join(_remote_text(a) for a in p.get("args", []))
            where = _where(frames[0].get("url"), frames[0].get("lineNumber"))
            report.errors.append(f"console.{p['type']}: {text}{where}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            report.errors.append(f"exception: {_exception_text(d)}{_where(d.get('url'), d.get('lineNumber'))}")
        elif method == "Log.entryAdded":
            entry = p.get("entry", {})
            # network errors are reported, with their cause, by Network.loadingFailed below
            if entry.get("level") == "error" and entry.get("source") != "network":
                report.errors.append(f"log ({entry.get('source')}): {entry.get('text')}"
                                     f"{_where(entry.get('url'), entry.get('lineNumber'))}")
        elif method == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            urls[p.get("requestId", "")] = url
            if not url.startswith(LOCAL_SCHEMES) and url not in report.external_requests:
                report.external_requests.append(url)
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            url = urls.get(p.get("requestId", ""), "?")
            reason = p.get("errorText") or "failed"
            if p.get("blockedReason"):  # Chromium 156 leaves errorText empty for a blocked request
                reason = f"blocked ({p['blockedReason']})"
            report.errors.append(f"failed to load {url[:200]}: {reason}")
