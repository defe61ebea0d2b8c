"""On demand with audio: every audio source pauses while the publisher is idle (a device
is closed, a file's sample clock stops, the tone starts again from the time it resumes),
the audio thread sleeps meanwhile, and a file's sound stays in step with its picture
across an idle period (the two threads share one :class:`IdleClock`)."""

from __future__ import annotations

import threading
import time
from array import array
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from streamrelay.publisher.audio import AudioPipeline, OpusEncoder
from streamrelay.publisher.audio_sources import (
    FRAME_SAMPLES,
    FRAME_US,
    SAMPLE_RATE,
    AudioBlock,
    DeviceAudioSource,
    FileAudioSource,
    ToneSource,
)
from streamrelay.publisher.client import Readiness
from streamrelay.publisher.idleclock import IdleClock
from streamrelay.publisher.pipeline import CapturePipeline
from streamrelay.publisher.sources import CapturedFrame, DeviceInput, FileSource
from tests.support.waiting import wait_until
from tests.test_publisher_client import FakeSink, ThreadedMemoryReactor, small_encoder

START_US = 1_700_000_000_000_000
CLIP_FPS = 25
FLASH_EVERY = 2  # seconds between a flash (and its beep) in the sync clip
BEEP_LEVEL = 16_000


def test_idle_clock_counts_each_pause_once_from_any_thread() -> None:
    """The first pause starts a period and the first resume ends it (repeats are no-ops);
    a running pause counts only once it has ended."""
    now = [10.0]
    clock = IdleClock(lambda: now[0])
    clock.pause()
    now[0] = 12.0
    clock.pause()  # the other thread noticing later changes nothing
    assert clock.paused and clock.paused_seconds() == 0.0
    now[0] = 13.5
    clock.resume()
    clock.resume()
    assert not clock.paused and clock.paused_seconds() == 3.5
    clock.pause()
    now[0] = 14.0
    clock.resume()
    assert clock.paused_seconds() == 4.0


