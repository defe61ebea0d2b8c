"""A URL source decoded rather than remuxed (what ``--renditions`` needs, which scales
the picture): opened with FFmpeg's network protocols, live, closed and reopened across
an on-demand pause, its credentials kept out of descriptions and errors."""

from __future__ import annotations

import socket
import time
from fractions import Fraction
from pathlib import Path

import pytest

from streamrelay.publisher.sources import (
    DeviceSource,
    SourceError,
    SourceSpec,
    open_source,
    parse_source_spec,
)
from tests.integration.test_publisher_source import GOP, free_port, producer_process


def test_a_udp_stream_is_decoded_scaled_and_reopened_after_a_pause(tmp_path: Path) -> None:
    """MPEG-TS over UDP from a producer process: frames come decoded at the asked size
    (yuv420p), the source is live (the network paces it), a pause closes it and a resume
    opens it again, after which frames come again."""
    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}"
    producer = producer_process(
        [f"{url}?pkt_size=1316"], "mpegts", 20 * GOP, str(tmp_path / "produced.jsonl")
    )
    try:
        source = open_source(parse_source_spec(url), 160, 96, Fraction(25))
        try:
            assert isinstance(source, DeviceSource) and source.live
            assert source.description == url
            frame = source.read(0, 0.0).frame
            assert (frame.width, frame.height, frame.format.name) == (160, 96, "yuv420p")
            source.pause()
            assert not source.opened
            source.resume()
            assert source.opened
            assert source.read(1, 0.0).frame.width == 160
        finally:
            source.close()
    finally:
        producer.kill()
        producer.wait()


def test_an_unreachable_url_fails_clearly_without_its_credentials() -> None:
    """An RTSP camera that cannot be reached: a SourceError naming the URL without its
    user and password (FFmpeg's own message would quote them)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    spec = SourceSpec("url", f"rtsp://admin:s3cret@127.0.0.1:{port}/stream1")
    started = time.monotonic()
    with pytest.raises(SourceError) as error:
        open_source(spec, 320, 240, Fraction(25))
    assert time.monotonic() - started < 20
    message = str(error.value)
    assert f"rtsp://127.0.0.1:{port}/stream1" in message
    assert "s3cret" not in message and "admin" not in message


def test_a_network_source_that_ends_is_opened_again_until_interrupted(tmp_path: Path) -> None:
    """MPEG-TS over TCP from a server that sends one GOP per connection and hangs up: the
    source reads on past the end (it connected again), and once the server is gone it
    keeps retrying until interrupted (the capture thread's stop), then fails clearly; a
    source resumed after an on-demand pause while its server is down retries likewise."""
    import threading

    from tests.integration.test_publisher_source import encode_to

    clip = tmp_path / "clip.ts"
    encode_to([str(clip)], "mpegts", GOP, str(tmp_path / "clip.jsonl"), paced=False)
    data = clip.read_bytes()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            with connection:
                connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    source = open_source(SourceSpec("url", f"tcp://127.0.0.1:{port}"), 160, 96, Fraction(25))
    resumed = open_source(SourceSpec("url", f"tcp://127.0.0.1:{port}"), 160, 96, Fraction(25))
    try:
        for index in range(GOP + 5):  # past the end of the first connection's pass
            assert source.read(index, 0.0).frame.width == 160
        assert len(accepted) >= 3
        assert resumed.read(0, 0.0).frame.width == 160
        resumed.pause()
        server.close()
        threading.Timer(1.0, source.interrupt).start()
        with pytest.raises(SourceError, match="stopped while reopening"):
            for index in range(10 * GOP):
                source.read(index, 0.0)
        # Resumed while its server is down: retried (not a failure) until interrupted.
        threading.Timer(1.0, resumed.interrupt).start()
        with pytest.raises(SourceError, match="stopped while reopening"):
            resumed.resume()
    finally:
        source.close()
        resumed.close()
        server.close()
