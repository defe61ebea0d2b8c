"""The publisher's audio: ``--audio`` parsing, the test tone and its beeps, Opus encoding
and its capture times, the outbox and the Publisher's audio path, the audio thread's
step, and the test pattern's beat frames (flash square and beat marks)."""

from __future__ import annotations

import threading
from array import array
from typing import Any

import av
import pytest

from streamrelay.publisher.arguments import parse_arguments
from streamrelay.publisher.audio import (
    AudioPipeline,
    AudioSpec,
    OpusEncoder,
    audio_meta,
    default_audio,
    parse_audio_spec,
)
from streamrelay.publisher.audio_sources import (
    BEEP_HZ,
    BEEP_LEVEL,
    FRAME_SAMPLES,
    FRAME_US,
    SOURCE_LATENCY,
    TONE_LEVEL,
    AudioBlock,
    ToneSource,
    audio_device_input,
)
from streamrelay.publisher.client import Readiness
from streamrelay.publisher.outbox import Kind, Outbox, Outgoing
from streamrelay.publisher.sources import SourceError, TestPatternSource
from streamrelay.publisher.testpattern import BEAT_FRAMES, TestPattern
from streamrelay.wire import FLAG_AUDIO, MediaMessage
from tests.test_publisher_client import connected_publisher

START_US = 1_700_000_000_000_000


def samples_of(block: bytes) -> array[int]:
    """s16 samples of a block."""
    return array("h", block)


# -- options ---------------------------------------------------------------------------------


def test_audio_specs_parse_and_default_per_source() -> None:
    """``--audio`` takes tone, file, device[:NAME] and none; the default is the tone for
    the test pattern, the file's audio for a file, none for devices."""
    assert parse_audio_spec("tone") == AudioSpec("tone")
    assert parse_audio_spec("device") == AudioSpec("device")
    assert parse_audio_spec("device:hw:1") == AudioSpec("device", "hw:1")
    for bad in ("beep", "tone:x", "file:x.mp4", ""):
        with pytest.raises(ValueError):
            parse_audio_spec(bad)
    assert default_audio("testsrc") == AudioSpec("tone")
    assert default_audio("file") == AudioSpec("file")
    assert default_audio("screen") == AudioSpec("none")
    assert default_audio("camera") == AudioSpec("none")


def test_command_line_audio_option() -> None:
    """The test pattern gets the tone by default, ``--audio none`` turns it off, a screen
    has none by default, and ``--audio file`` without a file source is a usage error."""
    assert parse_arguments([]).audio == AudioSpec("tone")
    assert parse_arguments(["--audio", "none"]).audio is None
    assert parse_arguments(["--source", "screen"]).audio is None
    assert parse_arguments(["--source", "screen", "--audio", "device"]).audio == AudioSpec("device")
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--audio", "file"])
    assert exit_info.value.code == 2


def test_audio_devices_per_platform() -> None:
    """ALSA (or PulseAudio) here, DirectShow on Windows (a name is needed), AVFoundation
    on macOS."""
    linux = audio_device_input(None, "linux")
    assert (linux.url, linux.format) == ("default", "alsa")
    assert audio_device_input("pulse:mic", "linux").format == "pulse"
    assert audio_device_input("pulse:mic", "linux").url == "mic"
    windows = audio_device_input("Microphone (USB)", "win32")
    assert (windows.url, windows.format) == ("audio=Microphone (USB)", "dshow")
    with pytest.raises(SourceError, match="dshow"):
        audio_device_input(None, "win32")
    assert audio_device_input(None, "darwin").url == ":0"
    assert audio_device_input(None, "darwin").format == "avfoundation"


# -- the tone --------------------------------------------------------------------------------


