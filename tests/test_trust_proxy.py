"""``--trust-proxy N``: the client named by the last N ``X-Forwarded-For`` hops, for
the per-address limits and the logs; every header shape, then the relay's limits behind
a proxy, through the real Site on StringTransports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from streamrelay.addresses import forwarded_client, forwarded_hops, hop_address
from tests.fakes import LogCapture, Relay

PROXY = IPv4Address("TCP", "127.0.0.1", 40000)


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def client(values: list[bytes], trust: int, peer: object = PROXY) -> object:
    return forwarded_client(peer, values, trust)  # type: ignore[arg-type]


# -- the header ----------------------------------------------------------------------------


def test_no_trust_means_the_peer_whatever_the_header() -> None:
    """Off by default: X-Forwarded-For changes nothing."""
    assert client([b"203.0.113.9"], 0) is PROXY


def test_missing_or_empty_header_means_the_peer() -> None:
    """No hop at all: the peer is the client."""
    assert client([], 1) is PROXY
    assert client([b""], 1) is PROXY
    assert client([b" , ,"], 2) is PROXY


@pytest.mark.parametrize(
    ("values", "trust", "expected"),
    [
        ([b"203.0.113.9"], 1, "203.0.113.9"),
        # nginx appends the address it saw: the last hop is the one it vouches for.
        ([b"198.51.100.1, 203.0.113.9"], 1, "203.0.113.9"),
        ([b"198.51.100.1, 203.0.113.9"], 2, "198.51.100.1"),
        # A spoofed leftmost hop is never taken while N hops are there.
        ([b"6.6.6.6, 198.51.100.1, 203.0.113.9"], 2, "198.51.100.1"),
        # Fewer hops than N: the leftmost (outer proxies were not on the path).
        ([b"203.0.113.9"], 3, "203.0.113.9"),
        ([b"198.51.100.1, 203.0.113.9"], 5, "198.51.100.1"),
        # Several headers are one list, in order.
        ([b"198.51.100.1, 198.51.100.2", b"203.0.113.9"], 1, "203.0.113.9"),
        ([b"198.51.100.1, 198.51.100.2", b"203.0.113.9"], 3, "198.51.100.1"),
        # Empty items and blanks are left out.
        ([b"198.51.100.1,, ,203.0.113.9 "], 2, "198.51.100.1"),
        # Ports (Azure and others add them) and brackets.
        ([b"203.0.113.9:4711"], 1, "203.0.113.9"),
        ([b"2001:db8::7"], 1, "2001:db8::7"),
        ([b"[2001:DB8:0::7]"], 1, "2001:db8::7"),
        ([b"[2001:db8::7]:443"], 1, "2001:db8::7"),
        ([b'"[2001:db8::7]:443"'], 1, "2001:db8::7"),
        # An IPv4-mapped IPv6 address is the IPv4 address (one key for the limits).
        ([b"::ffff:203.0.113.9"], 1, "203.0.113.9"),
    ],
)
def test_the_nth_hop_from_the_right_is_the_client(
    values: list[bytes], trust: int, expected: str
) -> None:
    """The hop N from the right, normalised; its port is unknown (0)."""
    found = client(values, trust)
    assert isinstance(found, (IPv4Address, IPv6Address))
    assert (found.host, found.port) == (expected, 0)
    assert isinstance(found, IPv6Address) == (":" in expected)


@pytest.mark.parametrize(
    "hop",
    [
        b"unknown",
        b"_hidden",
        b"203.0.113.9:http",
        b"203.0.113.9:",
        b"203.0.113.9:99999",
        b"203.0.113.9:" + b"9" * 5000,
        b"203.0.113",
        b"01.2.3.4",
        b"[2001:db8::7",
        b"[2001:db8::7]x",
        b"[2001:db8::7]:",
        b"2001:db8::7::1",
        b"example.com",
        b"\xff\xfe\x00",
        b"1.2.3.4 5.6.7.8",
        "203.0.113.\u0669".encode(),
    ],
)
def test_a_chosen_hop_that_is_no_address_means_the_peer(hop: bytes) -> None:
    """Garbage where the client should be: the limits count the proxy, never a name the
    client made up."""
    assert client([hop], 1) is PROXY
    assert client([b"198.51.100.1, " + hop], 1) is PROXY


def test_garbage_beyond_the_chosen_hop_does_not_matter() -> None:
    """Only the chosen hop is read."""
    found = client([b"garbage, 203.0.113.9"], 1)
    assert isinstance(found, IPv4Address) and found.host == "203.0.113.9"


def test_unix_socket_peers_are_proxies_too() -> None:
    """nginx in front of a unix socket: the forwarded client, or the socket."""
    peer = UNIXAddress(b"/run/streamrelay.sock")
    found = client([b"203.0.113.9"], 1, peer)
    assert isinstance(found, IPv4Address) and found.host == "203.0.113.9"
    assert client([b"nonsense"], 1, peer) is peer


def test_forwarded_hops_splits_every_header() -> None:
    """The hop list of several headers."""
    assert forwarded_hops([b"a, b", b" c ,", b""]) == ["a", "b", "c"]


@given(st.lists(st.binary(max_size=60), max_size=4), st.integers(min_value=0, max_value=5))
def test_any_header_gives_the_peer_or_an_ip_address(values: list[bytes], trust: int) -> None:
    """Whatever the headers, no exception: the peer itself or an IP address."""
    found = client(values, trust)
    if found is not PROXY:
        assert isinstance(found, (IPv4Address, IPv6Address))
        assert hop_address(found.host) == found.host


# -- the relay behind a proxy ------------------------------------------------------------------


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def test_per_address_connection_limit_counts_forwarded_clients() -> None:
    """Behind one proxy, each client has its own --max-connections-per-ip; the proxy
    address is no longer one shared bucket."""
    relay = Relay.with_options(trust_proxy=1, max_connections_per_ip=2)
    for address in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        for _ in range(2):
            relay.open("/watch/cam", extra=forwarded(address))
    third = relay.connect().upgrade("/watch/cam", forwarded("203.0.113.1"))
    assert third.status == 503
    assert relay.context.limiter.count_for("203.0.113.1") == 2
    assert relay.context.limiter.count_for("127.0.0.1") == 0


def test_without_trust_the_proxy_is_one_address() -> None:
    """Off (the default), the forwarded addresses are ignored: all count as the proxy."""
    relay = Relay.with_options(max_connections_per_ip=2)
    relay.open("/watch/cam", extra=forwarded("203.0.113.1"))
    relay.open("/watch/cam", extra=forwarded("203.0.113.2"))
    assert relay.connect().upgrade("/watch/cam", forwarded("203.0.113.3")).status == 503


def test_handshake_rate_is_per_forwarded_client() -> None:
    """One client's storm does not throttle the others behind the same proxy."""
    relay = Relay.with_options(trust_proxy=1, max_handshakes_per_ip=1.0, handshake_burst=2)
    statuses = [relay.connect().upgrade("/watch/cam", forwarded("203.0.113.1")).status
                for _ in range(4)]
    assert statuses == [101, 101, 503, 503]
    assert relay.connect().upgrade("/watch/cam", forwarded("203.0.113.2")).status == 101


