"""``--auth-url`` through the real twistd launch, against a twisted.web endpoint served
by the test in a subprocess (tests/support/auth_server.py): admit on 200, 403 and 401
refusals, 503 when it is slow, down or failing, the answer cache, the concurrency cap,
and no credential in the relay's log."""

from __future__ import annotations

import asyncio
import functools
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.http import handshake_request, http_get, http_json
from tests.support.relay_api import idle_state
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import run, wait_until
from tests.support.ws_client import accepted, refused

pytestmark = pytest.mark.integration


class AuthServer:
    """The endpoint process and its controls."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.auth_server"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("PORT "), line
        self.base = f"http://127.0.0.1:{int(line.split()[1])}"

    def mode(self, mode: str, delay: float = 0.0) -> None:
        """Switch the endpoint's behaviour."""
        assert http_get(self.base, f"/control?mode={mode}&delay={delay}").status == 200

    def calls(self) -> dict[str, Any]:
        """How often it was asked, and what with."""
        found = http_json(self.base, "/calls")
        assert isinstance(found, dict)
        return found

    def stop(self) -> None:
        """End the process."""
        self.process.kill()
        self.process.wait(5)


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    """A running endpoint, killed at teardown."""
    server = AuthServer()
    yield server
    server.stop()


def _relay(start_relay: StartRelay, server: AuthServer, *extra: str) -> RelayProcess:
    return start_relay(
        "--auth-url", f"{server.base}/auth", "--auth-timeout", "1", *extra
    )


@pytest.mark.timeout(40)
def test_the_endpoint_decides(start_relay: StartRelay, auth_server: AuthServer) -> None:
    """200 admits (publish from a non-loopback-only endpoint too), 403 gives 403, 401
    and other refusals 401; the endpoint sees role, stream, client, token, query and the
    selected headers; slow, down and failing endpoints give 503 + Retry-After; nothing
    secret reaches the log."""
    relay = _relay(start_relay, auth_server, "--auth-cache-seconds", "0")
    ws = relay.ws_url

    async def scenario() -> None:
        assert await accepted(f"{ws}/watch/cam?token=ok-SECRET-A&x=1") is None
        assert await accepted(
            f"{ws}/publish/cam", additional_headers={"Authorization": "Bearer ok-SECRET-B"}
        ) is None
        status, _, _ = await refused(f"{ws}/watch/cam?token=forbid-SECRET-C")
        assert status == 403
        status, _, _ = await refused(
            f"{ws}/relay/cam", additional_headers={"Cookie": "session=COOKIE-SECRET"}
        )
        assert status == 401
        auth_server.mode("slow", 3.0)
        status, headers, _ = await refused(f"{ws}/watch/cam?token=ok-SECRET-D")
        assert status == 503 and int(headers["retry-after"]) >= 1
        auth_server.mode("down")
        status, headers, _ = await refused(f"{ws}/watch/cam?token=ok-SECRET-E")
        assert status == 503 and "retry-after" in headers
        auth_server.mode("flap")
        statuses = [
            (await refused(f"{ws}/watch/cam?token=ok-SECRET-F"))[0],
            await accepted(f"{ws}/watch/cam?token=ok-SECRET-F"),
        ]
        assert statuses == [503, None]

    run(scenario(), 30)
    bodies = auth_server.calls()["bodies"]
    first = bodies[0]
    assert first["role"] == "view" and first["stream"] == "cam"
    assert first["client"] == "127.0.0.1" and first["token"] == "ok-SECRET-A"
    assert first["query"] == {"token": ["ok-SECRET-A"], "x": ["1"]}
    assert bodies[1]["role"] == "publish" and bodies[1]["token"] == "ok-SECRET-B"
    assert bodies[1]["headers"]["authorization"] == "Bearer ok-SECRET-B"
    assert bodies[3]["role"] == "relay"
    assert bodies[3]["headers"]["cookie"] == "session=COOKIE-SECRET"
    log = relay.log_text()
    assert "SECRET" not in log, relay.log_excerpt("SECRET")
    metrics = http_get(relay.http_url, "/metrics").body.decode()
    assert 'streamrelay_auth_calls_total{outcome="timeout"} 1.0' in metrics
    assert 'streamrelay_auth_calls_total{outcome="refused_403"} 1.0' in metrics


@pytest.mark.timeout(40)
def test_answers_are_cached_and_calls_capped(
    start_relay: StartRelay, auth_server: AuthServer
) -> None:
    """Admits and refusals are reused within --auth-cache-seconds (the endpoint counts
    one call each); over --auth-max-concurrent calls in progress a handshake gets 503
    at once."""
    relay = _relay(
        start_relay, auth_server, "--auth-cache-seconds", "30", "--auth-max-concurrent", "2"
    )
    ws = relay.ws_url

    async def scenario() -> None:
        for _ in range(3):
            assert await accepted(f"{ws}/watch/cam?token=ok-1") is None
            assert (await refused(f"{ws}/watch/cam?token=forbid-1"))[0] == 403
        # Another stream or role is another question.
        assert await accepted(f"{ws}/watch/other?token=ok-1") is None
        assert auth_server.calls()["calls"] == 3
        auth_server.mode("slow", 0.6)

        results = await asyncio.gather(
            accepted(f"{ws}/watch/cam?token=ok-slow-1"),
            accepted(f"{ws}/watch/cam?token=ok-slow-2"),
            _late_refusal(f"{ws}/watch/cam?token=ok-slow-3"),
        )
        assert results == [None, None, 503]

    run(scenario(), 30)
    metrics = http_get(relay.http_url, "/metrics").body.decode()
    assert "streamrelay_auth_cache_hits_total 4.0" in metrics
    assert 'streamrelay_auth_calls_total{outcome="over_capacity"} 1.0' in metrics


async def _late_refusal(url: str) -> int:
    # Starts after the two slow calls are in progress.
    await asyncio.sleep(0.2)
    return (await refused(url))[0]


@pytest.mark.timeout(30)
def test_a_client_leaving_mid_call_leaves_nothing(
    start_relay: StartRelay, auth_server: AuthServer
) -> None:
    """Clients that hang up while the endpoint is being asked cancel their calls: the
    relay goes back to idle at once, and counts them as cancelled."""
    relay = _relay(start_relay, auth_server, "--auth-cache-seconds", "0")
    auth_server.mode("slow", 0.9)

    def asked(count: int) -> bool:
        return bool(auth_server.calls()["calls"] >= count)

    for index in range(5):
        with socket.create_connection((relay.host, relay.port), timeout=5) as sock:
            sock.sendall(handshake_request(f"/watch/cam?token=ok-{index}"))
            wait_until(functools.partial(asked, index + 1), 5)
    wait_until(lambda: idle_state(relay) is not None, 5)
    metrics = http_get(relay.http_url, "/metrics").body.decode()
    assert 'streamrelay_auth_calls_total{outcome="cancelled"} 5.0' in metrics
    assert "streamrelay_auth_calls_total{outcome=\"admitted\"}" not in metrics
