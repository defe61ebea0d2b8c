"""Every close code the relay sends, as the peer sees it: 1001 (shutdown), 1003 (viewer
binary), 1007 (broken v1 payloads), 1008 (idle publisher, stalled viewer), 1009 (too big);
4409 (takeover) is in ``test_relay_fanout.py``."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.frames import OP_CLOSE
from tests.support.http import http_get
from tests.support.media import DELTA, KEY, media
from tests.support.raw_ws import RawWebSocket
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import run
from tests.support.ws_client import expect_close, refused, text, ws_connect

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_sigterm_closes_everyone_with_1001_and_exits_cleanly(start_relay: StartRelay) -> None:
    """SIGTERM: every viewer and the publisher get close code 1001; while a straggler
    (a peer that never answers the close) holds the drain open, ``/healthz`` answers 503
    and new handshakes get 503 + Retry-After; the process exits with SIGTERM's status
    within the close timeout plus a few seconds."""
    relay = start_relay("--close-timeout", "2")

    async def scenario() -> dict[str, Any]:
        viewers = [await ws_connect(f"{relay.ws_url}/watch/bye").__aenter__() for _ in range(2)]
        publisher = await ws_connect(f"{relay.ws_url}/publish/bye").__aenter__()
        await publisher.send(media(KEY, b"k"))
        for viewer in viewers:
            await text(viewer)
        straggler = await asyncio.to_thread(RawWebSocket.open, relay.port, "/watch/bye")
        assert straggler.status == 101
        await asyncio.sleep(0.2)
        signalled = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        closes = asyncio.gather(*(expect_close(ws) for ws in [*viewers, publisher]))
        # During the drain (the straggler holds it for --close-timeout).
        await asyncio.sleep(0.3)
        health = await asyncio.to_thread(http_get, relay.http_url, "/healthz", timeout=3)
        status, headers, _ = await refused(f"{relay.ws_url}/watch/bye")
        codes = await closes
        straggler.close()
        exit_status = await asyncio.to_thread(relay.process.wait, 15)
        return {
            "codes": codes,
            "health": health.status,
            "handshake": (status, headers.get("retry-after")),
            "exit": exit_status,
            "seconds": time.monotonic() - signalled,
        }

    outcome = run(scenario(), 40)
    assert [code for code, _ in outcome["codes"]] == [1001, 1001, 1001], outcome
    assert outcome["health"] == 503, outcome
    assert outcome["handshake"][0] == 503 and outcome["handshake"][1], outcome
    assert outcome["exit"] in (-signal.SIGTERM, 128 + signal.SIGTERM), outcome
    assert outcome["seconds"] < 2 + 5, outcome


@pytest.mark.timeout(40)
def test_sigterm_on_idle_relay_exits_at_once(start_relay: StartRelay) -> None:
    """With no connections the relay stops promptly with SIGTERM's exit status."""
    relay = start_relay()
    started = time.monotonic()
    relay.process.send_signal(signal.SIGTERM)
    try:
        status = relay.process.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail("relay did not exit within 10 s of SIGTERM:\n" + relay.log_excerpt())
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_viewer_sending_binary_gets_1003(relay: RelayProcess) -> None:
    """A viewer that sends a binary message is closed with 1003; a viewer's unknown or
    malformed text is ignored (it stays connected)."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/v") as viewer:
            await text(viewer)
            await viewer.send("not json at all")
            await viewer.send('{"type":"something-else"}')
            await viewer.send("[1,2]")
            await viewer.ping()
            await viewer.send(b"\x01binary")
            code, reason = await expect_close(viewer)
            assert code == 1003, (code, reason)

    run(scenario(), 20)


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"\x01\x00\x00\x00\x00\x00\x00\x00", id="8-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(media(0x03, b"x"), id="key-and-config"),
        pytest.param(media(0x08, b"x"), id="reserved-bit-3"),
        pytest.param(media(0x05, b"x"), id="audio-and-key"),
        pytest.param(media(0x80, b"x"), id="reserved-bit-7"),
        pytest.param("[1, 2]", id="json-array"),
        pytest.param("not json", id="not-json"),
        pytest.param('"a string"', id="json-string"),
        pytest.param("null", id="json-null"),
    ],
)
def test_publisher_invalid_payload_gets_1007(relay: RelayProcess, message: bytes | str) -> None:
    """A publisher breaking v1 (media shorter than 9 bytes, both KEY and CONFIG, a
    reserved flag bit, text that is not a JSON object) is closed with 1007 and a reason;
    the viewers see the stream go offline."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/bad") as viewer:
            assert await text(viewer) == {"type": "status", "state": "offline"}
            async with ws_connect(f"{relay.ws_url}/publish/bad") as publisher:
                assert await text(viewer) == {"type": "status", "state": "live"}
                await publisher.send(media(KEY, b"fine"))
                await publisher.send(message)
                code, reason = await expect_close(publisher)
                assert code == 1007, (code, reason)
                assert reason
            fine = await viewer.recv()
            assert isinstance(fine, bytes) and fine.endswith(b"fine")
            assert await text(viewer) == {"type": "status", "state": "offline"}

    run(scenario(), 30)


