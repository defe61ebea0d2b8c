"""The browser suite's own bound (``tests/browser/conftest.py``, ``Chromium``): a Playwright
call that Chromium never answers is ended by killing the browser within the bound, the
call fails at once, and the next user gets a new browser.  Without it one hung close held
a CI run for 20 minutes (pytest-timeout cannot interrupt the sync API's wait)."""

from __future__ import annotations

import time

import pytest

from tests.browser.conftest import Chromium

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

# A page script that never yields: the renderer never answers the evaluate.
SPIN = "() => { for (;;) {} }"


def test_a_call_the_browser_never_answers_fails_within_the_bound_and_a_new_browser_follows(
    chromium: Chromium,
) -> None:
    """``page.evaluate`` of an endless loop, under a 3 s watchdog, fails after about 3 s
    (not at the test's timeout); the kill is recorded; ``connected()`` then launches a
    working browser."""
    browser = chromium.connected()
    page = browser.new_page()
    started = time.monotonic()
    with pytest.raises(Exception) as raised, chromium.watchdog(3.0, "spinning page"):
        page.evaluate(SPIN)
    took = time.monotonic() - started
    assert 3.0 <= took < 15.0, took
    assert "closed" in str(raised.value).lower(), raised.value
    assert chromium.kills[-1] == "spinning page: no answer in 3 s"
    assert not browser.is_connected()
    again = chromium.connected()
    assert again is not browser and again.is_connected()
    fresh = again.new_page()
    assert fresh.evaluate("() => 6 * 7") == 42
    chromium.close_bounded(fresh, "closing the fresh page")


def test_a_close_that_hangs_is_bounded_and_warned_about(chromium: Chromium) -> None:
    """A close that never returns (here: a "close" that waits on a spinning page) ends
    within its bound with a warning naming it, and the next browser works."""
    page = chromium.connected().new_page()

    class HangingClose:
        def close(self) -> None:
            page.evaluate(SPIN)

    started = time.monotonic()
    with pytest.warns(UserWarning, match="Chromium killed and launched again: hanging close"):
        chromium.close_bounded(HangingClose(), "hanging close", bound=3.0)
    assert 3.0 <= time.monotonic() - started < 15.0
    fresh = chromium.connected().new_page()
    assert fresh.evaluate("() => 'up'") == "up"
    chromium.close_bounded(fresh, "closing the fresh page")
