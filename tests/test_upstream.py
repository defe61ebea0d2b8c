"""Relay to relay without sockets: origin and edge relays (the real site, gate and
protocols) on one ``Clock``, their pulls carried in memory by
:mod:`tests.support.relay_links`.
The pull manager's rules: one pull per stream, started by the first local viewer, ended
a grace period after the last, a cap, no pull for a refused viewer; the pulled stream
behaves as a local one; signals travel upstream; failures leave viewers connected."""

from __future__ import annotations

import time
from typing import Any

import pytest

from streamrelay.config import RelayConfig
from streamrelay.roles import Role
from streamrelay.tokens import make_token
from streamrelay.upstream import (
    PARK_SECONDS,
    PROBE_SECONDS,
    RETRY_MAX_SECONDS,
    TemplateLocator,
    UpstreamManager,
)
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, encode_media, parse_media
from tests.fakes import Peer, Relay
from tests.support.frames import OP_PONG, binary_frame, client_frame, text_frame
from tests.support.relay_links import SECRET, Network

ORIGIN = "origin:8080"
EDGE = "edge:8080"


def send(publisher: Peer, flags: int, tag: int, size: int = 60) -> None:
    """One media message whose capture time is ``tag``."""
    publisher.send(binary_frame(encode_media(flags, tag, b"m" * size)))


def gop(publisher: Peer, first: int, deltas: int = 2, config: bool = False) -> None:
    """(CONFIG,) KEY and deltas, tagged from ``first`` on."""
    tag = first
    if config:
        send(publisher, FLAG_CONFIG, tag)
        tag += 1
    send(publisher, FLAG_KEY, tag)
    for index in range(deltas):
        send(publisher, 0, tag + 1 + index)


def seen(peer: Peer) -> list[str]:
    """What a viewer got since last asked: ``live``, ``offline``, ``meta``,
    ``dropped:N``, media as ``C7``, ``K8``, ``d9`` (kind and capture time)."""
    shown = []
    for message in peer.messages(("text", "binary")):
        if message.kind == "binary":
            media = parse_media(message.payload)
            kind = "K" if media.is_key else "C" if media.is_config else "d"
            shown.append(f"{kind}{media.capture_time_us}")
        else:
            value = message.json
            if value["type"] == "status":
                shown.append(value["state"])
            elif value["type"] == "dropped":
                shown.append(f"dropped:{value['messages']}")
            else:
                shown.append(value["type"])
    return shown


def tick_answering(net: Network, seconds: float, *peers: Peer) -> None:
    """Let time pass while ``peers`` show signs of life (a pong every 0.25 s), as real
    viewers answering pings do."""
    for _ in range(round(seconds / 0.25)):
        for peer in peers:
            peer.send(client_frame(OP_PONG))
        net.tick(0.25)


def counts(publisher: Peer) -> list[int]:
    """The viewer counts the publisher heard since last asked."""
    return [m["count"] for m in publisher.json_messages() if m["type"] == "viewers"]


def relay_token(stream: str, role: Role = Role.RELAY, secret: bytes = SECRET) -> str:
    """A token as an edge mints it."""
    return make_token(secret, role, stream, int(time.time()) + 60)


@pytest.fixture
def net() -> Network:
    """An empty in-memory network."""
    return Network()


def live_origin(net: Network, **overrides: Any) -> tuple[Relay, Peer]:
    """An origin with a publisher of ``cam`` that sent meta, CONFIG 1, KEY 2, d 3, d 4."""
    origin = net.relay(ORIGIN, **overrides)
    publisher = origin.publisher("cam")
    publisher.send(text_frame({"type": "meta", "codec": "avc1.42C01F"}))
    gop(publisher, 1, config=True)
    net.flush()
    publisher.json_messages()
    return origin, publisher


# -- starting and sharing a pull --------------------------------------------------------------


