"""Fan-out, late joiners, keyframe requests, publisher restarts and takeover, seen by real
``websockets`` clients against the real ``twistd streamrelay`` process."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from websockets.asyncio.client import ClientConnection

from tests.support.media import CONFIG, DELTA, KEY, flags_of, media, numbered_payload
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import run
from tests.support.ws_client import (
    SUBPROTOCOL,
    binary,
    collect_text,
    expect_close,
    text,
    text_of_type,
    ws_connect,
)

pytestmark = pytest.mark.integration


def _script(count: int, seed: int = 7) -> list[bytes]:
    """CONFIG, then ``count`` media messages of varied sizes (up to 64 KiB), a KEY every 30."""
    rng = random.Random(seed)
    messages = [media(CONFIG, b"avcC-config-v1")]
    for index in range(count):
        flags = KEY if index % 30 == 0 else DELTA
        size = rng.choice([0, 1, 17, 500, 1400, 4096, 20000, 65536 - 9, rng.randrange(0, 65527)])
        messages.append(media(flags, numbered_payload(index, size)))
    return messages


@pytest.mark.timeout(60)
def test_one_publisher_three_viewers_get_every_message_intact_and_in_order(
    relay: RelayProcess,
) -> None:
    """A user publishing 300 frames to three viewers sees each viewer receive status, the
    stream's meta, then every binary message byte for byte, in order, none duplicated; the
    publisher hears the viewer count."""
    messages = _script(300)

    async def scenario() -> None:
        viewers = [
            await ws_connect(f"{relay.ws_url}/watch/fan", subprotocols=[SUBPROTOCOL]).__aenter__()
            for _ in range(3)
        ]
        try:
            for viewer in viewers:
                assert viewer.subprotocol == SUBPROTOCOL
                assert await text(viewer) == {"type": "status", "state": "offline"}
            async with ws_connect(f"{relay.ws_url}/publish/fan") as publisher:
                first = await text_of_type(publisher, "viewers")
                assert first == {"type": "viewers", "count": 3}
                for viewer in viewers:
                    assert await text(viewer) == {"type": "status", "state": "live"}
                await publisher.send('{"type":"meta","codec":"avc1.42E01F","width":640}')
                for viewer in viewers:
                    meta = await text(viewer)
                    assert meta == {"type": "meta", "codec": "avc1.42E01F", "width": 640}

                async def receive_all(viewer: ClientConnection) -> list[bytes]:
                    got = []
                    for _ in messages:
                        got.append(await binary(viewer, timeout=15))
                    return got

                receivers = [asyncio.create_task(receive_all(v)) for v in viewers]
                for message in messages:
                    await publisher.send(message)
                results = await asyncio.gather(*receivers)
                for got in results:
                    assert len(got) == len(messages)
                    for index, (sent, received) in enumerate(zip(messages, got, strict=True)):
                        assert received == sent, f"message {index} differs"
                # Nothing more (no duplicate) is pending.
                for viewer in viewers:
                    with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                        await asyncio.wait_for(viewer.recv(), 0.3)
                # One viewer leaves: the publisher hears 2.
                await viewers[0].close()
                assert (await text_of_type(publisher, "viewers")) == {"type": "viewers", "count": 2}
        finally:
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 50)


@pytest.mark.timeout(30)
def test_no_subprotocol_is_treated_as_v1(relay: RelayProcess) -> None:
    """A client that offers no subprotocol still gets v1 service (status first), and one
    that offers ``streamrelay.v1`` has it selected."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/plain") as viewer:
            assert viewer.subprotocol is None
            assert await text(viewer) == {"type": "status", "state": "offline"}
        async with ws_connect(
            f"{relay.ws_url}/watch/plain", subprotocols=["other.v9", SUBPROTOCOL]
        ) as viewer:
            assert viewer.subprotocol == SUBPROTOCOL

    run(scenario(), 20)