@pytest.mark.timeout(30)
def test_publisher_invalid_utf8_text_gets_1007(relay: RelayProcess) -> None:
    """A text frame that is not UTF-8 is closed with 1007."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/publish/utf") as publisher:
            await text(publisher)
            await publisher.send(b"\xff\xfe{}", text=True)
            code, _ = await expect_close(publisher)
            assert code == 1007

    run(scenario(), 20)


@pytest.mark.timeout(40)
def test_idle_publisher_gets_1008(start_relay: StartRelay) -> None:
    """With ``--publisher-idle-timeout 1``: a publisher that sends media every 0.3 s stays;
    one that sends nothing, or only metadata, is closed with 1008 soon after 1 s."""
    relay = start_relay("--publisher-idle-timeout", "1")

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/publish/busy") as busy:
            for _ in range(8):
                await busy.send(media(DELTA, b"tick"))
                await asyncio.sleep(0.3)
            assert busy.state.name == "OPEN"
        started = time.monotonic()
        async with ws_connect(f"{relay.ws_url}/publish/idle") as idle:
            code, reason = await expect_close(idle, timeout=8)
            assert code == 1008, (code, reason)
        assert 0.8 <= time.monotonic() - started < 1 + 4
        async with ws_connect(f"{relay.ws_url}/publish/meta-only") as chatty:
            for _ in range(3):
                await chatty.send('{"type":"meta","n":1}')
                await asyncio.sleep(0.25)
            code, _ = await expect_close(chatty, timeout=8)
            assert code == 1008

    run(scenario(), 30)


@pytest.mark.timeout(60)
def test_stalled_viewer_gets_1008(start_relay: StartRelay) -> None:
    """With ``--viewer-stall-timeout 1`` a viewer whose socket never reads (small receive
    buffer) is closed with 1008: when it finally reads, the close frame is there after
    the data that was in flight."""
    relay = start_relay(
        "--viewer-stall-timeout", "1", "--close-timeout", "15", "--ping-interval", "60",
        "--viewer-queue-bytes", "1048576",
    )

    async def scenario() -> int | None:
        stalled = await asyncio.to_thread(
            RawWebSocket.open, relay.port, "/watch/stall", rcvbuf=4096
        )
        assert stalled.status == 101
        async with ws_connect(f"{relay.ws_url}/publish/stall") as publisher:
            chunk = b"p" * 65536
            for index in range(160):  # 10 MiB: far past every buffer on the way
                await publisher.send(media(KEY if index % 30 == 0 else DELTA, chunk))
            await asyncio.sleep(3)

            def read_until_close() -> int | None:
                stalled.sock.settimeout(10)
                while True:
                    frame = stalled.read_frame()
                    if frame.opcode == OP_CLOSE:
                        return frame.close_code
            try:
                return await asyncio.to_thread(read_until_close)
            finally:
                stalled.close()

    code = run(scenario(), 45)
    assert code == 1008, relay.log_excerpt()
    assert "stalled" in relay.log_text()


@pytest.mark.timeout(40)
def test_oversized_messages_get_1009(start_relay: StartRelay) -> None:
    """A publisher message over ``--max-message-bytes`` and a viewer text message over
    4 KiB are closed with 1009; a message exactly at the bound is relayed."""
    relay = start_relay("--max-message-bytes", "100000")

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/big") as viewer:
            await text(viewer)
            async with ws_connect(f"{relay.ws_url}/publish/big") as publisher:
                await text(viewer)
                at_bound = media(KEY, b"a" * (100000 - 9))
                await publisher.send(at_bound)
                assert await viewer.recv() == at_bound
                try:
                    await publisher.send(media(DELTA, b"b" * 100001))
                except ConnectionClosed:
                    pass
                code, reason = await expect_close(publisher)
                assert code == 1009, (code, reason)
            await viewer.send('{"type":"keyframe-request","pad":"' + "x" * 4200 + '"}')
            code, reason = await expect_close(viewer)
            assert code == 1009, (code, reason)
        async with ws_connect(f"{relay.ws_url}/publish/meta") as publisher:
            await publisher.send('{"type":"meta","pad":"' + "m" * (65 * 1024) + '"}')
            code, _ = await expect_close(publisher)
            assert code == 1009

    run(scenario(), 30)
