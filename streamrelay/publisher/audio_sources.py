"""The publisher's audio sources: the test tone, a file's audio track, a capture device.

Each delivers 20 ms blocks of 48 kHz s16 samples with the capture time of their first
sample, at the pace they are captured (see :mod:`.audio` for the options and the wire).
While an on-demand publisher is idle its sources are paused: a device is closed (the
microphone is released), a file's sample clock stops (it resumes where it paused, in step
with its picture through the :class:`~.idleclock.IdleClock` both share), the tone starts
again from the time it resumes.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import av

from streamrelay.wire import now_us

from .idleclock import IdleClock
from .sources import DeviceInput, SourceError

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
FRAME_US = FRAME_SAMPLES * 1_000_000 // SAMPLE_RATE
# A generated or file source releases a block this long after its last sample is due
# (as a microphone's buffer would): a beat mark from the video thread is in by then.
SOURCE_LATENCY = 0.02
TONE_HZ = 440
TONE_LEVEL = 0.1
BEEP_HZ = 1000
BEEP_LEVEL = 0.5
BEEP_US = 100_000


@dataclass(frozen=True, slots=True)
class AudioBlock:
    """20 ms of interleaved s16 samples and the capture time of the first one."""

    samples: bytes
    capture_time_us: int


class AudioSource(Protocol):
    """Delivers 20 ms blocks at the rate they are captured."""

    description: str

    def read(self, stop: threading.Event) -> AudioBlock | None:
        """The next block, blocking until it is due; None once ``stop`` is set."""
        ...

    def pause(self) -> None:
        """No audio is wanted for a while (on demand, nobody watches)."""
        ...

    def resume(self) -> None:
        """Audio is wanted again after :meth:`pause`."""
        ...

    def close(self) -> None:
        """Release the file or device."""
        ...


def audio_device_input(target: str | None, platform: str = sys.platform) -> DeviceInput:
    """The FFmpeg input of ``device[:NAME]`` on ``platform``."""
    if platform.startswith("win"):
        if not target:
            raise SourceError(
                "audio device on Windows needs a name: device:NAME "
                "(list them with: ffmpeg -list_devices true -f dshow -i dummy)"
            )
        return DeviceInput(f"audio={target}", "dshow", {})
    if platform == "darwin":
        return DeviceInput(target or ":0", "avfoundation", {})
    name = target or "default"
    if name.startswith("pulse:"):
        return DeviceInput(name[len("pulse:") :] or "default", "pulse", {})
    return DeviceInput(name, "alsa", {})


def _sine_table(frequency: int, level: float) -> array[int]:
    # A whole number of cycles in one second: slicing at any sample index stays in phase.
    amplitude = level * 32767
    return array(
        "h",
        (
            round(amplitude * math.sin(2 * math.pi * frequency * n / SAMPLE_RATE))
            for n in range(SAMPLE_RATE)
        ),
    )


class ToneSource:
    """The test tone and its beeps (see the module docstring), paced by the wall clock."""

    def __init__(
        self,
        channels: int = 1,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description = "tone"
        self.channels = channels
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._tone = _sine_table(TONE_HZ, TONE_LEVEL)
        self._beep = _sine_table(BEEP_HZ, BEEP_LEVEL)[: BEEP_US * SAMPLE_RATE // 1_000_000]
        self._marks: deque[int] = deque(maxlen=64)
        self._lock = threading.Lock()
        self._sample = 0
        self._origin_us: int | None = None
        self._origin_monotonic = 0.0

    def mark(self, capture_time_us: int) -> None:
        """A beat frame was captured at ``capture_time_us``: beep from then (any thread)."""
        with self._lock:
            self._marks.append(capture_time_us)

    def block(self, sample: int, start_us: int) -> bytes:
        """The samples of the block starting at absolute ``sample``, captured from
        ``start_us``: the tone, with the beep of every mark that overlaps it."""
        offset = sample % SAMPLE_RATE
        tone = self._tone
        samples = (tone[offset:] + tone[:offset])[:FRAME_SAMPLES]
        end_us = start_us + FRAME_US
        with self._lock:
            marks = [m for m in self._marks if m < end_us and m + BEEP_US > start_us]
        for mark in marks:
            first = round((mark - start_us) * SAMPLE_RATE / 1_000_000)
            for index in range(max(0, first), FRAME_SAMPLES):
                beep_index = index - first
                if beep_index >= len(self._beep):
                    break
                samples[index] = self._beep[beep_index]
        if self.channels == 2:
            stereo = array("h", bytes(4 * FRAME_SAMPLES))
            stereo[0::2] = samples
            stereo[1::2] = samples
            samples = stereo
        return samples.tobytes()

    def read(self, stop: threading.Event) -> AudioBlock | None:
        """The next block, once its last sample is due plus :data:`SOURCE_LATENCY`."""
        if self._origin_us is None:
            self._origin_us = int(self._wall_clock() * 1_000_000)
            self._origin_monotonic = self._monotonic()
        due = self._origin_monotonic + (self._sample + FRAME_SAMPLES) / SAMPLE_RATE
        delay = due + SOURCE_LATENCY - self._monotonic()
        if delay > 0 and stop.wait(delay):
            return None
        if delay < -1.0:
            # Far behind (a suspended machine): carry on from now, not with a burst.
            behind = int(-delay * SAMPLE_RATE) // FRAME_SAMPLES * FRAME_SAMPLES
            self._sample += behind
        start_us = self._origin_us + self._sample * 1_000_000 // SAMPLE_RATE
        samples = self.block(self._sample, start_us)
        self._sample += FRAME_SAMPLES
        return AudioBlock(samples, start_us)

    def pause(self) -> None:
        """Nothing to release: the tone is made, not read."""

    def resume(self) -> None:
        """Start again from now (the tone's beeps follow the picture, which is live)."""
        self._origin_us = None
        self._sample = 0

    def close(self) -> None:
        """Nothing to release."""


class _Resampled:
    """Decoded audio of any format, as 20 ms s16 blocks at 48 kHz."""

    def __init__(self, channels: int) -> None:
        layout = "stereo" if channels == 2 else "mono"
        self._resampler = av.AudioResampler(format="s16", layout=layout, rate=SAMPLE_RATE)
        self._fifo = av.AudioFifo()
        self._block_bytes = FRAME_SAMPLES * 2 * channels

    @property
    def samples(self) -> int:
        return int(self._fifo.samples)

    def add(self, frame: Any) -> None:
        frame.pts = None  # the FIFO checks continuity of what it is given: not needed
        for out in self._resampler.resample(frame):
            out.pts = None
            self._fifo.write(out)

    def take(self) -> bytes | None:
        block = self._fifo.read(FRAME_SAMPLES)
        return None if block is None else bytes(block.planes[0])[: self._block_bytes]


class DeviceAudioSource:
    """A capture device; the device paces the reads.  A block's capture time is its
    arrival time minus the samples still buffered before it (the device's own buffering
    is not known)."""

    def __init__(self, device: DeviceInput, channels: int, description: str) -> None:
        self.description = description
        self._device = device
        self._channels = channels
        self._container: Any = None
        self._frames: Iterator[Any] = iter(())
        self._resampled = _Resampled(channels)
        self._arrived_us = 0
        self._open()

    def _open(self) -> None:
        device = self._device
        try:
            self._container = av.open(device.url, format=device.format, options=device.options)
            stream = self._container.streams.audio[0]
        except (av.FFmpegError, IndexError, ValueError) as error:
            if self._container is not None:
                self._container.close()
                self._container = None
            raise SourceError(
                f"cannot open audio {self.description} ({device.format} {device.url!r}): {error}"
            ) from None
        self._frames = self._container.decode(stream)
        # What was buffered before a pause is stale: start afresh.
        self._resampled = _Resampled(self._channels)

    @property
    def opened(self) -> bool:
        """True while the device is open (it is closed while paused)."""
        return self._container is not None

    def pause(self) -> None:
        """Close the device while nobody watches: the microphone is released (its
        indicator goes off), and a device left unread would only buffer stale sound."""
        self.close()

    def resume(self) -> None:
        """Open the device again."""
        if self._container is None:
            self._open()

    def read(self, stop: threading.Event) -> AudioBlock | None:
        """Block until the device has delivered the next 20 ms."""
        while self._resampled.samples < FRAME_SAMPLES:
            if stop.is_set():
                return None
            try:
                frame = next(self._frames)
            except StopIteration:
                raise SourceError(f"{self.description} stopped delivering audio") from None
            except av.FFmpegError as error:
                raise SourceError(f"{self.description} failed: {error}") from None
            self._resampled.add(frame)
            self._arrived_us = now_us()
        buffered_us = self._resampled.samples * 1_000_000 // SAMPLE_RATE
        samples = self._resampled.take()
        assert samples is not None
        return AudioBlock(samples, self._arrived_us - buffered_us)

    def close(self) -> None:
        """Close the device."""
        if self._container is not None:
            self._container.close()
            self._container = None


class FileAudioSource:
    """The audio track of a file, looped (reopened at its end) and paced by the wall
    clock from when the first block is read, as the video of the same file is; held back
    by the time spent paused (``idle_clock``, shared with the video of the same file)."""

    def __init__(
        self,
        path: str,
        channels: int,
        idle_clock: IdleClock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock_us: Callable[[], int] = now_us,
    ) -> None:
        self.description = f"file:{path}"
        self.idle_clock = idle_clock if idle_clock is not None else IdleClock(monotonic)
        self._monotonic = monotonic
        self._wall_clock_us = wall_clock_us
        self._path = path
        self._channels = channels
        self._container: Any = None
        self._frames: Iterator[Any] = iter(())
        self._resampled = _Resampled(channels)
        self._sample = 0
        self._origin_us: int | None = None
        self._origin_monotonic = 0.0
        self._open()

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        try:
            self._container = av.open(self._path)
            stream = self._container.streams.audio[0]
        except (av.FFmpegError, IndexError) as error:
            raise SourceError(f"no audio to read in {self._path}: {error}") from None
        self._frames = self._container.decode(stream)

    def read(self, stop: threading.Event) -> AudioBlock | None:
        """The next 20 ms, once due."""
        reopened = False
        while self._resampled.samples < FRAME_SAMPLES:
            try:
                self._resampled.add(next(self._frames))
                reopened = False
            except StopIteration:
                if reopened:
                    raise SourceError(f"{self._path} holds no decodable audio") from None
                self._open()
                reopened = True
            except av.FFmpegError as error:
                raise SourceError(f"decoding audio of {self._path} failed: {error}") from None
        paused = self.idle_clock.paused_seconds()
        if self._origin_us is None:
            # Origins such that the first block is due now, the time paused so far aside.
            self._origin_us = self._wall_clock_us() - round(paused * 1_000_000)
            self._origin_monotonic = self._monotonic() - paused
        due = self._origin_monotonic + paused + (self._sample + FRAME_SAMPLES) / SAMPLE_RATE
        delay = due + SOURCE_LATENCY - self._monotonic()
        if delay > 0 and stop.wait(delay):
            return None
        samples = self._resampled.take()
        assert samples is not None
        start_us = (
            self._origin_us + round(paused * 1_000_000) + self._sample * 1_000_000 // SAMPLE_RATE
        )
        self._sample += FRAME_SAMPLES
        return AudioBlock(samples, start_us)

    def pause(self) -> None:
        """Stop the file's sample clock: it resumes where it paused."""
        self.idle_clock.pause()

    def resume(self) -> None:
        """Start the sample clock again (the time paused no longer counts)."""
        self.idle_clock.resume()

    def close(self) -> None:
        """Close the file."""
        if self._container is not None:
            self._container.close()
            self._container = None


def file_has_audio(path: str) -> bool:
    """True when ``path`` has an audio track PyAV can open."""
    try:
        with av.open(path) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, OSError):
        return False
