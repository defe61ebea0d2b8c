"""Fixtures of the end-to-end browser suite: headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``STREAMRELAY_CHROMIUM`` overrides the path),
launched once per session.  Where it is missing the suite is skipped on a developer
machine, but fails loudly when ``CI`` is set: a CI run that silently skipped the
end-to-end tests would prove nothing.

Pages are always loaded from ``http://127.0.0.1:PORT`` (a secure context), because
WebCodecs exists only in secure contexts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.ci import ci_is_set
from tests.support.figures import artifacts_folder
from tests.support.publisher_process import PublisherProcesses

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Figures measured by the tests, printed at the end of the run and written to
# $STREAMRELAY_ARTIFACTS/browser-figures.json when that variable is set.
FIGURES: dict[str, Any] = {}

# Injected into every page before its own scripts (CDP init scripts are not subject to
# the page's CSP).  It records CSP violations, and the moments (performance.now(), ms
# since navigation start) the player's first WebSocket was created and opened and its
# first frame was decoded.  The WebSocket subclass changes no behaviour.
PROBE_SCRIPT = """
(() => {
  const t = { wsCreated: null, wsOpen: null, firstDecoded: null, cspViolations: [] };
  Object.defineProperty(window, '__streamrelayTest', { value: t });
  document.addEventListener('securitypolicyviolation', (e) => {
    t.cspViolations.push(e.violatedDirective + ' blocked ' + (e.blockedURI || '(inline)'));
  }, true);
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      if (t.wsCreated === null) t.wsCreated = performance.now();
      this.addEventListener('open', () => {
        if (t.wsOpen === null) t.wsOpen = performance.now();
      });
    }
  };
  const poll = () => {
    const p = window.streamrelayPlayer;
    if (p && p.framesDecoded > 0) {
      t.firstDecoded = performance.now();
      return;
    }
    setTimeout(poll, 2);
  };
  poll();
})();
"""


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Run the browser tests after every other test of the session.

    Playwright's sync API marks its asyncio loop as the thread's running loop for as
    long as it is started (between calls too), so while the session's browser lives,
    ``asyncio.run()`` in the same thread fails with "cannot be called from a running
    event loop" -- which the integration tests use.  The browser is session-scoped,
    so the browser tests go last (a stable sort: every other order is kept)."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


def _unavailable(why: str) -> None:
    if ci_is_set():
        pytest.fail(f"browser tests cannot run under CI: {why}", pytrace=False)
    pytest.skip(why)


# A Playwright call waits on the browser with no bound of its own, and pytest-timeout's
# signal cannot interrupt it (the sync API waits inside its own event loop, which takes
# the exception only once the browser answers).  Chromium has been seen to hang that way
# for 20 minutes while closing a context, its zygote forking renderers in a loop.  So
# the suite bounds every test and every close itself: past the bound it kills Chromium's
# processes, the pending call fails at once, and the next test gets a new browser.
CLOSE_BOUND_S = 20.0
# The test's own bound is its pytest-timeout less this margin (for the teardown).
TEST_BOUND_MARGIN_S = 10.0


class Chromium:
    """The session's headless Chromium: launched again for the next test after a
    watchdog killed it."""

    def __init__(self, playwright: Any, executable: str) -> None:
        self._playwright = playwright
        self._executable = executable
        self.browser = self._launch()
        # Why each kill happened, in order.
        self.kills: list[str] = []

    def _launch(self) -> Any:
        return self._playwright.chromium.launch(
            executable_path=self._executable, args=CHROMIUM_ARGS
        )

    def connected(self) -> Any:
        """The browser, launched again if the last one is gone."""
        if not self.browser.is_connected():
            self.browser = self._launch()
        return self.browser

    def kill(self, why: str) -> None:
        """SIGKILL every Chromium process of this test run (called from a timer thread:
        only psutil here, no Playwright)."""
        self.kills.append(why)
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "chrom" in process.name().lower():
                    process.kill()

    @contextlib.contextmanager
    def watchdog(self, seconds: float, what: str) -> Iterator[None]:
        """Kill the browser if the block has not ended within ``seconds``."""
        timer = threading.Timer(seconds, self.kill, args=(f"{what}: no answer in {seconds:g} s",))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def close_bounded(self, closable: Any, what: str, bound: float = CLOSE_BOUND_S) -> None:
        """``closable.close()`` (a page or a context), bounded: a browser that does not
        answer within ``bound`` seconds is killed (a warning says so) and the next test
        gets a new one."""
        kills = len(self.kills)
        try:
            with self.watchdog(bound, what):
                closable.close()
        except Exception:  # noqa: BLE001 - the browser may be gone already
            pass
        if len(self.kills) > kills:
            warnings.warn(f"Chromium killed and launched again: {self.kills[-1]}", stacklevel=2)

    def close(self) -> None:
        """Close the browser at the end of the session (bounded as well)."""
        if self.browser.is_connected():
            self.close_bounded(self.browser, "closing the browser")


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    """One headless Chromium for the session (a new one after a hang, see ``Chromium``)."""
    executable = os.environ.get("STREAMRELAY_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        _unavailable(
            f"no Chromium at {executable} (apt-get install -y chromium, or set "
            "STREAMRELAY_CHROMIUM)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - depends on the environment
        _unavailable(f"playwright is not installed: {exc}")
    with sync_playwright() as playwright:
        launched = Chromium(playwright, executable)
        try:
            yield launched
        finally:
            launched.close()


def _test_bound(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(
        request.config.getini("timeout") or 300
    )
    return max(timeout - TEST_BOUND_MARGIN_S, TEST_BOUND_MARGIN_S)


@pytest.fixture
def browser(chromium: Chromium, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session's browser, for one test that the browser cannot hang: past the test's
    timeout (less a margin for its teardown) Chromium is killed, the test's pending
    Playwright call fails, and the test fails saying why."""
    kills = len(chromium.kills)
    bound = _test_bound(request)
    with chromium.watchdog(bound, f"{request.node.name}"):
        yield chromium.connected()
    hung = chromium.kills[kills:]
    if any(why.startswith(f"{request.node.name}:") for why in hung):
        pytest.fail(f"Chromium did not answer: killed ({'; '.join(hung)})", pytrace=False)


