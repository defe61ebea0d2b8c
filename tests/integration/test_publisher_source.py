"""``streamrelay-publish --source URL|file:``: remuxing without re-encoding, end to end.

Each test produces H.264 with PyAV itself (libx264, a moving test pattern), in a process
of its own where the source is live: MPEG-TS over UDP on loopback, an RTMP push into a
listening publisher, or an FLV file (AVCC, the conversion path). It runs the real
``streamrelay-publish`` process against a real ``twistd streamrelay`` relay and an
independent ``websockets`` viewer, and compares the access units the producer's encoder
made with what the viewer receives: byte for byte, in order, with the right KEY flags.
Allowed differences, and only these: access unit delimiters (the MPEG-TS muxer adds
them; the publisher drops them) and the SPS/PPS the publisher inserts before an IDR that
lacks them in-band (AVCC sources keep them in the ``avcC`` record).
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from streamrelay.publisher.h264 import (
    NAL_AUD,
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    nal_type,
    split_annexb,
)
from streamrelay.publisher.hevc import HEVC_AUD, HEVC_PPS, HEVC_SPS, HEVC_VPS, hevc_nal_type
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage, parse_media
from tests.support.publisher_process import publisher_environment, running_publisher
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run
from tests.support.ws_client import Viewer

pytestmark = pytest.mark.publisher_process

REPOSITORY = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT, FPS, GOP = 320, 240, 25, 25


def encode_to(
    urls: list[str],
    fmt: str,
    frames: int,
    record: str,
    paced: bool = True,
    bframes: int = 0,
    size: tuple[int, int] = (WIDTH, HEIGHT),
    options: dict[str, str] | None = None,
    first: int = 0,
    codec: str = "libx264",
    profile: str = "",
) -> None:
    """Encode a moving pattern (from picture number ``first``) with libx264, mux it into
    every URL (same packets), and write each access unit the encoder made to ``record``
    (JSON lines: hex, key)."""
    import av
    import numpy as np

    outputs = [av.open(url, "w", format=fmt, options=options or {}) for url in urls]
    streams: list[Any] = []
    for output in outputs:
        stream: Any = output.add_stream(codec, rate=FPS)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        settings = f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes={bframes}"
        if codec == "libx265":
            stream.options = {
                "preset": "ultrafast",
                "tune": "zerolatency",
                "x265-params": f"{settings}:log-level=error",
            }
        else:
            stream.options = {
                # ultrafast turns off what makes High profile High (CABAC, 8x8 transforms).
                "preset": "veryfast" if profile else "ultrafast",
                "profile": profile or ("baseline" if not bframes else "main"),
                "tune": "zerolatency" if not bframes else "film",
                "x264-params": settings,
            }
        streams.append(stream)
    encoder = streams[0]
    width, height = size
    across = np.tile(np.arange(width, dtype=np.uint16), (height, 1))
    down = np.tile(np.arange(height, dtype=np.uint16)[:, None], (1, width))
    started = time.monotonic()
    with open(record, "w") as log:
        for index in range(frames + 1):
            if index < frames:
                number = first + index
                channels = [(across + number * 7) % 256, (down + number * 3) % 256, across ^ down]
                picture = np.stack(channels, axis=2).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts = index
                packets = encoder.encode(frame)
            else:
                packets = encoder.encode(None)
            for packet in packets:
                data = bytes(packet)
                log.write(json.dumps({"au": data.hex(), "key": packet.is_keyframe}) + "\n")
                for stream, output in zip(streams, outputs, strict=True):
                    copy = av.Packet(data)
                    copy.pts, copy.dts = packet.pts, packet.dts
                    copy.time_base = packet.time_base
                    copy.is_keyframe = packet.is_keyframe
                    copy.stream = stream
                    output.mux(copy)
            log.flush()
            if paced:
                delay = started + (index + 1) / FPS - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    for output in outputs:
        output.close()


def producer_process(
    urls: list[str], fmt: str, frames: int, record: str, **options: Any
) -> subprocess.Popen[bytes]:
    """Run :func:`encode_to` in a process of its own (a live source)."""
    code = (
        "import json, sys; from tests.integration.test_publisher_source import encode_to; "
        "encode_to(**json.loads(sys.argv[1]))"
    )
    arguments = {"urls": urls, "fmt": fmt, "frames": frames, "record": record, **options}
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(arguments)],
        cwd=REPOSITORY,
        env=publisher_environment(),
    )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port the kernel just handed out on loopback (and took back)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextmanager
def publisher(
    relay: RelayProcess, stream: str, source: str, log: Path, *extra: str, size: str = ""
) -> Iterator[subprocess.Popen[bytes]]:
    """``streamrelay-publish`` publishing ``source`` to ``relay``; stderr goes to ``log``."""
    with running_publisher(
        f"{relay.ws_url}/publish/{stream}",
        "--source",
        source,
        "--size",
        size or f"{WIDTH}x{HEIGHT}",
        "--preset",
        "ultrafast",
        "--bitrate",
        "400k",
        *extra,
        log=log,
        output="stderr",
    ) as process:
        yield process


def recorded(path: Path) -> list[tuple[list[bytes], bool]]:
    """The producer's access units: (NAL units, keyframe) in encoding order."""
    units = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        units.append((split_annexb(bytes.fromhex(entry["au"])), bool(entry["key"])))
    return units


