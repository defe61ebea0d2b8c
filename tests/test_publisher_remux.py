"""Remuxing without decoding: AVCC to Annex-B, parameter sets before keys, capture times
from PTS, the remux-or-transcode decision, source URLs, the source thread's drops, and
HEVC pass-through (hvcC records, the codec string, IRAP keys)."""

from __future__ import annotations

import io
import itertools
import json
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from streamrelay.publisher.bitstream import AccessUnitConverter, is_annexb, transcode_reason
from streamrelay.publisher.client import Readiness
from streamrelay.publisher.h264 import (
    NAL_AUD,
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    H264Error,
    H264Packager,
    join_annexb,
    nal_type,
    split_annexb,
    split_avcc,
)
from streamrelay.publisher.hevc import (
    HevcPackager,
    HevcSpsInfo,
    hevc_nal_type,
    hvcc_config_to_parameter_sets,
    parse_hevc_sps,
)
from streamrelay.publisher.sources import SourceSpec, media_input, parse_source_spec
from streamrelay.publisher.timeline import LiveClock, MediaTimeline, PacedClock
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY
from tests.support.pipelines import running
from tests.test_publisher_client import FakeSink, ThreadedMemoryReactor
from tests.test_publisher_h264 import IDR_SLICE, P_SLICE, PPS_BASELINE, SEI, SPS_BASELINE_720P

AUD = bytes.fromhex("09f0")


def avcc(units: list[bytes], length_size: int = 4) -> bytes:
    """Units as a length-prefixed access unit."""
    return b"".join(len(unit).to_bytes(length_size, "big") + unit for unit in units)


def avcc_record(sps: bytes, pps: bytes, length_size: int = 4) -> bytes:
    """A minimal AVCDecoderConfigurationRecord."""
    return (
        bytes([1, sps[1], sps[2], sps[3], 0xFC | (length_size - 1), 0xE1])
        + len(sps).to_bytes(2, "big")
        + sps
        + b"\x01"
        + len(pps).to_bytes(2, "big")
        + pps
    )


@pytest.mark.parametrize("length_size", [1, 2, 4])
def test_avcc_packets_become_annexb_with_the_record_parameter_sets(length_size: int) -> None:
    """With an avcC record, packets are split by its NAL length size and joined with
    start codes, byte for byte; the record's SPS/PPS are offered once as their own unit."""
    converter = AccessUnitConverter(avcc_record(SPS_BASELINE_720P, PPS_BASELINE, length_size))
    assert converter.length_size == length_size
    assert split_annexb(converter.take_parameter_sets() or b"") == [
        SPS_BASELINE_720P,
        PPS_BASELINE,
    ]
    assert converter.take_parameter_sets() is None
    access_unit = converter.convert(avcc([SEI, IDR_SLICE], length_size))
    assert access_unit == join_annexb([SEI, IDR_SLICE])
    assert split_avcc(avcc([P_SLICE], length_size), length_size) == [P_SLICE]


def test_annexb_packets_pass_unchanged_except_access_unit_delimiters() -> None:
    """Annex-B packets keep every NAL unit but the AUDs an MPEG-TS muxer adds; Annex-B
    extradata (RTSP's sprop-parameter-sets) is offered as parameter sets."""
    converter = AccessUnitConverter(join_annexb([SPS_BASELINE_720P, PPS_BASELINE]))
    assert converter.length_size is None
    assert converter.take_parameter_sets() == join_annexb([SPS_BASELINE_720P, PPS_BASELINE])
    packet = join_annexb([AUD, SPS_BASELINE_720P, PPS_BASELINE, IDR_SLICE])
    assert split_annexb(converter.convert(packet)) == [SPS_BASELINE_720P, PPS_BASELINE, IDR_SLICE]
    assert converter.convert(b"\x00\x00\x01" + P_SLICE) == join_annexb([P_SLICE])
    assert is_annexb(b"\x00\x00\x01\x65") and not is_annexb(b"\x00\x00\x00\x05\x65")