@dataclass
class PageLog:
    """What a page reported on its console and as uncaught errors."""

    console: list[tuple[str, str]] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        """Console errors and uncaught page errors."""
        found = [text for kind, text in self.console if kind == "error"]
        return found + self.page_errors


@pytest.fixture
def open_page(browser: Any, chromium: Chromium) -> Iterator[Callable[..., tuple[Any, PageLog]]]:
    """``open_page(url=None)``: a new page in its own context (a fresh "tab") with the
    probe script installed, and its console log.  Every context is closed at teardown."""
    contexts: list[Any] = []

    def open_(url: str | None = None) -> tuple[Any, PageLog]:
        context = browser.new_context(viewport={"width": 1280, "height": 720})
        contexts.append(context)
        context.add_init_script(PROBE_SCRIPT)
        page = context.new_page()
        log = PageLog()
        page.on("console", lambda message: log.console.append((message.type, message.text)))
        page.on("pageerror", lambda error: log.page_errors.append(str(error)))
        if url is not None:
            page.goto(url, wait_until="load")
        return page, log

    yield open_
    for context in contexts:
        chromium.close_bounded(context, "closing a page's context")


@pytest.fixture
def start_publisher(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start_publisher(url, *extra)``: the real desktop publisher as a separate process
    (``python -m streamrelay.publisher URL --quiet``), stopped at teardown."""
    with PublisherProcesses(tmp_path) as publishers:
        yield lambda url, *extra: publishers.start("--url", url, "--quiet", *extra)


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    """``$STREAMRELAY_ARTIFACTS`` when set (created if needed), else the test's tmp dir."""
    return artifacts_folder() or tmp_path


@pytest.fixture
def figures() -> dict[str, Any]:
    """Record a measured figure: ``figures["name"] = value`` (reported at the end)."""
    return FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the measured figures, and keep them as an artifact."""
    if not FIGURES:
        return
    terminalreporter.section("streamrelay browser figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")
    folder = artifacts_folder()
    if folder is not None:
        (folder / "browser-figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")