def received(viewer: Viewer) -> tuple[list[MediaMessage], list[MediaMessage]]:
    """The viewer's (CONFIG messages, frames), in arrival order."""
    messages = [parse_media(data) for _, data in viewer.media]
    return (
        [message for message in messages if message.flags == FLAG_CONFIG],
        [message for message in messages if message.flags != FLAG_CONFIG],
    )


def check_identical(
    frames: list[MediaMessage],
    produced: list[tuple[list[bytes], bool]],
    parameter_sets: list[bytes] | None,
    loop: bool = False,
    hevc: bool = False,
) -> tuple[int, int]:
    """Every frame is the producer's next access unit (cyclically when ``loop``), byte for
    byte apart from AUDs and, when ``parameter_sets`` is given, those parameter sets
    inserted in front of each key picture; KEY exactly on the encoder's keyframes (IDR;
    IRAP for ``hevc``). A gap may only end at a KEY (frames dropped up to a keyframe when
    the network is behind). Returns the producer index of the first frame and the number
    of gaps."""
    assert frames, "the viewer received no frames"
    assert frames[0].flags == FLAG_KEY, "the first frame is not a KEY"
    unit_type = hevc_nal_type if hevc else nal_type
    delimiter = HEVC_AUD if hevc else NAL_AUD
    required = [HEVC_VPS, HEVC_SPS, HEVC_PPS] if hevc else [NAL_SPS, NAL_PPS]

    def as_produced(message: MediaMessage) -> list[bytes]:
        units = [unit for unit in split_annexb(message.payload) if unit_type(unit) != delimiter]
        if message.flags == FLAG_KEY:
            types = [unit_type(unit) for unit in units]
            assert all(kind in types for kind in required), types
            assert any(kind in types for kind in (range(16, 24) if hevc else [NAL_IDR])), types
            if parameter_sets is not None:
                assert units[: len(parameter_sets)] == parameter_sets
                units = units[len(parameter_sets) :]
        return units

    first = as_produced(frames[0])
    starts = [index for index, (units, _) in enumerate(produced) if units == first]
    assert starts, "the first KEY is none of the producer's access units"
    position = starts[0]
    gaps = 0
    for number, message in enumerate(frames):
        if position == len(produced):
            assert loop, f"frame {number}: more frames than the producer made"
            position = 0
        units = as_produced(message)
        if units != produced[position][0] and message.flags == FLAG_KEY:
            # Dropped up to a keyframe (the network was behind: the documented way to
            # lose frames), so this KEY is a later one of the producer's.
            later = [
                index
                for index in range(position + 1, len(produced) + (position if loop else 0))
                if produced[index % len(produced)][0] == units
            ]
            assert later, f"frame {number}: a KEY that is none of the producer's"
            position, gaps = later[0] % len(produced), gaps + 1
        assert units == produced[position][0], f"frame {number} differs from unit {position}"
        assert (message.flags == FLAG_KEY) == produced[position][1], f"frame {number}: KEY flag"
        position += 1
    return starts[0], gaps


