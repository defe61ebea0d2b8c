"""``/metrics``: scraped through the real Site on StringTransports and a Clock, parsed
with prometheus_client's own parsers, and checked against what the relay did."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from streamrelay.metrics import close_code_label
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, encode_media
from tests.fakes import Peer, Relay
from tests.support.frames import binary_frame, close_frame

HOST = "relay.test"

# Every family the relay exports, whatever it did (prometheus_client's text parser names
# counters without their _total suffix).
EXPECTED_FAMILIES = {
    "streamrelay_info",
    "streamrelay_shutting_down",
    "streamrelay_connections",
    "streamrelay_max_connections",
    "streamrelay_connections_opened",
    "streamrelay_connections_closed",
    "streamrelay_handshakes_refused",
    "streamrelay_handshake_duration_seconds",
    "streamrelay_ping_timeouts",
    "streamrelay_viewer_stalls",
    "streamrelay_streams",
    "streamrelay_streams_available",
    "streamrelay_viewer_pending_bytes",
    "streamrelay_gop_cache_bytes",
    "streamrelay_buffered_bytes",
    "streamrelay_max_buffered_bytes",
    "streamrelay_messages_in",
    "streamrelay_bytes_in",
    "streamrelay_messages_out",
    "streamrelay_bytes_out",
    "streamrelay_keyframes_in",
    "streamrelay_keyframe_requests",
    "streamrelay_messages_dropped",
    "streamrelay_buffer_sheds",
    "streamrelay_limit_refusals",
    "streamrelay_inbound_budget_closes",
    "streamrelay_pulls",
    "streamrelay_pulls_live",
    "streamrelay_pull_connects",
    "streamrelay_pulls_started",
    "streamrelay_pull_refusals",
    "streamrelay_pull_reconnects",
    "streamrelay_stream_viewers",
    "streamrelay_stream_relays",
    "streamrelay_stream_messages_in",
    "streamrelay_stream_bytes_in",
    "streamrelay_stream_messages_dropped",
    "streamrelay_rendition_switches",
    "streamrelay_rendition_switches_refused",
    "process_resident_memory_bytes",
    "process_cpu_seconds",
    "python_info",
}


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(relay: Relay) -> tuple[set[str], Samples]:
    """GET /metrics from loopback: the family names and every sample by name and labels."""
    response = relay.connect().request("GET", "/metrics", {"Host": HOST})
    assert response.status == 200, response.body
    assert (response.header("content-type") or "").startswith("text/plain; version=")
    families = list(text_string_to_metric_families(response.body.decode("utf-8")))
    samples: Samples = {}
    for family in families:
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return {family.name for family in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly these labels (fails the test if absent)."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def pause(peer: Peer) -> None:
    """The viewer's transport is full: the relay's producer on it is paused."""
    producer = peer.transport.producer
    assert producer is not None
    producer.pauseProducing()


def media(flags: int, size: int = 100) -> bytes:
    return binary_frame(encode_media(flags, 1_700_000_000_000_000, b"m" * size))


def test_every_family_is_exported_by_an_idle_relay() -> None:
    """A relay that did nothing yet exports every family (zeros included), parseable by
    prometheus_client's parser."""
    names, samples = scrape(Relay())
    assert EXPECTED_FAMILIES - names == set()
    assert value(samples, "streamrelay_streams", state="live") == 0
    assert value(samples, "streamrelay_connections_opened_total", role="viewer") == 0
    assert value(samples, "streamrelay_messages_dropped_total", reason="slow_viewer") == 0
    assert value(samples, "streamrelay_messages_dropped_total", reason="cache_overflow") == 0
    assert value(samples, "streamrelay_max_connections") == 10000
    assert value(samples, "streamrelay_info", version="0.1.0") == 1


