"""A transcoded live source's audio: PTS mapped onto the decoded frames' capture times
(:class:`~streamrelay.publisher.timeline.CaptureTimeMap`) and the decoding source that
carries the audio along (:class:`~streamrelay.publisher.remux_audio.AudioCarryingSource`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import av
import pytest

from streamrelay.publisher import sources
from streamrelay.publisher.remux_audio import AudioCarryingSource
from streamrelay.publisher.sources import DeviceInput, SourceError
from streamrelay.publisher.timeline import CaptureTimeMap
from tests.integration.test_publisher_source_media import BEEP_FRAME, FPS, write_av_clip
from tests.test_publisher_remux_media import AudioSink, onset

BASE_US = 1_700_000_000_000_000
FRAME_US = 1_000_000 // FPS


def test_audio_pts_take_the_latest_frames_offset() -> None:
    """Nothing before a frame; then PTS + the latest frame's (capture - PTS); a new
    frame's offset applies to the audio after it."""
    times = CaptureTimeMap()
    assert times.capture_time(0) is None
    times.note_frame(1_000_000, BASE_US)
    assert times.capture_time(1_010_000) == BASE_US + 10_000
    assert times.capture_time(990_000 + 30_000) == BASE_US + 20_000
    times.note_frame(1_040_000, BASE_US + 45_000)  # decoded 5 ms late
    assert times.capture_time(1_040_000) == BASE_US + 45_000
    assert times.refused == 1 and times.clamped == 0


def test_audio_capture_times_strictly_increase() -> None:
    """A stamp that falls back a little (the offset shrank) follows the previous one
    by a microsecond; one that falls back further than max_clamp is refused, and the
    next that is later goes out."""
    times = CaptureTimeMap(max_clamp=0.1)
    times.note_frame(0, BASE_US + 30_000)
    first = times.capture_time(0)
    assert first == BASE_US + 30_000
    times.note_frame(20_000, BASE_US + 20_000)  # 30 ms faster than the frame before
    assert times.capture_time(10_000) == first + 1
    assert times.clamped == 1
    times.note_frame(40_000, BASE_US - 500_000)  # half a second earlier
    assert times.capture_time(40_000) is None
    assert times.refused == 1
    assert times.capture_time(700_000) == BASE_US + 160_000


def test_audio_across_a_discontinuity_waits_for_the_video() -> None:
    """Audio more than max_gap from the latest frame's PTS (a wrap or a jump the video has
    not reached), and audio after a reopening before the first new frame, is refused;
    stamps stay increasing across the reopening."""
    times = CaptureTimeMap(max_gap=5.0)
    times.note_frame(10_000_000, BASE_US)
    assert times.capture_time(10_000_000 + 5_000_001) is None
    assert times.capture_time(10_000_000 - 5_000_001) is None
    assert times.capture_time(10_020_000) == BASE_US + 20_000
    times.forget_frames()
    assert times.capture_time(10_040_000) is None
    times.note_frame(0, BASE_US - 1_000_000)  # reopened, the new frames stamped earlier
    assert times.capture_time(0) is None  # well before what was already sent
    times.note_frame(40_000, BASE_US + 200_000)
    assert times.capture_time(40_000) == BASE_US + 200_000


@pytest.mark.parametrize(("codec", "channels"), [("aac", 2), ("libopus", 1)])
def test_decoding_source_carries_its_audio_on_the_frames_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, channels: int
) -> None:
    """A clip with B-frames and ``codec`` audio decoded by AudioCarryingSource, one frame
    read every 40 ms of a fake capture clock (a live source's pace): every picture comes
    out, the audio reaches the sink as Opus with capture times increasing, and the
    beep's onset is at the beep frame's capture time (within 2 ms)."""
    clip = tmp_path / "clip.mkv"
    write_av_clip(clip, codec, bframes=2)
    ticks = itertools.count()
    monkeypatch.setattr(sources, "now_us", lambda: BASE_US + next(ticks) * FRAME_US)
    sink = AudioSink()
    container = av.open(str(clip))
    source = AudioCarryingSource.carrying(container, 160, 120, "clip", sink)
    assert source.meta == {"codec": "opus", "sample_rate": 48_000, "channels": channels}
    stamps: list[int] = []
    try:
        while True:
            stamps.append(source.read(len(stamps), 0.0).capture_time_us)
    except SourceError:
        pass  # the clip ended, and nothing reopens it
    finally:
        source.close()
    assert len(stamps) == 3 * FPS
    assert source.audio is not None and source.audio.stats.dropped == 0
    assert len(sink.audio) > 100
    times = [stamp for _, stamp in sink.audio]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert abs(onset(sink.audio, channels) - stamps[BEEP_FRAME]) <= 2_000


def test_reopened_source_with_other_audio_is_not_carried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The channel count goes out once in meta: a source reopened (after it ended) with
    another carries no audio (mono Opus announced, stereo AAC found on reopening), and its
    pictures still come."""
    mono, stereo = tmp_path / "mono.mkv", tmp_path / "stereo.mkv"
    write_av_clip(mono, "libopus")
    write_av_clip(stereo, "aac")
    monkeypatch.setattr(sources, "now_us", lambda: BASE_US)
    sink = AudioSink()
    reopen = DeviceInput(str(stereo), None, {})
    source = AudioCarryingSource.carrying(av.open(str(mono)), 160, 120, "clip", sink, reopen)
    try:
        for index in range(3 * FPS + 5):
            source.read(index, 0.0)
            if index == 0:
                assert source.audio is not None and source.audio.channels == 1
    finally:
        source.close()
    assert source.audio is None
    assert len(sink.audio) > 0