def check_times(frames: list[MediaMessage]) -> None:
    """Capture times increase strictly and lie on the wall clock."""
    stamps = [message.capture_time_us for message in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), "times not increasing"
    assert abs(stamps[-1] / 1e6 - time.time()) < 60


async def watch(relay: RelayProcess, stream: str) -> Viewer:
    """A viewer of ``stream``, connected before the publisher goes live."""
    viewer = Viewer(f"{relay.ws_url}/watch/{stream}")
    await viewer.start()
    return viewer


async def settle(viewer: Viewer, quiet: float = 1.5, timeout: float = 60.0) -> None:
    """Wait until the viewer got media and then nothing more for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    await asyncio.wait_for(viewer.first_media.wait(), timeout)
    count = -1
    while time.monotonic() < deadline and count != len(viewer.media):
        count = len(viewer.media)
        await asyncio.sleep(quiet)


def meta_of(viewer: Viewer) -> dict[str, Any]:
    """The last ``meta`` the viewer received."""
    metas = [message for _, message in viewer.texts if message.get("type") == "meta"]
    assert metas, "no meta received"
    return metas[-1]


def watch_udp_source(
    relay: RelayProcess,
    stream: str,
    log: Path,
    record: Path,
    frames: int,
    *extra: str,
    **producer_options: Any,
) -> Viewer:
    """A viewer of ``stream`` while the publisher (``extra`` on its command line) reads
    MPEG-TS over UDP from a live producer of ``frames`` frames (recorded to ``record``);
    the viewer, closed once the stream has settled."""
    port = free_port(socket.SOCK_DGRAM)

    async def scenario() -> Viewer:
        viewer = await watch(relay, stream)
        with publisher(relay, stream, f"udp://127.0.0.1:{port}", log, *extra):
            await asyncio.sleep(1.0)  # the publisher binds the port
            producer = producer_process(
                [f"udp://127.0.0.1:{port}?pkt_size=1316"],
                "mpegts",
                frames,
                str(record),
                **producer_options,
            )
            await asyncio.to_thread(producer.wait, 60)
            await settle(viewer)
        await viewer.close()
        return viewer

    return run(scenario(), timeout=120)


def test_udp_mpegts_is_remuxed_byte_identical(relay: RelayProcess, tmp_path: Path) -> None:
    """MPEG-TS over UDP from a live producer: the viewer gets the encoder's access units
    byte for byte (minus the TS muxer's AUDs; x264 repeats SPS/PPS itself, so nothing is
    inserted), in order, KEY on every IDR; meta says avc1 at the source's size; the
    status line says it remuxes."""
    record = tmp_path / "produced.jsonl"
    log = tmp_path / "publisher.log"
    viewer = watch_udp_source(relay, "ts", log, record, 175)
    configs, frames = received(viewer)
    produced = recorded(record)
    assert configs and [nal_type(u) for u in split_annexb(configs[0].payload)] == [NAL_SPS, NAL_PPS]
    _, gaps = check_identical(frames, produced, parameter_sets=None)
    assert gaps <= 1, gaps
    assert len(frames) >= len(produced) - 3 * GOP, (len(frames), len(produced))
    check_times(frames)
    meta = meta_of(viewer)
    assert meta["codec"].startswith("avc1.42") and (meta["width"], meta["height"]) == (
        WIDTH,
        HEIGHT,
    )
    assert meta["fps"] == FPS
    text = log.read_text()
    assert "remuxing H.264 without re-encoding" in text, text


def write_clip(
    path: Path, fmt: str, frames: int, bframes: int = 0
) -> list[tuple[list[bytes], bool]]:
    """Encode a clip into a file (not paced); the producer's access units."""
    record = path.with_suffix(".jsonl")
    encode_to([str(path)], fmt, frames, str(record), paced=False, bframes=bframes)
    return recorded(record)


