"""Prometheus metrics for one relay: its own ``CollectorRegistry`` (never the global one,
so several relays in one process, as in the tests, do not clash).

Two kinds of series, so that relaying a message costs nothing more than it did:

- counted when they happen, a few times per connection and never per message: WebSockets
  opened and closed, handshakes refused, how long handshakes took, ping timeouts, stalled
  viewers (:class:`RelayMetrics`, prometheus_client instruments);
- read from the relay's state when scraped (:class:`RelayCollector`): connections by
  role, streams, memory buffered and pending towards viewers, the message and byte
  totals the streams keep anyway, drops, sheds, keyframe requests, refusals by each
  limit, inbound-budget closes, relay-to-relay pulls (on a relay with ``--upstream``:
  pulls by state, started, refused, connections per pull), and per live stream (bounded
  by ``--max-streams``, plus ``--max-pulls`` pulled streams) its viewers, edges and totals.

:meth:`RelayMetrics.exposition` renders the registry in the format the scraper asks for
(Prometheus text or OpenMetrics).  It runs on the reactor thread: the collector reads
state the reactor owns, which prometheus_client's own Twisted resource (a WSGI resource
run in a worker thread) must not touch.

(Over 400 lines: each family is a name, a help text and one read of the relay's state,
and they are kept in one file so that the exported set is seen, reviewed and documented
(docs/operations.md, checked by a test) in one place.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from streamrelay import __version__, wire
from streamrelay.roles import Role

if TYPE_CHECKING:
    from streamrelay.context import RelayContext

# The "_created" companion of every counter only doubles the series; scrapers infer
# resets from decreases.
disable_created_metrics()

ROLES = tuple(role.label for role in Role)
# Close codes the relay or a well-behaved peer uses; any other code a peer sends (it may
# send any of 3000-4999) is counted as "other", which keeps the label set bounded.
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, wire.CLOSE_PUBLISHER_REPLACED}
)
# From a fast loopback handshake to the handshake timeout's default (5 s).
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def close_code_label(code: int | None) -> str:
    """The ``code`` label of a closed WebSocket: a known code, ``other``, or 1006 for a
    connection that ended without a close frame."""
    if code is None:
        return "1006"
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


class RelayMetrics:
    """A relay's registry and the instruments counted when events happen."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._watching = False
        self.connections_opened = Counter(
            "streamrelay_connections_opened",
            "WebSocket connections opened, by role.",
            ["role"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "streamrelay_connections_closed",
            "WebSocket connections closed, by role and close code (1006: no close frame; "
            "other: a code the relay does not use).",
            ["role", "code"],
            registry=self.registry,
        )
        self.handshakes_refused = Counter(
            "streamrelay_handshakes_refused",
            "Requests refused before a WebSocket existed, by HTTP status (the refusal "
            "table of docs/protocol.md; 431, 413 and 400 on any path).",
            ["status"],
            registry=self.registry,
        )
        self.handshake_seconds = Histogram(
            "streamrelay_handshake_duration_seconds",
            "Time from the TCP accept (or the end of the previous request on the "
            "connection) to the WebSocket being open, by role.",
            ["role"],
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )
        self.ping_timeouts = Counter(
            "streamrelay_ping_timeouts",
            "Connections aborted for showing no sign of life after a ping, by role.",
            ["role"],
            registry=self.registry,
        )
        self.viewer_stalls = Counter(
            "streamrelay_viewer_stalls",
            "Viewers closed (1008) for making no write progress for --viewer-stall-timeout.",
            registry=self.registry,
        )
        # --auth-url (streamrelay.auth_url): calls by outcome, their latency, cache hits.
        self.auth_calls = Counter(
            "streamrelay_auth_calls",
            "Calls to the --auth-url endpoint, by outcome (admitted, refused_401, "
            "refused_403, timeout, failed, over_capacity, cancelled).",
            ["outcome"],
            registry=self.registry,
        )
        self.auth_seconds = Histogram(
            "streamrelay_auth_duration_seconds",
            "Time the --auth-url endpoint took to answer (or to time out or fail).",
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )
        self.auth_cache_hits = Counter(
            "streamrelay_auth_cache_hits",
            "Handshakes decided from the --auth-url answer cache.",
            registry=self.registry,
        )
        for role in ROLES:
            # Every role's series exists from the start, at zero.
            self.connections_opened.labels(role)
            self.ping_timeouts.labels(role)
            self.handshake_seconds.labels(role)
        # The labelled children of the per-handshake counters, looked up once each:
        # prometheus_client's labels() takes a lock and checks its arguments every call,
        # which a handshake storm (thousands a second) pays several times per handshake.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- events ---------------------------------------------------------------------

    def opened(self, role: str, handshake_seconds: float) -> None:
        """A WebSocket in ``role`` opened, ``handshake_seconds`` after its request began."""
        self._child(self.connections_opened, role).inc()
        self._child(self.handshake_seconds, role).observe(max(0.0, handshake_seconds))

    def closed(self, role: str, code: int | None) -> None:
        """A WebSocket in ``role`` is gone; ``code`` as :func:`close_code_label` takes it."""
        self._child(self.connections_closed, role, close_code_label(code)).inc()

    def refused(self, status: int) -> None:
        """A request was refused with ``status`` before any WebSocket existed."""
        self._child(self.handshakes_refused, str(status)).inc()

    def auth_call(self, outcome: str, seconds: float | None) -> None:
        """A call to the authorisation endpoint ended with ``outcome``, after
        ``seconds`` (None: no latency to record)."""
        self.auth_calls.labels(outcome).inc()
        if seconds is not None:
            self.auth_seconds.observe(max(0.0, seconds))

    def auth_cache_hit(self) -> None:
        """A handshake was decided from the authorisation answer cache."""
        self.auth_cache_hits.inc()

    def ping_timeout(self, role: str) -> None:
        """A peer in ``role`` was aborted after an unanswered ping."""
        self.ping_timeouts.labels(role).inc()

    def viewer_stalled(self) -> None:
        """A viewer made no write progress for the stall timeout."""
        self.viewer_stalls.inc()

    # -- scraping -------------------------------------------------------------------

    def watch(self, context: RelayContext) -> None:
        """Read ``context`` at every scrape from now on, and the process's own figures
        (memory, CPU, descriptors); once per registry."""
        if self._watching:
            return
        self._watching = True
        self.registry.register(RelayCollector(context))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry's samples in the format ``accept`` asks for, and its content
        type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class RelayCollector:
    """Reads a relay's state when scraped (a prometheus_client custom collector)."""

    def __init__(self, context: RelayContext) -> None:
        self._context = context

    def collect(self) -> Iterator[Metric]:
        """Every scrape-time family, zero-valued series included."""
        context = self._context
        yield from self._process(context)
        yield from self._connections(context)
        yield from self._streams(context)
        yield from self._refusals(context)
        yield from self._renditions(context)
        yield from self._pulls(context)
        yield from self._directory(context)
        if context.config.stream_metrics:
            yield from self._per_stream(context)

    @staticmethod
    def _process(context: RelayContext) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "streamrelay_info", "The relay's version (always 1).", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "streamrelay_shutting_down",
            "1 while the relay drains (new handshakes get 503, /healthz answers 503).",
            value=1 if context.shutting_down else 0,
        )

    @staticmethod
    def _connections(context: RelayContext) -> Iterator[Metric]:
        counts = dict.fromkeys((*ROLES, "http"), 0)
        for connection in list(context.connections):
            upgraded: Any = getattr(connection, "upgraded", None)
            role = upgraded.role.label if upgraded is not None else "http"
            counts[role] = counts.get(role, 0) + 1
        open_now = GaugeMetricFamily(
            "streamrelay_connections",
            "Open TCP connections by role (http: not, or not yet, a WebSocket).",
            labels=["role"],
        )
        for role, count in counts.items():
            open_now.add_metric([role], count)
        yield open_now
        yield GaugeMetricFamily(
            "streamrelay_max_connections",
            "--max-connections as in force (lowered to fit the descriptor limit).",
            value=context.limiter.max_connections,
        )

    @staticmethod
    def _streams(context: RelayContext) -> Iterator[Metric]:
        registry = context.registry
        streams = GaugeMetricFamily(
            "streamrelay_streams",
            "Streams with a publisher (live) and names held only by waiting viewers.",
            labels=["state"],
        )
        streams.add_metric(["live"], registry.live_streams)
        streams.add_metric(["waiting"], registry.waiting.total)
        yield streams
        yield _gauge(
            "streamrelay_streams_available",
            "Live streams whose publisher is connected but idle on demand (nobody watches).",
            registry.available_count,
        )
        pending = 0
        cached = 0
        for stream in list(registry.streams.values()):
            cached += stream.gop.backlog_bytes
            for queue in list(stream.viewers.values()):
                pending += queue.backlog_bytes
        yield _gauge(
            "streamrelay_viewer_pending_bytes",
            "Memory pending towards viewers: queued in the relay plus estimated in "
            "transports (each message counts its size plus a fixed overhead).",
            pending,
        )
        yield _gauge(
            "streamrelay_gop_cache_bytes", "Memory held by the GOP caches of all streams.", cached
        )
        yield _gauge(
            "streamrelay_buffered_bytes",
            "GOP caches plus everything pending towards viewers, as bounded by "
            "--max-buffered-bytes.",
            registry.budget.total,
        )
        yield _gauge(
            "streamrelay_max_buffered_bytes", "--max-buffered-bytes.", registry.budget.limit
        )
        totals = registry.totals()
        yield _counter(
            "streamrelay_messages_in",
            "Media messages received from publishers.",
            totals.messages_in,
        )
        yield _counter(
            "streamrelay_bytes_in",
            "Bytes of the media messages received from publishers.",
            totals.bytes_in,
        )
        yield _counter(
            "streamrelay_messages_out",
            "Messages written towards viewers (media and text).",
            totals.messages_out,
        )
        yield _counter(
            "streamrelay_bytes_out",
            "Bytes of the messages written towards viewers.",
            totals.bytes_out,
        )
        yield _counter(
            "streamrelay_keyframes_in", "KEY messages received from publishers.", totals.keyframes
        )
        yield _counter(
            "streamrelay_keyframe_requests",
            "Keyframe requests sent to publishers (after the rate limit).",
            totals.keyframe_requests,
        )
        dropped = CounterMetricFamily(
            "streamrelay_messages_dropped",
            "Media messages dropped, by reason: slow_viewer (not delivered to a viewer "
            "that fell behind or was shed), cache_overflow (emptied from a GOP cache over "
            "its bounds or shed).",
            labels=["reason"],
        )
        dropped.add_metric(["slow_viewer"], totals.dropped)
        dropped.add_metric(["cache_overflow"], totals.cache_discarded)
        yield dropped
        yield _counter(
            "streamrelay_buffer_sheds",
            "Viewers put into skipping and GOP caches emptied because all buffers reached "
            "--max-buffered-bytes.",
            registry.budget.sheds,
        )

    @staticmethod
    def _refusals(context: RelayContext) -> Iterator[Metric]:
        limits = CounterMetricFamily(
            "streamrelay_limit_refusals",
            "Refusals (503) by the limit that made them: connections (global or per "
            "address), handshake_rate (per address), waiting_streams.",
            labels=["limit"],
        )
        limits.add_metric(["connections"], context.limiter.refused)
        limits.add_metric(["handshake_rate"], context.handshake_rate.refused)
        limits.add_metric(["waiting_streams"], context.registry.waiting.refused)
        yield limits
        over_budget = CounterMetricFamily(
            "streamrelay_inbound_budget_closes",
            "Connections closed (1008) for sending more frames or bytes than their "
            "inbound budget, by role and reason.",
            labels=["role", "reason"],
        )
        # Kept by the protocols as {role: {reason: count}}.
        counts: dict[str, dict[str, int]] = getattr(context, "over_budget", {})
        for role, reasons in sorted(counts.items()):
            for reason, count in sorted(reasons.items()):
                over_budget.add_metric([role, reason], count)
        yield over_budget

    @staticmethod
    def _renditions(context: RelayContext) -> Iterator[Metric]:
        # Counted by streamrelay.adaptive on the registry; every reason exported from 0.
        registry = context.registry
        switches = CounterMetricFamily(
            "streamrelay_rendition_switches",
            "Adaptive viewers' rendition changes (docs/protocol.md, Renditions), by "
            "reason: start (told its first rendition), down, up, offline (left a "
            "rendition whose publisher went away).",
            labels=["reason"],
        )
        for reason in ("start", "down", "up", "offline"):
            switches.add_metric([reason], registry.rendition_switches.get(reason, 0))
        yield switches
        refused = CounterMetricFamily(
            "streamrelay_rendition_switches_refused",
            "Rendition switches not made, by reason: viewer_limit (the target had "
            "--max-viewers-per-stream viewers), no_key (the target sent no KEY in time).",
            labels=["reason"],
        )
        for reason in ("viewer_limit", "no_key"):
            refused.add_metric([reason], registry.rendition_switches_refused.get(reason, 0))
        yield refused

    @staticmethod
    def _directory(context: RelayContext) -> Iterator[Metric]:
        # The cluster directory (--cluster), read by attribute from the registry's
        # ``origins``; a relay outside a cluster exports nothing here.
        directory: Any = getattr(getattr(context.registry, "origins", None), "directory", None)
        if directory is None:
            return
        yield _counter(
            "streamrelay_directory_errors",
            "Calls to the cluster directory (Redis) that failed or timed out.",
            directory.errors,
        )
        yield _gauge(
            "streamrelay_directory_heartbeat_age_seconds",
            "Seconds since this node's last successful heartbeat in the directory.",
            directory.heartbeat_age,
        )
        yield _gauge(
            "streamrelay_directory_streams_held",
            "Streams this node is the origin of in the directory.",
            len(directory.held),
        )

    @staticmethod
    def _pulls(context: RelayContext) -> Iterator[Metric]:
        # Relay to relay (docs/cluster.md): the pull manager a relay with --upstream
        # hangs on its registry (``puller``); read by name, so that a relay without one
        # exports the same families at zero.
        puller: Any = getattr(context.registry, "puller", None)
        pulls: dict[str, Any] = dict(getattr(puller, "pulls", None) or {})
        by_state = GaugeMetricFamily(
            "streamrelay_pulls",
            "Streams pulled from the upstream (--upstream), by the state of their "
            "connection (open, connecting, waiting for the next attempt, ...).",
            labels=["state"],
        )
        states: dict[str, int] = {}
        live = 0
        connects = CounterMetricFamily(
            "streamrelay_pull_connects",
            "Connections each current pull opened to its upstream (the first one plus "
            "every reconnect), by stream (at most --max-pulls).",
            labels=["stream"],
        )
        for name, pull in sorted(pulls.items()):
            client = getattr(pull, "client", None)
            state = str(getattr(getattr(client, "state", None), "value", "unknown"))
            states[state] = states.get(state, 0) + 1
            live += 1 if getattr(client, "live", False) else 0
            connects.add_metric([name], getattr(getattr(client, "stats", None), "connects", 0))
        for state, count in sorted(states.items()):
            by_state.add_metric([state], count)
        yield by_state
        yield _gauge(
            "streamrelay_pulls_live", "Pulls whose upstream says the stream is live.", live
        )
        yield connects
        yield _counter(
            "streamrelay_pulls_started",
            "Pulls started (a stream with viewers here and no local publisher).",
            getattr(puller, "started", 0),
        )
        yield _counter(
            "streamrelay_pull_refusals",
            "Pulls not started because --max-pulls was reached (the viewer got 503).",
            getattr(puller, "refused", 0),
        )
        yield _counter(
            "streamrelay_pull_reconnects",
            "Connections pulls reopened to the upstream after their first, since start "
            "(unlike streamrelay_pull_connects, not reset when a pull ends).",
            getattr(puller, "reconnects", 0),
        )

    @staticmethod
    def _per_stream(context: RelayContext) -> Iterator[Metric]:
        # Live streams only: at most --max-streams (plus --max-pulls pulled) label values.
        live = [s for s in list(context.registry.streams.values()) if s.live]
        families: list[tuple[GaugeMetricFamily | CounterMetricFamily, Callable[[Any], float]]] = [
            (
                GaugeMetricFamily(
                    "streamrelay_stream_viewers", "Viewers of a live stream.", labels=["stream"]
                ),
                lambda stream: len(stream.viewers) - len(_edges(stream)),
            ),
            (
                GaugeMetricFamily(
                    "streamrelay_stream_relays",
                    "Edge relays pulling a live stream from this one (/relay/NAME).",
                    labels=["stream"],
                ),
                lambda stream: len(_edges(stream)),
            ),
            (
                CounterMetricFamily(
                    "streamrelay_stream_messages_in",
                    "Media messages a live stream received (since it was created).",
                    labels=["stream"],
                ),
                lambda stream: stream.messages_in,
            ),
            (
                CounterMetricFamily(
                    "streamrelay_stream_bytes_in",
                    "Bytes of media a live stream received (since it was created).",
                    labels=["stream"],
                ),
                lambda stream: stream.bytes_in,
            ),
            (
                CounterMetricFamily(
                    "streamrelay_stream_messages_dropped",
                    "Media messages of a live stream not delivered to a viewer that fell "
                    "behind (since it was created).",
                    labels=["stream"],
                ),
                lambda stream: stream.dropped,
            ),
        ]
        for family, value in families:
            for stream in live:
                family.add_metric([stream.name], value(stream))
            yield family
        yield from _viewer_reports(live)