def write_sync_clip(path: Path, seconds: int) -> None:
    """A Matroska clip (H.264 and PCM): a black picture that flashes white for one frame
    every FLASH_EVERY seconds, and silence with a 100 ms 1 kHz beep from the same instant."""
    import math

    with av.open(str(path), "w") as container:
        video: Any = container.add_stream("libx264", rate=CLIP_FPS)
        video.width, video.height, video.pix_fmt = 160, 96, "yuv420p"
        video.options = {"preset": "ultrafast", "tune": "zerolatency"}
        sound: Any = container.add_stream("pcm_s16le", rate=SAMPLE_RATE)
        sound.layout = "mono"
        beep = array(
            "h",
            (
                round(BEEP_LEVEL * math.sin(2 * math.pi * 1000 * n / SAMPLE_RATE))
                for n in range(SAMPLE_RATE // 10)
            ),
        )
        blocks_per_frame = SAMPLE_RATE // FRAME_SAMPLES // CLIP_FPS  # 2
        for index in range(seconds * CLIP_FPS):
            lit = index % (FLASH_EVERY * CLIP_FPS) == 0
            frame = av.VideoFrame(160, 96, "yuv420p")
            for number, plane in enumerate(frame.planes):
                level = (235 if lit else 16) if number == 0 else 128
                plane.update(bytes([level]) * plane.buffer_size)
            frame.pts = index
            container.mux(video.encode(frame))
            for block in range(index * blocks_per_frame, (index + 1) * blocks_per_frame):
                first = block * FRAME_SAMPLES
                offset = first % (FLASH_EVERY * SAMPLE_RATE)
                samples = array("h", bytes(2 * FRAME_SAMPLES))
                for n in range(FRAME_SAMPLES):
                    if offset + n < len(beep):
                        samples[n] = beep[offset + n]
                audio = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
                audio.planes[0].update(samples.tobytes())
                audio.sample_rate = SAMPLE_RATE
                audio.pts = first
                container.mux(sound.encode(audio))
        container.mux(video.encode(None))
        container.mux(sound.encode(None))


class AvSink(FakeSink):
    """A sink for both threads, whose readiness the test sets."""

    def send_audio_threadsafe(self, payload: bytes, capture_time_us: int) -> bool:
        self.received.append(("audio", payload))
        return True


class FlashProbe(FileSource):
    """The real file source, noting the capture time of every flash that goes out."""

    def __init__(self, path: Path, sink: AvSink) -> None:
        super().__init__(str(path), 160, 96)
        self.sink = sink
        self.flashes: list[int] = []
        self._lit = False

    def read(self, frame_index: int, elapsed: float) -> CapturedFrame:
        captured = super().read(frame_index, elapsed)
        luma = captured.frame.planes[0]
        lit = bytes(luma)[48 * luma.line_size + 80] > 128
        if lit and not self._lit and self.sink.readiness is Readiness.READY:
            self.flashes.append(captured.capture_time_us)
        self._lit = lit
        return captured


class BeepProbe(FileAudioSource):
    """The real file audio source, noting the capture time of every beep's first sample
    that goes out."""

    def __init__(self, path: Path, clock: IdleClock, sink: AvSink) -> None:
        super().__init__(str(path), 1, clock)
        self.sink = sink
        self.beeps: list[int] = []
        self._loud = False

    def read(self, stop: threading.Event) -> AudioBlock | None:
        block = super().read(stop)
        if block is not None:
            loud = [n for n, v in enumerate(array("h", block.samples)) if abs(v) > 4000]
            if loud and not self._loud and self.sink.readiness is Readiness.READY:
                self.beeps.append(block.capture_time_us + loud[0] * 1_000_000 // SAMPLE_RATE)
            self._loud = bool(loud)
        return block


def test_a_files_sound_stays_in_step_with_its_picture_across_an_idle_period(
    tmp_path: Path,
) -> None:
    """A file's picture (capture thread) and sound (audio thread), with a real encoder
    each: after an idle period of over a second both resume where they paused, and a
    flash and its beep carry the same capture times relative to each other as before
    (the sound is not the idle period ahead of the picture)."""
    clip = tmp_path / "sync.mkv"
    write_sync_clip(clip, 4 * FLASH_EVERY)
    sink = AvSink()
    clock = IdleClock()
    picture = FlashProbe(clip, sink)
    sound = BeepProbe(clip, clock, sink)
    encoder = small_encoder(60)
    video = CapturePipeline(
        picture, encoder, sink, reactor=ThreadedMemoryReactor(), fps=Fraction(30), idle_clock=clock
    )
    audio = AudioPipeline(sound, OpusEncoder(1), sink, reactor=ThreadedMemoryReactor())
    video.start()
    audio.start()
    try:
        wait_until(lambda: picture.flashes and sound.beeps, 20)
        sink.readiness = Readiness.IDLE
        wait_until(lambda: video.stats.idle_periods == 1, 20)
        time.sleep(1.2)
        sink.readiness = Readiness.READY
        # What the publisher's keyframe request does when it turns active (cli.py).
        video.request_keyframe()
        audio.wake()
        wait_until(lambda: len(picture.flashes) >= 2 and len(sound.beeps) >= 2, 30)
    finally:
        video.stop()
        audio.stop()
        assert video.join(10) and audio.join(10)
    before = sound.beeps[0] - picture.flashes[0]
    after = sound.beeps[1] - picture.flashes[1]
    # A frame (33 ms) of quantisation on each side, and a loaded machine's lateness.
    assert abs(after - before) < 150_000, (before, after)
    # The second flash came a whole idle period later than the file puts it.
    assert picture.flashes[1] - picture.flashes[0] >= (FLASH_EVERY + 1.1) * 1_000_000
    assert clock.paused_seconds() >= 1.1
    assert audio.stats.idle_periods == 1  # the audio thread slept too


def test_a_files_audio_clock_stops_while_paused(tmp_path: Path) -> None:
    """A paused file audio source resumes where it paused: the next block is the file's
    next 20 ms (as an unpaused source's), stamped the paused time later, not the pause's
    worth of sound further on."""
    clip = tmp_path / "sync.mkv"
    write_sync_clip(clip, 2)
    now = [100.0]
    wall = [START_US]
    stop = threading.Event()
    source = FileAudioSource(str(clip), 1, monotonic=lambda: now[0], wall_clock_us=lambda: wall[0])
    reference = FileAudioSource(str(clip), 1)
    try:
        first = source.read(stop)
        assert first is not None and first.capture_time_us == START_US
        now[0] += 1.0  # the next blocks are due: no waiting
        for _ in range(4):
            assert source.read(stop) is not None
        source.pause()
        now[0] += 30.0
        wall[0] += 30_000_000
        source.resume()
        block = source.read(stop)
        assert block is not None
        assert block.capture_time_us == START_US + 30_000_000 + 5 * FRAME_US
        expected = [reference.read(stop) for _ in range(6)][-1]
        assert expected is not None and block.samples == expected.samples
    finally:
        source.close()
        reference.close()


def test_an_audio_device_is_closed_while_paused_and_reopened() -> None:
    """A capture device (FFmpeg's lavfi sine, opened as a microphone is) is released on
    pause and opened again on resume, delivering 20 ms blocks after."""
    device = DeviceAudioSource(
        DeviceInput(f"sine=frequency=440:sample_rate={SAMPLE_RATE}", "lavfi", {}), 2, "sine"
    )
    stop = threading.Event()
    try:
        block = device.read(stop)
        assert block is not None and len(block.samples) == 4 * FRAME_SAMPLES
        device.pause()
        assert not device.opened
        device.resume()
        assert device.opened
        block = device.read(stop)
        assert block is not None and max(array("h", block.samples)) > 1000
    finally:
        device.close()


def test_the_tone_starts_again_from_the_time_it_resumes() -> None:
    """The test tone does not make up for a pause with a burst: the first block after
    resume is stamped from then."""
    now = [50.0]
    wall = [START_US / 1e6]
    tone = ToneSource(1, wall_clock=lambda: wall[0], monotonic=lambda: now[0])
    stop = threading.Event()
    now[0] += 1.0
    blocks = [tone.read(stop) for _ in range(3)]
    assert [b.capture_time_us for b in blocks if b] == [START_US + n * FRAME_US for n in range(3)]
    tone.pause()
    now[0] += 20.0
    wall[0] += 20.0
    tone.resume()
    block = tone.read(stop)
    assert block is not None and block.capture_time_us == START_US + 20_000_000


class CountingTone(ToneSource):
    """The tone, counting reads, pauses and resumes."""

    def __init__(self) -> None:
        super().__init__(1)
        self.reads = 0
        self.pauses = 0
        self.resumes = 0

    def read(self, stop: threading.Event) -> AudioBlock | None:
        self.reads += 1
        return super().read(stop)

    def pause(self) -> None:
        self.pauses += 1
        super().pause()

    def resume(self) -> None:
        self.resumes += 1
        super().resume()


def test_the_audio_thread_sleeps_while_idle_and_wakes_on_request() -> None:
    """While the sink is IDLE the real audio thread pauses its source and reads nothing;
    woken once the sink is active again, it resumes the source and sends packets."""
    sink = AvSink()
    source = CountingTone()
    pipeline = AudioPipeline(source, OpusEncoder(1), sink, reactor=ThreadedMemoryReactor())
    pipeline.start()
    try:
        wait_until(lambda: any(kind == "audio" for kind, _ in sink.received), 10)
        sink.readiness = Readiness.IDLE
        wait_until(lambda: source.pauses == 1, 10)
        reads = source.reads
        time.sleep(0.5)  # 25 blocks' time: none may be read
        assert source.reads == reads
        sink.received.clear()
        sink.readiness = Readiness.READY
        pipeline.wake()
        wait_until(lambda: any(kind == "audio" for kind, _ in sink.received), 10)
        assert source.resumes == 1
    finally:
        pipeline.stop()
        assert pipeline.join(5)
    assert pipeline.stats.idle_periods == 1
