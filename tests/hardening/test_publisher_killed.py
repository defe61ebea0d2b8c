"""Hardening 6: a publisher killed with SIGKILL in the middle of a frame.

A publisher process (``tests.support.half_frame_publisher``) sends complete messages, then
half of a 256 KiB frame, and is SIGKILLed. Three viewers must see ``offline`` within 1 s
of the kill, must only ever have received complete, byte-exact messages from the
publisher's sequence (never the half message), and a new publisher must be accepted at
once. Three rounds, each killed publisher followed by the next one, then a last one.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.figures import record_figure, rounded
from tests.support.half_frame_publisher import PARTIAL_SEQUENCE
from tests.support.media import CONFIG, KEY, media_is_intact, media_sequence
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.ws_client import PacedPublisher, Viewer

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

ROUNDS = 3
MESSAGES = 40
# The publisher runs as ``python -m tests.support.half_frame_publisher`` from here.
REPOSITORY = Path(__file__).resolve().parents[2]


async def _wait_media(viewers: list[Viewer], sequence: int, timeout: float) -> bool:
    """Wait until every viewer received message ``sequence``; False at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(sequence in viewer.sequences() for viewer in viewers):
            return True
        await asyncio.sleep(0.005)
    return False


async def _scenario(relay: RelayProcess) -> dict[str, Any]:
    url = f"{relay.ws_url}/watch/killed"
    viewers = [await Viewer(url, name=f"viewer-{index}").start() for index in range(3)]
    for viewer in viewers:
        await viewer.wait_status("offline")
    rounds: list[dict[str, Any]] = []
    for number in range(ROUNDS):
        first = (number + 1) * 1000
        launched = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.half_frame_publisher",
            str(relay.port),
            "killed",
            str(first),
            str(MESSAGES),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPOSITORY,
        )
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode().strip()
        assert line == "HALF", line
        accepted = time.monotonic() - launched
        final = first + MESSAGES - 1
        assert await _wait_media(viewers, final, 5), f"viewers did not all receive {final}"
        await asyncio.sleep(0.2)  # the half frame is in the relay's hands
        offline_before = [
            len([s for s in viewer.statuses() if s[1] == "offline"]) for viewer in viewers
        ]
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        offline = []
        for viewer, count in zip(viewers, offline_before, strict=True):
            seen = await _wait_offline(viewer, count, 5)
            offline.append(None if seen is None else seen - killed_at)
        await process.wait()
        rounds.append(
            {
                "process_to_half_frame_s": accepted,
                "offline_after_kill_s": offline,
                "exit": process.returncode,
            }
        )
    # A last publisher, at once.
    started = time.monotonic()
    last = await PacedPublisher(
        f"{relay.ws_url}/publish/killed", rate=50, gop=10, size=1000, limit=20
    ).start()
    last_handshake = time.monotonic() - started
    await asyncio.wait_for(last.done.wait(), 5)
    await _wait_media(viewers, 19, 5)  # the sequence check below says what is missing
    await last.close()
    for viewer in viewers:
        await viewer.close()
    return {"viewers": viewers, "rounds": rounds, "last_handshake_s": last_handshake}


async def _wait_offline(viewer: Viewer, already: int, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        offline = [at for at, state in viewer.statuses() if state == "offline"]
        if len(offline) > already:
            return offline[already]
        await asyncio.sleep(0.002)
    return None


def _expected_sequences() -> list[int]:
    expected: list[int] = []
    for number in range(ROUNDS):
        first = (number + 1) * 1000
        expected += list(range(first, first + MESSAGES))
    return expected + list(range(20))


def test_publisher_killed_mid_frame(start_relay: StartRelay) -> None:
    """Publishers SIGKILLed mid-frame: viewers see ``offline`` within 1 s, only ever get whole
    messages of the publisher's sequence, and the next publisher is accepted at once."""
    relay = start_relay()
    outcome = asyncio.run(_scenario(relay))
    viewers: list[Viewer] = outcome["viewers"]
    offline = [value for round_ in outcome["rounds"] for value in round_["offline_after_kill_s"]]
    broken = [
        (viewer.name, len(message))
        for viewer in viewers
        for _, message in viewer.media
        if not media_is_intact(message)
    ]
    partial = [
        viewer.name
        for viewer in viewers
        if any(media_sequence(m) == PARTIAL_SEQUENCE for _, m in viewer.media if len(m) >= 17)
    ]
    expected = _expected_sequences()
    sequences = {viewer.name: viewer.sequences() for viewer in viewers}
    statuses = {viewer.name: [state for _, state in viewer.statuses()] for viewer in viewers}
    firsts_ok = all(_rounds_start_with_config_then_key(viewer) for viewer in viewers)
    record_figure(
        "publisher_sigkill_mid_frame",
        rounds=ROUNDS,
        messages_per_round=MESSAGES,
        half_frame_bytes=(256 * 1024 + 14) // 2,
        offline_after_kill_s=[None if value is None else rounded(value) for value in offline],
        offline_max_s=rounded(max((v for v in offline if v is not None), default=-1)),
        next_publisher_handshake_s=rounded(outcome["last_handshake_s"]),
        publisher_process_to_half_frame_s=[
            rounded(r["process_to_half_frame_s"]) for r in outcome["rounds"]
        ],
        media_received_per_viewer=[len(viewer.media) for viewer in viewers],
        broken_messages=len(broken),
        partial_forwarded=len(partial),
    )
    assert all(value is not None and value < 1.0 for value in offline), offline
    assert not broken and not partial
    assert all(found == expected for found in sequences.values()), sequences
    assert firsts_ok
    for states in statuses.values():
        assert states == ["offline"] + ["live", "offline"] * ROUNDS + ["live", "offline"], states
    assert outcome["last_handshake_s"] < 1.0


def _rounds_start_with_config_then_key(viewer: Viewer) -> bool:
    """After every (re)start of a publisher the viewer's first two messages are the
    CONFIG then a KEY."""
    previous = None
    for index, (_, message) in enumerate(viewer.media):
        sequence = media_sequence(message)
        if previous is None or sequence != previous + 1:
            if message[0] != CONFIG:
                return False
            if index + 1 < len(viewer.media) and viewer.media[index + 1][1][0] != KEY:
                return False
        previous = sequence
    return True