def avcc_parameter_sets(path: Path) -> list[bytes]:
    """The SPS and PPS of a file's avcC record."""
    import av

    from streamrelay.publisher.h264 import avcc_config_to_parameter_sets

    with av.open(str(path)) as container:
        extradata = container.streams.video[0].codec_context.extradata
    assert extradata is not None
    sps, pps, _ = avcc_config_to_parameter_sets(extradata)
    return [*sps, *pps]


@contextmanager
def web_server(directory: Path) -> Iterator[str]:
    """An HTTP server on loopback serving ``directory``; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file handler that does not log every request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Say nothing."""


@pytest.mark.parametrize("where", ["file", "http"])
def test_flv_file_avcc_is_converted_paced_and_looped(
    relay: RelayProcess, tmp_path: Path, where: str
) -> None:
    """An FLV file (AVCC, parameter sets only in the avcC record), local or on a web
    server: every KEY carries the record's SPS/PPS and then the encoder's IDR access unit
    unchanged; the deltas are unchanged; the file plays at its own rate (capture times
    40 ms apart at 25 fps, not as fast as it can be read) and loops (after the last access
    unit comes the first)."""
    clip = tmp_path / "clip.flv"
    produced = write_clip(clip, "flv", 2 * GOP)
    parameter_sets = avcc_parameter_sets(clip)
    assert not any(nal_type(unit) in (NAL_SPS, NAL_PPS) for units, _ in produced for unit in units)
    log = tmp_path / "publisher.log"

    async def scenario() -> Viewer:
        viewer = await watch(relay, "flv")
        with web_server(tmp_path) as base:
            source = f"file:{clip}" if where == "file" else f"{base}/clip.flv"
            with publisher(relay, "flv", source, log, "--duration", "6"):
                await settle(viewer, quiet=2.0)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=90)
    configs, frames = received(viewer)
    assert configs[0].payload == b"".join(b"\x00\x00\x00\x01" + unit for unit in parameter_sets)
    assert len(frames) > len(produced), "the file did not loop"
    _, gaps = check_identical(frames, produced, parameter_sets=parameter_sets, loop=True)
    assert gaps <= 1, gaps
    check_times(frames)
    steps = sorted(
        b.capture_time_us - a.capture_time_us for a, b in zip(frames, frames[1:], strict=False)
    )
    assert steps[len(steps) // 2] == pytest.approx(1e6 / FPS, abs=1000), steps
    assert "remuxing H.264 without re-encoding" in log.read_text()


def test_b_frames_are_transcoded(relay: RelayProcess, tmp_path: Path) -> None:
    """A file with B-frames cannot go out as v1 H.264: the publisher transcodes it with
    its encoder (the configured size, baseline) and says so in its status line."""
    clip = tmp_path / "bframes.ts"
    write_clip(clip, "mpegts", 2 * GOP, bframes=2)
    log = tmp_path / "publisher.log"

    async def scenario() -> Viewer:
        viewer = await watch(relay, "bf")
        with publisher(relay, "bf", str(clip), log, "--duration", "6", size="256x144"):
            await settle(viewer, quiet=2.0)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=90)
    configs, frames = received(viewer)
    assert configs and frames and frames[0].flags == FLAG_KEY
    meta = meta_of(viewer)
    assert meta["codec"].startswith("avc1.42") and (meta["width"], meta["height"]) == (256, 144)
    check_times(frames)
    assert "transcoding: B-frames" in log.read_text()