def test_waiting_streams_are_held_by_the_forwarded_client() -> None:
    """--max-waiting-streams-per-ip counts the client, both when checked and when held."""
    relay = Relay.with_options(trust_proxy=1, max_waiting_streams_per_ip=1)
    relay.open("/watch/first", extra=forwarded("203.0.113.1"))
    assert relay.connect().upgrade("/watch/second", forwarded("203.0.113.1")).status == 503
    relay.open("/watch/second", extra=forwarded("203.0.113.2"))
    waiting = relay.context.registry.waiting
    assert (waiting.held_by("203.0.113.1"), waiting.held_by("203.0.113.2")) == (1, 1)
    assert waiting.held_by("127.0.0.1") == 0


def test_keep_alive_connection_moves_to_each_request_s_client() -> None:
    """A proxy's kept-alive connection carries several clients' requests in turn: its
    slot follows the current one, and is given back once."""
    relay = Relay.with_options(trust_proxy=1)
    peer = relay.connect()
    for address in ("203.0.113.1", "203.0.113.2"):
        response = peer.request("GET", "/healthz", {"Host": "relay.test", **forwarded(address)})
        assert response.status == 200
        assert relay.context.limiter.count_for(address) == 1
    assert relay.context.limiter.count_for("203.0.113.1") == 0
    assert relay.context.limiter.total == 1
    peer.lose()
    relay.assert_idle()


def test_connections_before_their_head_count_only_globally() -> None:
    """Until the head names the client, a connection holds a slot of the global limit
    only (its per-address key is its own)."""
    relay = Relay.with_options(trust_proxy=1, max_connections_per_ip=1, max_connections=3)
    peers = [relay.connect() for _ in range(3)]
    assert relay.context.limiter.total == 3
    fourth = relay.connect()
    assert fourth.request("GET", "/healthz", {"Host": "relay.test"}).status == 503
    for peer in peers:
        peer.lose()
    fourth.lose()
    relay.assert_idle()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "203.0.113.9"])
def test_publishing_without_secret_stays_loopback_only(address: str) -> None:
    """With --trust-proxy, a forwarded request is still not a direct loopback one: no
    publishing without a secret through a proxy, whatever the hop says."""
    relay = Relay.with_options(trust_proxy=1)
    assert relay.connect().upgrade("/publish/cam", forwarded(address)).status == 403
    assert relay.connect("10.0.0.8").upgrade("/publish/cam", forwarded(address)).status == 403
    relay.open("/publish/cam")  # a direct loopback publisher still may


def test_logs_name_the_client_and_the_proxy(log: LogCapture) -> None:
    """The connection lines and the access line show the forwarded client and the proxy
    it came through."""
    relay = Relay.with_options(trust_proxy=1)
    viewer = relay.open("/watch/cam", extra=forwarded("203.0.113.7"))
    viewer.lose()
    opened = [e for e in log.events if e.get("kind") == "connection.open"]
    closed = [e for e in log.events if e.get("kind") == "connection.close"]
    proxy = f"127.0.0.1:{viewer.address.port}"
    assert [(e["peer"], e["via"]) for e in opened] == [("203.0.113.7", proxy)]
    assert [(e["peer"], e["via"]) for e in closed] == [("203.0.113.7", proxy)]
