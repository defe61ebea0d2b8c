"""Viewer reports and the clock exchange (docs/protocol.md, "Viewer reports"): validation,
rate limits and the per-stream summary on a Clock, then the viewer -> relay -> publisher
and ``/api/streams`` paths through the real Site and Autobahn protocols."""

from __future__ import annotations

import math
from typing import Any

import pytest
from twisted.internet.task import Clock

from streamrelay.config import RelayConfig
from streamrelay.inbound import InboundBudget, frame_size, limits_for
from streamrelay.reports import (
    MAX_REPORTS,
    REPORT_MIN_INTERVAL_SECONDS,
    TIME_BURST,
    TIME_INTERVAL_SECONDS,
    WINDOW_SECONDS,
    InvalidReport,
    ReportWindow,
    ViewerInputGate,
    ViewerReport,
    parse_report,
    parse_time_request,
)
from streamrelay.roles import Role
from streamrelay.streams import VIEWER_REPORT_INTERVAL
from streamrelay.wire import FLAG_KEY, encode_media, encode_text
from tests.fakes import Relay
from tests.support.frames import OP_PING, binary_frame, client_frame, text_frame

GOOD: dict[str, Any] = {
    "type": "report",
    "latency_ms": 180.5,
    "fps": 30,
    "dropped": 2,
    "stalls": 1,
    "clock_offset_ms": -3.25,
}


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def report(latency: float | None = 100.0, **changes: Any) -> ViewerReport:
    """A valid report with ``latency`` and other members changed."""
    values = {**GOOD, "latency_ms": latency, **changes}
    return parse_report(values)


# -- validation -----------------------------------------------------------------------------


def test_a_valid_report_parses_and_nulls_are_allowed_where_documented() -> None:
    """Every member as sent; latency and clock offset may be null."""
    parsed = parse_report(GOOD)
    assert parsed == ViewerReport(180.5, 30.0, 2, 1, -3.25)
    nulls = parse_report({**GOOD, "latency_ms": None, "clock_offset_ms": None})
    assert nulls.latency_ms is None and nulls.clock_offset_ms is None


@pytest.mark.parametrize(
    "change",
    [
        {"latency_ms": -1},
        {"latency_ms": 600_001},
        {"latency_ms": "100"},
        {"latency_ms": True},
        {"latency_ms": math.inf},
        {"latency_ms": math.nan},
        {"fps": None},
        {"fps": 1001},
        {"fps": -0.1},
        {"dropped": 1.5},
        {"dropped": -1},
        {"dropped": 10**6 + 1},
        {"dropped": False},
        {"stalls": 10_001},
        {"stalls": "0"},
        {"clock_offset_ms": 86_400_001},
        {"clock_offset_ms": [1]},
        {"fps": 10**400},
    ],
)
def test_any_bad_member_makes_the_report_invalid(change: dict[str, Any]) -> None:
    """Wrong type (booleans and strings are no numbers), not finite, out of range."""
    with pytest.raises(InvalidReport):
        parse_report({**GOOD, **change})


@pytest.mark.parametrize("missing", ["fps", "dropped", "stalls"])
def test_a_report_missing_a_required_member_is_invalid(missing: str) -> None:
    """fps, dropped and stalls are required."""
    with pytest.raises(InvalidReport):
        parse_report({key: value for key, value in GOOD.items() if key != missing})


@pytest.mark.parametrize(
    ("t0", "expected"),
    [(1.5, 1.5), (1_700_000_000_123.25, 1_700_000_000_123.25), (0, 0), (-3, -3),
     (None, None), ("1", None), (True, None), (1e17, None), (math.inf, None)],
)
def test_time_requests_echo_only_finite_numbers_in_range(t0: Any, expected: Any) -> None:
    """t0 is echoed when a number of magnitude up to 1e16, else the request is ignored."""
    assert parse_time_request({"type": "time", "t0": t0}) == expected


# -- rate limits ----------------------------------------------------------------------------


def test_one_report_per_interval_is_counted() -> None:
    """Within 2 s of a counted report, the next is not counted; after it, it is."""
    clock = Clock()
    gate = ViewerInputGate(clock)
    assert gate.allow_report()
    clock.advance(REPORT_MIN_INTERVAL_SECONDS - 0.01)
    assert not gate.allow_report()
    clock.advance(0.01)
    assert gate.allow_report()


def test_time_requests_get_a_burst_then_one_per_interval() -> None:
    """4 answered at once, then one more per 5 s."""
    clock = Clock()
    gate = ViewerInputGate(clock)
    assert [gate.allow_time() for _ in range(TIME_BURST + 2)] == [True] * TIME_BURST + [False] * 2
    clock.advance(TIME_INTERVAL_SECONDS)
    assert gate.allow_time() and not gate.allow_time()