def test_first_viewer_on_a_cold_edge_starts_one_pull_and_gets_the_origins_cache(
    net: Network,
) -> None:
    """The first viewer of a stream on an edge makes the edge pull it: the viewer sees
    offline, then live, meta, CONFIG and the origin's cached GOP, then live media."""
    _origin, publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN)
    viewer = edge.viewer("cam")
    net.flush()
    assert seen(viewer) == ["offline", "live", "meta", "C1", "K2", "d3", "d4"]
    send(publisher, 0, 5)
    net.flush()
    assert seen(viewer) == ["d5"]
    assert list(manager.pulls) == ["cam"] and manager.started == 1
    assert net.connects == {ORIGIN: 1}


def test_viewers_share_one_pull_and_late_joiners_start_from_the_edge_cache(
    net: Network,
) -> None:
    """A second viewer on the edge adds no upstream connection and starts from the edge's
    own cache at once."""
    _origin, publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN)
    edge.viewer("cam")
    net.flush()
    send(publisher, 0, 5)
    net.flush()
    late = edge.viewer("cam")
    net.flush()
    assert seen(late) == ["live", "meta", "C1", "K2", "d3", "d4", "d5"]
    assert manager.started == 1 and net.connects == {ORIGIN: 1}
    assert len(net.links_to(ORIGIN)) == 1


def test_the_publisher_hears_the_total_audience(net: Network) -> None:
    """The origin's publisher hears its local viewers plus every edge's, not the edges'
    own connections; a viewer leaving an edge lowers the total."""
    origin, publisher = live_origin(net)
    origin.viewer("cam")
    edge_a, _ = net.edge("a:8080", ORIGIN)
    edge_b, _ = net.edge("b:8080", ORIGIN)
    viewers = [edge_a.viewer("cam"), edge_a.viewer("cam"), edge_b.viewer("cam")]
    net.tick(1.0)
    assert counts(publisher)[-1] == 4
    viewers[0].lose()
    net.tick(1.0)
    assert counts(publisher)[-1] == 3
    entry = origin.context.registry.describe(True)[0]
    assert (entry["viewers"], entry["relays"], entry["audience"]) == (1, 2, 3)


def test_a_keyframe_request_the_edge_cannot_serve_reaches_the_publisher(net: Network) -> None:
    """An edge without a GOP cache cannot start a joiner: its request goes upstream and
    reaches the publisher; a viewer's own request does too, still throttled."""
    _origin, publisher = live_origin(net, keyframe_request_interval=1.0)
    edge, _ = net.edge(EDGE, ORIGIN, gop_cache_bytes=0)
    edge.viewer("cam")
    net.tick(1.5)
    first = edge.viewer("cam")
    net.flush()
    assert {"type": "keyframe-request"} in publisher.json_messages()
    net.tick(1.5)
    first.send(text_frame({"type": "keyframe-request"}))
    first.send(text_frame({"type": "keyframe-request"}))
    net.flush()
    requests = [m for m in publisher.json_messages() if m["type"] == "keyframe-request"]
    assert len(requests) == 1


# -- lifetime ----------------------------------------------------------------------------------


def test_the_pull_ends_a_grace_period_after_the_last_viewer(net: Network) -> None:
    """The last viewer leaves: the pull lives on through the grace period (the stream and
    its cache too), then ends; the origin forgets the edge."""
    origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN, upstream_grace=3.0)
    viewer = edge.viewer("cam")
    net.flush()
    viewer.lose()
    net.tick(2.9)
    assert "cam" in manager.pulls and manager.pulls["cam"].in_grace
    assert edge.context.registry.describe(True)[0]["upstream"]["grace"] is True
    net.tick(0.2)
    assert manager.pulls == {}
    assert edge.context.registry.streams == {}
    assert net.links_to(ORIGIN) == []
    assert origin.context.registry.describe(True)[0]["relays"] == 0


def test_a_viewer_back_within_the_grace_reuses_the_pull(net: Network) -> None:
    """A viewer returning inside the grace gets the edge's cache at once, and no new
    upstream connection is made."""
    _origin, publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN, upstream_grace=3.0)
    edge.viewer("cam").lose()
    net.tick(2.0)
    send(publisher, 0, 5)
    back = edge.viewer("cam")
    net.tick(5.0)
    assert seen(back) == ["live", "meta", "C1", "K2", "d3", "d4", "d5"]
    assert manager.started == 1 and net.connects == {ORIGIN: 1}
    assert not manager.pulls["cam"].in_grace


