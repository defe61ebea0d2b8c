"""Every refusal status, as a real client sees it in the HTTP handshake (404, 400, 426,
431, 503 + Retry-After, 403, 401, 409), and their documented order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from tests.support.http import handshake_request, http_exchange, http_get, plain_request
from tests.support.media import KEY, media
from tests.support.relay_api import api_streams
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.tokens import make_token, write_secret
from tests.support.waiting import run, wait_until
from tests.support.ws_client import accepted, refused, text, ws_connect

pytestmark = pytest.mark.integration


def _retry_after(headers: dict[str, str]) -> int:
    assert "retry-after" in headers, headers
    value = int(headers["retry-after"])
    assert value >= 1
    return value


@pytest.mark.timeout(30)
def test_unknown_paths_are_404(relay: RelayProcess) -> None:
    """Unknown paths, a missing stream name and extra segments answer 404, for WebSocket
    handshakes and for plain GETs; ``/echo`` is off by default."""

    async def scenario() -> None:
        for path in ("/nope", "/watch", "/watch/", "/watch/a/b", "/publish/x/y", "/echo",
                     "/api/nothing"):
            status, _, _ = await refused(f"{relay.ws_url}{path}")
            assert status == 404, path

    run(scenario(), 20)
    assert http_get(relay.http_url, "/nope").status == 404


@pytest.mark.timeout(30)
def test_bad_stream_names_are_400(relay: RelayProcess) -> None:
    """Names outside ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` are refused with 400, even on a
    plain GET (400 comes before 426); a 64-character name is fine."""

    async def scenario() -> None:
        for name in ("bad!name", "-lead", ".dot", "_under", "a" * 65, "sp%20ace", "%C3%A9t%C3%A9"):
            for role in ("watch", "publish"):
                status, _, body = await refused(f"{relay.ws_url}/{role}/{name}")
                assert status == 400, (role, name, body)
        assert await accepted(f"{relay.ws_url}/watch/{'a' * 64}") is None
        assert await accepted(f"{relay.ws_url}/watch/A.b_c-9") is None

    run(scenario(), 20)
    assert http_get(relay.http_url, "/watch/bad!name").status == 400


@pytest.mark.timeout(30)
def test_plain_get_on_websocket_path_is_426_without_redirect(relay: RelayProcess) -> None:
    """A browser opening ``/watch/s`` or ``/publish/s`` as a page gets 426 with
    ``Upgrade: websocket``; ``?redirect=`` is never followed or echoed (no open redirect,
    no Autobahn status page)."""
    for path in ("/watch/s", "/publish/s", "/watch/s?redirect=http://example.com",
                 "/publish/s?redirect=http%3A%2F%2Fexample.com%2F"):
        response = http_get(relay.http_url, path)
        assert response.status == 426, path
        assert response.headers.get("upgrade", "").lower() == "websocket"
        assert "location" not in response.headers
        assert b"example.com" not in response.body
        assert b"<html" not in response.body.lower()
    # POST is no WebSocket either.
    assert http_get(relay.http_url, "/watch/s", method="POST").status == 426


@pytest.mark.timeout(30)
def test_oversized_request_heads_are_431(relay: RelayProcess) -> None:
    """A 64 KiB header line, 200 header lines, or 24 KiB of headers in lines under the
    per-line bound: each is answered 431 (not a bare 400, not a silent close), and the
    relay keeps serving."""
    host = relay.host
    cases = {
        "64 KiB line": handshake_request("/watch/s", host, [("X-Big", "a" * 65536)]),
        "200 lines": handshake_request("/watch/s", host, [(f"X-H{i}", "v") for i in range(200)]),
        "24 KiB total": handshake_request(
            "/watch/s", host, [(f"X-Part{i}", "b" * 6000) for i in range(4)]
        ),
        "64 KiB request line": (b"GET /watch/" + b"a" * 65536 + b" HTTP/1.1\r\n\r\n"),
    }
    for label, request in cases.items():
        response = http_exchange(relay.port, request, until_close=True)
        assert response.status == 431, label
    # 100 short header lines are still within the bound.
    ok_request = plain_request("/healthz", host, [(f"X-H{i}", "v") for i in range(90)])
    assert http_exchange(relay.port, ok_request, until_close=True).status == 200
    assert http_get(relay.http_url, "/healthz").status == 200


@pytest.mark.timeout(40)
def test_per_address_connection_limit_is_503_with_retry_after(start_relay: StartRelay) -> None:
    """With ``--max-connections-per-ip 3`` a fourth connection from the same address is
    refused 503 with Retry-After; after one closes, a new one is admitted again."""
    relay = start_relay("--max-connections-per-ip", "3")

    async def scenario() -> None:
        held = [await ws_connect(f"{relay.ws_url}/watch/ip").__aenter__() for _ in range(3)]
        status, headers, _ = await refused(f"{relay.ws_url}/watch/ip")
        assert status == 503
        _retry_after(headers)
        plain = await asyncio.to_thread(http_get, relay.http_url, "/healthz")
        assert plain.status == 503 and "retry-after" in plain.headers
        await held.pop().close()
        await asyncio.sleep(0.3)
        async with ws_connect(f"{relay.ws_url}/watch/ip") as again:
            assert (await text(again))["type"] == "status"
        for ws in held:
            await ws.close()

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_handshake_rate_limit_is_503_with_retry_after(start_relay: StartRelay) -> None:
    """With ``--max-handshakes-per-ip 1`` (burst 2) a quick series of handshakes from one
    address is cut off with 503 and Retry-After; after a pause handshakes work again."""
    relay = start_relay("--max-handshakes-per-ip", "1")

    async def scenario() -> None:
        outcomes = []
        for _ in range(5):
            try:
                async with ws_connect(f"{relay.ws_url}/watch/rate"):
                    outcomes.append(101)
            except InvalidStatus as error:
                outcomes.append(error.response.status_code)
                assert "Retry-After" in error.response.headers
        assert outcomes[0] == 101
        assert 503 in outcomes, outcomes
        assert outcomes.count(101) <= 3, outcomes
        await asyncio.sleep(2.2)
        assert await accepted(f"{relay.ws_url}/watch/rate") is None

    run(scenario(), 30)


def _no_publisher(relay: RelayProcess) -> bool:
    return bool(api_streams(relay)["connections"]["publishers"] == 0)


@pytest.mark.timeout(40)
def test_stream_limit_is_503_for_publishers_only(start_relay: StartRelay) -> None:
    """With ``--max-streams 1`` and a publisher on ``one``, a publisher of a second stream
    is refused 503 with Retry-After, while viewers never count towards the limit: a
    viewer of a name nobody publishes and one of the live stream are accepted.  Once the
    publisher has left, the second stream can be published."""
    relay = start_relay("--max-streams", "1")

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/publish/one"):
            status, headers, body = await refused(f"{relay.ws_url}/publish/two")
            assert status == 503, body
            _retry_after(headers)
            assert await accepted(f"{relay.ws_url}/watch/two") is None
            assert await accepted(f"{relay.ws_url}/watch/one") is None
        await asyncio.to_thread(wait_until, lambda: _no_publisher(relay), 5)
        assert await accepted(f"{relay.ws_url}/publish/two") is None

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_waiting_stream_limit_is_503_and_spares_publishers(start_relay: StartRelay) -> None:
    """With ``--max-waiting-streams-per-ip 2`` the viewers of one address may hold two
    names nobody publishes; a third such name is refused 503 with Retry-After and a
    reason that says why, while one more viewer of a held name is accepted (no new
    name), and so is a publisher of the refused name."""
    relay = start_relay("--max-waiting-streams-per-ip", "2")

    async def scenario() -> None:
        async with (
            ws_connect(f"{relay.ws_url}/watch/w1") as first,
            ws_connect(f"{relay.ws_url}/watch/w2") as second,
        ):
            for viewer in (first, second):
                assert await text(viewer) == {"type": "status", "state": "offline"}
            status, headers, body = await refused(f"{relay.ws_url}/watch/w3")
            assert status == 503, body
            assert "waiting" in body, body
            _retry_after(headers)
            assert await accepted(f"{relay.ws_url}/watch/w1") is None
            assert await accepted(f"{relay.ws_url}/publish/w3") is None

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_viewer_limit_is_503(start_relay: StartRelay) -> None:
    """With ``--max-viewers-per-stream 1`` a second viewer of the stream is refused 503
    with Retry-After; a viewer of another stream is not affected."""
    relay = start_relay("--max-viewers-per-stream", "1")

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/solo"):
            status, headers, _ = await refused(f"{relay.ws_url}/watch/solo")
            assert status == 503
            _retry_after(headers)
            assert await accepted(f"{relay.ws_url}/watch/other") is None
            # 503 (limit) is checked before 403 (origin).
            status, _, _ = await refused(f"{relay.ws_url}/watch/solo", origin="null")
            assert status == 503

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_origin_refusals_are_403(start_relay: StartRelay) -> None:
    """Publishing with any ``Origin`` header (a web page) is refused 403 by default, and
    ``Origin: null`` also when viewing with the default ``*``; desktop clients (no
    Origin) publish fine; viewers from any real origin are welcome."""
    relay = start_relay()

    async def scenario() -> None:
        for origin in ("https://evil.example", "http://localhost:8080", "null"):
            status, _, _ = await refused(f"{relay.ws_url}/publish/o", origin=origin)
            assert status == 403, origin
        status, _, _ = await refused(f"{relay.ws_url}/watch/o", origin="null")
        assert status == 403
        assert await accepted(f"{relay.ws_url}/watch/o", origin="https://anyone.example") is None
        assert await accepted(f"{relay.ws_url}/publish/o") is None

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_listed_origins_are_allowed(start_relay: StartRelay) -> None:
    """``--publish-origins null,https://*.example.com`` lets a listed origin publish
    (``null`` only because it is listed); ``--view-origins`` restricts viewers."""
    relay = start_relay(
        "--publish-origins", "null,https://*.example.com",
        "--view-origins", "https://tv.example.org",
    )

    async def scenario() -> None:
        assert await accepted(f"{relay.ws_url}/publish/lo", origin="null") is None
        assert await accepted(f"{relay.ws_url}/publish/lo", origin="https://a.example.com") is None
        status, _, _ = await refused(f"{relay.ws_url}/publish/lo", origin="https://example.net")
        assert status == 403
        assert await accepted(f"{relay.ws_url}/watch/lo", origin="https://tv.example.org") is None
        assert await accepted(f"{relay.ws_url}/watch/lo") is None
        for origin in ("https://evil.example", "null"):
            status, _, _ = await refused(f"{relay.ws_url}/watch/lo", origin=origin)
            assert status == 403, origin

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_forwarded_publish_without_secret_is_403(start_relay: StartRelay) -> None:
    """Without a publish secret a request relayed by a proxy on the same host
    (``X-Forwarded-For`` or ``Forwarded``) may not publish: 403.  Viewing is unaffected."""
    relay = start_relay()

    async def scenario() -> None:
        for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
            status, _, body = await refused(
                f"{relay.ws_url}/publish/fw", additional_headers=header
            )
            assert status == 403, (header, body)
            assert await accepted(f"{relay.ws_url}/watch/fw", additional_headers=header) is None

    run(scenario(), 30)
    assert "No publish secret configured" in relay.log_text()


@pytest.mark.timeout(60)
def test_publish_tokens(start_relay: StartRelay, tmp_path: Path) -> None:
    """With ``--publish-secret-file``: a missing, tampered, expired, wrong-role,
    wrong-stream or garbage token is refused 401; a valid token works as
    ``Authorization: Bearer`` and as ``?token=`` (also from behind a proxy); neither a
    token nor the secret ever shows up in the relay's log."""
    secret = b"s3cret-publish-key"
    relay = start_relay("--publish-secret-file", str(write_secret(tmp_path, "pub", secret)))
    future = int(time.time()) + 3600
    good = make_token(secret, "publish", "cam", future)
    bad_tokens = {
        "tampered": good[:-1] + ("0" if good[-1] != "0" else "1"),
        "expired": make_token(secret, "publish", "cam", int(time.time()) - 5),
        "wrong role": make_token(secret, "view", "cam", future),
        "wrong stream": make_token(secret, "publish", "other", future),
        "wrong secret": make_token(b"not-the-secret", "publish", "cam", future),
        "garbage": "hello",
        "future expiry, forged": f"{future + 99}.{good.split('.', 1)[1]}",
    }

    async def scenario() -> None:
        status, _, _ = await refused(f"{relay.ws_url}/publish/cam")
        assert status == 401
        for label, token in bad_tokens.items():
            status, _, _ = await refused(
                f"{relay.ws_url}/publish/cam",
                additional_headers={"Authorization": f"Bearer {token}"},
            )
            assert status == 401, label
            status, _, _ = await refused(f"{relay.ws_url}/publish/cam?token={token}")
            assert status == 401, label
        async with ws_connect(
            f"{relay.ws_url}/publish/cam", additional_headers={"Authorization": f"Bearer {good}"}
        ) as publisher:
            assert await text(publisher) == {"type": "viewers", "count": 0}
            await publisher.send(media(KEY, b"k"))
        async with ws_connect(f"{relay.ws_url}/publish/cam?token={good}") as publisher:
            assert await text(publisher) == {"type": "viewers", "count": 0}
        # With a secret, a token is what counts, proxy or not.
        assert await accepted(
            f"{relay.ws_url}/publish/cam?token={good}",
            additional_headers={"X-Forwarded-For": "198.51.100.7"},
        ) is None
        # 403 (origin) is checked before 401 (token).
        status, _, _ = await refused(f"{relay.ws_url}/publish/cam", origin="https://x.example")
        assert status == 403
        # Viewing stays open without a view secret.
        assert await accepted(f"{relay.ws_url}/watch/cam") is None

    run(scenario(), 50)
    log = relay.log_text()
    assert secret.decode() not in log
    for token in [good, *bad_tokens.values()]:
        signature = token.partition(".")[2]
        assert (signature or token) not in log, "a token appears in the relay's log"


@pytest.mark.timeout(60)
def test_view_tokens(start_relay: StartRelay, tmp_path: Path) -> None:
    """With ``--view-secret-file`` viewers need a ``view`` token for the stream (401
    without, or with a publish token); ``?token=`` and Bearer both work; the log never
    shows it; ``/api/streams`` still answers the loopback operator."""
    secret = b"view-secret-value"
    relay = start_relay("--view-secret-file", str(write_secret(tmp_path, "view", secret)))
    future = int(time.time()) + 600
    good = make_token(secret, "view", "show", future)

    async def scenario() -> None:
        status, _, _ = await refused(f"{relay.ws_url}/watch/show")
        assert status == 401
        for token in (
            make_token(secret, "publish", "show", future),
            make_token(secret, "view", "other", future),
            make_token(secret, "view", "show", int(time.time()) - 1),
        ):
            status, _, _ = await refused(f"{relay.ws_url}/watch/show?token={token}")
            assert status == 401
        async with ws_connect(f"{relay.ws_url}/watch/show?token={good}") as viewer:
            assert await text(viewer) == {"type": "status", "state": "offline"}
        assert await accepted(
            f"{relay.ws_url}/watch/show", additional_headers={"Authorization": f"Bearer {good}"}
        ) is None

    run(scenario(), 50)
    assert http_get(relay.http_url, "/api/streams").status == 200
    assert good.partition(".")[2] not in relay.log_text()
    assert secret.decode() not in relay.log_text()


@pytest.mark.timeout(40)
def test_no_takeover_is_409(start_relay: StartRelay, tmp_path: Path) -> None:
    """With ``--no-takeover`` a second publisher is refused 409 while the first is live,
    the first keeps publishing, and after it leaves a new publisher is admitted.  With a
    secret, a missing token is 401 before 409."""
    secret = b"k"
    relay = start_relay("--no-takeover", "--publish-secret-file",
                        str(write_secret(tmp_path, "pub", secret)))
    token = make_token(secret, "publish", "only", int(time.time()) + 600)
    url = f"{relay.ws_url}/publish/only?token={token}"

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/only") as viewer:
            await text(viewer)
            async with ws_connect(url) as first:
                await text(viewer)  # live
                status, _, body = await refused(url)
                assert status == 409, body
                status, _, _ = await refused(f"{relay.ws_url}/publish/only")
                assert status == 401
                message = media(KEY, b"still-here")
                await first.send(message)
                assert await viewer.recv() == message
            assert await text(viewer) == {"type": "status", "state": "offline"}
            await asyncio.sleep(0.1)
            async with ws_connect(url) as second:
                assert (await text(second))["type"] == "viewers"

    run(scenario(), 30)
    wait_until(lambda: api_streams(relay)["connections"]["publishers"] == 0, 5)