def test_tone_beeps_from_the_exact_sample_of_the_mark() -> None:
    """A beat mark 7.5 ms into a block starts the beep at sample 360 of that block (phase
    0 of a 1 kHz sine at the beep's level); before it the quiet tone plays on."""
    tone = ToneSource()
    tone.mark(START_US + 7_500)
    block = samples_of(tone.block(0, START_US))
    assert max(abs(v) for v in block[:360]) <= TONE_LEVEL * 32767 + 1
    assert block[360] == 0  # sin(0)
    quarter = 48_000 // BEEP_HZ // 4
    assert abs(block[360 + quarter] - BEEP_LEVEL * 32767) <= 1
    # The beep goes on into the next block, and ends 100 ms after it started.
    following = samples_of(tone.block(FRAME_SAMPLES, START_US + FRAME_US))
    assert max(abs(v) for v in following) > 0.9 * BEEP_LEVEL * 32767
    late = samples_of(tone.block(6 * FRAME_SAMPLES, START_US + 6 * FRAME_US))
    assert max(abs(v) for v in late) <= TONE_LEVEL * 32767 + 1


def test_stereo_tone_has_both_channels() -> None:
    """Two channels carry the same samples, interleaved."""
    block = samples_of(ToneSource(channels=2).block(0, START_US))
    assert len(block) == 2 * FRAME_SAMPLES
    assert block[0::2] == block[1::2]


def test_tone_is_paced_by_the_clock_and_stops() -> None:
    """Each block is released once its last sample is due (plus the source latency),
    with capture times 20 ms apart; a set stop event ends the wait at once."""
    now = [100.0]
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            now[0] += timeout or 0.0
            return self.is_set()

    tone = ToneSource(wall_clock=lambda: START_US / 1e6, monotonic=lambda: now[0])
    stop = Stop()
    first = tone.read(stop)
    second = tone.read(stop)
    assert first is not None and second is not None
    assert second.capture_time_us - first.capture_time_us == FRAME_US
    assert waits[0] == pytest.approx(FRAME_US / 1e6 + SOURCE_LATENCY)
    assert waits[1] == pytest.approx(0.02)
    stop.set()
    assert tone.read(stop) is None


# -- Opus ------------------------------------------------------------------------------------


def test_opus_packets_carry_the_capture_time_of_their_first_decoded_sample() -> None:
    """Packets decode with PyAV to 20 ms at 48 kHz; each packet's capture time counts the
    encoder's priming samples, so the beep decoded from them starts at the mark's time
    (within a millisecond)."""
    tone = ToneSource()
    mark = START_US + 205_000
    tone.mark(mark)
    encoder = OpusEncoder(1)
    packets: list[tuple[bytes, int]] = []
    for index in range(20):
        start = START_US + index * FRAME_US
        packets += encoder.encode(AudioBlock(tone.block(index * FRAME_SAMPLES, start), start))
    assert len(packets) == 20
    assert [t for _p, t in packets][1] - packets[0][1] == FRAME_US
    decoder: Any = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "mono"
    onset = None
    for payload, capture in packets:
        for frame in decoder.decode(av.Packet(payload)):
            samples = array("f", bytes(frame.planes[0])[: frame.samples * 4])
            assert len(samples) == FRAME_SAMPLES
            for index, value in enumerate(samples):
                if onset is None and abs(value) > BEEP_LEVEL / 2:
                    onset = capture + index * 1_000_000 / 48_000
    assert onset is not None
    assert abs(onset - mark) < 1_000, onset - mark


def test_audio_meta() -> None:
    """What ``meta`` says about the audio."""
    assert audio_meta(2) == {"codec": "opus", "sample_rate": 48_000, "channels": 2}


# -- the network side ------------------------------------------------------------------------


def test_outbox_audio_is_dropped_alone_over_the_limit() -> None:
    """Audio goes out at once, waits behind a paused transport, and is dropped alone when
    it would go over the limit: no KEY is waited for or owed."""
    written: list[Outgoing] = []
    outbox = Outbox(written.append, high_water=100, low_water=10, limit=200)
    packet = Outgoing(b"a" * 80, Kind.AUDIO)
    assert outbox.offer_audio(packet) and written == [packet]
    outbox.pause()
    assert outbox.offer_audio(packet) and outbox.offer_audio(packet)
    assert not outbox.offer_audio(packet)
    assert not outbox.keyframe_owed and not outbox.dropping_until_key
    outbox.resume()
    assert len(written) == 3