def test_a_viewer_back_within_the_grace_of_an_offline_stream_reuses_the_pull(
    net: Network,
) -> None:
    """With the stream offline upstream the edge forgets the stream when its viewer
    leaves, but the pull stays for the grace; a viewer back in time reuses it and sees the
    stream go live."""
    origin = net.relay(ORIGIN)
    edge, manager = net.edge(EDGE, ORIGIN, upstream_grace=3.0)
    edge.viewer("cam").lose()
    net.tick(1.0)
    assert edge.context.registry.streams == {} and "cam" in manager.pulls
    back = edge.viewer("cam")
    publisher = origin.publisher("cam")
    gop(publisher, 1, config=True)
    net.tick(4.0)
    assert seen(back) == ["offline", "live", "C1", "K2", "d3", "d4"]
    assert net.connects == {ORIGIN: 1}


# -- failures ---------------------------------------------------------------------------------


def test_origin_death_leaves_viewers_connected_offline_then_live_again(net: Network) -> None:
    """The origin dies: edge viewers see offline and stay; the edge retries with backoff,
    and once a new origin has the stream they continue from its CONFIG and KEY."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN)
    viewer = edge.viewer("cam")
    net.flush()
    seen(viewer)
    net.kill(ORIGIN)
    assert seen(viewer) == ["offline"]
    net.tick(3.0)
    assert not viewer.closing and manager.pulls["cam"].client.stats.connects == 1
    revived = net.relay(ORIGIN)
    publisher = revived.publisher("cam")
    gop(publisher, 10, config=True)
    net.tick(RETRY_MAX_SECONDS + 0.1)
    assert seen(viewer) == ["live", "C10", "K11", "d12", "d13"]
    assert not viewer.closing and manager.reconnects == 1


def test_an_upstream_gap_reaches_edge_viewers_as_dropped_then_config_then_key(
    net: Network,
) -> None:
    """The origin drops whole GOPs towards a slow edge (its relay queue is full): edge
    viewers see ``dropped`` with the origin's count, the new CONFIG, then the KEY, and a
    late joiner never starts inside the gap."""
    origin, publisher = live_origin(net, relay_queue_bytes=3000)
    edge, _ = net.edge(EDGE, ORIGIN)
    viewer = edge.viewer("cam")
    net.flush()
    seen(viewer)
    (link,) = net.links_to(ORIGIN)
    edge_side = link.server.upgraded
    edge_side.transport_paused()
    for tag in range(10, 20):
        send(publisher, 0, tag, size=500)
    send(publisher, FLAG_CONFIG, 20)
    send(publisher, FLAG_KEY, 21)
    send(publisher, 0, 22)
    edge_side.transport_resumed()
    net.flush()
    received = seen(viewer)
    assert received[0].startswith("dropped:") and received[1:] == ["C20", "K21", "d22"]
    dropped = int(received[0].split(":")[1])
    assert dropped >= 5
    assert origin.context.registry.streams["cam"].dropped >= dropped


def test_a_black_holed_upstream_is_found_by_the_pings(net: Network) -> None:
    """A path that stops carrying anything (no close) is dropped by the edge's pings
    within interval + timeout: viewers see offline and stay; the origin drops its side by
    its own pings; the edge's next attempt, on a working path, serves the viewers again."""
    _origin, publisher = live_origin(net, ping_interval=1.0, ping_timeout=1.0)
    edge, manager = net.edge(EDGE, ORIGIN, ping_interval=1.0, ping_timeout=1.0)
    viewer = edge.viewer("cam")
    net.flush()
    seen(viewer)
    (link,) = net.links_to(ORIGIN)
    link.dark = True
    tick_answering(net, 1.75, viewer, publisher)
    assert seen(viewer) == []
    tick_answering(net, 0.25, viewer, publisher)
    assert link.client_io.disconnecting and link.server_io.disconnecting
    # The path was dark, not the origin: the next attempt (a new path) is served.
    tick_answering(net, RETRY_MAX_SECONDS, viewer, publisher)
    assert seen(viewer) == ["offline", "live", "meta", "C1", "K2", "d3", "d4"]
    assert not viewer.closing
    assert manager.pulls["cam"].client.stats.connects == 2