def test_the_players_messages_fit_the_viewer_inbound_budget_with_margin() -> None:
    """A player's worst minute -- reconnect-time clock burst, a report every 2 s, a time
    request every 5 s and a keyframe request a second (the player's most), with pongs --
    stays inside half the default viewer budget of frames and bytes."""
    clock = Clock()
    config = RelayConfig()
    limits = limits_for(Role.VIEWER, config, 4096)
    assert limits is not None
    half = type(limits)(
        limits.frames_per_second / 2, limits.frame_burst / 2,
        limits.bytes_per_second / 2, limits.byte_burst / 2,
    )
    budget = InboundBudget(clock, half)
    longest = {**GOOD, "latency_ms": 599_999.9, "clock_offset_ms": -86_399_999.9}
    big_report = len(encode_text(longest))
    time_request = len(encode_text({"type": "time", "t0": 1_700_000_000_123.456}))
    keyframe = len(encode_text({"type": "keyframe-request"}))
    for _ in range(3):
        assert budget.frame(frame_size(time_request)) is None
    for tenth in range(600):
        clock.advance(0.1)
        if tenth % 20 == 0:
            assert budget.frame(frame_size(big_report)) is None
        if tenth % 50 == 0:
            assert budget.frame(frame_size(time_request)) is None
        if tenth % 10 == 0:
            assert budget.frame(frame_size(keyframe)) is None
        if tenth % 100 == 0:
            assert budget.frame(frame_size(0)) is None


# -- the summary ----------------------------------------------------------------------------


def test_the_summary_gives_percentiles_sums_and_forgets_after_a_minute() -> None:
    """p50/p95 nearest rank over the reports' latencies (null ones left out), p50 fps,
    stalls and drops summed; reports older than 60 s no longer count."""
    clock = Clock()
    window = ReportWindow(clock)
    empty = window.summary()
    assert empty["reports"] == 0 and empty["latency_ms"] is None and empty["fps"] is None
    for latency in range(1, 101):
        window.add(report(float(latency), stalls=1, dropped=3))
    window.add(report(None, fps=10))
    summary = window.summary()
    assert summary["reports"] == 101
    assert summary["latency_ms"] == {"p50": 50.0, "p95": 95.0}
    assert summary["fps"] == {"p50": 30.0}
    assert summary["stalls"] == 101 and summary["dropped"] == 302
    clock.advance(WINDOW_SECONDS / 2)
    window.add(report(1000.0))
    clock.advance(WINDOW_SECONDS / 2 + 0.001)
    later = window.summary()
    assert later["reports"] == 1 and later["latency_ms"] == {"p50": 1000.0, "p95": 1000.0}
    clock.advance(WINDOW_SECONDS)
    assert window.summary()["reports"] == 0


def test_the_window_holds_at_most_its_bound_newest_first() -> None:
    """However many reports arrive, the window keeps the newest MAX_REPORTS."""
    clock = Clock()
    window = ReportWindow(clock)
    for index in range(MAX_REPORTS * 3):
        window.add(report(1.0 if index < MAX_REPORTS * 2 else 500.0))
    assert len(window) == MAX_REPORTS
    assert window.summary()["latency_ms"] == {"p50": 500.0, "p95": 500.0}
    assert window.total == MAX_REPORTS * 3


# -- through the relay ----------------------------------------------------------------------


def setup() -> tuple[Relay, Any, Any]:
    """A relay with a live publisher of ``cam`` and one viewer, their messages so far read."""
    relay = Relay()
    publisher = relay.publisher()
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"\x00\x00\x00\x01\x65")))
    viewer = relay.viewer()
    relay.clock.advance(1)
    publisher.messages()
    viewer.messages()
    return relay, publisher, viewer


def viewer_reports(relay: Relay) -> dict[str, Any]:
    """The ``viewer_reports`` of ``cam`` in /api/streams."""
    listing = relay.connect().request("GET", "/api/streams", {"Host": "relay.test"}).json()
    return dict(listing["streams"][0]["viewer_reports"])


def test_time_requests_are_answered_with_the_relays_clock_within_the_burst() -> None:
    """The answer echoes t0 and gives the relay's clock in µs; past the burst, silence;
    a bad t0 gets no answer and no close."""
    relay, _publisher, viewer = setup()
    relay.clock.advance(1000.25)
    viewer.send(text_frame({"type": "time", "t0": 12345.5}))
    assert viewer.json_messages() == [{"type": "time", "t0": 12345.5, "server_us": 1_001_250_000}]
    for _ in range(TIME_BURST):
        viewer.send(text_frame({"type": "time", "t0": 1}))
    assert len(viewer.json_messages()) == TIME_BURST - 1
    viewer.send(text_frame({"type": "time", "t0": "x"}))
    relay.clock.advance(TIME_INTERVAL_SECONDS)
    viewer.send(text_frame({"type": "time"}))
    assert viewer.json_messages() == []
    assert not viewer.closing


