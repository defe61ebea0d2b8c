"""A remuxed source's audio and thumbnails, end to end (``streamrelay-publish --source``).

The test writes a Matroska clip with PyAV itself: H.264 (libx264, a keyframe every
second) and an audio track that is quiet noise except for a 100 ms 1 kHz beep starting exactly
at the presentation time of video frame :data:`BEEP_FRAME`, a keyframe. The real
``streamrelay-publish`` remuxes it into a real ``twistd streamrelay``; an independent
``websockets`` viewer asks for audio (``?audio=1``). Checked: Opus in the clip reaches the
viewer packet for packet, byte-identical; AAC arrives as Opus that PyAV decodes; in both,
the beep's onset carries the capture time of the beep frame's KEY (A/V sync through the
shared timeline); and the relay serves a thumbnail of the remuxed picture.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from streamrelay.publisher.h264 import NAL_IDR, nal_type, split_annexb
from streamrelay.wire import FLAG_AUDIO, FLAG_CONFIG, MediaMessage, parse_media
from tests.integration.test_publisher_source import (
    FPS,
    GOP,
    HEIGHT,
    REPOSITORY,
    WIDTH,
    publisher,
)
from tests.support.http import http_get
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run, wait_until
from tests.support.ws_client import Viewer

pytestmark = [pytest.mark.publisher_process, pytest.mark.timeout(150)]

FRAMES = 3 * GOP
BEEP_FRAME = GOP  # the second keyframe: 1.0 s into the clip
BEEP_SECONDS = 0.1
#: How far the beep's onset may be from its frame's capture time (measured: under 1 ms;
#: the margin covers an Opus onset smeared over a few samples).
SYNC_TOLERANCE_US = 10_000


def slices(access_unit: bytes) -> list[bytes]:
    """The coded slices of an Annex-B access unit: what identifies a picture whatever
    parameter sets, SEI or delimiters surround it."""
    return [unit for unit in split_annexb(access_unit) if nal_type(unit) in (1, NAL_IDR)]


def write_av_clip(
    path: Path, audio_codec: str, bframes: int = 0, flash: bool = False
) -> tuple[list[list[bytes]], list[bytes]]:
    """Write the clip (see the module docstring); (each frame's slices, the audio
    packets as muxed). Opus: 48 kHz mono; AAC: 44.1 kHz stereo (resampled by the
    publisher). With ``bframes``, Main profile with that many B-frames. With ``flash``,
    the beep frame is white (found after transcoding, where slices change)."""
    rate, layout = (48_000, "mono") if audio_codec == "libopus" else (44_100, "stereo")
    output = av.open(str(path), "w", format="matroska")
    video: Any = output.add_stream("libx264", rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.options = {
        "preset": "ultrafast",
        **({} if bframes else {"tune": "zerolatency"}),
        "profile": "main" if bframes else "baseline",
        "x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes={bframes}",
    }
    audio: Any = output.add_stream(audio_codec, rate=rate)
    audio.layout = layout
    if audio_codec == "libopus":
        audio.options = {"application": "lowdelay", "frame_duration": "20"}
    audio.codec_context.open()
    block = audio.codec_context.frame_size or 960
    channels = 1 if layout == "mono" else 2
    beep_start = BEEP_FRAME * rate // FPS
    beep_end = beep_start + int(BEEP_SECONDS * rate)
    video_slices: list[list[bytes]] = []
    audio_packets: list[bytes] = []
    across = np.tile(np.arange(WIDTH, dtype=np.uint16), (HEIGHT, 1))
    sample = 0
    noise = np.random.default_rng(14)

    def mux_audio(until: int | None) -> None:
        nonlocal sample
        while until is None or sample < until:
            if until is None:
                frames = audio.encode(None)
                until = -1
            else:
                index = np.arange(sample, sample + block)
                # Quiet noise (every packet different) and the beep.
                wave = np.where(
                    (index >= beep_start) & (index < beep_end),
                    0.5 * np.sin(2 * np.pi * 1000 * index / rate),
                    noise.uniform(-0.01, 0.01, block),
                )
                samples = (wave * 32767).astype(np.int16)
                planar = np.repeat(samples[None, :], channels, axis=0).T.reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(planar, format="s16", layout=layout)
                frame.sample_rate, frame.pts = rate, sample
                sample += block
                frames = audio.encode(frame)
            for packet in frames:
                audio_packets.append(bytes(packet))
                output.mux(packet)

    for index in range(FRAMES + 1):
        if index < FRAMES:
            picture = np.stack(
                [(across + index * 7) % 256, (across * 3 + index) % 256, across % 256], axis=2
            ).astype(np.uint8)
            if flash and index == BEEP_FRAME:
                picture[:] = 255
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = index
            packets = video.encode(frame)
        else:
            packets = video.encode(None)
        for packet in packets:
            video_slices.append(slices(bytes(packet)))
            output.mux(packet)
        mux_audio((index + 1) * rate // FPS if index < FRAMES else None)
    output.close()
    return video_slices, audio_packets


def split_messages(viewer: Viewer) -> tuple[list[MediaMessage], list[MediaMessage]]:
    """The viewer's (video frames, audio messages), in arrival order."""
    messages = [parse_media(data) for _, data in viewer.media]
    return (
        [m for m in messages if m.flags not in (FLAG_CONFIG, FLAG_AUDIO)],
        [m for m in messages if m.flags == FLAG_AUDIO],
    )


