"""Capture times for remuxed media: a source's timestamps mapped onto the wire clock.

A remuxed source brings its own timestamps (PTS in the stream's time base): they may
start anywhere, wrap (MPEG-TS PTS wraps every 2**33 / 90 kHz, about 26.5 hours), jump
(a camera restart, a spliced TS, a file that loops) or be missing. The wire wants a
wall-clock capture time per frame, in microseconds since the Unix epoch, that increases
from frame to frame. Three small pieces, free of I/O (clocks are passed in):

:class:`MediaTimeline`
    turns raw PTS into a continuous media time: strictly increasing, with wraps, jumps
    backwards and jumps forwards of more than ``max_gap`` seconds replaced by one frame
    duration, and a missing PTS extrapolated from the last one;
:class:`LiveClock`
    for a live source (the network sets the pace): capture time = media time + an offset
    that follows the lower envelope of (arrival time - media time). A frame is never
    stamped later than it arrived, network jitter does not reach the stamps (the PTS
    cadence does), a slowly drifting source clock is followed (the offset leaks upwards
    by ``leak`` seconds per second of media until it touches the arrivals again), and a
    stall longer than ``resync_after`` re-anchors at once;
:class:`PacedClock`
    for a file that the publisher plays at its own rate: the time each frame is due; a
    reader that falls behind by more than ``late_after`` carries on from now rather than
    bursting to catch up;
:class:`CaptureTimeMap`
    for the audio of a source whose video is decoded and re-encoded (the video frames
    are stamped when decoded): audio PTS mapped onto the capture clock through the
    latest video frame's (PTS, capture time) pair.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Final

MICROSECONDS: Final = 1_000_000


class MediaTimeline:
    """Continuous, strictly increasing media time (microseconds) from raw packet PTS."""

    def __init__(self, frame_duration_us: int = 33_333, max_gap: float = 5.0) -> None:
        if frame_duration_us < 1:
            raise ValueError("frame duration must be at least 1 microsecond")
        self.frame_duration_us = frame_duration_us
        self._max_gap_us = int(max_gap * MICROSECONDS)
        self._last_raw_us: int | None = None
        self._last_raw_media_us = 0
        self._last_us: int | None = None
        #: How many discontinuities (wraps, jumps) were smoothed over.
        self.discontinuities = 0

    def advance(self, pts: int | None, time_base: Fraction | None) -> int:
        """The media time of the next frame in decoding order, from its PTS (or None)."""
        raw_us = None
        if pts is not None and time_base is not None:
            raw_us = int(pts * time_base * MICROSECONDS)
        last = self._last_us
        if last is None:
            media_us = 0
        elif raw_us is None or self._last_raw_us is None:
            media_us = last + self.frame_duration_us
        else:
            step = raw_us - self._last_raw_us
            if 0 < step <= self._max_gap_us:
                # From the last frame that had a PTS: frames without one in between
                # were extrapolated, and do not shift this one.
                media_us = max(self._last_raw_media_us + step, last + 1)
            else:
                # A wrap, a jump, a repeated PTS or a new pass of a looped file: the
                # frame follows the previous one by one frame duration.
                if step != 0:
                    self.discontinuities += 1
                media_us = last + self.frame_duration_us
        if raw_us is not None:
            self._last_raw_us = raw_us
            self._last_raw_media_us = media_us
        self._last_us = media_us
        return media_us

    def media_time_of(self, pts: int | None, time_base: Fraction | None) -> int | None:
        """The media time of a PTS of another stream of the same source (its audio), on
        this timeline: shifted as the last timestamped frame was, so that audio and video
        sampled together get the same media time. None without a PTS, before the first
        timestamped frame, or more than ``max_gap`` away from it (the other stream is
        across a discontinuity this timeline has not seen yet)."""
        if pts is None or time_base is None or self._last_raw_us is None:
            return None
        raw_us = int(pts * time_base * MICROSECONDS)
        if abs(raw_us - self._last_raw_us) > self._max_gap_us:
            return None
        return self._last_raw_media_us + raw_us - self._last_raw_us


class LiveClock:
    """Capture times for a live source: see the module docstring."""

    def __init__(self, leak: float = 0.001, resync_after: float = 2.0) -> None:
        self._leak = leak
        self._resync_after_us = int(resync_after * MICROSECONDS)
        self._offset_us: int | None = None
        self._last_media_us = 0
        self._last_capture_us = 0
        #: How many times the clock re-anchored after a stall or a jump.
        self.resyncs = 0

    def capture_time(self, media_us: int, arrival_us: int) -> int:
        """The capture time of a frame at ``media_us`` that arrived at ``arrival_us``."""
        observed = arrival_us - media_us
        offset = self._offset_us
        if offset is None:
            offset = observed
        else:
            offset += int((media_us - self._last_media_us) * self._leak)
            if observed < offset:
                offset = observed
            elif observed - offset > self._resync_after_us:
                self.resyncs += 1
                offset = observed
        self._offset_us = offset
        self._last_media_us = media_us
        capture = max(media_us + offset, self._last_capture_us + 1)
        self._last_capture_us = capture
        return capture

    def time_of(self, media_us: int) -> int | None:
        """The capture time of another stream's sample at ``media_us`` (the audio's),
        on the frames' current offset, changing nothing; None before the first frame."""
        return None if self._offset_us is None else media_us + self._offset_us