def test_b_frames_appearing_mid_stream_switch_to_transcoding(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """A source whose B-frames start after the publisher opened it (two MPEG-TS clips
    joined: none, then some): the first part is remuxed byte for byte; at the first
    picture out of order the publisher hands the source to its encoder (meta changes to
    the configured size) and says why."""
    first = write_clip(tmp_path / "first.ts", "mpegts", 6 * GOP)
    write_clip(tmp_path / "second.ts", "mpegts", 4 * GOP, bframes=2)
    joined = tmp_path / "joined.ts"
    joined.write_bytes((tmp_path / "first.ts").read_bytes() + (tmp_path / "second.ts").read_bytes())
    log = tmp_path / "publisher.log"

    async def scenario() -> Viewer:
        viewer = await watch(relay, "switch")
        with publisher(relay, "switch", f"file:{joined}", log, "--duration", "11", size="256x144"):
            await settle(viewer, quiet=2.5)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=90)
    metas = [message for _, message in viewer.texts if message.get("type") == "meta"]
    assert [(m["width"], m["height"]) for m in metas][:1] == [(WIDTH, HEIGHT)]
    assert (metas[-1]["width"], metas[-1]["height"]) == (256, 144), metas
    _, frames = received(viewer)
    start, _ = check_identical(frames[:1], first, parameter_sets=None)
    _, gaps = check_identical(frames[: len(first) - start], first, parameter_sets=None)
    assert gaps == 0, gaps
    assert len(frames) > len(first), "nothing after the switch"
    check_times(frames)
    assert "transcoding: B-frames" in log.read_text()


def test_rtmp_push_into_a_listening_publisher(relay: RelayProcess, tmp_path: Path) -> None:
    """``rtmp://...?listen=1``: a producer pushes FLV over RTMP (as OBS does) into the
    publisher, which remuxes it: AVCC converted, SPS/PPS inserted before each IDR, every
    access unit byte-identical and in order. The producer disconnects and pushes again
    (OBS stopping and starting): the publisher listens again and the stream goes on from
    the new push's first keyframe, with capture times still increasing."""
    port = free_port()
    records = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    log = tmp_path / "publisher.log"
    url = f"rtmp://127.0.0.1:{port}/live/obs"

    async def scenario() -> Viewer:
        viewer = await watch(relay, "obs")
        with publisher(relay, "obs", f"{url}?listen=1", log):
            await asyncio.sleep(1.5)  # the publisher listens
            for number, record in enumerate(records):
                producer = producer_process([url], "flv", 100, str(record), first=1000 * number)
                await asyncio.to_thread(producer.wait, 60)
                await settle(viewer)
        await viewer.close()
        return viewer

    viewer = run(scenario(), timeout=150)
    configs, frames = received(viewer)
    first, second = recorded(records[0]), recorded(records[1])
    parameter_sets = split_annexb(configs[0].payload)
    assert all(config.payload == configs[0].payload for config in configs)
    split = next(
        index
        for index, frame in enumerate(frames)
        if frame.flags == FLAG_KEY and split_annexb(frame.payload)[2:] == second[0][0]
    )
    gaps = [
        check_identical(frames[:split], first, parameter_sets=parameter_sets)[1],
        check_identical(frames[split:], second, parameter_sets=parameter_sets)[1],
    ]
    assert gaps == [0, 0], gaps
    assert split >= len(first) - 2 * GOP and len(frames) - split == len(second)
    check_times(frames)
    text = log.read_text()
    assert "remuxing H.264 without re-encoding" in text
    assert "ended; reopening it" in text


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "transcoded"])
def test_hevc_over_udp(relay: RelayProcess, tmp_path: Path, passthrough: bool) -> None:
    """HEVC in MPEG-TS over UDP: by default the viewer gets the x265 access units byte
    for byte (minus AUDs), KEY on IRAP pictures, meta.codec the WebCodecs string
    (hvc1.1.6.L60.90: Main, level 2); with --transcode the publisher re-encodes to H.264
    (for browsers without HEVC) and says so."""
    record = tmp_path / "produced.jsonl"
    log = tmp_path / "publisher.log"
    extra = [] if passthrough else ["--transcode"]
    viewer = watch_udp_source(relay, "hevc", log, record, 125, *extra, codec="libx265")
    configs, frames = received(viewer)
    meta = meta_of(viewer)
    text = log.read_text()
    assert (meta["width"], meta["height"]) == (WIDTH, HEIGHT)
    check_times(frames)
    if not passthrough:
        assert meta["codec"].startswith("avc1.42")
        assert "transcoding: --transcode" in text
        return
    assert meta["codec"] == "hvc1.1.6.L60.90"
    kinds = [hevc_nal_type(unit) for unit in split_annexb(configs[0].payload)]
    assert kinds == [HEVC_VPS, HEVC_SPS, HEVC_PPS]
    produced = [
        ([unit for unit in units if hevc_nal_type(unit) != HEVC_AUD], key)
        for units, key in recorded(record)
    ]
    _, gaps = check_identical(frames, produced, parameter_sets=None, hevc=True)
    assert gaps <= 1, gaps
    assert len(frames) >= len(produced) - 3 * GOP
    assert "remuxing HEVC without re-encoding" in text