def test_publisher_sends_audio_messages_and_counts_them_apart() -> None:
    """``send_audio`` sends a 0x04 AUDIO message with the capture time given, counted as
    audio, not as a frame; the threadsafe path gets there through the reactor."""
    publisher, relay, _recorder, reactor = connected_publisher()
    assert publisher.send_audio(b"opus-1", 1000)
    assert publisher.send_audio_threadsafe(b"opus-2", 1020)
    reactor.run_thread_calls()
    assert relay.last.messages() == [
        MediaMessage.build(FLAG_AUDIO, 1000, b"opus-1"),
        MediaMessage.build(FLAG_AUDIO, 1020, b"opus-2"),
    ]
    assert (publisher.stats.audio_sent, publisher.stats.frames_sent) == (2, 0)


def test_publisher_audio_handoff_is_bounded() -> None:
    """At most 25 packets wait for the reactor thread; past that they are dropped and
    counted."""
    publisher, _relay, _recorder, reactor = connected_publisher()
    accepted = [publisher.send_audio_threadsafe(b"x", n) for n in range(30)]
    assert accepted.count(True) == 25 and publisher.stats.audio_dropped == 5
    reactor.run_thread_calls()
    assert publisher.send_audio_threadsafe(b"x", 99)


class FakeSink:
    """The audio thread's view of a publisher."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self.sent: list[tuple[bytes, int]] = []

    def send_audio_threadsafe(self, payload: bytes, capture_time_us: int) -> bool:
        self.sent.append((payload, capture_time_us))
        return True


class OneBlock:
    """A source with one block, then the end."""

    description = "test"

    def __init__(self) -> None:
        self.blocks = [AudioBlock(ToneSource().block(0, START_US), START_US)]

    def read(self, stop: threading.Event) -> AudioBlock | None:
        return self.blocks.pop() if self.blocks else None

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("readiness", [Readiness.READY, Readiness.CONGESTED, Readiness.OFFLINE])
def test_audio_pipeline_step(readiness: Readiness) -> None:
    """One step reads a block and sends its packet, even while the video is congested
    (audio is small); offline, the block is read (the pace is kept) but not encoded."""
    sink = FakeSink(readiness)
    pipeline = AudioPipeline(OneBlock(), OpusEncoder(1), sink, reactor=None)
    assert pipeline.run_once()
    assert len(sink.sent) == (0 if readiness is Readiness.OFFLINE else 1)
    assert pipeline.stats.offline == (1 if readiness is Readiness.OFFLINE else 0)
    assert not pipeline.run_once()


# -- the test pattern's beats ----------------------------------------------------------------


def test_pattern_flashes_and_marks_every_beat_frame() -> None:
    """Every BEAT_FRAMES-th frame has a white top-left square (black otherwise), and the
    source reports that frame's capture time to the tone."""
    times = iter([START_US / 1e6 + n / 30 for n in range(2 * BEAT_FRAMES + 1)])
    source = TestPatternSource(320, 240, wall_clock=lambda: next(times))
    marks: list[int] = []
    source.on_beat = marks.append
    corners = []
    captures = []
    for index in range(2 * BEAT_FRAMES + 1):
        captured = source.read(index, index / 30)
        captures.append(captured.capture_time_us)
        luma = captured.frame.planes[0]
        corners.append(bytes(luma)[5 * luma.line_size + 5])
    assert marks == [captures[0], captures[BEAT_FRAMES], captures[2 * BEAT_FRAMES]]
    flashing = [index for index, value in enumerate(corners) if value > 128]
    assert flashing == [0, BEAT_FRAMES, 2 * BEAT_FRAMES]
    assert TestPattern(320, 240).box_size >= 8


