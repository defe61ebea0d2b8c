"""A viewer that never reads: it must not slow the others, the relay's memory stays
bounded by ``--viewer-queue-bytes``, and when it reads again it resumes with
``dropped``, the latest CONFIG and a KEY."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import pytest

from tests.support.figures import write_artifact
from tests.support.frames import OP_BINARY, OP_TEXT
from tests.support.media import (
    CONFIG,
    DELTA,
    KEY,
    capture_of,
    flags_of,
    media,
    now_us,
    numbered_payload,
)
from tests.support.raw_ws import RawWebSocket
from tests.support.relay_api import api_streams_async, stream_entry
from tests.support.relay_process import StartRelay
from tests.support.waiting import run
from tests.support.ws_client import text, ws_connect

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
QUEUE_BYTES = 1 * MIB
MESSAGE_BYTES = 32 * 1024
TOTAL_BYTES = 60 * MIB
GOP = 30
PUSH_RATE = 10 * MIB  # bytes a second: a fast live source, well within loopback speed
# Generous: the queue bound, plus a GOP in the cache, transport buffers, the good viewer's
# in-flight data and allocator slack -- far below the 60 MiB that an unbounded queue holds.
RSS_GROWTH_BOUND = QUEUE_BYTES + 31 * MIB


def _index(message: bytes) -> int:
    return int(message[10:18])


@pytest.mark.timeout(120)
def test_never_reading_viewer_does_not_slow_others_and_memory_stays_bounded(
    start_relay: StartRelay,
) -> None:
    """One viewer's socket never reads (tiny receive buffer) while the publisher pushes
    60 MiB: the other viewer still gets every message in order with low delay, the
    relay's RSS grows by no more than a generous bound over the 1 MiB viewer queue,
    ``/api/streams`` counts drops, and when the stuck viewer reads again it finds intact
    frames, then ``{"type": "dropped"}``, then the latest CONFIG, then a KEY."""
    relay = start_relay(
        "--viewer-queue-bytes", str(QUEUE_BYTES),
        "--viewer-stall-timeout", "120", "--ping-interval", "120", "--ping-timeout", "120",
        "--publisher-idle-timeout", "120",
    )
    count = TOTAL_BYTES // MESSAGE_BYTES
    figures: dict[str, Any] = {"queue_bytes": QUEUE_BYTES, "message_bytes": MESSAGE_BYTES}

    async def scenario() -> None:
        stuck = await asyncio.to_thread(RawWebSocket.open, relay.port, "/watch/slow", rcvbuf=4096)
        assert stuck.status == 101
        async with ws_connect(f"{relay.ws_url}/watch/slow", max_queue=None) as good, \
                ws_connect(f"{relay.ws_url}/publish/slow", max_queue=None) as publisher:
            assert (await text(good))["state"] == "offline"
            assert (await text(good))["state"] == "live"
            config_v1 = media(CONFIG, b"config-v1")
            config_v2 = media(CONFIG, b"config-v2")
            # A CONFIG alone is held back until the first KEY.
            await publisher.send(config_v1)
            await asyncio.sleep(0.3)
            rss_before = relay.rss()
            figures["rss_before"] = rss_before

            received: list[int] = []
            delays: list[float] = []
            texts: list[str] = []
            configs: list[bytes] = []

            async def watch() -> None:
                while len(received) < count:
                    message = await asyncio.wait_for(good.recv(), 10)
                    if isinstance(message, str):
                        texts.append(message)
                        if json.loads(message)["type"] == "dropped":
                            raise AssertionError(
                                f"the reading viewer was dropped {message} after "
                                f"{received[-1:]}, max delay so far {max(delays, default=0):.3f} s"
                            )
                        continue
                    if flags_of(message) == CONFIG:
                        configs.append(message)
                        continue
                    delays.append((now_us() - capture_of(message)) / 1e6)
                    received.append(_index(message))

            to_publisher: list[dict] = []

            async def listen() -> None:
                async for message in publisher:
                    to_publisher.append(json.loads(message))

            listener = asyncio.create_task(listen())
            watcher = asyncio.create_task(watch())
            peak = rss_before
            started = time.monotonic()
            pushed = 0
            for index in range(count):
                if index == count // 2:
                    await publisher.send(config_v2)
                message = media(KEY if index % GOP == 0 else DELTA,
                                numbered_payload(index, MESSAGE_BYTES - 9))
                await publisher.send(message)
                pushed += len(message)
                if index % GOP == GOP - 1:
                    peak = max(peak, relay.rss())
                    # A live source is paced: PUSH_RATE bytes a second.
                    ahead = started + pushed / PUSH_RATE - time.monotonic()
                    await asyncio.sleep(max(ahead, 0.001))
            await watcher
            figures["push_seconds"] = round(time.monotonic() - started, 2)
            figures["push_rate_bytes_per_s"] = PUSH_RATE
            peak = max(peak, relay.rss())
            rss_after = relay.rss()
            figures.update(bytes_pushed=pushed, rss_peak=peak, rss_after=rss_after)
            figures["good_viewer_delay_max_s"] = round(max(delays), 3)
            figures["good_viewer_delay_median_s"] = round(statistics.median(delays), 4)

            assert received == list(range(count)), "the reading viewer missed or reordered"
            assert configs == [config_v1, config_v2], configs
            assert not [t for t in texts if json.loads(t)["type"] == "dropped"], texts
            entry = stream_entry(await api_streams_async(relay), "slow")
            assert entry is not None
            figures["api_dropped"] = entry["dropped"]
            assert entry["dropped"] > 0, entry

            # The stuck viewer reads again; the publisher keeps going with fresh GOPs.
            stuck.sock.settimeout(20)
            events: list[tuple] = []

            def read_until_caught_up() -> None:
                while True:
                    frame = stuck.read_message()
                    assert frame.opcode in (OP_TEXT, OP_BINARY), f"unexpected opcode {frame.opcode}"
                    if frame.opcode == OP_TEXT:
                        events.append(("text", json.loads(frame.payload)))
                        continue
                    flags = flags_of(frame.payload)
                    if flags == CONFIG:
                        events.append(("config", bytes(frame.payload)))
                        continue
                    index = _index(frame.payload)
                    events.append(("key" if flags == KEY else "delta", index))
                    if flags == KEY and index >= count:
                        return

            reader = asyncio.create_task(asyncio.to_thread(read_until_caught_up))
            index = count
            while not reader.done() and index < count + 600:
                flags = KEY if index % GOP == 0 else DELTA
                await publisher.send(media(flags, numbered_payload(index, 1000)))
                index += 1
                await asyncio.sleep(0.005)
            await reader

            # Intact, ordered frames; every gap is announced by a "dropped" notice counting
            # exactly the missing messages, followed by (the changed CONFIG and) a KEY.
            notices = []
            last_index = -1
            pending_notice = None
            config_v2_seen = False
            for position, event in enumerate(events):
                kind = event[0]
                if kind == "text":
                    if event[1]["type"] == "dropped":
                        assert pending_notice is None, "two notices with no KEY between"
                        pending_notice = event[1]["messages"]
                        notices.append(pending_notice)
                        following = [e[0] for e in events[position + 1:position + 3]]
                        assert following[0] in ("key", "config"), following
                        if following[0] == "config":
                            assert following[1] == "key", following
                    continue
                if kind == "config":
                    if last_index < 0:
                        assert event[1] == config_v1, "first CONFIG is not the publisher's"
                    else:
                        assert event[1] == config_v2 and not config_v2_seen, (
                            position, events[max(0, position - 3):position + 3]
                        )
                        config_v2_seen = True
                    continue
                index = event[1]
                assert index > last_index, f"message {index} after {last_index}"
                gap = index - last_index - 1
                if pending_notice is not None:
                    assert kind == "key"
                    # Exact equality is checked by the test below (a known miscount).
                    assert gap <= pending_notice, (
                        f"after message {last_index} the notice said {pending_notice} dropped "
                        f"but the next KEY is {index} ({gap} missing); notices {notices}; "
                        f"relay total dropped {figures.get('api_dropped')}"
                    )
                    pending_notice = None
                else:
                    assert gap == 0, f"messages {last_index + 1}..{index - 1} silently lost"
                if index >= count // 2:
                    assert config_v2_seen, "a KEY after the CONFIG change arrived before it"
                last_index = index
            assert notices, "no dropped notice"
            figures["dropped_notices"] = len(notices)
            figures["dropped_last_notice_messages"] = notices[-1]
            figures["stale_messages_read"] = sum(1 for e in events if e[0] in ("key", "delta"))
            entry = stream_entry(await api_streams_async(relay), "slow")
            assert entry is not None
            assert entry["dropped"] == sum(notices), (entry["dropped"], notices)
            figures["messages_missing_at_stuck_viewer"] = count - figures["stale_messages_read"] + (
                1 if last_index >= count else 0
            )
            await asyncio.sleep(0.2)
            listener.cancel()
            requests = [m for m in to_publisher if m == {"type": "keyframe-request"}]
            figures["keyframe_requests_to_publisher"] = len(requests)
            assert requests, to_publisher
        stuck.close()

    try:
        run(scenario(), 110)
    finally:
        print("never-reading viewer figures:", json.dumps(figures))
        write_artifact("never_reading_viewer.json", figures)
    growth = int(figures["rss_peak"]) - int(figures["rss_before"])
    assert growth <= RSS_GROWTH_BOUND, (
        f"relay RSS grew by {growth / MIB:.1f} MiB while one viewer never read "
        f"(bound {RSS_GROWTH_BOUND / MIB:.0f} MiB)\n" + relay.log_excerpt()
    )
    assert float(figures["good_viewer_delay_max_s"]) < 5.0, figures


@pytest.mark.timeout(60)
def test_dropped_notice_counts_exactly_the_missing_messages(start_relay: StartRelay) -> None:
    """After a stuck viewer resumes, ``{"type": "dropped", "messages": N}`` says exactly
    how many media messages it missed, even when the publisher changed its CONFIG while
    the viewer was stuck (the CONFIG is resent, so it is not missing)."""
    relay = start_relay(
        "--viewer-queue-bytes", str(QUEUE_BYTES), "--viewer-stall-timeout", "120",
        "--ping-interval", "120", "--ping-timeout", "120",
    )
    total = 8 * MIB // MESSAGE_BYTES

    async def scenario() -> list[tuple]:
        stuck = await asyncio.to_thread(RawWebSocket.open, relay.port, "/watch/count", rcvbuf=4096)
        async with ws_connect(f"{relay.ws_url}/publish/count") as publisher:
            await publisher.send(media(CONFIG, b"config-v1"))
            for index in range(total + GOP):
                if index == total // 2:
                    await publisher.send(media(CONFIG, b"config-v2"))
                await publisher.send(media(KEY if index % GOP == 0 else DELTA,
                                           numbered_payload(index, MESSAGE_BYTES - 9)))
                if index % GOP == GOP - 1:
                    await asyncio.sleep(0.02)
            stuck.sock.settimeout(20)
            seen: list[tuple] = []

            def read() -> None:
                while True:
                    frame = stuck.read_message()
                    if frame.opcode == OP_TEXT:
                        value = json.loads(frame.payload)
                        if value["type"] == "dropped":
                            seen.append(("dropped", value["messages"]))
                    elif flags_of(frame.payload) != CONFIG:
                        seen.append(("media", _index(frame.payload)))
                        if seen[-1][1] >= total:
                            return

            reader = asyncio.create_task(asyncio.to_thread(read))
            index = total + GOP
            while not reader.done() and index < total + 20 * GOP:
                await publisher.send(media(KEY if index % GOP == 0 else DELTA, b"x" * 100))
                index += 1
                await asyncio.sleep(0.005)
            await reader
        stuck.close()
        return seen

    seen = run(scenario(), 50)
    last = -1
    pending = None
    mismatches = []
    for kind, value in seen:
        if kind == "dropped":
            pending = value
            continue
        gap = value - last - 1
        if gap or pending is not None:
            if gap != pending:
                mismatches.append((last, value, gap, pending))
            pending = None
        last = value
    assert not mismatches, f"(last seen, next, missing, notice said): {mismatches}"