def test_each_upstream_is_tried_in_turn(net: Network) -> None:
    """With two upstreams, a refused first one leads to the second."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, f"down:1 {ORIGIN}")
    viewer = edge.viewer("cam")
    net.tick(0.5)
    assert seen(viewer)[-1] == "d4"
    assert net.connects == {"down:1": 1, ORIGIN: 1}


# -- limits -----------------------------------------------------------------------------------


def test_the_pull_cap_refuses_a_viewer_that_would_need_one_more(net: Network) -> None:
    """With ``--max-pulls 1`` and a live pull, a second stream's viewer gets 503 in its
    handshake and no pull; more viewers of the pulled stream are fine."""
    origin = net.relay(ORIGIN)
    gop(origin.publisher("a"), 1, config=True)
    edge, manager = net.edge(EDGE, ORIGIN, max_pulls=1)
    edge.viewer("a")
    net.flush()
    refused = edge.connect().upgrade("/watch/b")
    assert refused.status == 503 and b"pull limit" in refused.body
    edge.viewer("a")
    net.flush()
    assert list(manager.pulls) == ["a"] and manager.started == 1 and manager.refused == 1


def test_no_pull_for_an_invalid_name_or_a_refused_viewer(net: Network) -> None:
    """Invalid names (400) and viewers refused for their token (401) start nothing."""
    net.relay(ORIGIN)
    edge, manager = net.edge(EDGE, ORIGIN, view_secret=b"view-secret")
    assert edge.connect().upgrade("/watch/bad..name!").status == 400
    assert edge.connect().upgrade("/watch/cam").status == 401
    assert edge.connect().upgrade("/watch/cam?token=1.abc").status == 401
    net.flush()
    assert manager.started == 0 and net.connects == {}


def test_a_local_publisher_takes_over_and_the_pull_comes_back_when_it_leaves(
    net: Network,
) -> None:
    """A publisher on the edge wins over the pull (which ends, whatever --no-takeover
    says); when it leaves, the edge's viewers are served from upstream again."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN, takeover=False)
    viewer = edge.viewer("cam")
    net.flush()
    seen(viewer)
    local = edge.publisher("cam")
    gop(local, 100, config=True)
    net.flush()
    assert seen(viewer) == ["C100", "K101", "d102", "d103"]
    assert manager.pulls == {} and net.links_to(ORIGIN) == []
    assert edge.context.registry.describe(True)[0]["source"] == "publisher"
    local.lose()
    net.flush()
    assert seen(viewer) == ["offline", "live", "meta", "C1", "K2", "d3", "d4"]
    assert manager.started == 2


def test_the_pulled_stream_is_bounded_like_a_local_one(net: Network) -> None:
    """Edge viewers have the edge's own queue bound: a stalled one skips to the next KEY
    while another keeps everything."""
    _origin, publisher = live_origin(net)
    edge, _ = net.edge(EDGE, ORIGIN, viewer_queue_bytes=2000)
    slow = edge.viewer("cam")
    fast = edge.viewer("cam")
    net.flush()
    seen(slow), seen(fast)
    slow.protocol.transport_paused()
    for tag in range(10, 20):
        send(publisher, 0, tag, size=500)
    send(publisher, FLAG_KEY, 20)
    net.flush()
    slow.protocol.transport_resumed()
    assert seen(fast) == [f"d{tag}" for tag in range(10, 20)] + ["K20"]
    slow_seen = seen(slow)
    assert slow_seen[-2].startswith("dropped:") and slow_seen[-1] == "K20"


# -- chains and the relay endpoint ---------------------------------------------------------------