def test_connections_streams_and_traffic_are_counted() -> None:
    """A publisher and two viewers: connections by role, the live stream, messages and
    bytes in and out, the handshake histogram, the per-stream series."""
    relay = Relay()
    publisher = relay.publisher("cam")
    viewers = [relay.viewer("cam"), relay.viewer("cam")]
    relay.viewer("waiting")
    publisher.send(media(FLAG_CONFIG, 20))
    for flags in (FLAG_KEY, 0, 0):
        publisher.send(media(flags))
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_connections", role="publisher") == 1
    assert value(samples, "streamrelay_connections", role="viewer") == 3
    # The scrape's own connection is the one plain HTTP connection.
    assert value(samples, "streamrelay_connections", role="http") == 1
    assert value(samples, "streamrelay_streams", state="live") == 1
    assert value(samples, "streamrelay_streams", state="waiting") == 1
    assert value(samples, "streamrelay_messages_in_total") == 4
    media_bytes = 4 * 9 + 20 + 3 * 100
    assert value(samples, "streamrelay_bytes_in_total") == media_bytes
    assert value(samples, "streamrelay_keyframes_in_total") == 1
    # Each viewer of cam got status, then the four media messages; "waiting" its status.
    assert value(samples, "streamrelay_messages_out_total") == 2 * 5 + 1
    assert value(samples, "streamrelay_bytes_out_total") > 2 * media_bytes
    assert value(samples, "streamrelay_connections_opened_total", role="publisher") == 1
    assert value(samples, "streamrelay_connections_opened_total", role="viewer") == 3
    assert value(samples, "streamrelay_handshake_duration_seconds_count", role="viewer") == 3
    assert value(samples, "streamrelay_stream_viewers", stream="cam") == 2
    assert value(samples, "streamrelay_stream_messages_in_total", stream="cam") == 4
    assert value(samples, "streamrelay_stream_bytes_in_total", stream="cam") == media_bytes
    # Only live streams get series of their own.
    assert ("streamrelay_stream_viewers", (("stream", "waiting"),)) not in samples
    assert value(samples, "streamrelay_gop_cache_bytes") > 0
    assert len(viewers) == 2


def test_totals_never_go_down_when_streams_and_viewers_leave() -> None:
    """Counters read from the streams keep what departed streams and viewers did."""
    relay = Relay()
    publisher = relay.publisher("cam")
    viewer = relay.viewer("cam")
    publisher.send(media(FLAG_KEY))
    _names, before = scrape(relay)
    viewer.send(close_frame(1000))
    viewer.lose()
    publisher.lose()
    relay.settle()
    assert relay.context.registry.streams == {}
    _names, after = scrape(relay)
    for name in (
        "streamrelay_messages_in_total",
        "streamrelay_bytes_in_total",
        "streamrelay_messages_out_total",
        "streamrelay_bytes_out_total",
        "streamrelay_keyframes_in_total",
    ):
        assert value(after, name) == value(before, name) > 0, name
    assert value(after, "streamrelay_streams", state="live") == 0
    assert value(after, "streamrelay_connections_closed_total", role="viewer", code="1000") == 1
    assert value(after, "streamrelay_connections_closed_total", role="publisher", code="1006") == 1


def test_refusals_are_counted_by_status_and_by_limit() -> None:
    """Handshake refusals by HTTP status (404, 426, 431, 503) and the limit behind each
    503."""
    relay = Relay.with_options(max_handshakes_per_ip=1.0, handshake_burst=2)
    relay.connect().upgrade("/watch/a/b")  # 404
    relay.connect().request("GET", "/watch/cam", {"Host": HOST})  # 426
    relay.connect().send(b"GET /x HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n")  # 431
    statuses = [relay.connect().upgrade("/watch/cam").status for _ in range(4)]
    assert statuses.count(503) == 2, statuses
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_handshakes_refused_total", status="404") == 1
    assert value(samples, "streamrelay_handshakes_refused_total", status="426") == 1
    assert value(samples, "streamrelay_handshakes_refused_total", status="431") == 1
    assert value(samples, "streamrelay_handshakes_refused_total", status="503") == 2
    assert value(samples, "streamrelay_limit_refusals_total", limit="handshake_rate") == 2


def test_slow_viewer_drops_and_keyframe_requests_are_counted() -> None:
    """A paused viewer over its queue bound drops media (slow_viewer) and the relay asks
    the publisher for keyframes."""
    relay = Relay.with_options(viewer_queue_bytes=2000)
    publisher = relay.publisher("cam")
    slow = relay.viewer("cam")
    publisher.send(media(FLAG_KEY))
    pause(slow)
    publisher.send(media(0, 200))
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_viewer_pending_bytes") > 200
    for _ in range(30):
        publisher.send(media(0, 200))
    _names, samples = scrape(relay)
    dropped = value(samples, "streamrelay_messages_dropped_total", reason="slow_viewer")
    assert dropped > 0
    assert value(samples, "streamrelay_stream_messages_dropped_total", stream="cam") == dropped
    # The viewer joined with nothing cached: that first need went to the publisher.
    assert value(samples, "streamrelay_keyframe_requests_total") >= 1