def test_reports_reach_the_listing_and_the_publisher() -> None:
    """A counted report shows in /api/streams at once; the publisher gets the same
    summary within 5 s, every 5 s while there are reports, and once more with none."""
    relay, publisher, viewer = setup()
    viewer.send(text_frame(GOOD))
    summary = viewer_reports(relay)
    assert summary["reports"] == 1
    assert summary["latency_ms"] == {"p50": 180.5, "p95": 180.5}
    relay.clock.advance(VIEWER_REPORT_INTERVAL)
    sent = publisher.json_messages()
    assert sent == [{"type": "viewer-report", **summary}]
    relay.clock.advance(VIEWER_REPORT_INTERVAL)
    assert [m["reports"] for m in publisher.json_messages()] == [1]
    last = []
    for second in range(int(WINDOW_SECONDS + 3 * VIEWER_REPORT_INTERVAL)):
        # Both stay alive meanwhile: media from the publisher, pings from the viewer.
        publisher.send(binary_frame(encode_media(0, 2 + second, b"\x00\x00\x00\x01\x41")))
        viewer.send(client_frame(OP_PING, b""))
        relay.clock.advance(1.0)
        last += [m for m in publisher.json_messages() if m["type"] == "viewer-report"]
    # One summary per interval until the report aged out, one with none, then silence.
    assert [m["reports"] for m in last][-2:] == [1, 0]
    # The report came at t=1: the summaries of t=6, 11, ... 61 carry it (two read above),
    # the one of t=66 is the last.
    assert len(last) == WINDOW_SECONDS // VIEWER_REPORT_INTERVAL - 2 + 1
    assert not viewer.closing and not publisher.closing


def test_invalid_and_too_frequent_reports_are_ignored_without_closing() -> None:
    """A bad member: ignored and counted as invalid; a second valid report within 2 s:
    not counted; the viewer stays connected."""
    relay, _publisher, viewer = setup()
    viewer.send(text_frame({**GOOD, "fps": "fast"}))
    viewer.send(text_frame('{"type": "report", "fps": 1e999}'))
    assert viewer_reports(relay)["reports"] == 0
    viewer.send(text_frame(GOOD))
    viewer.send(text_frame(GOOD))
    assert viewer_reports(relay)["reports"] == 1
    relay.clock.advance(REPORT_MIN_INTERVAL_SECONDS)
    viewer.send(text_frame(GOOD))
    assert viewer_reports(relay)["reports"] == 2
    assert relay.context.registry.streams["cam"].reports.invalid == 2
    assert not viewer.closing


def test_publishers_that_never_asked_for_them_only_get_text() -> None:
    """The summary is a text message of a new type: a v1 publisher's ``json_messages``
    see only objects with a ``type``, never binary."""
    relay, publisher, viewer = setup()
    viewer.send(text_frame(GOOD))
    relay.clock.advance(VIEWER_REPORT_INTERVAL)
    assert [m.kind for m in publisher.messages()] == ["text"]


def test_a_new_publisher_starts_with_no_reports() -> None:
    """A takeover forgets the previous publisher's viewer reports."""
    relay, _publisher, viewer = setup()
    viewer.send(text_frame(GOOD))
    relay.publisher()
    assert viewer_reports(relay)["reports"] == 0


def test_per_stream_metrics_export_the_reported_latency() -> None:
    """With --stream-metrics, /metrics has the last minute's p50/p95 in seconds and the
    reports counted, per live stream."""
    relay = Relay.with_options(stream_metrics=True)
    publisher = relay.publisher()
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"\x00\x00\x00\x01\x65")))
    viewer = relay.viewer()
    viewer.send(text_frame(GOOD))
    body = relay.connect().request("GET", "/metrics", {"Host": "relay.test"}).body.decode()
    assert 'streamrelay_stream_viewer_latency_seconds{quantile="0.5",stream="cam"} 0.1805' in body
    assert 'streamrelay_stream_viewer_reports_total{stream="cam"} 1.0' in body


# -- relay to relay ---------------------------------------------------------------------------