def test_remuxing_costs_a_fraction_of_transcoding(relay: RelayProcess, tmp_path: Path) -> None:
    """One producer sends the same MPEG-TS to two UDP ports: one publisher remuxes it,
    the other (``--transcode``) decodes and re-encodes it at the same size and rate. Over
    the same window the remuxer uses well under half the CPU time of the transcoder (the
    figures are printed; the report has them for larger pictures)."""
    import psutil

    ports = [free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)]
    record = tmp_path / "produced.jsonl"

    async def scenario() -> tuple[float, float]:
        viewers = [await watch(relay, "remux"), await watch(relay, "encode")]
        with (
            publisher(
                relay, "remux", f"udp://127.0.0.1:{ports[0]}", tmp_path / "r.log", size="640x360"
            ) as remux,
            publisher(
                relay,
                "encode",
                f"udp://127.0.0.1:{ports[1]}",
                tmp_path / "e.log",
                "--transcode",
                size="640x360",
            ) as encode,
        ):
            await asyncio.sleep(1.0)
            producer = producer_process(
                [f"udp://127.0.0.1:{port}?pkt_size=1316" for port in ports],
                "mpegts",
                300,
                str(record),
                size=(640, 360),
            )
            for viewer in viewers:
                await asyncio.wait_for(viewer.first_media.wait(), 60)
            processes = [psutil.Process(remux.pid), psutil.Process(encode.pid)]
            before = [sum(p.cpu_times()[:2]) for p in processes]
            await asyncio.sleep(6.0)
            after = [sum(p.cpu_times()[:2]) for p in processes]
            await asyncio.to_thread(producer.wait, 60)
        for viewer in viewers:
            await viewer.close()
        return after[0] - before[0], after[1] - before[1]

    remuxing, transcoding = run(scenario(), timeout=150)
    print(f"CPU seconds over 6 s: remuxing {remuxing:.2f}, transcoding {transcoding:.2f}")
    assert transcoding > 0
    assert remuxing < 0.5 * transcoding, (remuxing, transcoding)


def test_unreachable_source_is_retried_and_credentials_stay_out_of_the_log(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """An RTSP camera that refuses connections: the publisher keeps running and retrying,
    says so, and never prints the password of the URL (FFmpeg's errors quote the URL)."""
    port = free_port()
    log = tmp_path / "publisher.log"
    source = f"rtsp://admin:s3cret-pw@127.0.0.1:{port}/stream1?token=t0ken"
    with publisher(relay, "cam", source, log, "--duration", "4") as process:
        process.wait(30)
    text = log.read_text()
    assert process.returncode == 0, text
    assert "cannot open rtsp://127.0.0.1:" in text and "retrying" in text, text
    assert "s3cret-pw" not in text and "t0ken" not in text, text
