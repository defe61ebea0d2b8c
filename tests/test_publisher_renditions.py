"""Rendition sets, publisher side: the ``--renditions`` parser, the stream naming, the
announcement in ``meta``, and :class:`RenditionPublisher` (one connection per rendition,
summed viewers, keyframe requests from any connection) against in-memory relays."""

from __future__ import annotations

from typing import Any

import pytest

from streamrelay.publisher.arguments import parse_arguments
from streamrelay.publisher.client import ConnectionState, Readiness
from streamrelay.publisher.ondemand import Activity
from streamrelay.publisher.rendition_publisher import RenditionPublisher
from streamrelay.publisher.renditions import (
    Rendition,
    RenditionError,
    RenditionSet,
    announcement,
    base_stream_name,
    parse_renditions,
    rendition_meta,
    rendition_stream_name,
    rendition_url,
)
from streamrelay.publisher.settings import PublisherSettings
from streamrelay.wsclient.backoff import Backoff
from tests.test_publisher_client import FakeRelay, ThreadedMemoryReactor

THREE = "1280x720@2500k,640x360@800k,320x180@250k"


def test_parses_sizes_bitrates_and_derives_labels_from_the_height() -> None:
    """Each item is WxH@BITRATE; the label defaults to the height plus 'p'."""
    assert parse_renditions(THREE) == (
        Rendition("720p", 1280, 720, 2_500_000),
        Rendition("360p", 640, 360, 800_000),
        Rendition("180p", 320, 180, 250_000),
    )


def test_explicit_labels_spaces_and_order_highest_bitrate_first() -> None:
    """LABEL= names a rendition; whatever the order given, the highest bitrate comes first
    (it becomes the base stream)."""
    assert parse_renditions(" low=320x180@250k , 640x360@0.8M,hd=1280x720@2500000 ") == (
        Rendition("hd", 1280, 720, 2_500_000),
        Rendition("360p", 640, 360, 800_000),
        Rendition("low", 320, 180, 250_000),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "comma-separated list"),
        ("640x360@800k,", "comma-separated list"),
        ("640x360", "[LABEL=]WIDTHxHEIGHT@BITRATE"),
        ("640x361@800k", "even"),
        ("64x36@800k", "between 96x64"),
        ("640x360@fast", "bitrate"),
        ("640x360@10k", "between 50k"),
        ("bad label=640x360@800k", "a label is"),
        ("-x=640x360@800k", "a label is"),
        ("abcdefghijklmnopq=640x360@800k", "a label is"),
        ("640x360@800k,480x360@600k", "'360p' is used twice"),
        (",".join(["640x360@800k"] * 9), "at most 8"),
    ],
)
def test_bad_lists_are_refused_with_the_reason(text: str, reason: str) -> None:
    """Every malformed list is refused with a message naming what is wrong."""
    with pytest.raises(RenditionError) as refusal:
        parse_renditions(text)
    assert reason in str(refusal.value)


def test_the_naming_convention_lives_in_one_function() -> None:
    """The top rendition is the base stream itself, each other BASE~LABEL; URLs keep the
    host, path prefix and query (a token), and change only the stream."""
    assert rendition_stream_name("cam", None) == "cam"
    assert rendition_stream_name("cam", "360p") == "cam~360p"
    renditions = RenditionSet("cam", parse_renditions(THREE))
    assert renditions.streams() == ["cam", "cam~360p", "cam~180p"]
    assert (
        rendition_url("wss://relay.test:8443/prefix/publish/cam?token=abc", "cam~360p")
        == "wss://relay.test:8443/prefix/publish/cam~360p?token=abc"
    )
    assert base_stream_name("ws://relay/publish/cam/") == "cam"
    with pytest.raises(RenditionError, match="must not contain"):
        base_stream_name("ws://relay/publish/cam~360p")
    with pytest.raises(RenditionError, match="names no stream"):
        base_stream_name("ws://relay/")