def test_gop_cache_overflow_is_counted() -> None:
    """A GOP over --gop-cache-messages empties the cache: its messages count as
    cache_overflow drops."""
    relay = Relay.with_options(gop_cache_messages=5)
    publisher = relay.publisher("cam")
    publisher.send(media(FLAG_KEY))
    for _ in range(5):
        publisher.send(media(0))
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_messages_dropped_total", reason="cache_overflow") == 6


def test_ping_timeouts_and_stalls_are_counted() -> None:
    """A silent viewer aborted after its ping, and a stalled one closed with 1008."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=5, viewer_stall_timeout=3)
    publisher = relay.publisher("cam")
    stalled = relay.viewer("cam")
    pause(stalled)
    publisher.send(media(FLAG_KEY))
    relay.tick(3.1)
    assert stalled.close_codes() == [1008]
    silent = relay.viewer("other")
    relay.tick(15.1)
    assert silent.aborted
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_viewer_stalls_total") == 1
    assert value(samples, "streamrelay_ping_timeouts_total", role="viewer") >= 1


def test_inbound_budget_closes_are_read_from_the_context() -> None:
    """The inbound budget's counts ({role: {reason: count}} on the context) are
    exported by role and reason."""
    relay = Relay()
    vars(relay.context)["over_budget"] = {"viewer": {"too many frames": 3}}
    _names, samples = scrape(relay)
    assert (
        value(samples, "streamrelay_inbound_budget_closes_total", role="viewer",
              reason="too many frames")
        == 3
    )


def test_per_stream_series_can_be_left_out() -> None:
    """--no-stream-metrics: no series per stream, the totals stay."""
    relay = Relay.with_options(stream_metrics=False)
    publisher = relay.publisher("cam")
    publisher.send(media(FLAG_KEY))
    names, samples = scrape(relay)
    assert not [name for name in names if name.startswith("streamrelay_stream_")]
    assert value(samples, "streamrelay_messages_in_total") == 1


def test_relays_have_registries_of_their_own() -> None:
    """Two relays in one process count apart (a registry per relay, not the global one)."""
    busy, idle = Relay(), Relay()
    busy.publisher("cam").send(media(FLAG_KEY))
    _names, samples = scrape(idle)
    assert value(samples, "streamrelay_messages_in_total") == 0
    assert value(samples, "streamrelay_connections_opened_total", role="publisher") == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"X-Real-IP": "1.2.3.4"},
    ],
)
def test_metrics_are_refused_to_proxied_requests(headers: dict[str, str]) -> None:
    """A reverse proxy on the same host does not make /metrics public."""
    response = Relay().connect().request("GET", "/metrics", {"Host": HOST, **headers})
    assert response.status == 403


@pytest.mark.parametrize("host", ["10.1.2.3", "2001:db8::5"])
def test_metrics_are_refused_to_other_hosts(host: str) -> None:
    """On the relay's port /metrics is for direct loopback requests only."""
    assert Relay().connect(host).request("GET", "/metrics", {"Host": HOST}).status == 403


def test_metrics_are_refused_even_with_trusted_proxies() -> None:
    """--trust-proxy does not open /metrics to forwarded clients, loopback or not."""
    relay = Relay.with_options(trust_proxy=1)
    headers = {"Host": HOST, "X-Forwarded-For": "127.0.0.1"}
    assert relay.connect().request("GET", "/metrics", headers).status == 403


