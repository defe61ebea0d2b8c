"""Hardening 2 (issue 8): the memory bounds count memory, not payload bytes.

A publisher sends one KEY, then 200,000 media messages of 9 bytes (the smallest v1
allows) as fast as loopback takes them.  Each message used to cost the relay ~300 bytes
of Python objects while it counted 9, so a cache "bounded" at a few MiB grew by tens of
MB.  Now every holder charges each message its bytes plus a measured overhead.  The
relay's RSS is sampled throughout; its peak growth over the RSS before the flood must
stay within 1.5 x the configured bound:

======================================  =================================================
case                                    bound
======================================  =================================================
GOP cache, ``--gop-cache-bytes 1.5 MiB``  1.5 MiB (the byte bound is reached first)
GOP cache, default options              --gop-cache-messages (4096) x the cost of one
                                        9-byte message (the count cap is reached first)
a viewer that never reads,              1.5 MiB (``--gop-cache-bytes 0``: the queue
``--viewer-queue-bytes 1.5 MiB``          alone holds the messages)
======================================  =================================================
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.gop import DEFAULT_GOP_CACHE_MESSAGES
from tests.support.figures import record_figure, rounded
from tests.support.frames import OP_BINARY, client_frame
from tests.support.media import KEY, media_message
from tests.support.raw_ws import flood_connections
from tests.support.relay_api import MB, RssSampler, listed_entry
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(180)]

TINY_MESSAGES = 200_000
BATCH = 2_000
VIEWER_FLOOD_MESSAGES = 600_000  # 6.6 MB framed, past the kernel's socket buffers
BOUND = 3 * MB // 2  # 1.5 MiB
RATIO = 1.5
STREAM = "flood"
# A v1 message of 9 bytes: the header alone (a delta, capture time 1).
TINY_FRAME = client_frame(OP_BINARY, b"\x00" + (1).to_bytes(8, "big"))


# The flood sends as fast as a socket takes it, far past the publisher's default inbound
# budget (which would close it with 1008 first: tests/hardening/test_inbound_flood.py):
# raised here so that the memory bounds are what is measured.
FULL_SPEED = ("--publisher-frames-per-second", "100000000")

def _flood(
    relay: RelayProcess, with_viewer: bool, messages: int = TINY_MESSAGES
) -> dict[str, Any]:
    """Publish one KEY and 100 tiny messages, measure the RSS, then flood ``messages``
    tiny messages while sampling it; returns the figures."""
    # With ``with_viewer``, a viewer with a small receive window that never reads.
    watch = f"/watch/{STREAM}" if with_viewer else None
    with flood_connections(relay.port, STREAM, watch) as (publisher, _):
        publisher.sendall(client_frame(OP_BINARY, media_message(0, KEY, 9)))
        publisher.sendall(TINY_FRAME * 100)
        expected = 101
        wait_until(lambda: listed_entry(relay, STREAM)["messages_in"] >= expected, 10)
        time.sleep(0.3)
        # The relay reads the publisher as fast as it relays (some 30,000 tiny messages a
        # second here); a flood larger than the kernel's buffers waits on it.
        publisher.settimeout(60)
        with RssSampler(relay) as sampler:
            started = time.monotonic()
            for _ in range(messages // BATCH):
                publisher.sendall(TINY_FRAME * BATCH)
            sent_after = time.monotonic() - started
            expected += messages
            wait_until(lambda: listed_entry(relay, STREAM)["messages_in"] >= expected, 60, 0.1)
            relayed_after = time.monotonic() - started
            time.sleep(0.3)
        entry = listed_entry(relay, STREAM)
        return {
            "messages": entry["messages_in"],
            "dropped": entry["dropped"],
            "sent_s": rounded(sent_after),
            "relayed_s": rounded(relayed_after),
            "rss_before_mb": rounded(sampler.start_rss / MB, 2),
            "rss_peak_growth_mb": rounded(sampler.peak_growth / MB, 3),
            "rss_final_growth_mb": rounded((relay.rss() - sampler.start_rss) / MB, 3),
        }


def test_tiny_flood_into_a_small_gop_cache_stays_within_its_bound(start_relay: StartRelay) -> None:
    """``--gop-cache-bytes 1.5 MiB`` (about 3,400 tiny messages at their real cost, under
    the message cap): RSS grows by at most 1.5 x 1.5 MiB."""
    relay = start_relay("--gop-cache-bytes", str(BOUND), *FULL_SPEED)
    figures = _flood(relay, with_viewer=False)
    record_figure(
        "memory bound: GOP cache, 9-byte flood", bound_mb=rounded(BOUND / MB), **figures
    )
    assert figures["rss_peak_growth_mb"] * MB <= RATIO * BOUND, figures


def test_tiny_flood_with_default_options_hits_the_message_cap(start_relay: StartRelay) -> None:
    """Default options (8 MiB GOP cache): 4,096 tiny messages reach the message cap
    first, so RSS grows by at most 1.5 x what 4,096 such messages are charged."""
    relay = start_relay(*FULL_SPEED)
    bound = DEFAULT_GOP_CACHE_MESSAGES * (9 + MESSAGE_OVERHEAD_BYTES)
    figures = _flood(relay, with_viewer=False)
    record_figure(
        "memory bound: GOP cache message cap, 9-byte flood", bound_mb=rounded(bound / MB), **figures
    )
    assert figures["rss_peak_growth_mb"] * MB <= RATIO * bound, figures


def test_tiny_flood_towards_a_viewer_that_does_not_read(start_relay: StartRelay) -> None:
    """``--viewer-queue-bytes 1.5 MiB`` and no GOP cache: the viewer's queue and its
    transport hold at most 1.5 x 1.5 MiB of real memory; the rest is dropped."""
    relay = start_relay(
        *FULL_SPEED,
        "--gop-cache-bytes", "0",
        "--viewer-queue-bytes", str(BOUND),
        "--viewer-stall-timeout", "120",
    )
    # The relay writes straight into the kernel while a viewer's socket takes bytes: its
    # send buffer (up to net.ipv4.tcp_wmem's maximum, 4 MiB by default) absorbs the first
    # few MB before the relay holds anything itself, so the flood must be larger than that
    # for the queue's bound to be what is measured.
    figures = _flood(relay, with_viewer=True, messages=VIEWER_FLOOD_MESSAGES)
    record_figure(
        "memory bound: viewer queue, 9-byte flood", bound_mb=rounded(BOUND / MB), **figures
    )
    assert figures["dropped"] > 0, "the viewer's queue never reached its bound"
    assert figures["rss_peak_growth_mb"] * MB <= RATIO * BOUND, figures