def test_meta_announces_the_whole_set_and_the_rendition_itself() -> None:
    """Every rendition's meta carries its own label and bitrate and the whole set, highest
    bitrate first, with each rendition's stream, size, bitrate and codec."""
    renditions = RenditionSet("cam", parse_renditions(THREE))
    codecs: dict[str, str | None] = {"720p": "avc1.42C01F", "360p": "avc1.42C01E", "180p": None}
    base = {"type": "meta", "codec": "avc1.42C01E", "width": 640, "height": 360, "fps": 30}
    meta = rendition_meta(base, renditions.renditions[1], renditions, codecs)
    assert meta["rendition"] == "360p"
    assert meta["bitrate"] == 800_000
    assert (meta["codec"], meta["width"], meta["height"], meta["fps"]) == (
        "avc1.42C01E",
        640,
        360,
        30,
    )
    assert meta["renditions"] == announcement(renditions, codecs)
    assert meta["renditions"] == [
        {
            "name": "720p",
            "stream": "cam",
            "width": 1280,
            "height": 720,
            "bitrate": 2_500_000,
            "codec": "avc1.42C01F",
        },
        {
            "name": "360p",
            "stream": "cam~360p",
            "width": 640,
            "height": 360,
            "bitrate": 800_000,
            "codec": "avc1.42C01E",
        },
        {"name": "180p", "stream": "cam~180p", "width": 320, "height": 180, "bitrate": 250_000},
    ]