def test_an_edge_passes_its_viewers_reports_upstream_to_the_publishers_relay() -> None:
    """A viewer of an edge reports: the edge sums it up itself and passes it on, so the
    origin's /api/streams and its publisher's ``viewer-report`` count it too; the edge's
    viewers never see the ``reports`` message."""
    from tests.support.relay_links import Network
    from tests.test_upstream import ORIGIN, seen, tick_answering

    net = Network()
    origin = net.relay(ORIGIN)
    publisher = origin.publisher("cam")
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"\x00\x00\x00\x01\x65")))
    net.flush()
    edge, _manager = net.edge("edge:8080", ORIGIN)
    viewer = edge.viewer("cam")
    net.flush()
    viewer.send(text_frame(GOOD))
    assert viewer_reports(edge)["reports"] == 1
    assert viewer_reports(origin)["reports"] == 0
    tick_answering(net, VIEWER_REPORT_INTERVAL + 0.5, viewer, publisher)
    at_origin = viewer_reports(origin)
    assert at_origin["reports"] == 1
    assert at_origin["latency_ms"] == {"p50": 180.5, "p95": 180.5}
    tick_answering(net, VIEWER_REPORT_INTERVAL, viewer, publisher)
    heard = [m for m in publisher.json_messages() if m["type"] == "viewer-report"]
    assert heard and heard[-1]["reports"] == 1 and heard[-1]["stalls"] == 1
    assert "reports" not in seen(viewer)
    # Passed on once, not again at every interval.
    tick_answering(net, 2 * VIEWER_REPORT_INTERVAL, viewer, publisher)
    assert viewer_reports(origin)["reports"] == 1


def test_forwarded_reports_are_validated_row_by_row_and_rate_limited() -> None:
    """An edge's ``reports``: bad rows are skipped (counted invalid), more than 100 rows
    or no list is ignored as a whole, and one message per 2 s is counted."""
    from streamrelay.reports import MAX_FORWARDED, parse_forwarded

    good = [180.5, 30, 0, 0]
    reports, invalid = parse_forwarded(
        {"reports": [good, [None, 25.0, 1, 0], [1, 2, 3], "x", [-5, 30, 0, 0], good]}
    )
    assert [r.latency_ms for r in reports] == [180.5, None, 180.5] and invalid == 3
    for bad in ({"reports": [good] * (MAX_FORWARDED + 1)}, {"reports": "x"}, {}):
        with pytest.raises(InvalidReport):
            parse_forwarded(bad)
    longest = {"type": "reports", "reports": [[599_999.9, 999.9, 999_999, 9_999]] * MAX_FORWARDED}
    assert len(encode_text(longest)) < 4096


def test_an_edge_connection_gets_one_reports_message_counted_per_interval() -> None:
    """Over /relay/: a valid ``reports`` message counts its rows; a second within 2 s is
    ignored; a malformed one is ignored without closing the edge."""
    from tests.test_upstream import SECRET, relay_token

    relay = Relay(config=RelayConfig(relay_secret=SECRET))
    publisher = relay.publisher()
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"\x00\x00\x00\x01\x65")))
    edge = relay.connect()
    bearer = {"Authorization": f"Bearer {relay_token('cam')}"}
    assert edge.upgrade("/relay/cam", bearer).status == 101
    rows = [[100.0, 30, 0, 0], [200.0, 30, 0, 1], [None, 0, 5, 1]]
    edge.send(text_frame({"type": "reports", "reports": rows}))
    edge.send(text_frame({"type": "reports", "reports": rows}))
    summary = viewer_reports(relay)
    assert summary["reports"] == 3 and summary["stalls"] == 2 and summary["dropped"] == 5
    relay.clock.advance(REPORT_MIN_INTERVAL_SECONDS)
    edge.send(text_frame({"type": "reports", "reports": {"not": "a list"}}))
    edge.send(text_frame({"type": "reports", "reports": rows[:1]}))
    assert viewer_reports(relay)["reports"] == 4
    assert not edge.closing


# -- adaptive viewers ---------------------------------------------------------------------------


def test_an_adaptive_viewers_reports_go_to_the_base_stream_on_any_rendition() -> None:
    """The publisher of a rendition set shows the base stream's summary: an adaptive
    viewer's reports are counted there, before and after it steps down a rendition, and
    never split onto the rendition it is on."""
    from tests.test_adaptive import Renditions, back_up

    renditions = Renditions()
    session, _viewer = renditions.watch()
    streams = renditions.core.registry.streams
    session.report(report(120.0))
    back_up(session, renditions, 2.0)
    renditions.frames(key=True)
    session.queue.resume_producing()
    assert session.stream.name != "cam"  # it stepped down
    renditions.core.clock.advance(REPORT_MIN_INTERVAL_SECONDS)
    session.report(report(240.0))
    assert streams["cam"].reports.summary()["reports"] == 2
    assert streams["cam"].reports.summary()["latency_ms"]["p95"] == 240.0
    assert streams[session.stream.name].reports.summary()["reports"] == 0
