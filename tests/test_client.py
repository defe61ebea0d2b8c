"""The Python viewer client (:mod:`streamrelay.client`) against the real relay site on a
``Clock``, connected in memory (:mod:`tests.support.relay_links`): what it reports, its token, its
reconnects with backoff, its pings, its stop."""

from __future__ import annotations

import pytest

from streamrelay.client import AUTH_RETRY_SECONDS, ClientSettings, ClientState, StreamClient
from streamrelay.roles import Role
from streamrelay.tokens import make_token
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, encode_media
from streamrelay.wsclient.backoff import Backoff
from tests.fakes import Peer, Relay, captured_log
from tests.support.frames import OP_PONG, binary_frame, client_frame, text_frame
from tests.support.relay_links import Network, Recorder, watcher

URL = "ws://origin:8080/watch/cam"


def send(publisher: Peer, flags: int, tag: int, size: int = 60) -> bytes:
    """Publish one media message tagged ``tag``; returns it as it travels."""
    data = encode_media(flags, tag, b"p" * size)
    publisher.send(binary_frame(data))
    return data


@pytest.fixture
def net() -> Network:
    """An empty in-memory network."""
    return Network()


def live(net: Network, **overrides: object) -> tuple[Relay, Peer]:
    """A relay at origin:8080 with a live ``cam`` (meta, CONFIG 1, KEY 2)."""
    relay = net.relay("origin:8080", **overrides)
    publisher = relay.publisher("cam")
    publisher.send(text_frame({"type": "meta", "codec": "avc1.42C01F", "fps": 30}))
    send(publisher, FLAG_CONFIG, 1)
    send(publisher, FLAG_KEY, 2)
    net.flush()
    return relay, publisher


def test_the_client_reports_status_meta_and_every_message_in_order(net: Network) -> None:
    """A user watching from Python gets the open, the status, the meta (raw and parsed),
    then every media message byte for byte in the publisher's order, and counts them."""
    _relay, publisher = live(net)
    client, recorder = watcher(net, URL)
    sent = [send(publisher, 0, tag, size=tag * 10) for tag in range(3, 50)]
    net.flush()
    assert recorder.kinds()[:5] == ["opened", "live", "meta", "C", "K"]
    media = [event[1] for event in recorder.events if event[0] == "media"]
    assert [message.data for message in media[2:]] == sent
    assert recorder.events[2] == ("meta", {"type": "meta", "codec": "avc1.42C01F", "fps": 30})
    assert client.stats.messages == 49 and client.stats.keyframes == 1
    assert client.stats.bytes == sum(len(message.data) for message in media)
    assert client.state is ClientState.OPEN and client.live


def test_status_changes_are_reported(net: Network) -> None:
    """A publisher leaving and another coming: offline, then live again."""
    relay, publisher = live(net)
    _client, recorder = watcher(net, URL)
    publisher.lose()
    net.flush()
    relay.publisher("cam")
    net.flush()
    statuses = [event[1] for event in recorder.events if event[0] == "status"]
    assert statuses == [True, False, True]


def test_a_keyframe_request_reaches_the_publisher(net: Network) -> None:
    """``request_keyframe`` travels to the publisher (through the relay's throttle)."""
    _relay, publisher = live(net)
    client, _recorder = watcher(net, URL)
    net.tick(2.0)
    publisher.json_messages()
    assert client.request_keyframe() is True
    net.flush()
    assert {"type": "keyframe-request"} in publisher.json_messages()


def test_drops_are_reported_before_the_resuming_messages(net: Network) -> None:
    """A client that cannot keep up hears ``dropped`` with the count, then the KEY."""
    relay, publisher = live(net, viewer_queue_bytes=2000)
    _client, recorder = watcher(net, URL)
    server = net.links_to("origin:8080")[0].server.upgraded
    server.transport_paused()
    for tag in range(3, 13):
        send(publisher, 0, tag, size=500)
    server.transport_resumed()
    send(publisher, FLAG_KEY, 13)
    net.flush()
    assert recorder.kinds()[-2:] == ["dropped", "K"]
    assert recorder.events[-2][1] > 0


def test_the_token_goes_only_in_the_authorization_header(net: Network) -> None:
    """With a view secret the token opens the stream; it is sent as a Bearer header,
    never shown in the settings' repr, the display URL or the log."""
    net.relay("origin:8080", view_secret=b"view")
    token = make_token(b"view", Role.VIEWER, "cam", 4_000_000_000)
    with captured_log() as log:
        client, recorder = watcher(net, URL, token=token)
    assert client.state is ClientState.OPEN and recorder.kinds() == ["opened", "offline"]
    assert token not in repr(client.settings) and token not in client.display_url
    assert all(token not in repr(event) for event in log.events)


