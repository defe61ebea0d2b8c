"""The streamrelay-publish command line: argument handling, and end to end over loopback.

The loopback tests run the real CLI in a subprocess against a stand-in relay built on the
independent ``websockets`` library, on 127.0.0.1 with a kernel-chosen port.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

from streamrelay.publisher.arguments import (
    KeyframeInterval,
    parse_arguments,
    parse_bitrate,
    parse_fps,
    parse_keyframe_interval,
    parse_size,
)
from streamrelay.publisher.cli import queue_bounds
from streamrelay.publisher.h264 import NAL_IDR, NAL_PPS, NAL_SPS, nal_type, split_annexb
from streamrelay.publisher.sources import SourceSpec
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage, parse_media
from tests.support.certs import make_certificate
from tests.support.publisher_process import (
    light_encode,
    start_piped_publisher,
)

TOKEN = "1999999999.feedfacecafebeef-not-for-printing"


def test_value_parsers() -> None:
    """Sizes, frame rates, bitrates and keyframe intervals parse in their usual spellings."""
    assert parse_size("1280x720") == (1280, 720)
    assert parse_size(" 640 X 360 ") == (640, 360)
    assert parse_fps("30") == 30
    assert parse_fps("29.97") == Fraction(2997, 100)
    assert parse_fps("30000/1001") == Fraction(30000, 1001)
    assert parse_bitrate("2000k") == 2_000_000
    assert parse_bitrate("2.5M") == 2_500_000
    assert parse_bitrate("800000") == 800_000
    assert parse_keyframe_interval("2") == KeyframeInterval(seconds=2.0)
    assert parse_keyframe_interval("0.5s") == KeyframeInterval(seconds=0.5)
    assert parse_keyframe_interval("60f") == KeyframeInterval(frames=60)
    assert KeyframeInterval(seconds=2.0).in_frames(Fraction(30)) == 60
    assert KeyframeInterval(seconds=0.01).in_frames(Fraction(30)) == 1
    assert KeyframeInterval(frames=45).in_frames(Fraction(30)) == 45
    high_water, limit = queue_bounds(2_000_000)
    assert 64 * 1024 <= high_water < limit


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--size", "1281x720"], "--size"),
        (["--size", "big"], "--size"),
        (["--fps", "0"], "--fps"),
        (["--bitrate", "fast"], "--bitrate"),
        (["--keyframe-interval", "1.5f"], "--keyframe-interval"),
        (["--source", "webcam"], "--source"),
        (["--source", "testsrc", "--source-option", "framerate=5"], "--source-option"),
        (["--source", "screen", "--source-option", "novalue"], "--source-option"),
        (["ftp://relay/publish/x"], "url"),
        (["ws://a/publish/x", "--url", "ws://b/publish/x"], "URL"),
        (["--duration", "-1"], "--duration"),
        (["--preset", "placebo"], "--preset"),
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value exits with status 2 and a message that names the option."""
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(argv)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hevc-passthrough"], "--hevc-passthrough: applies to file and URL sources"),
        (["--transcode", "--source", "camera"], "--transcode: applies to file and URL sources"),
        (["--transcode", "--source", "screen"], "--transcode: applies to file and URL sources"),
        (["--transcode"], "testsrc is always encoded"),
        (
            ["--renditions", "640x360@800k", "--transcode", "--source", "rtsp://h/x"],
            "--transcode: --renditions always re-encodes",
        ),
        (
            ["--renditions", "640x360@800k", "--hevc-passthrough", "--source", "rtsp://h/x"],
            "--hevc-passthrough: --renditions always re-encodes",
        ),
        (
            ["--codec", "vp9", "--hevc-passthrough", "--source", "rtsp://h/x"],
            "--hevc-passthrough: --codec vp9 re-encodes",
        ),
        (
            ["--codec", "av1", "--hevc-passthrough", "--source", "srt://h:9000"],
            "--hevc-passthrough: --codec av1 re-encodes",
        ),
        (
            ["--transcode", "--hevc-passthrough", "--source", "srt://h:9000"],
            "--hevc-passthrough: --transcode re-encodes",
        ),
        (["--codec", "vp9", "--preset", "fast"], "--preset: applies to --codec h264 only"),
        (["--codec", "av1", "--profile", "high"], "--profile: applies to --codec h264 only"),
        (["--on-demand-grace", "30"], "--on-demand-grace: needs --on-demand"),
        (["--source", "camera", "--audio", "tone"], "--audio: tone goes with the test pattern"),
        (["--renditions", "640x360@800k", "--size", "1280x720"], "--renditions: gives each"),
        (["--renditions", "640x360@800k", "--bitrate", "2000k"], "--renditions: gives each"),
    ],
)
def test_options_that_would_do_nothing_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An option that the rest of the command line makes meaningless exits with status 2
    and a message naming the conflict, instead of being silently ignored (the defaults
    given explicitly, e.g. --size 1280x720 with --renditions, included)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["ws://127.0.0.1:9/publish/x", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_options_that_apply_are_still_accepted() -> None:
    """The same options where they do apply: --transcode and --hevc-passthrough with file
    and URL sources, --preset with h264, --on-demand-grace with --on-demand, and the
    defaults when nothing is given."""
    options = parse_arguments(["--source", "rtsp://h/x", "--hevc-passthrough"])
    assert options.hevc_passthrough and not options.transcode
    options = parse_arguments(["--source", "srt://h:9000", "--transcode", "--codec", "vp9"])
    assert options.transcode and options.codec == "vp9"
    options = parse_arguments(["--on-demand", "--on-demand-grace", "3", "--preset", "fast"])
    assert (options.on_demand_grace, options.preset) == (3.0, "fast")
    options = parse_arguments([])
    assert (options.width, options.height, options.bitrate) == (1280, 720, 2_000_000)
    assert (options.preset, options.profile, options.on_demand_grace) == (
        "veryfast",
        "baseline",
        10.0,
    )


def test_defaults_and_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: test pattern, 1280x720, 30 fps, 2000k, 2 s GOP, the demo URL; the token
    comes from STREAMRELAY_TOKEN unless --token is given."""
    monkeypatch.setenv("STREAMRELAY_TOKEN", "from-env")
    options = parse_arguments([])
    assert options.url == "ws://127.0.0.1:8080/publish/demo"
    assert options.source == SourceSpec("testsrc")
    assert (options.width, options.height, options.fps) == (1280, 720, 30)
    assert (options.bitrate, options.keyframe_interval_frames) == (2_000_000, 60)
    assert options.token == "from-env"
    assert parse_arguments(["--token", "from-flag"]).token == "from-flag"
    options = parse_arguments(
        ["--url", "wss://relay/publish/x", "--source", "screen", "--source-option", "a=b"]
    )
    assert options.url == "wss://relay/publish/x"
    assert options.source == SourceSpec("screen", None, {"a": "b"})


class StandInRelay:
    """A minimal relay on loopback: records what each publisher connection sends and lets
    the test script its answers per connection."""

    def __init__(
        self, script: Callable[[int, ServerConnection, StandInRelay], None], **serve_options: Any
    ) -> None:
        self.script = script
        self.connections = 0
        self.log: list[tuple[int, str, Any]] = []
        self.requests: list[tuple[str, dict[str, str], str | None]] = []
        self.close_codes: list[int | None] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._server: Server = serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol("streamrelay.v1")],
            **serve_options,
        )
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, connection: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        request = connection.request
        assert request is not None
        headers = {name.lower(): value for name, value in request.headers.raw_items()}
        self.requests.append((request.path, headers, connection.subprotocol))
        try:
            self.script(number, connection, self)
        except ConnectionClosed:
            pass
        except BaseException as error:  # surfaced by the test
            self.error = error
            self.done.set()
        self.close_codes.append(connection.close_code)

    @staticmethod
    def receive(
        connection: ServerConnection, timeout: float = 10.0
    ) -> dict[str, Any] | MediaMessage:
        message = connection.recv(timeout=timeout)
        while isinstance(message, str) and json.loads(message).get("type") == "thumbnail":
            # Thumbnails come every few seconds, between frames: not what these scripts
            # check (tests/test_publisher_thumbnail.py does).
            message = connection.recv(timeout=timeout)
        if isinstance(message, str):
            decoded: dict[str, Any] = json.loads(message)
            return decoded
        return parse_media(message)

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


@contextmanager
def publisher_process(
    url: str, *extra: str, token: str | None = TOKEN
) -> Iterator[subprocess.Popen[str]]:
    """The real CLI publishing its test pattern to ``url`` with ``token`` in its
    environment; its output piped; killed at the end."""
    process = start_piped_publisher(
        url,
        *light_encode("320x240", 30, "500k"),
        # Video only: these tests read the stand-in relay's messages one by one.
        "--audio",
        "none",
        *extra,
        token=token,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def assert_self_contained_key(message: MediaMessage) -> None:
    types = [nal_type(unit) for unit in split_annexb(message.payload)]
    assert types[:2] == [NAL_SPS, NAL_PPS] and NAL_IDR in types


def test_publishes_meta_config_key_answers_keyframe_requests_and_reconnects() -> None:
    """Against a stand-in relay on loopback, the real CLI: offers streamrelay.v1 with the
    Bearer token; sends meta, CONFIG (SPS+PPS), then a KEY, then deltas, all with valid
    headers and wall-clock timestamps; answers keyframe-request with a KEY within a few
    frames (mid-GOP); after the relay closes the connection it reconnects and sends meta,
    CONFIG and a KEY again; on SIGTERM it closes cleanly (1000) and exits 0; the token never
    appears in its output."""
    observations: dict[str, Any] = {}

    def script(number: int, connection: ServerConnection, relay: StandInRelay) -> None:
        meta = relay.receive(connection)
        config = relay.receive(connection)
        key = relay.receive(connection)
        assert isinstance(meta, dict) and meta["type"] == "meta"
        assert meta["codec"].startswith("avc1.42") and len(meta["codec"]) == 11
        assert (meta["width"], meta["height"], meta["fps"]) == (320, 240, 30)
        assert isinstance(config, MediaMessage) and config.flags == FLAG_CONFIG
        assert [nal_type(u) for u in split_annexb(config.payload)] == [NAL_SPS, NAL_PPS]
        assert isinstance(key, MediaMessage) and key.flags == FLAG_KEY
        assert_self_contained_key(key)
        assert abs(key.capture_time_us / 1e6 - time.time()) < 5
        connection.send(json.dumps({"type": "viewers", "count": 2}))
        if number == 1:
            stamps = [key.capture_time_us]
            for _ in range(10):
                delta = relay.receive(connection)
                assert isinstance(delta, MediaMessage) and delta.flags == 0
                stamps.append(delta.capture_time_us)
            assert stamps == sorted(stamps)
            connection.send(json.dumps({"type": "keyframe-request"}))
            requested_at = time.monotonic()
            for waited in range(1, 8):
                answer = relay.receive(connection)
                assert isinstance(answer, MediaMessage)
                if answer.flags == FLAG_KEY:
                    assert_self_contained_key(answer)
                    observations["frames_until_key"] = waited
                    observations["seconds_until_key"] = time.monotonic() - requested_at
                    break
            connection.close(1001, "relay restarting")
            return
        observations["reconnected"] = True
        relay.done.set()
        while True:
            relay.receive(connection)

    relay = StandInRelay(script)
    try:
        with publisher_process(
            f"ws://127.0.0.1:{relay.port}/publish/loop", "--keyframe-interval", "20s"
        ) as process:
            assert relay.done.wait(30), "publisher did not reconnect in time"
            assert relay.error is None, relay.error
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=15)
            assert process.returncode == 0, stderr
    finally:
        relay.close()
    assert relay.error is None, relay.error
    assert observations["reconnected"]
    assert observations["frames_until_key"] <= 5, observations
    assert observations["seconds_until_key"] < 1.0, observations
    for path, headers, subprotocol in relay.requests:
        assert path == "/publish/loop"
        assert headers["authorization"] == f"Bearer {TOKEN}"
        assert subprotocol == "streamrelay.v1"
        assert "origin" not in headers
    assert relay.close_codes[-1] == 1000
    assert TOKEN not in stderr
    assert "connected" in stderr


def test_wss_verifies_certificates_unless_insecure(tmp_path: Path) -> None:
    """Over wss:// a self-signed certificate is refused by default (the publisher keeps
    retrying and says why), and accepted with --insecure, which then publishes normally."""
    key, certificate = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)

    def script(number: int, connection: ServerConnection, relay: StandInRelay) -> None:
        assert isinstance(relay.receive(connection), dict)
        config, frame = relay.receive(connection), relay.receive(connection)
        assert isinstance(config, MediaMessage) and config.flags == FLAG_CONFIG
        assert isinstance(frame, MediaMessage) and frame.flags == FLAG_KEY
        relay.done.set()

    relay = StandInRelay(script, ssl=context)
    url = f"wss://localhost:{relay.port}/publish/tls"
    try:
        with publisher_process(url, "--duration", "1", token=None) as process:
            _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
        assert relay.connections == 0
        assert "certificate" in stderr.lower() or "verif" in stderr.lower(), stderr

        with publisher_process(url, "--insecure", "--duration", "20", token=None) as process:
            assert relay.done.wait(20), "no media over wss:// with --insecure"
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=15)
        assert process.returncode == 0, stderr
    finally:
        relay.close()
    assert relay.error is None, relay.error