def test_length_prefixed_packets_without_a_record_and_bad_input() -> None:
    """No record and no start code: 4-byte lengths (what every muxer writes); truncated
    data, and extradata that is neither form, raise H264Error."""
    converter = AccessUnitConverter(None)
    assert converter.convert(avcc([P_SLICE])) == join_annexb([P_SLICE])
    with pytest.raises(H264Error):
        converter.convert(avcc([P_SLICE])[:-1])
    with pytest.raises(H264Error):
        AccessUnitConverter(b"\x07junk")
    converter.update_extradata(avcc_record(SPS_BASELINE_720P, PPS_BASELINE, 2))
    assert converter.length_size == 2 and converter.take_parameter_sets() is not None


def test_parameter_sets_are_inserted_before_every_key_of_an_avcc_source() -> None:
    """The record's parameter sets make a CONFIG (before the first KEY); a KEY without
    in-band SPS/PPS gets them inserted in front of its own units, unchanged; deltas pass
    as they are; new parameter sets make a new CONFIG."""
    converter = AccessUnitConverter(avcc_record(SPS_BASELINE_720P, PPS_BASELINE))
    packager = H264Packager()
    config = packager.package(converter.take_parameter_sets() or b"", 1)
    assert [message.flags for message in config] == [FLAG_CONFIG]
    (key,) = packager.package(converter.convert(avcc([SEI, IDR_SLICE])), 2)
    assert key.flags == FLAG_KEY
    assert split_annexb(key.payload) == [SPS_BASELINE_720P, PPS_BASELINE, SEI, IDR_SLICE]
    (delta,) = packager.package(converter.convert(avcc([P_SLICE])), 3)
    assert delta.flags == 0 and delta.payload == join_annexb([P_SLICE])
    other_pps = bytes.fromhex("68ce3880")
    converter.update_extradata(avcc_record(SPS_BASELINE_720P, other_pps))
    messages = packager.package(converter.take_parameter_sets() or b"", 4)
    assert [m.flags for m in messages] == [FLAG_CONFIG]
    (key,) = packager.package(converter.convert(avcc([IDR_SLICE])), 5)
    assert split_annexb(key.payload)[:2] == [SPS_BASELINE_720P, other_pps]


def test_transcode_reasons() -> None:
    """Only 8-bit 4:2:0 H.264 without B-frames is remuxed; anything else says why not."""
    assert transcode_reason("h264", False, "yuv420p") is None
    assert transcode_reason("h264", False, "yuvj420p") is None
    assert transcode_reason("h264", False, None) is None
    assert transcode_reason("h264", True, "yuv420p") == "B-frames"
    assert transcode_reason("hevc", False, "yuv420p") == "hevc video"
    assert transcode_reason("h264", False, "yuv422p") == "pixel format yuv422p"


def test_media_timeline_is_continuous_through_wraps_jumps_and_missing_pts() -> None:
    """Steady PTS map to their own spacing from 0; a 33-bit MPEG-TS wrap, a jump back, a
    jump forward past max_gap and a missing PTS each advance by one frame duration."""
    timeline = MediaTimeline(frame_duration_us=40_000, max_gap=5.0)
    tb = Fraction(1, 90_000)
    wrap = 2**33
    pts = [wrap - 7200, wrap - 3600, 0, 3600, None, 10_800, 5_000_000, 5_003_600, 100, 3700]
    times = [timeline.advance(value, tb) for value in pts]
    assert times == [0, 40_000, 80_000, 120_000, 160_000, 200_000, 240_000, 280_000, 320_000,
                     360_000]  # fmt: skip
    assert timeline.discontinuities == 3
    assert all(b > a for a, b in itertools.pairwise(times))


