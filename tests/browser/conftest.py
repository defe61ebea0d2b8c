"""Fixtures of the end-to-end browser suite: headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``STREAMRELAY_CHROMIUM`` overrides the path),
launched once per session.  Where it is missing the suite is skipped on a developer
machine, but fails loudly when ``CI`` is set: a CI run that silently skipped the
end-to-end tests would prove nothing.

Pages are always loaded from ``http://127.0.0.1:PORT`` (a secure context), because
WebCodecs exists only in secure contexts.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session."""
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
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


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
def open_page(browser: Any) -> Iterator[Callable[..., tuple[Any, PageLog]]]:
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
        try:
            context.close()
        except Exception:  # noqa: BLE001 - the browser may be gone already
            pass


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
