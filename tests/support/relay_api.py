"""What a running relay says about itself: ``/api/streams`` (public), ``/api/internals``
(loopback only, and only with ``--api-internals``: start the relay with
``start_relay(..., internals=True)``), and its memory as the OS sees it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from tests.support.http import http_json
from tests.support.relay_process import RelayProcess

MB = 1024 * 1024


def api_streams(relay: RelayProcess) -> dict[str, Any]:
    """``/api/streams`` as JSON."""
    snapshot: dict[str, Any] = http_json(relay.http_url, "/api/streams")
    return snapshot


async def api_streams_async(relay: RelayProcess) -> dict[str, Any]:
    """:func:`api_streams` off the event loop."""
    return await asyncio.to_thread(api_streams, relay)


def api_internals(relay: RelayProcess) -> dict[str, Any]:
    """``/api/internals``: live object counts for leak accounting. The request's own
    connection is counted in it: one RelayChannel and one in ``connections`` and
    ``limiter.total``. It runs ``gc.collect()`` in the relay."""
    counts: dict[str, Any] = http_json(relay.http_url, "/api/internals")
    return counts


def stream_entry(snapshot: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The entry for ``name`` in an ``/api/streams`` answer, or None."""
    entries: list[dict[str, Any]] = snapshot["streams"]
    return next((entry for entry in entries if entry["name"] == name), None)


def current_entry(relay: RelayProcess, name: str) -> dict[str, Any] | None:
    """The relay's ``/api/streams`` entry for ``name`` now, or None."""
    return stream_entry(api_streams(relay), name)


def listed_entry(relay: RelayProcess, name: str) -> dict[str, Any]:
    """The relay's ``/api/streams`` entry for ``name``, which must be listed."""
    entry = current_entry(relay, name)
    assert entry is not None, f"{name} is not in /api/streams"
    return entry


def entry_in_state(relay: RelayProcess, name: str, state: str) -> dict[str, Any] | None:
    """The entry for ``name`` if its ``state`` is ``state`` ("live", "available"), else
    None: a predicate for :func:`tests.support.waiting.wait_until`."""
    entry = current_entry(relay, name)
    return entry if entry is not None and entry.get("state") == state else None


def idle_state(relay: RelayProcess) -> dict[str, Any] | None:
    """``/api/streams`` when the relay is idle (no streams, only this request open),
    else None."""
    snapshot = api_streams(relay)
    connections = snapshot["connections"]
    if (
        not snapshot["streams"]
        and connections["publishers"] == 0
        and connections["viewers"] == 0
        and connections["total"] <= 1
    ):
        return snapshot
    return None


class RssSampler:
    """Samples the relay's RSS every ``interval`` in a thread; ``peak`` is the highest."""

    def __init__(self, relay: RelayProcess, interval: float = 0.01) -> None:
        self._relay = relay
        self._interval = interval
        self.start_rss = relay.rss()
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self._relay.rss())
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self._relay.rss())

    @property
    def peak_growth(self) -> int:
        """Highest RSS seen minus the RSS at the start, in bytes."""
        return self.peak - self.start_rss