def test_live_clock_follows_the_lower_envelope_of_arrivals() -> None:
    """Jittery arrivals of a steady 25 fps source get stamps 40 ms apart, never later
    than their arrival; a stall longer than resync_after re-anchors to the arrival."""
    clock = LiveClock(leak=0.001, resync_after=2.0)
    base = 1_700_000_000_000_000
    jitter = [30_000, 5_000, 0, 60_000, 10_000, 25_000]
    stamps = []
    for index, late in enumerate(jitter):
        media = index * 40_000
        arrival = base + media + late
        stamps.append(clock.capture_time(media, arrival))
        assert stamps[-1] <= arrival
    assert all(b > a for a, b in itertools.pairwise(stamps))
    # After the earliest arrival (index 2) the stamps follow the PTS cadence, plus the
    # leak (0.1 %) that lets the offset follow a source clock running slow.
    assert all(40_000 <= b - a <= 40_040 for a, b in itertools.pairwise(stamps[2:]))
    stalled_arrival = base + 6 * 40_000 + 10_000_000
    assert clock.capture_time(6 * 40_000, stalled_arrival) == stalled_arrival
    assert clock.resyncs == 1


def test_live_clock_follows_a_source_clock_that_runs_slow() -> None:
    """A source clock 0.05 % slow: the offset leaks upwards, so stamps stay within a few
    milliseconds of the arrivals instead of drifting away over an hour."""
    clock = LiveClock(leak=0.001)
    base = 1_700_000_000_000_000
    worst = 0
    for index in range(0, 90_000, 10):  # an hour of 25 fps, sampled
        media = index * 40_000
        arrival = base + int(media * 1.0005)
        worst = max(worst, arrival - clock.capture_time(media, arrival))
    assert worst < 50_000


def test_paced_clock_plays_at_the_file_rate_and_restarts_when_late() -> None:
    """Frames are due at start + media time; a reader more than late_after behind carries
    on from now (no burst to catch up)."""
    clock = PacedClock(late_after=0.25)
    start = 1_000_000_000
    assert clock.due(0, start) == start
    assert clock.due(40_000, start + 1_000) == start + 40_000
    assert clock.due(80_000, start + 2_000_000) == start + 2_000_000
    assert clock.late_restarts == 1
    assert clock.due(120_000, start + 2_000_000) == start + 2_040_000


def test_url_sources_parse_and_open_with_sensible_defaults(tmp_path: Path) -> None:
    """URLs are sources of kind url; file:// is a file. RTSP defaults to TCP;
    rtmp://...?listen=1 becomes the listen option (FFmpeg's RTMP reads none from the
    URL) and a listening source; --source-option overrides; credentials are not shown."""
    assert parse_source_spec("rtsp://cam/stream") == SourceSpec("url", "rtsp://cam/stream")
    assert parse_source_spec("file:///tmp/a.mp4") == SourceSpec("file", "/tmp/a.mp4")
    rtsp = media_input(SourceSpec("url", "rtsp://admin:secret@cam:554/s1?channel=1"))
    assert rtsp.options == {"rtsp_transport": "tcp"} and rtsp.live and not rtsp.listen
    assert "secret" not in rtsp.description and "cam:554/s1" in rtsp.description
    rtmp = media_input(SourceSpec("url", "rtmp://0.0.0.0:1935/live/key?listen=1"))
    assert rtmp.url == "rtmp://0.0.0.0:1935/live/key"
    assert rtmp.options == {"listen": "1"} and rtmp.listen and rtmp.live
    srt = media_input(SourceSpec("url", "srt://0.0.0.0:9000?mode=listener"))
    assert srt.listen and srt.url == "srt://0.0.0.0:9000?mode=listener"
    udp = media_input(SourceSpec("url", "udp://127.0.0.1:5000", {"fifo_size": "100000"}))
    assert udp.options == {"fifo_size": "100000"} and not udp.listen
    overridden = media_input(SourceSpec("url", "rtsp://cam/s", {"rtsp_transport": "udp"}))
    assert overridden.options == {"rtsp_transport": "udp"}
    clip = media_input(SourceSpec("file", str(tmp_path / "a.mp4")))
    assert not clip.live and not clip.listen


