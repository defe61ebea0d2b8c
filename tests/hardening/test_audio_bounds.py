"""Audio counts in every memory bound (docs/protocol.md, "Audio"): a publisher floods
the smallest AUDIO messages v1 allows (9 bytes, flag 0x04) as fast as loopback takes
them, and the relay's RSS growth stays within 1.5 x the configured bound, as for video
(tests/hardening/test_memory_bounds.py):

=============================================  ==========================================
case                                           bound
=============================================  ==========================================
GOP cache after a KEY, ``--gop-cache-bytes``   1.5 MiB
an audio viewer that never reads,              1.5 MiB (``--gop-cache-bytes 0``)
``--viewer-queue-bytes 1.5 MiB``
audio with no KEY yet                          the 64 KiB kept for the next KEY; 1.5 MiB
                                               is asserted (RSS noise)
=============================================  ==========================================
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.figures import record_figure, rounded
from tests.support.frames import OP_BINARY, client_frame
from tests.support.raw_ws import flood_connections
from tests.support.relay_api import MB, RssSampler, listed_entry
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(180)]

BOUND = 3 * MB // 2
RATIO = 1.5
BATCH = 2_000
STREAM = "audioflood"
# The flood's audio is captured at or after its KEY (audio captured before the KEY would
# be neither cached nor sent: it belongs to the GOP before), each packet later than the
# one before (a viewer gets audio whose capture times strictly increase: a repeat is
# passed over, which would not fill its queue).
TINY_KEY = client_frame(OP_BINARY, b"\x01" + (1).to_bytes(8, "big") + b"key")


def tiny_audio(first: int, count: int) -> bytes:
    """``count`` 9-byte AUDIO messages captured at ``first``, ``first + 1``, ..."""
    return b"".join(
        client_frame(OP_BINARY, b"\x04" + capture.to_bytes(8, "big"))
        for capture in range(first, first + count)
    )
FULL_SPEED = ("--publisher-frames-per-second", "100000000")


def _flood(relay: RelayProcess, messages: int, *, key: bool, viewer: bool) -> dict[str, Any]:
    """Optionally a KEY, then ``messages`` tiny AUDIO messages, RSS sampled throughout."""
    # With ``viewer``, an audio viewer with a small receive window that never reads.
    watch = f"/watch/{STREAM}?audio=1" if viewer else None
    with flood_connections(relay.port, STREAM, watch) as (publisher, _):
        expected = 100
        if key:
            publisher.sendall(TINY_KEY)
            expected += 1
        publisher.sendall(tiny_audio(1, 100))
        wait_until(lambda: listed_entry(relay, STREAM)["messages_in"] >= expected, 10)
        time.sleep(0.3)
        publisher.settimeout(60)
        with RssSampler(relay) as sampler:
            # Built before the sampling window's sends, so the flood comes at full speed.
            batches = [tiny_audio(101 + n * BATCH, BATCH) for n in range(messages // BATCH)]
            for batch in batches:
                publisher.sendall(batch)
            expected += messages
            wait_until(lambda: listed_entry(relay, STREAM)["messages_in"] >= expected, 90, 0.1)
            time.sleep(0.3)
        entry = listed_entry(relay, STREAM)
        return {
            "messages": entry["messages_in"],
            "dropped": entry["dropped"],
            "rss_peak_growth_mb": rounded(sampler.peak_growth / MB, 3),
        }


def test_audio_flood_into_the_gop_cache_stays_within_its_bound(start_relay: StartRelay) -> None:
    """After a KEY, audio fills the GOP cache at its real cost: RSS grows by at most
    1.5 x ``--gop-cache-bytes``."""
    relay = start_relay("--gop-cache-bytes", str(BOUND), *FULL_SPEED)
    figures = _flood(relay, 200_000, key=True, viewer=False)
    record_figure("memory bound: GOP cache, 9-byte audio flood", **figures)
    assert figures["rss_peak_growth_mb"] * MB <= RATIO * BOUND, figures


def test_audio_flood_before_any_key_keeps_only_a_little(start_relay: StartRelay) -> None:
    """With no KEY, only the last second of audio (64 KiB at most) waits for one."""
    relay = start_relay(*FULL_SPEED)
    figures = _flood(relay, 100_000, key=False, viewer=False)
    record_figure("memory bound: audio waiting for a KEY, 9-byte flood", **figures)
    assert figures["rss_peak_growth_mb"] * MB <= RATIO * BOUND, figures


def test_audio_flood_towards_an_audio_viewer_that_does_not_read(start_relay: StartRelay) -> None:
    """An audio viewer that never reads holds at most 1.5 x ``--viewer-queue-bytes`` of
    real memory; the rest of the audio is dropped (and counted)."""
    relay = start_relay(
        *FULL_SPEED,
        "--gop-cache-bytes", "0",
        "--viewer-queue-bytes", str(BOUND),
        "--viewer-stall-timeout", "120",
    )
    # Past the kernel's socket buffers (up to 4 MiB), as the video case.
    figures = _flood(relay, 600_000, key=True, viewer=True)
    record_figure("memory bound: audio viewer queue, 9-byte flood", **figures)
    assert figures["dropped"] > 0, "the viewer's queue never reached its bound"
    assert figures["rss_peak_growth_mb"] * MB <= RATIO * BOUND, figures