def _viewer_reports(live: list[Any]) -> Iterator[Metric]:
    """What the viewers of each live stream report (docs/protocol.md, "Viewer reports"):
    the latency percentiles of the last minute, and the reports counted."""
    latency = GaugeMetricFamily(
        "streamrelay_stream_viewer_latency_seconds",
        "Glass-to-glass latency the viewers of a live stream reported over the last "
        "minute, by quantile (0.5, 0.95); absent without reports.",
        labels=["stream", "quantile"],
    )
    reports = CounterMetricFamily(
        "streamrelay_stream_viewer_reports",
        "Viewer reports counted for a live stream (since its publisher started).",
        labels=["stream"],
    )
    for stream in live:
        window = getattr(stream, "reports", None)
        if window is None:
            continue
        reports.add_metric([stream.name], window.total)
        summary = window.summary()["latency_ms"]
        if summary is not None:
            latency.add_metric([stream.name, "0.5"], summary["p50"] / 1000)
            latency.add_metric([stream.name, "0.95"], summary["p95"] / 1000)
    yield latency
    yield reports


def _edges(stream: Any) -> dict[Any, int]:
    """The edge relays among a stream's viewers, with the audience each reports."""
    edges: dict[Any, int] = getattr(stream, "relay_counts", None) or {}
    return edges


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)