@pytest.mark.timeout(30)
def test_late_joiner_starts_with_config_then_cached_gop(relay: RelayProcess) -> None:
    """A viewer joining mid-GOP gets status live, meta, then CONFIG, the KEY and every
    message since, at once (no wait for the next keyframe), then the live messages."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/publish/late") as publisher:
            assert await text(publisher) == {"type": "viewers", "count": 0}
            await publisher.send('{"type":"meta","fps":30}')
            old_gop = [media(KEY, b"old-key"), media(DELTA, b"old-1")]
            config = media(CONFIG, b"config-A")
            gop = [media(KEY, b"key-1"), media(DELTA, b"d-1"), media(DELTA, b"d-2")]
            for message in [media(CONFIG, b"config-0"), *old_gop, config, *gop]:
                await publisher.send(message)
            await asyncio.sleep(0.2)
            async with ws_connect(f"{relay.ws_url}/watch/late") as viewer:
                assert await text(viewer) == {"type": "status", "state": "live"}
                assert await text(viewer) == {"type": "meta", "fps": 30}
                first = await binary(viewer)
                assert first == config and flags_of(first) == CONFIG
                for expected in gop:
                    assert await binary(viewer) == expected
                live = media(DELTA, b"d-3")
                await publisher.send(live)
                assert await binary(viewer) == live
                assert (await text_of_type(publisher, "viewers")) == {
                    "type": "viewers", "count": 1,
                }

    run(scenario(), 20)


@pytest.mark.timeout(40)
def test_keyframe_requests_without_cache_are_sent_and_rate_limited(start_relay: StartRelay) -> None:
    """With the GOP cache off a joining viewer waits for the next KEY and the publisher is
    asked for one; a viewer's own requests are rate-limited to one per interval, and a
    need inside the interval is sent at its end, never lost."""
    relay = start_relay("--gop-cache-bytes", "0", "--keyframe-request-interval", "1")

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/publish/kf") as publisher:
            assert await text(publisher) == {"type": "viewers", "count": 0}
            config = media(CONFIG, b"cfg")
            await publisher.send(config)
            await publisher.send(media(KEY, b"k0"))
            await publisher.send(media(DELTA, b"d0"))
            await asyncio.sleep(0.1)
            async with ws_connect(f"{relay.ws_url}/watch/kf") as viewer:
                assert await text(viewer) == {"type": "status", "state": "live"}
                joined = await collect_text(publisher, 0.5)
                assert {"type": "keyframe-request"} in joined, joined
                assert {"type": "viewers", "count": 1} in joined, joined
                # Deltas before the next KEY are not sent to the waiting viewer.
                await publisher.send(media(DELTA, b"d1"))
                key = media(KEY, b"k1")
                await publisher.send(key)
                assert await binary(viewer) == config
                assert await binary(viewer) == key
                # Past the interval: the viewer's own request goes out at once ...
                await asyncio.sleep(1.1)
                started = time.monotonic()
                for _ in range(5):
                    await viewer.send('{"type":"keyframe-request"}')
                requests = []
                deadline = started + 2.6
                while (remaining := deadline - time.monotonic()) > 0:
                    try:
                        message = await asyncio.wait_for(publisher.recv(), remaining)
                    except (TimeoutError, asyncio.TimeoutError):
                        break
                    if message == '{"type":"keyframe-request"}':
                        requests.append(time.monotonic() - started)
                # ... and the burst of five becomes one now plus one at the interval's end.
                assert len(requests) == 2, requests
                assert requests[0] < 0.8, requests
                assert requests[1] - requests[0] >= 0.85, requests

    run(scenario(), 30)


@pytest.mark.timeout(30)
def test_viewer_count_updates_are_coalesced_and_the_last_arrives(relay: RelayProcess) -> None:
    """Ten viewers joining in a burst, then leaving in a burst: the publisher gets at most
    a few ``viewers`` messages a second, and each burst's final count (10, then 0)
    always arrives."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/publish/crowd") as publisher:
            assert await text(publisher) == {"type": "viewers", "count": 0}
            started = time.monotonic()
            viewers = []
            for _ in range(10):
                viewers.append(await ws_connect(f"{relay.ws_url}/watch/crowd").__aenter__())
            counts = []

            async def until(final: int) -> None:
                while True:
                    message = await text_of_type(publisher, "viewers", timeout=3)
                    counts.append(message["count"])
                    if message["count"] == final:
                        return

            await until(10)
            for viewer in viewers:
                await viewer.close()
            await until(0)
            elapsed = time.monotonic() - started
            assert counts[-1] == 0
            assert len(counts) <= 4 * elapsed + 2, (counts, elapsed)
            # Within each burst the counts only move one way: no stale value arrives late.
            peak = counts.index(10)
            assert counts[: peak + 1] == sorted(counts[: peak + 1]), counts
            assert counts[peak:] == sorted(counts[peak:], reverse=True), counts

    run(scenario(), 20)