# -- files and devices -----------------------------------------------------------------------


def write_clip(path: Any, seconds: float, audio: bool) -> None:
    """A short Matroska clip: H.264 video, and a 440 Hz Opus track when ``audio``."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        sound = container.add_stream("libopus", rate=48_000) if audio else None
        pattern = TestPattern(96, 64)
        for index in range(int(seconds * 30)):
            frame = pattern.render(index, index / 30)
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            tone = ToneSource()
            for index in range(int(seconds * 50)):
                block = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
                block.planes[0].update(tone.block(index * FRAME_SAMPLES, 0))
                block.sample_rate = 48_000
                block.pts = index * FRAME_SAMPLES
                container.mux(sound.encode(block))
            container.mux(sound.encode(None))


def test_file_audio_is_read_paced_and_looped(tmp_path: Any) -> None:
    """``--audio file``: the file's track comes out as 20 ms blocks of 48 kHz (stereo
    here), not silence, with capture times 20 ms apart, past the file's end (it loops)."""
    from streamrelay.publisher.audio_sources import FileAudioSource, file_has_audio

    clip = tmp_path / "clip.mkv"
    write_clip(clip, 0.3, audio=True)
    assert file_has_audio(str(clip))
    source = FileAudioSource(str(clip), 2)
    stop = threading.Event()
    blocks = [source.read(stop) for _ in range(25)]  # 0.5 s: past the end of 0.3 s
    source.close()
    assert all(block is not None for block in blocks)
    times = [block.capture_time_us for block in blocks if block is not None]
    assert [b - a for a, b in zip(times, times[1:], strict=False)] == [FRAME_US] * 24
    for block in blocks:
        assert block is not None and len(block.samples) == 4 * FRAME_SAMPLES
    loud = [max(abs(v) for v in samples_of(b.samples)) for b in blocks if b is not None]
    assert sum(peak > 0.05 * 32767 for peak in loud) >= 20


def test_file_without_audio_has_none_by_default(tmp_path: Any) -> None:
    """A file source without an audio track publishes no audio by default; asking for
    its audio is a usage error."""
    clip = tmp_path / "silent.mkv"
    write_clip(clip, 0.2, audio=False)
    assert parse_arguments(["--source", f"file:{clip}"]).audio is None
    with pytest.raises(SystemExit):
        parse_arguments(["--source", f"file:{clip}", "--audio", "file"])
    with_audio = tmp_path / "sound.mkv"
    write_clip(with_audio, 0.2, audio=True)
    assert parse_arguments(["--source", f"file:{with_audio}"]).audio == AudioSpec("file")


def test_a_missing_audio_device_is_a_clear_error() -> None:
    """A device FFmpeg cannot open is refused with the device named."""
    from streamrelay.publisher.audio import open_audio_source

    with pytest.raises(SourceError, match="no-such-card"):
        open_audio_source(AudioSpec("device", "no-such-card"), 2, None)


def test_fan_out_sends_one_track_to_every_connection_that_takes_audio() -> None:
    """Renditions carry the same audio: each packet goes to every connection that sends
    media now; the fan-out is READY while one of them is."""
    from streamrelay.publisher.audio import FanOutAudioSink

    ready, offline, congested = (
        FakeSink(Readiness.READY),
        FakeSink(Readiness.OFFLINE),
        FakeSink(Readiness.CONGESTED),
    )
    fan_out = FanOutAudioSink([offline, ready, congested])
    assert fan_out.readiness is Readiness.READY
    assert fan_out.send_audio_threadsafe(b"p", 7)
    assert ready.sent == congested.sent == [(b"p", 7)] and offline.sent == []
    assert FanOutAudioSink([offline]).readiness is Readiness.OFFLINE
    assert not FanOutAudioSink([offline]).send_audio_threadsafe(b"p", 8)
    with pytest.raises(ValueError):
        FanOutAudioSink([])
