"""A live source whose video must be transcoded keeps its audio, in sync, end to end.

The clip of :mod:`tests.integration.test_publisher_source_media` with B-frames (which the
v1 profile forbids, so the publisher decodes and re-encodes the video), AAC or Opus audio,
and a white beep frame (a transcoded frame's bytes change, its picture does not), is sent
as live MPEG-TS over UDP by a process of its own. The real ``streamrelay-publish`` reads
it and publishes to a real ``twistd streamrelay``; an independent ``websockets`` viewer
asks for audio (``?audio=1``). Checked: the status says the video is transcoded and what
happens to the audio; the viewer's Opus decodes with PyAV; the beep's onset carries the
capture time of the white frame (decoded from the received H.264 with PyAV) within
:data:`SYNC_BOUND_US`.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from streamrelay.wire import MediaMessage
from tests.integration.test_publisher_source import REPOSITORY, free_port, publisher
from tests.integration.test_publisher_source_media import (
    beep_onsets,
    meta_audio,
    split_messages,
    write_av_clip,
)
from tests.support.publisher_process import publisher_environment
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run
from tests.support.ws_client import Viewer

pytestmark = [pytest.mark.publisher_process, pytest.mark.timeout(180)]

#: How far the beep's onset may be from the white frame's capture time. The video is
#: stamped when the publisher decodes it, the audio through the latest decoded frame's
#: PTS-to-capture offset, so the two differ by the jitter of the decoder's output; one
#: frame (40 ms at 25 fps) bounds it with a margin on a loaded machine (measured: see
#: the report printed by the test).
SYNC_BOUND_US = 40_000
#: The first second or so is read in a burst (what FFmpeg buffered while probing the
#: source): the first pass's beep is not checked.
SETTLED_US = 2_500_000


def flash_times(frames: list[MediaMessage]) -> list[int]:
    """Decode the received H.264 (from its first KEY, with PyAV) and return the capture
    times of the white frames."""
    decoder: Any = av.CodecContext.create("h264", "r")
    times: list[int] = []
    started = False
    for message in frames:
        started = started or message.is_key
        if not started:
            continue
        for picture in decoder.decode(av.Packet(message.payload)):
            luma = picture.to_ndarray(format="gray")
            if float(np.mean(luma)) > 220:
                times.append(message.capture_time_us)
    return times


@pytest.mark.parametrize(
    ("codec", "channels", "mode"),
    [("aac", 2, "audio: AAC transcoded to Opus"), ("libopus", 1, "audio: Opus passed through")],
    ids=["aac", "opus"],
)
def test_live_source_with_b_frames_keeps_its_audio_in_sync(
    relay: RelayProcess, tmp_path: Path, codec: str, channels: int, mode: str
) -> None:
    """Live MPEG-TS over UDP, H.264 with B-frames and ``codec`` audio: the video is
    transcoded, the audio reaches an audio viewer as Opus that PyAV decodes, with
    capture times increasing, and every beep after the start's burst is within
    SYNC_BOUND_US of the white frame's capture time."""
    clip = tmp_path / "live.mkv"
    write_av_clip(clip, codec, bframes=2, flash=True)
    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}?pkt_size=1316"
    log = tmp_path / "live.log"
    code = (
        "import sys; from tests.integration.test_publisher_source_media import stream_file; "
        "stream_file(sys.argv[1], sys.argv[2], passes=3)"
    )

    async def scenario() -> Viewer:
        viewer = Viewer(f"{relay.ws_url}/watch/live?audio=1")
        await viewer.start()
        with publisher(relay, "live", f"udp://127.0.0.1:{port}", log):
            await asyncio.sleep(1.0)
            producer = subprocess.Popen(
                [sys.executable, "-c", code, str(clip), url],
                cwd=REPOSITORY,
                env=publisher_environment(),
            )
            await asyncio.to_thread(producer.wait, 90)
            await asyncio.sleep(2.0)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=150)
    text = log.read_text()
    assert "transcoding: B-frames" in text, text
    assert mode in text, text
    frames, audio = split_messages(viewer)
    assert frames and len(audio) > 150, (len(frames), len(audio))
    assert meta_audio(viewer) == {"codec": "opus", "sample_rate": 48_000, "channels": channels}
    times = [message.capture_time_us for message in audio]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    start = frames[0].capture_time_us + SETTLED_US
    onsets = [onset for onset in beep_onsets(audio, channels) if onset >= start]
    flashes = flash_times(frames)
    assert onsets and flashes, (onsets, flashes)
    offsets = []
    for onset in onsets:
        nearest = min(flashes, key=lambda stamp: abs(stamp - onset))
        assert abs(nearest - onset) < 500_000, (onsets, flashes)
        offsets.append(onset - nearest)
    print(f"A/V offset (audio - video), {codec}: {[round(o / 1000, 1) for o in offsets]} ms")
    assert all(abs(offset) <= SYNC_BOUND_US for offset in offsets), offsets