def make_group(
    relay: FakeRelay,
    reactor: ThreadedMemoryReactor,
    url: str = "ws://relay.test/publish/cam",
    **settings: Any,
) -> RenditionPublisher:
    """A RenditionPublisher of the three-rendition set on in-memory relays."""
    return RenditionPublisher(
        PublisherSettings(
            url, token="t0ken", ping_interval=0, ping_timeout=0, open_timeout=0, **settings
        ),
        parse_renditions(THREE),
        reactor=reactor,
        queue_bounds=lambda bitrate: (bitrate // 16, bitrate // 4),
        backoff_factory=lambda: Backoff(uniform=lambda: 1.0),
        endpoint_factory=relay.endpoint,
    )


def test_one_connection_per_rendition_each_to_its_own_stream() -> None:
    """start() opens one connection per rendition, each to its stream's URL with the same
    token, each outbox sized for its own bitrate."""
    relay, reactor = FakeRelay(), ThreadedMemoryReactor()
    group = make_group(relay, reactor)
    group.start()
    for connection in relay.connections:
        connection.accept()
    assert [c.request_line for c in relay.connections] == [
        "GET /publish/cam HTTP/1.1",
        "GET /publish/cam~360p HTTP/1.1",
        "GET /publish/cam~180p HTTP/1.1",
    ]
    assert all(c.headers["authorization"] == "Bearer t0ken" for c in relay.connections)
    assert [p.settings.queue_limit_bytes for p in group.publishers] == [625_000, 200_000, 62_500]
    assert group.connected and group.state is ConnectionState.LIVE
    assert group.publisher("360p") is group.publishers[1]


def test_viewers_are_summed_over_the_renditions() -> None:
    """The count the publisher acts on is the sum over its connections, reported on every
    change; a connection that has not reported yet counts for nothing."""
    relay, reactor = FakeRelay(), ThreadedMemoryReactor()
    group = make_group(relay, reactor)
    reported: list[int] = []
    group.on_viewers = reported.append
    group.start()
    for connection in relay.connections:
        connection.accept()
    assert group.viewers is None
    relay.connections[1].send_text({"type": "viewers", "count": 2})
    relay.connections[0].send_text({"type": "viewers", "count": 3})
    relay.connections[2].send_text({"type": "viewers", "count": 1})
    relay.connections[1].send_text({"type": "viewers", "count": 0})
    assert reported == [2, 5, 6, 4]
    assert group.viewers == 4


def test_a_keyframe_request_on_any_connection_reaches_the_set_once() -> None:
    """A relay's keyframe-request on any rendition's connection calls the set's
    on_keyframe_request (which forces a keyframe in all renditions)."""
    relay, reactor = FakeRelay(), ThreadedMemoryReactor()
    group = make_group(relay, reactor)
    requests: list[str] = []
    group.on_keyframe_request = lambda: requests.append("key")
    group.start()
    for connection in relay.connections:
        connection.accept()
    assert len(requests) == 3  # every new connection asks for a KEY to start from
    requests.clear()
    relay.connections[2].send_text({"type": "keyframe-request"})
    assert requests == ["key"]
    assert group.stats.keyframe_requests == 1


def test_one_stream_taken_over_stops_the_whole_set() -> None:
    """When a newer publisher takes one rendition's stream (4409), the other connections
    close too and when_stopped fires with the reason."""
    relay, reactor = FakeRelay(), ThreadedMemoryReactor()
    group = make_group(relay, reactor)
    stopped: list[str] = []
    group.when_stopped().addCallback(stopped.append)
    group.start()
    for connection in relay.connections:
        connection.accept()
    relay.connections[1].close(4409, "replaced")
    for connection in (relay.connections[0], relay.connections[2]):
        connection.close(1000)
    assert all(p.state is ConnectionState.STOPPED for p in group.publishers)
    assert stopped and "replaced" in stopped[0]


def test_the_command_line_takes_a_rendition_list() -> None:
    """--renditions gives the set; the source is captured at the top rendition's size and
    the options record its bitrate."""
    options = parse_arguments(["ws://relay/publish/cam", "--renditions", THREE])
    assert options.renditions == parse_renditions(THREE)
    assert (options.width, options.height, options.bitrate) == (1280, 720, 2_500_000)
    assert parse_arguments(["ws://relay/publish/cam"]).renditions == ()


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--renditions", "640x360"], "argument --renditions: '640x360': expected"),
        (["--renditions", "640x360@800k,480x360@500k"], "is used twice"),
        (["--renditions", THREE, "--size", "640x360"], "drop --size and --bitrate"),
        (["--renditions", THREE, "--bitrate", "1M"], "drop --size and --bitrate"),
    ],
)
def test_bad_rendition_options_are_usage_errors(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --renditions value, or one combined with --size/--bitrate, exits with status
    2 and a message naming the option and the problem."""
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["ws://relay/publish/cam", *argv])
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err


def test_a_base_name_with_the_separator_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The URL's stream is the base name: it may not itself hold '~'."""
    with pytest.raises(SystemExit):
        parse_arguments(["ws://relay/publish/cam~hd", "--renditions", THREE])
    assert "must not contain '~'" in capsys.readouterr().err


def test_on_demand_decides_once_for_the_whole_set() -> None:
    """``on_demand`` with renditions: one decision fed the summed audience. Nobody on any
    rendition for the grace: every connection says ``idle`` (the capture thread, which
    follows the top one, stops); one viewer on the lowest rendition wakes all of them
    (an ABR viewer may step to any), and each asks for a keyframe."""
    relay, reactor = FakeRelay(), ThreadedMemoryReactor()
    group = make_group(relay, reactor, on_demand=True, on_demand_grace=2)
    requests: list[str] = []
    group.on_keyframe_request = lambda: requests.append("key")
    group.start()
    for connection in relay.connections:
        connection.accept()
    for connection in relay.connections:
        connection.send_text({"type": "viewers", "count": 0})
    assert all(p.on_demand is None for p in group.publishers)
    reactor.advance(1)
    assert group.activity is Activity.ACTIVE
    reactor.advance(1.5)
    assert group.activity is Activity.IDLE and group.readiness is Readiness.IDLE
    for connection in relay.connections:
        assert {"type": "publisher-state", "state": "idle"} in connection.messages()
    requests.clear()
    relay.connections[2].send_text({"type": "viewers", "count": 1})
    assert all(p.activity is Activity.ACTIVE for p in group.publishers)
    assert group.readiness is Readiness.READY and requests
    assert group.on_demand is not None and group.on_demand.idle_periods == 1


def test_renditions_with_another_codec_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--renditions`` encodes H.264: with ``--codec vp9`` the command line says so."""
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["ws://relay/publish/cam", "--renditions", THREE, "--codec", "vp9"])
    assert exit_info.value.code == 2
    assert "H.264 only" in capsys.readouterr().err