def beep_onsets(audio: list[MediaMessage], channels: int) -> list[int]:
    """Decode the received Opus with PyAV (each packet in arrival order, no pre-skip
    dropped, as the wire's Opus profile assumes) and return the capture time of every
    beep onset: the first loud sample after at least 200 ms of silence."""
    decoder: Any = av.CodecContext.create("opus", "r")
    decoder.sample_rate = 48_000
    decoder.layout = "stereo" if channels == 2 else "mono"
    onsets: list[int] = []
    quiet_since: int | None = None
    for message in audio:
        for frame in decoder.decode(av.Packet(message.payload)):
            samples = np.abs(frame.to_ndarray().astype(np.float64)).max(axis=0)
            if samples.dtype != np.float64 or samples.max() > 2:
                samples = samples / 32768.0
            loud = np.nonzero(samples > 0.2)[0]
            start = message.capture_time_us
            if loud.size == 0:
                quiet_since = start if quiet_since is None else quiet_since
                continue
            if quiet_since is not None and start - quiet_since >= 200_000:
                onsets.append(start + int(loud[0]) * 1_000_000 // 48_000)
            quiet_since = None
    return onsets


def beep_frame_times(frames: list[MediaMessage], video: list[list[bytes]]) -> list[int]:
    """Capture times of the received beep frame (every pass of the looped clip)."""
    beep = video[BEEP_FRAME]
    return [m.capture_time_us for m in frames if slices(m.payload) == beep]


def play(relay: RelayProcess, tmp_path: Path, clip: Path, stream: str) -> tuple[Viewer, str]:
    """Publish ``clip`` for a few passes with an audio viewer; the viewer and the log."""
    log = tmp_path / f"{stream}.log"

    async def scenario() -> Viewer:
        viewer = Viewer(f"{relay.ws_url}/watch/{stream}?audio=1")
        await viewer.start()
        with publisher(relay, stream, f"file:{clip}", log, "--duration", "8"):
            for _ in range(200):
                await asyncio.sleep(0.1)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=90)
    return viewer, log.read_text()


def meta_audio(viewer: Viewer) -> dict[str, Any]:
    """The ``audio`` member of the last ``meta``."""
    metas = [m for _, m in viewer.texts if m.get("type") == "meta"]
    assert metas, "no meta"
    return dict(metas[-1]["audio"])


def check_sync(
    frames: list[MediaMessage], audio: list[MediaMessage], video: Any, ch: int, after_us: int = 0
) -> None:
    """Every beep onset (``after_us`` past the first frame's capture time) is within
    SYNC_TOLERANCE_US of the beep frame's capture time."""
    start = frames[0].capture_time_us + after_us
    onsets = [onset for onset in beep_onsets(audio, ch) if onset >= start]
    beeps = beep_frame_times(frames, video)
    assert onsets and beeps, (onsets, beeps)
    matched = 0
    for onset in onsets:
        nearest = min(beeps, key=lambda stamp: abs(stamp - onset))
        if abs(nearest - onset) < 500_000:
            assert abs(nearest - onset) <= SYNC_TOLERANCE_US, (onset - nearest, onsets, beeps)
            matched += 1
    assert matched >= 1, (onsets, beeps)