def test_a_chain_carries_media_counts_and_keyframe_requests(net: Network) -> None:
    """origin -> edge -> edge: the chained edge's viewer gets everything; the publisher
    hears viewers at every level; a keyframe request from the end of the chain reaches
    the publisher."""
    _origin, publisher = live_origin(net, keyframe_request_interval=0.5)
    middle, _ = net.edge("middle:8080", ORIGIN, gop_cache_bytes=0)
    end, _ = net.edge("end:8080", "middle:8080", gop_cache_bytes=0)
    middle.viewer("cam")
    net.tick(1.0)
    publisher.json_messages()
    viewer = end.viewer("cam")
    net.tick(1.0)
    assert {"type": "keyframe-request"} in publisher.json_messages()
    send(publisher, FLAG_KEY, 5)
    net.flush()
    assert seen(viewer) == ["offline", "live", "meta", "C1", "K5"]
    net.tick(1.0)
    end.viewer("cam")
    net.tick(1.0)
    assert counts(publisher)[-1] == 3
    viewer.send(text_frame({"type": "keyframe-request"}))
    net.tick(1.0)
    assert {"type": "keyframe-request"} in publisher.json_messages()


def test_the_relay_endpoint_needs_the_secret_and_a_relay_token() -> None:
    """Without --relay-secret-file /relay is refused (403); with it, a relay token for
    the stream opens it and a view token, a token for another stream or an Origin header
    does not."""
    closed = Relay()
    response = closed.connect().upgrade("/relay/cam", {"Authorization": "Bearer x"})
    assert response.status == 403
    relay = Relay(config=RelayConfig(relay_secret=SECRET))
    bearer = {"Authorization": f"Bearer {relay_token('cam')}"}
    assert relay.connect().upgrade("/relay/cam").status == 401
    view = {"Authorization": f"Bearer {relay_token('cam', Role.VIEWER)}"}
    assert relay.connect().upgrade("/relay/cam", view).status == 401
    other = {"Authorization": f"Bearer {relay_token('other')}"}
    assert relay.connect().upgrade("/relay/cam", other).status == 401
    browser = {**bearer, "Origin": "https://evil.example"}
    assert relay.connect().upgrade("/relay/cam", browser).status == 403
    peer = relay.connect()
    assert peer.upgrade("/relay/cam", bearer).status == 101
    assert peer.json_messages() == [{"type": "status", "state": "offline"}]


@pytest.mark.parametrize("count", [-1, 1.5, "3", True, None, 10**10])
def test_an_edge_reporting_a_bad_count_is_closed_with_1007(count: object) -> None:
    """``viewers`` from an edge must carry a whole number in range."""
    relay = Relay(config=RelayConfig(relay_secret=SECRET))
    peer = relay.connect()
    bearer = {"Authorization": f"Bearer {relay_token('cam')}"}
    assert peer.upgrade("/relay/cam", bearer).status == 101
    peer.send(text_frame({"type": "viewers", "count": count}))
    assert peer.close_codes() == [1007]


def test_stop_all_closes_every_pull(net: Network) -> None:
    """The relay stopping closes its pulls with 1000 and forgets them."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN)
    edge.viewer("cam")
    net.flush()
    stopped = manager.stop_all()
    net.flush()
    assert manager.pulls == {} and net.links_to(ORIGIN) == []
    assert stopped.called


def test_the_template_locator_fills_in_the_stream() -> None:
    """``{stream}`` is replaced in every template, in order."""
    locator = TemplateLocator(("ws://a/relay/{stream}", "wss://b:1/x/{stream}/y"))
    assert locator.urls("cam") == ("ws://a/relay/cam", "wss://b:1/x/cam/y")


def test_the_manager_needs_the_relay_secret() -> None:
    """No pull without the secret its tokens are signed with."""
    config = RelayConfig(upstream=("ws://a/relay/{stream}",))
    relay = Relay(config=config)
    with pytest.raises(ValueError):
        UpstreamManager(relay.context.registry, relay.clock, config)


def test_the_locator_is_asked_at_every_attempt(net: Network) -> None:
    """A locator whose answer changes (a directory learning the origin) is followed."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, "nowhere:1")
    answers = ["ws://nowhere:1/relay/{stream}"]
    manager.locator = _Changing(answers)
    viewer = edge.viewer("cam")
    net.tick(0.5)
    assert seen(viewer) == ["offline"] and net.connects == {"nowhere:1": 3}
    answers[0] = f"ws://{ORIGIN}/relay/{{stream}}"
    net.tick(1.0)
    assert seen(viewer)[-1] == "d4"