class ScriptedSink(FakeSink):
    """A sink that turns CONGESTED after ``congest_after`` frames for ``congested_reads``
    readiness reads, and stops the pipeline once it holds ``enough`` frames."""

    def __init__(self, congest_after: int, congested_reads: int, enough: int) -> None:
        super().__init__()
        self.congest_after = congest_after
        self.congested_reads = congested_reads
        self.enough = enough
        self.pipeline: Any = None
        self.enough_received = threading.Event()

    @property  # type: ignore[override]
    def readiness(self) -> Readiness:
        frames = sum(1 for kind, _ in self.received if kind in ("key", "delta"))
        if frames >= self.congest_after and self.congested_reads > 0:
            self.congested_reads -= 1
            return Readiness.CONGESTED
        return Readiness.READY

    @readiness.setter
    def readiness(self, value: Readiness) -> None:
        pass

    def send_frame_threadsafe(
        self, payload: bytes, *, key: bool, capture_time_us: int | None = None
    ) -> bool:
        accepted = super().send_frame_threadsafe(payload, key=key, capture_time_us=capture_time_us)
        frames = sum(1 for kind, _ in self.received if kind in ("key", "delta"))
        if frames >= self.enough:
            self.pipeline.stop()
            self.enough_received.set()
        return accepted


def test_source_thread_drops_to_the_next_key_and_cannot_force_one(tmp_path: Path) -> None:
    """A real FLV file through the source thread: meta and CONFIG first, then the first
    KEY; when the sink stays CONGESTED past the pipeline's patience, access units are
    dropped up to the source's next IDR, which resumes the stream (no keyframe can be
    forced: a request is only counted); the file loops."""
    from streamrelay.publisher.remux import SourcePipeline
    from streamrelay.publisher.sources import MediaInput
    from tests.integration.test_publisher_source import GOP, encode_to

    clip = tmp_path / "clip.flv"
    encode_to([str(clip)], "flv", 2 * GOP, str(tmp_path / "clip.jsonl"), paced=False)
    keys = [json.loads(line)["key"] for line in (tmp_path / "clip.jsonl").read_text().splitlines()]
    sink = ScriptedSink(congest_after=5, congested_reads=2, enough=2 * GOP + 10)
    ticks = itertools.count()
    pipeline = SourcePipeline(
        MediaInput(str(clip), {}, False, False, "file:clip.flv"),
        sink,
        reactor=ThreadedMemoryReactor(),
        encoder_factory=lambda: pytest.fail("a remuxable file must not be encoded"),
        frame_size=(320, 240),
        fps=Fraction(25),
        # Time flies: every access unit is due at once, and patience runs out at once.
        monotonic=lambda: next(ticks) * 1.0,
        wall_clock_us=lambda: next(ticks) * 1_000_000,
    )
    sink.pipeline = pipeline
    pipeline.start()
    assert sink.enough_received.wait(30)
    assert pipeline.join(10)
    kinds = [kind for kind, _ in sink.received]
    assert kinds[:3] == ["meta", "config", "key"]
    frames = [kind for kind in kinds if kind in ("key", "delta")]
    assert frames[:5] == ["key"] + ["delta"] * 4
    # Congested at the 6th frame past the patience: nothing until a KEY resumes.
    assert frames[5] == "key"
    stats = pipeline.remux_stats
    assert stats.frames_dropped >= 1 and stats.frames_waiting_for_key >= GOP - 6
    assert keys.count(True) == 2 and stats.source_opens >= 2  # looped
    pipeline.request_keyframe()
    pipeline.request_keyframe()
    assert stats.keyframe_requests_ignored == 2
    assert pipeline.mode == "remuxing H.264 without re-encoding"
    payloads = [payload for kind, payload in sink.received if kind == "key"]
    for payload in payloads:
        types = [nal_type(unit) for unit in split_annexb(payload)]
        assert types[:2] == [NAL_SPS, NAL_PPS] and NAL_IDR in types and NAL_AUD not in types


# libx265 (ultrafast, zerolatency), 320x240 Main: its VPS, SPS (with emulation-prevention
# bytes) and PPS.
HEVC_VPS_320 = bytes.fromhex("40010c01ffff01600000030090000003000003003cba0240")
HEVC_SPS_320 = bytes.fromhex(
    "42010101600000030090000003000003003ca00a080f165ba4a4c2e68080000003008000000c84"
)
HEVC_PPS_320 = bytes.fromhex("4401c0718312")
HEVC_IDR = bytes.fromhex("2801adc412dd9955")  # IDR_N_LP
HEVC_CRA = bytes.fromhex("2a01af0011")  # CRA_NUT
HEVC_TRAIL = bytes.fromhex("0201d00978")  # TRAIL_R
HEVC_AUD_UNIT = bytes.fromhex("460150")