class PacedClock:
    """When each frame of a paced (file) source is due, on the wall clock (microseconds)."""

    def __init__(self, late_after: float = 0.25) -> None:
        self._late_after_us = int(late_after * MICROSECONDS)
        self._offset_us: int | None = None
        self._last_due_us = 0
        #: How many times the reader was late and carried on from now.
        self.late_restarts = 0

    def due(self, media_us: int, now_us: int) -> int:
        """The wall-clock time at which the frame at ``media_us`` should go out."""
        if self._offset_us is None:
            self._offset_us = now_us - media_us
        due = media_us + self._offset_us
        if due < now_us - self._late_after_us:
            self.late_restarts += 1
            self._offset_us = now_us - media_us
            due = now_us
        due = max(due, self._last_due_us + 1)
        self._last_due_us = due
        return due

    def time_of(self, media_us: int) -> int | None:
        """When another stream's sample at ``media_us`` (the audio's) is due, on the
        frames' current offset, changing nothing; None before the first frame."""
        return None if self._offset_us is None else media_us + self._offset_us


class CaptureTimeMap:
    """Capture times for another stream's packets (the audio's) of a source whose video
    frames are stamped at capture (decoded for transcoding): a PTS (microseconds, the
    source's clock) is shifted by the latest video frame's (capture time - PTS), so that
    audio and video sampled together get the same capture time, within the jitter of the
    frames' own stamps. Results strictly increase, as the wire wants: a stamp that falls
    back by up to ``max_clamp`` seconds (the offset shrank a little, a frame decoded
    faster than the one before) follows the previous one by a microsecond; further back,
    or more than ``max_gap`` seconds from the latest frame's PTS (across a discontinuity
    the video has not reached yet), or before any frame: None.
    """

    def __init__(self, max_gap: float = 5.0, max_clamp: float = 0.1) -> None:
        self._max_gap_us = int(max_gap * MICROSECONDS)
        self._max_clamp_us = int(max_clamp * MICROSECONDS)
        self._frame_pts_us: int | None = None
        self._offset_us = 0
        self._last_us: int | None = None
        #: How many stamps fell back and were moved forward, and how many were refused.
        self.clamped = 0
        self.refused = 0

    def note_frame(self, pts_us: int, capture_us: int) -> None:
        """A video frame at ``pts_us`` was stamped ``capture_us``."""
        self._frame_pts_us = pts_us
        self._offset_us = capture_us - pts_us

    def forget_frames(self) -> None:
        """The source was opened again (its PTS may restart): wait for a new frame.
        Results still increase past the ones already given."""
        self._frame_pts_us = None

    def capture_time(self, pts_us: int) -> int | None:
        """The capture time of a packet at ``pts_us``, or None (see the class docstring)."""
        frame_pts = self._frame_pts_us
        if frame_pts is None or abs(pts_us - frame_pts) > self._max_gap_us:
            self.refused += 1
            return None
        stamp = pts_us + self._offset_us
        last = self._last_us
        if last is not None and stamp <= last:
            if last - stamp > self._max_clamp_us:
                self.refused += 1
                return None
            self.clamped += 1
            stamp = last + 1
        self._last_us = stamp
        return stamp


__all__ = ["CaptureTimeMap", "LiveClock", "MediaTimeline", "PacedClock"]