class _Changing:
    """A locator reading its one template from a list the test changes."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def urls(self, name: str) -> tuple[str, ...]:
        return (self.answers[0].replace("{stream}", name),)


def test_upstream_is_repeatable_and_needs_the_relay_secret(tmp_path: Any) -> None:
    """``--upstream`` given twice keeps both, in order (a base URL gets /relay/{stream});
    without ``--relay-secret-file`` it is a usage error naming that option."""
    from twisted.python import usage

    from streamrelay.tap import Options

    secret = tmp_path / "relay.key"
    secret.write_bytes(b"s3cret")
    options = Options()
    options.parseOptions(
        ["--upstream", "ws://a:1", "--upstream", "wss://b/x/{stream}", "--relay-secret-file",
         str(secret)]
    )
    config = options.config()
    assert config.upstream == ("ws://a:1/relay/{stream}", "wss://b/x/{stream}")
    assert config.relay_secret == b"s3cret" and "s3cret" not in repr(config)
    with pytest.raises(usage.UsageError, match="--relay-secret-file"):
        Options().parseOptions(["--upstream", "ws://a:1"])


def test_the_token_command_prints_relay_tokens(tmp_path: Any, capsys: Any) -> None:
    """``streamrelay-token relay NAME`` prints a token the relay endpoint accepts."""
    from streamrelay.token_cli import main
    from streamrelay.tokens import verify_token

    secret = tmp_path / "relay.key"
    secret.write_bytes(SECRET)
    assert main(["relay", "cam", "--secret-file", str(secret)]) == 0
    token = capsys.readouterr().out.strip()
    verify_token(SECRET, token, Role.RELAY, "cam", time.time())


def test_make_service_wires_the_pull_manager_only_with_an_upstream(tmp_path: Any) -> None:
    """``twistd streamrelay --upstream ...`` runs an upstream service whose manager is the
    registry's puller; without ``--upstream`` there is none."""
    from streamrelay.tap import Options, makeService
    from streamrelay.upstream import UpstreamService

    secret = tmp_path / "relay.key"
    secret.write_bytes(SECRET)
    common = ["--listen", "tcp:0:interface=127.0.0.1", "--relay-secret-file", str(secret)]
    options = Options()
    options.parseOptions([*common, "--upstream", "ws://origin:8080"])
    relay = makeService(options)
    (upstream,) = [child for child in relay if isinstance(child, UpstreamService)]
    assert relay.context.registry.puller is upstream.manager
    plain = Options()
    plain.parseOptions(common)
    relay = makeService(plain)
    assert not [child for child in relay if isinstance(child, UpstreamService)]
    assert relay.context.registry.puller is None


def test_a_stream_left_without_a_pull_at_the_cap_gets_the_next_free_place(
    net: Network,
) -> None:
    """At the cap, viewers a local publisher leaves behind cannot be pulled for; once
    another pull ends, their stream gets its place."""
    origin = net.relay(ORIGIN)
    for name in ("a", "b"):
        gop(origin.publisher(name), 1, config=True)
    edge, manager = net.edge(EDGE, ORIGIN, max_pulls=1, upstream_grace=1.0)
    local = edge.publisher("b")
    left_behind = edge.viewer("b")
    first = edge.viewer("a")
    net.flush()
    local.lose()
    net.flush()
    assert list(manager.pulls) == ["a"] and manager.refused == 1
    first.lose()
    net.tick(1.5)
    assert list(manager.pulls) == ["b"]
    assert seen(left_behind)[-5:] == ["live", "C1", "K2", "d3", "d4"]