def hvcc_record(units: list[bytes], length_size: int = 4) -> bytes:
    """A minimal HEVCDecoderConfigurationRecord holding ``units`` (one array each)."""
    header = bytes([1]) + bytes(20) + bytes([0x0C | (length_size - 1), len(units)])
    arrays = b"".join(
        bytes([0x80 | hevc_nal_type(unit)]) + b"\x00\x01" + len(unit).to_bytes(2, "big") + unit
        for unit in units
    )
    return header + arrays


def test_hevc_sps_gives_the_webcodecs_codec_string_and_size() -> None:
    """The x265 SPS says Main (1), compatible with Main and Main 10 (flags 1 and 2: 6),
    Main tier level 60, constraint byte 0x90 (progressive, frame only): hvc1.1.6.L60.90,
    and 320x240."""
    info = parse_hevc_sps(HEVC_SPS_320)
    assert info == HevcSpsInfo("hvc1.1.6.L60.90", 320, 240)
    with pytest.raises(H264Error):
        parse_hevc_sps(HEVC_PPS_320)


def test_hvcc_records_and_hevc_packaging() -> None:
    """An hvcC record gives its parameter sets and NAL length size; HEVC AVCC packets
    become Annex-B without AUDs; the packager sends VPS+SPS+PPS as CONFIG, inserts them
    into key pictures (IDR and CRA) that lack them, and passes trailing pictures as
    deltas; meta values come from the SPS."""
    record = hvcc_record([HEVC_VPS_320, HEVC_SPS_320, HEVC_PPS_320], length_size=4)
    units, length_size = hvcc_config_to_parameter_sets(record)
    assert units == [HEVC_VPS_320, HEVC_SPS_320, HEVC_PPS_320] and length_size == 4
    with pytest.raises(H264Error):
        hvcc_config_to_parameter_sets(record[:-3])
    converter = AccessUnitConverter(record, "hevc")
    packager = converter.packager()
    assert isinstance(packager, HevcPackager)
    (config,) = packager.package(converter.take_parameter_sets() or b"", 1)
    assert config.flags == FLAG_CONFIG
    assert split_annexb(config.payload) == [HEVC_VPS_320, HEVC_SPS_320, HEVC_PPS_320]
    assert packager.codec_string == "hvc1.1.6.L60.90" and packager.picture_size == (320, 240)
    for key_picture in (HEVC_IDR, HEVC_CRA):
        access_unit = converter.convert(avcc([HEVC_AUD_UNIT, key_picture]))
        assert packager.is_key_access_unit(access_unit)
        (key,) = packager.package(access_unit, 2)
        assert key.flags == FLAG_KEY
        assert split_annexb(key.payload) == [HEVC_VPS_320, HEVC_SPS_320, HEVC_PPS_320, key_picture]
    (delta,) = packager.package(converter.convert(avcc([HEVC_TRAIL])), 3)
    assert delta.flags == 0 and delta.payload == join_annexb([HEVC_TRAIL])
    assert transcode_reason("hevc", False, "yuv420p", hevc_passthrough=True) is None
    assert transcode_reason("hevc", True, "yuv420p", hevc_passthrough=True) == "B-frames"