@pytest.mark.timeout(40)
def test_viewers_survive_publisher_restart(relay: RelayProcess) -> None:
    """Viewers connected before any publisher see offline, then live with the publisher's
    CONFIG and KEY; they stay across the publisher leaving (offline) and a new publisher
    (live again, starting from its CONFIG and KEY, never from its earlier deltas)."""

    async def scenario() -> None:
        viewers = [await ws_connect(f"{relay.ws_url}/watch/re").__aenter__() for _ in range(2)]
        try:
            for viewer in viewers:
                assert await text(viewer) == {"type": "status", "state": "offline"}
            for round_number in range(2):
                async with ws_connect(f"{relay.ws_url}/publish/re") as publisher:
                    for viewer in viewers:
                        assert await text(viewer) == {"type": "status", "state": "live"}
                    # A delta before any KEY cannot be decoded: not forwarded.
                    await publisher.send(media(DELTA, b"orphan-%d" % round_number))
                    config = media(CONFIG, b"cfg-%d" % round_number)
                    key = media(KEY, b"key-%d" % round_number)
                    delta = media(DELTA, b"delta-%d" % round_number)
                    for message in (config, key, delta):
                        await publisher.send(message)
                    for viewer in viewers:
                        assert await binary(viewer) == config
                        assert await binary(viewer) == key
                        assert await binary(viewer) == delta
                for viewer in viewers:
                    assert await text(viewer) == {"type": "status", "state": "offline"}
        finally:
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 30)


@pytest.mark.timeout(40)
def test_takeover_closes_old_publisher_with_4409_and_viewers_continue(relay: RelayProcess) -> None:
    """A second publisher replaces the first: the first is closed with 4409, viewers stay
    connected (no offline flap) and continue from the new publisher's CONFIG and KEY."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/take") as viewer:
            assert await text(viewer) == {"type": "status", "state": "offline"}
            first = await ws_connect(f"{relay.ws_url}/publish/take").__aenter__()
            assert await text(viewer) == {"type": "status", "state": "live"}
            old = [media(CONFIG, b"old-cfg"), media(KEY, b"old-key"), media(DELTA, b"old-d")]
            for message in old:
                await first.send(message)
            for expected in old:
                assert await binary(viewer) == expected
            async with ws_connect(f"{relay.ws_url}/publish/take") as second:
                code, reason = await expect_close(first)
                assert code == 4409, (code, reason)
                await second.send(media(DELTA, b"new-orphan"))
                new = [media(CONFIG, b"new-cfg"), media(KEY, b"new-key"), media(DELTA, b"new-d")]
                for message in new:
                    await second.send(message)
                received = [await viewer.recv() for _ in range(3)]
                assert received == new, received
                assert (await text_of_type(second, "viewers")) == {"type": "viewers", "count": 1}

    run(scenario(), 30)