def test_pulls_for_invented_names_never_lock_a_live_stream_out(net: Network) -> None:
    """The reviewer's scenario (issue 8): viewers from 4 addresses wait on 16 invented
    names each, what used to take all 64 pulls; a viewer of the live stream is still
    admitted and served.  Probes hold no place, at most a quarter of --max-pulls are
    open at once, and each told ``offline`` parks while others queue."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN)
    for address in range(4):
        for index in range(16):
            edge.viewer(f"nobody{address}x{index}", host=f"10.0.0.{address + 1}")
    assert manager.probes == manager.max_probes == 16 and len(manager.queued) == 48
    viewer = edge.viewer("cam")
    net.flush()
    assert seen(viewer) == ["offline", "live", "meta", "C1", "K2", "d3", "d4"]
    assert manager.places_taken == 1 and manager.refused == 0
    # The last probes, nobody queued behind them, wait out PROBE_SECONDS.
    assert manager.queued == {} and len(manager.parked) + manager.probes == 64
    assert len(net.links_to(ORIGIN)) == 1 + manager.probes <= 1 + manager.max_probes


def test_a_probe_that_finds_nothing_live_is_parked_then_probes_again(net: Network) -> None:
    """A pull never live upstream closes after the probe time (freeing the upstream's
    waiting slot) while its viewer stays; it probes again after the park time, and goes
    live when a publisher has come meanwhile."""
    origin = net.relay(ORIGIN)
    edge, manager = net.edge(EDGE, ORIGIN)
    viewer = edge.viewer("later")
    tick_answering(net, PROBE_SECONDS + 0.5, viewer)
    assert "later" not in manager.pulls and "later" in manager.parked
    assert net.links_to(ORIGIN) == [] and manager.parked_total == 1
    assert "later" not in origin.context.registry.streams
    gop(origin.publisher("later"), 1, config=True)
    tick_answering(net, PARK_SECONDS + 0.5, viewer)
    assert "later" in manager.pulls and manager.places_taken == 1
    assert seen(viewer)[-5:] == ["live", "C1", "K2", "d3", "d4"]


def test_the_last_viewer_leaving_forgets_a_parked_name(net: Network) -> None:
    """A parked name whose viewers all left is not probed again."""
    net.relay(ORIGIN)
    edge, manager = net.edge(EDGE, ORIGIN)
    viewer = edge.viewer("gone")
    tick_answering(net, PROBE_SECONDS + 0.5, viewer)
    assert "gone" in manager.parked
    viewer.lose()
    net.flush()
    assert manager.parked == {}
    net.tick(PARK_SECONDS + 1)
    assert manager.pulls == {} and manager.started == 1


def test_a_probe_going_live_over_the_cap_ends_and_waits_for_a_place(net: Network) -> None:
    """Two probes for streams both live upstream with one place: the second to go live
    ends (its viewers wait), and gets the place when the first pull ends."""
    origin = net.relay(ORIGIN)
    for name in ("a", "b"):
        gop(origin.publisher(name), 1, config=True)
    edge, manager = net.edge(EDGE, ORIGIN, max_pulls=1, upstream_grace=1.0)
    first = edge.viewer("a")
    second = edge.viewer("b")
    net.flush()
    assert list(manager.pulls) == ["a"] and manager.refused == 1
    first.lose()
    tick_answering(net, 1.5, second)
    assert list(manager.pulls) == ["b"] and "K2" in seen(second)


def test_a_keyframe_request_made_while_reconnecting_is_sent_once_open(net: Network) -> None:
    """A keyframe request the pull cannot send (its connection is down) is kept and sent
    when the connection is open again."""
    _origin, _publisher = live_origin(net)
    edge, manager = net.edge(EDGE, ORIGIN)
    edge.viewer("cam")
    net.flush()
    pull = manager.pulls["cam"]
    sent: list[bool] = []
    request = pull.client.request_keyframe

    def spy() -> bool:
        sent.append(request())
        return sent[-1]

    pull.client.request_keyframe = spy  # type: ignore[method-assign]
    net.kill(ORIGIN)
    pull.send_keyframe_request()
    assert sent == [False] and pull.keyframe_owed
    net.relay(ORIGIN).publisher("cam")
    net.tick(RETRY_MAX_SECONDS + 0.1)
    assert pull.client.stats.connects == 2 and not pull.keyframe_owed
    # The owed request goes out as the connection opens; the second is the one a pulled
    # stream sends when it goes live with a viewer waiting for a KEY.
    assert sent == [False, True, True]