def test_opus_passes_through_byte_identical_and_in_sync(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """H.264 + Opus in a Matroska file: the viewer's AUDIO payloads are the clip's Opus
    packets byte for byte and in order (a pass of the looped file may lose a packet or
    two where the audio crosses the loop before the video); the beep's onset carries the
    capture time of the beep frame; the status says the audio is passed through."""
    clip = tmp_path / "opus.mkv"
    video, packets = write_av_clip(clip, "libopus")
    viewer, log = play(relay, tmp_path, clip, "opusclip")
    frames, audio = split_messages(viewer)
    assert len(frames) > FRAMES, "the file did not loop"
    assert meta_audio(viewer) == {"codec": "opus", "sample_rate": 48_000, "channels": 1}
    position = {payload: index for index, payload in enumerate(packets)}
    assert len(position) == len(packets), "the clip's Opus packets are not all distinct"
    indices = [position.get(message.payload) for message in audio]
    assert None not in indices, "an AUDIO payload that is none of the clip's Opus packets"
    steps = [b - a for a, b in zip(indices, indices[1:], strict=False)]  # type: ignore[operator]
    backwards = [step for step in steps if step <= 0]
    assert len(backwards) <= 3, "out of order beyond the loops"  # one per pass, 3 passes max
    assert sum(1 for step in steps if step == 1) >= 0.9 * len(steps), steps
    assert len(audio) >= len(packets), "less than one pass of audio"
    times = [message.capture_time_us for message in audio]
    assert all(b > a for a, b in zip(times, times[1:], strict=False)), [
        (indices[i], times[i] - times[0], times[i + 1] - times[i])
        for i in range(len(times) - 1)
        if times[i + 1] - times[i] != 20_000
    ]
    assert abs(times[-1] / 1e6 - time.time()) < 60
    check_sync(frames, audio, video, 1)
    assert "audio: Opus passed through" in log


def test_aac_is_transcoded_to_opus_in_sync(relay: RelayProcess, tmp_path: Path) -> None:
    """H.264 + AAC (44.1 kHz stereo): the viewer gets Opus (stereo, 48 kHz in meta) that
    PyAV decodes, with the beep's onset at the beep frame's capture time; the video is
    still remuxed; the status says the audio is transcoded."""
    clip = tmp_path / "aac.mkv"
    video, _ = write_av_clip(clip, "aac")
    viewer, log = play(relay, tmp_path, clip, "aacclip")
    frames, audio = split_messages(viewer)
    assert len(frames) > FRAMES
    assert meta_audio(viewer) == {"codec": "opus", "sample_rate": 48_000, "channels": 2}
    # 20 ms packets for about 8 s of playing.
    assert len(audio) > 200, len(audio)
    check_sync(frames, audio, video, 2)
    assert "audio: AAC transcoded to Opus" in log
    assert "remuxing H.264 without re-encoding" in log


@pytest.mark.parametrize("bframes", [0, 2], ids=["remuxed", "transcoded"])
def test_source_has_a_thumbnail(relay: RelayProcess, tmp_path: Path, bframes: int) -> None:
    """A remuxed file (and one transcoded for its B-frames): the relay serves
    /api/streams/NAME/thumbnail.jpg, a JPEG that PyAV decodes, 320 pixels wide (made
    from one decoded keyframe by the remuxing publisher, from the transcoder's decoded
    frames otherwise)."""
    clip = tmp_path / "thumb.mkv"
    write_av_clip(clip, "libopus", bframes=bframes)
    log = tmp_path / "thumb.log"
    path = "/api/streams/thumbclip/thumbnail.jpg"
    with publisher(
        relay, "thumbclip", f"file:{clip}", log, "--thumbnail-interval", "1", "--audio", "none"
    ):

        def served() -> Any:
            response = http_get(relay.http_url, path)
            return response if response.status == 200 else None

        response = wait_until(served, 60, 0.2)
    assert response.header("content-type") == "image/jpeg"
    decoder: Any = av.CodecContext.create("mjpeg", "r")
    pictures = decoder.decode(av.Packet(response.body))
    assert len(pictures) == 1
    assert (pictures[0].width, pictures[0].height) == (320, 240)
    mode = "transcoding: B-frames" if bframes else "remuxing H.264 without re-encoding"
    assert mode in log.read_text()


def test_a_transcoded_file_keeps_its_audio(relay: RelayProcess, tmp_path: Path) -> None:
    """H.264 with B-frames + AAC: the video is transcoded, and the file's audio still
    reaches an audio viewer as Opus that PyAV decodes, with the beep in it; the status
    says both."""
    clip = tmp_path / "bframes.mkv"
    write_av_clip(clip, "aac", bframes=2)
    viewer, log = play(relay, tmp_path, clip, "bclip")
    frames, audio = split_messages(viewer)
    assert frames and len(audio) > 100, (len(frames), len(audio))
    assert meta_audio(viewer) == {"codec": "opus", "sample_rate": 48_000, "channels": 2}
    assert beep_onsets(audio, 2), "no beep decoded"
    assert "transcoding: B-frames" in log
    assert "audio: transcoded to Opus" in log


def stream_file(clip: str, url: str, passes: int = 2) -> None:
    """Send ``clip``'s packets (video and audio, unchanged) ``passes`` times to ``url``
    as MPEG-TS, each when its time comes: a live source."""
    with av.open(url, "w", format="mpegts") as output:
        outputs: dict[int, Any] = {}
        started = time.monotonic()
        for number in range(passes):
            shift = number * (FRAMES / FPS + 0.1)  # past the audio's last packet
            with av.open(clip) as source:
                if not outputs:
                    outputs = {
                        stream.index: output.add_stream_from_template(stream)
                        for stream in (source.streams.video[0], source.streams.audio[0])
                    }
                for packet in source.demux():
                    if packet.dts is None or packet.pts is None or not packet.size:
                        continue
                    due = started + shift + float(packet.dts * packet.time_base)
                    time.sleep(max(0.0, due - time.monotonic()))
                    ticks = int(shift / packet.time_base)
                    packet.pts, packet.dts = packet.pts + ticks, packet.dts + ticks
                    packet.stream = outputs[packet.stream_index]
                    output.mux(packet)


def test_live_mpegts_over_udp_carries_opus_byte_identical_in_sync(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """A live source: the clip's H.264 + Opus streamed twice as MPEG-TS over UDP by a
    process of its own. The viewer's AUDIO payloads are the clip's Opus packets byte for
    byte, in order, with capture times increasing, and the second beep's onset carries
    its frame's capture time (the live clock). The first second is read in a burst
    (what FFmpeg buffered while probing the source) and stamped compressed by the live
    clock: the first beep is not checked."""
    from tests.integration.test_publisher_source import free_port
    from tests.support.publisher_process import publisher_environment

    clip = tmp_path / "live.mkv"
    video, packets = write_av_clip(clip, "libopus")
    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}?pkt_size=1316"
    log = tmp_path / "live.log"
    code = (
        "import sys; from tests.integration.test_publisher_source_media import stream_file; "
        "stream_file(sys.argv[1], sys.argv[2])"
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
            await asyncio.to_thread(producer.wait, 60)
            await asyncio.sleep(2.0)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=120)
    frames, audio = split_messages(viewer)
    assert meta_audio(viewer) == {"codec": "opus", "sample_rate": 48_000, "channels": 1}
    position = {payload: index for index, payload in enumerate(packets)}
    indices = [position.get(message.payload) for message in audio]
    assert None not in indices, "an AUDIO payload that is none of the clip's Opus packets"
    assert len(audio) >= len(packets), (len(audio), indices)
    steps = [b - a for a, b in zip(indices, indices[1:], strict=False)]  # type: ignore[operator]
    assert sum(1 for step in steps if step <= 0) <= 1, "out of order beyond the second pass"
    times = [message.capture_time_us for message in audio]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    check_sync(frames, audio, video, 1, after_us=2_500_000)
    assert "audio: Opus passed through" in log.read_text()