def test_a_refused_client_retries_with_backoff_and_a_fresh_token(net: Network) -> None:
    """A 401 is explained in ``last_error``; every attempt asks the token source anew
    and waits AUTH_RETRY_SECONDS (a wrong credential will not change soon) plus a
    backoff twice as long as the one before, up to the maximum."""
    relay = net.relay("origin:8080", view_secret=b"view")
    tokens: list[str] = []

    def source(url: str) -> str:
        tokens.append(url)
        return "1.bad" if len(tokens) < 4 else make_token(b"view", Role.VIEWER, "cam", 4 * 10**9)

    recorder = Recorder()
    client = StreamClient(
        ClientSettings(URL, retry_initial=0.1, retry_max=1.0),
        recorder,
        net.clock,
        endpoint_factory=net.endpoint,
        token_source=source,
        backoff=_fixed_backoff(),
    )
    client.start()
    net.flush()
    assert client.state is ClientState.WAITING and "401" in (client.last_error or "")
    net.tick(AUTH_RETRY_SECONDS + 0.05)
    assert len(tokens) == 1
    net.tick(0.1 + AUTH_RETRY_SECONDS + 0.2 + AUTH_RETRY_SECONDS + 0.35)
    assert len(tokens) == 3 and client.state is ClientState.WAITING
    net.tick(0.1)
    assert len(tokens) == 4 and client.state is ClientState.OPEN
    assert tokens == [URL] * 4
    assert relay.context.registry.viewer_count == 1


def _fixed_backoff() -> Backoff:
    """Delays at their ceilings: 0.1, 0.2, 0.4, ... up to 1 s."""
    return Backoff(0.1, 1.0, uniform=lambda: 1.0)


def test_a_refusal_with_retry_after_waits_at_least_that_long(net: Network) -> None:
    """503 with ``Retry-After: 10``: the next attempt comes after 10 s plus the jitter."""
    relay, _publisher = live(net, max_viewers_per_stream=1)
    relay.viewer("cam")
    client, _recorder = watcher(net, URL)
    assert client.state is ClientState.WAITING and "503" in (client.last_error or "")
    net.tick(10.0)
    assert net.connects["origin:8080"] == 1
    net.tick(0.2)
    assert net.connects["origin:8080"] == 2


def test_a_lost_relay_is_retried_and_each_url_taken_in_turn(net: Network) -> None:
    """The relay goes away: the listener hears ``closed``, and the client tries the next
    URL, then the first again, and so on until one answers."""
    live(net)
    backup_url = "ws://backup:8080/watch/cam"
    client, recorder = watcher(net, (URL, backup_url))  # type: ignore[arg-type]
    assert client.display_url == URL
    net.kill("origin:8080")
    assert recorder.kinds()[-1] == "closed" and client.state is ClientState.WAITING
    net.tick(0.15)
    assert net.connects == {"origin:8080": 1, "backup:8080": 1}
    net.relay("backup:8080").publisher("cam")
    net.tick(0.6)  # retries after 0.2 s (origin) and 0.4 s more (backup)
    assert client.state is ClientState.OPEN and client.display_url == backup_url
    assert net.connects == {"origin:8080": 2, "backup:8080": 2}
    assert recorder.kinds()[-1] == "live"


def test_a_silent_relay_is_dropped_by_the_pings(net: Network) -> None:
    """A path that goes dark after the open is dropped within ping interval + timeout,
    and the listener hears ``closed``."""
    live(net)
    client, recorder = watcher(net, URL, ping_interval=1.0, ping_timeout=2.0)
    (link,) = net.links_to("origin:8080")
    net.tick(0.5)
    link.dark = True
    net.tick(2.4)
    assert "closed" not in recorder.kinds()
    net.tick(0.2)
    assert recorder.kinds()[-1] == "closed" and client.state is not ClientState.OPEN


def test_a_relay_that_answers_pings_stays(net: Network) -> None:
    """The relay answers the client's pings: the connection outlives many intervals."""
    _relay, publisher = live(net, ping_interval=100.0)
    client, recorder = watcher(net, URL, ping_interval=1.0, ping_timeout=1.0)
    for _ in range(20):
        publisher.send(client_frame(OP_PONG))
        net.tick(0.5)
    assert client.state is ClientState.OPEN and "closed" not in recorder.kinds()