def test_openmetrics_is_served_when_asked_for() -> None:
    """A scraper that accepts OpenMetrics gets it, and it parses."""
    response = Relay().connect().request(
        "GET", "/metrics", {"Host": HOST, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status == 200
    assert (response.header("content-type") or "").startswith("application/openmetrics-text")
    names = {f.name for f in openmetrics_families(response.body.decode("utf-8"))}
    assert "streamrelay_messages_in" in names


def test_head_and_other_methods() -> None:
    """HEAD is answered like GET, without the body; POST is 405."""
    relay = Relay()
    head = relay.connect().request("HEAD", "/metrics", {"Host": HOST})
    assert head.status == 200 and head.body == b""
    assert relay.connect().request("POST", "/metrics", {"Host": HOST}).status == 405


def test_metrics_site_answers_anyone_and_only_metrics() -> None:
    """The --metrics-listen site serves /metrics to any address, 404 elsewhere."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from streamrelay.web import metrics_site

    relay = Relay()
    site = metrics_site(relay.context)
    answers = {}
    for path in ("/metrics", "/healthz", "/"):
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 5000))
        assert channel is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5000))
        channel.makeConnection(transport)
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        answers[path] = transport.value()
        channel.connectionLost(None)
    assert answers["/metrics"].startswith(b"HTTP/1.1 200")
    assert b"streamrelay_messages_in_total" in answers["/metrics"]
    assert answers["/healthz"].startswith(b"HTTP/1.1 404")
    assert answers["/"].startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize(
    ("code", "label"),
    [(None, "1006"), (1000, "1000"), (4409, "4409"), (3000, "other"), (4999, "other")],
)
def test_close_code_labels_are_bounded(code: int | None, label: str) -> None:
    """Codes the relay does not use are one label value, whatever peers send."""
    assert close_code_label(code) == label


def test_a_peer_close_code_outside_the_known_set_is_other() -> None:
    """A viewer closing with 4000 is counted as code="other"."""
    relay = Relay()
    viewer: Peer = relay.viewer("cam")
    viewer.send(close_frame(4000))
    viewer.lose()
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_connections_closed_total", role="viewer", code="other") == 1


class _State(enum.Enum):
    OPEN = "open"
    WAITING = "waiting"


@dataclass
class _Stats:
    connects: int


@dataclass
class _Client:
    state: _State
    live: bool
    stats: _Stats


@dataclass
class _Pull:
    client: _Client


@dataclass
class _Puller:
    """The shape of streamrelay.upstream.UpstreamManager that the metrics read."""

    pulls: dict[str, _Pull] = field(default_factory=dict)
    started: int = 0
    refused: int = 0
    reconnects: int = 0


def test_pulls_are_read_from_the_pull_manager() -> None:
    """On a relay with --upstream: pulls by state, how many are live, connections per
    pull, pulls started and refused (the registry's ``puller``)."""
    relay = Relay()
    puller = _Puller(
        pulls={
            "cam": _Pull(_Client(_State.OPEN, True, _Stats(3))),
            "desk": _Pull(_Client(_State.WAITING, False, _Stats(1))),
            "hall": _Pull(_Client(_State.WAITING, False, _Stats(0))),
        },
        started=7,
        refused=2,
        reconnects=5,
    )
    vars(relay.context.registry)["puller"] = puller
    _names, samples = scrape(relay)
    assert value(samples, "streamrelay_pulls", state="open") == 1
    assert value(samples, "streamrelay_pulls", state="waiting") == 2
    assert value(samples, "streamrelay_pulls_live") == 1
    assert value(samples, "streamrelay_pull_connects_total", stream="cam") == 3
    assert value(samples, "streamrelay_pulls_started_total") == 7
    assert value(samples, "streamrelay_pull_refusals_total") == 2
    assert value(samples, "streamrelay_pull_reconnects_total") == 5


def test_a_relay_without_upstream_exports_the_pull_families_at_zero() -> None:
    """Dashboards see the same families on every relay."""
    _names, samples = scrape(Relay())
    assert value(samples, "streamrelay_pulls_live") == 0
    assert value(samples, "streamrelay_pulls_started_total") == 0


def test_rendition_switches_are_counted_by_reason() -> None:
    """An adaptive viewer told its first rendition counts as ``start``; every reason and
    refusal is exported from 0."""
    from tests.support.frames import text_frame
    from tests.test_abr import SET

    relay = Relay()
    names, samples = scrape(relay)
    for reason in ("start", "down", "up", "offline"):
        assert value(samples, "streamrelay_rendition_switches_total", reason=reason) == 0
    for reason in ("viewer_limit", "no_key"):
        assert value(samples, "streamrelay_rendition_switches_refused_total", reason=reason) == 0
    publisher = relay.publisher("cam")
    publisher.send(text_frame({"type": "meta", "width": 640, "renditions": SET}))
    relay.viewer("cam?abr=1")
    relay.viewer("cam")
    _, samples = scrape(relay)
    assert value(samples, "streamrelay_rendition_switches_total", reason="start") == 1
    assert value(samples, "streamrelay_rendition_switches_total", reason="down") == 0