def test_a_file_keeps_looping_while_the_publisher_is_offline(tmp_path: Path) -> None:
    """Offline (the relay is down): every access unit is skipped, not an error; the file
    loops on, meta and CONFIG still reach the sink (kept for the next connection), and a
    stop ends the thread cleanly."""
    from streamrelay.publisher.remux import SourcePipeline
    from streamrelay.publisher.sources import MediaInput
    from tests.integration.test_publisher_source import GOP, encode_to
    from tests.support.waiting import wait_until

    clip = tmp_path / "clip.ts"
    encode_to([str(clip)], "mpegts", GOP, str(tmp_path / "clip.jsonl"), paced=False)
    sink = FakeSink()
    sink.readiness = Readiness.OFFLINE
    reactor = ThreadedMemoryReactor()
    ticks = itertools.count()
    pipeline = SourcePipeline(
        MediaInput(str(clip), {}, False, False, "file:clip.ts"),
        sink,
        reactor=reactor,
        encoder_factory=lambda: pytest.fail("a remuxable file must not be encoded"),
        frame_size=(320, 240),
        fps=Fraction(25),
        wall_clock_us=lambda: next(ticks) * 1_000_000,
    )
    with running(pipeline):
        wait_until(lambda: pipeline.remux_stats.source_opens >= 3, 30)
    reactor.run_thread_calls()
    outcomes: list[object] = []
    pipeline.when_finished().addBoth(outcomes.append)
    assert outcomes == [None]
    kinds = [kind for kind, _ in sink.received]
    assert kinds == ["meta", "config"]
    assert pipeline.remux_stats.frames_offline >= 2


def test_command_line_for_url_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL is a --source; --source-option applies to it (not to testsrc); --transcode is
    off unless given, HEVC pass-through on (--hevc-passthrough still accepted); the
    audio is the source's own unless --audio none; without --source, STREAMRELAY_SOURCE
    (a URL with credentials kept out of the process list), else testsrc."""
    from streamrelay.publisher.arguments import parse_arguments
    from streamrelay.publisher.audio import AudioSpec, default_audio

    monkeypatch.delenv("STREAMRELAY_SOURCE", raising=False)
    assert parse_arguments([]).source == SourceSpec("testsrc")
    monkeypatch.setenv("STREAMRELAY_SOURCE", "rtsp://u:p@cam/s")
    assert parse_arguments([]).source == SourceSpec("url", "rtsp://u:p@cam/s")
    assert parse_arguments(["--source", "screen"]).source == SourceSpec("screen")

    options = parse_arguments(["--source", "rtsp://cam/s1", "--source-option", "a=b"])
    assert options.source == SourceSpec("url", "rtsp://cam/s1", {"a": "b"})
    assert not options.transcode and options.hevc_passthrough
    assert options.audio == AudioSpec("source")
    assert default_audio("url") == AudioSpec("source")
    options = parse_arguments(["--source", "srt://h:9000", "--transcode"])
    assert options.transcode and not options.hevc_passthrough
    assert parse_arguments(["--source", "srt://h:9000", "--hevc-passthrough"]).hevc_passthrough
    with pytest.raises(SystemExit):
        parse_arguments(["--source", "srt://h:9000", "--transcode", "--hevc-passthrough"])
    assert parse_arguments(["--source", "srt://h:9000", "--audio", "none"]).audio is None
    assert parse_arguments(["--source", "srt://h:9000", "--audio", "source"]).audio == (
        AudioSpec("source")
    )
    with pytest.raises(SystemExit):
        parse_arguments(["--source", "screen", "--audio", "source"])
    with pytest.raises(SystemExit):
        parse_arguments(["--source", "testsrc", "--source-option", "a=b"])


def test_status_line_says_whether_the_source_is_remuxed_or_transcoded() -> None:
    """The status line ends with the source pipeline's mode: opening, remuxing, or
    transcoding with the reason."""
    from twisted.internet.task import Clock

    from streamrelay.publisher.remux import REMUXING, SourcePipeline
    from streamrelay.publisher.sources import MediaInput
    from streamrelay.publisher.status import StatusLine
    from tests.test_publisher_status import FakePublisher

    pipeline = SourcePipeline(
        MediaInput("udp://127.0.0.1:9", {}, True, False, "udp://127.0.0.1:9"),
        FakeSink(),
        reactor=Clock(),
        encoder_factory=lambda: pytest.fail("not started"),
        frame_size=(320, 240),
        fps=Fraction(25),
    )
    status = StatusLine(Clock(), FakePublisher(), pipeline, io.StringIO(), interactive=False)
    assert status.render().endswith("opening source")
    pipeline.mode = REMUXING
    assert status.render().endswith("remuxing H.264 without re-encoding")
    pipeline.mode = "transcoding: B-frames"
    assert status.render().endswith("transcoding: B-frames")