def test_a_handshake_that_never_completes_is_abandoned_at_the_open_timeout(
    net: Network,
) -> None:
    """A relay that accepts TCP but never answers the handshake is given up on after
    ``open_timeout``, then tried again."""
    live(net)
    recorder = Recorder()
    client = StreamClient(
        ClientSettings(URL, open_timeout=3.0, retry_initial=0.1, retry_max=1.0),
        recorder,
        net.clock,
        endpoint_factory=net.endpoint,
        backoff=_fixed_backoff(),
    )
    client.start()
    net.links[0].dark = True
    net.tick(2.9)
    assert client.state is ClientState.CONNECTING
    net.tick(0.2)
    assert client.state is ClientState.WAITING and net.connects["origin:8080"] == 1
    net.tick(0.2)
    assert client.state is ClientState.OPEN and recorder.kinds()[:2] == ["opened", "live"]


def test_stop_closes_with_1000_and_never_reconnects(net: Network) -> None:
    """``stop`` sends a 1000 close; its Deferred fires once the connection is gone, and
    no attempt follows."""
    relay, _publisher = live(net)
    client, _recorder = watcher(net, URL)
    stopped = client.stop("bye")
    net.tick(5.0)
    assert stopped.called and client.state is ClientState.STOPPED
    assert net.connects["origin:8080"] == 1 and relay.context.registry.viewer_count == 0


def test_stop_while_waiting_or_idle_fires_at_once(net: Network) -> None:
    """A client between attempts, or never started, stops at once."""
    waiting, _ = watcher(net, URL)
    assert waiting.state is ClientState.WAITING
    assert waiting.stop().called and waiting.state is ClientState.STOPPED
    net.tick(5.0)
    assert net.connects["origin:8080"] == 1
    idle = StreamClient(ClientSettings(URL), Recorder(), net.clock)
    assert idle.stop().called


def test_broken_media_from_the_relay_closes_with_1007(net: Network) -> None:
    """A binary message that breaks v1 (here both KEY and CONFIG) closes the connection
    with 1007; other text types reach ``text``."""
    live(net)
    client, recorder = watcher(net, URL)
    session = client.session
    assert session is not None
    client.message_received(session, b'{"type":"later","x":1}', False)
    assert recorder.events[-1] == ("text", {"type": "later", "x": 1})
    client.message_received(session, b"\x03" + bytes(8), True)
    net.flush()
    assert recorder.kinds()[-1] == "closed" and "1007" in (client.last_error or "")


@pytest.mark.parametrize(
    "keywords",
    [
        {"url": ()},
        {"url": "http://x/watch/a", "retry_initial": 0},
        {"url": "http://x/watch/a", "retry_initial": 2, "retry_max": 1},
        {"url": "http://x/watch/a", "token": "a\nb"},
        {"url": "ftp://x/watch/a"},
    ],
)
def test_bad_settings_are_refused(keywords: dict[str, object]) -> None:
    """No URL, a bad retry range, a multi-line token or a non-WebSocket URL."""
    with pytest.raises(ValueError):
        ClientSettings(**keywords)  # type: ignore[arg-type]


def test_retries_are_logged_once_per_reason_with_a_count(net: Network) -> None:
    """A dead relay retried for seconds logs one retry line, not one per attempt; the
    count of failed attempts is kept and logged when the client is watching again."""
    with captured_log() as log:
        client, _recorder = watcher(net, URL)
        net.tick(5.0)
        retries = [e for e in log.events if "retrying" in e.get("log_format", "")]
        assert len(retries) == 1 and client.failures >= 5
        failures = client.failures
        net.relay("origin:8080")
        net.tick(1.1)
    assert client.state is ClientState.OPEN and client.failures == 0
    watching = [e for e in log.events if "watching" in e.get("log_format", "")]
    assert watching[-1]["failures"] >= failures


def test_an_attempt_that_cannot_be_prepared_is_logged_and_retried(net: Network) -> None:
    """A URL source or token source raising inside the retry timer leaves the client
    waiting for its next attempt (not stuck connecting), with the failure logged."""
    net.relay("origin:8080")
    calls: list[str] = []

    def urls() -> str:
        calls.append("url")
        if len(calls) == 2:
            raise ValueError("directory unreachable")
        return URL

    client = StreamClient(
        ClientSettings(URL, retry_initial=0.1, retry_max=1.0),
        Recorder(),
        net.clock,
        endpoint_factory=net.endpoint,
        backoff=_fixed_backoff(),
        next_url=urls,
    )
    client.start()
    net.flush()
    assert client.state is ClientState.OPEN
    with captured_log() as log:
        net.kill("origin:8080")
        net.tick(0.15)
        assert client.state is ClientState.WAITING
        assert "cannot prepare" in (client.last_error or "")
        assert any("log_failure" in event for event in log.events)
        net.relay("origin:8080")
        net.tick(0.3)
    assert client.state is ClientState.OPEN and len(calls) == 3
