"""``streamrelay-publish --codec vp9|av1`` through the real ``twistd streamrelay``, seen by
an independent ``websockets`` viewer: meta, CONFIG then KEY first, a KEY soon after the
viewer asks for one (the GOP is far longer), and frames that PyAV decodes one for one."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import pytest

from tests.support.media import CONFIG, KEY, flags_of
from tests.support.publisher_process import PublisherProcesses
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run
from tests.support.ws_client import SUBPROTOCOL, text_of_type, ws_connect

pytestmark = [pytest.mark.integration, pytest.mark.publisher_process, pytest.mark.timeout(120)]

HEADER = 9
DECODERS = {"vp9": "vp9", "av1": "libdav1d"}
PREFIXES = {"vp9": "vp09.", "av1": "av01."}
GOP_SECONDS = 60  # far longer than the test: a KEY after the first one is a forced one


@pytest.fixture
def publisher_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start(url, *extra)``: ``python -m streamrelay.publisher`` as its own process,
    stopped with SIGTERM at teardown."""
    with PublisherProcesses(tmp_path) as publishers:
        yield lambda url, *extra: publishers.start("--url", url, "--quiet", *extra)


def decode_all(codec: str, payloads: list[bytes]) -> list[Any]:
    """Decode every payload with PyAV; returns the pictures."""
    context: Any = av.CodecContext.create(DECODERS[codec], "r")
    pictures: list[Any] = []
    for payload in payloads:
        pictures.extend(context.decode(av.Packet(payload)))
    pictures.extend(context.decode(None))
    return pictures


@pytest.mark.parametrize("codec", ["vp9", "av1"])
def test_publisher_codec_through_the_relay(
    codec: str,
    relay: RelayProcess,
    publisher_process: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A viewer waiting before the publisher starts gets the meta with the codec string,
    then CONFIG, then a KEY; after it asks for a keyframe a KEY arrives within 5 s though
    the GOP is 60 s; every frame it received decodes with PyAV to a 320x240 picture."""

    async def scenario() -> tuple[dict[str, Any], list[bytes], float | None]:
        async with ws_connect(
            f"{relay.ws_url}/watch/{codec}", subprotocols=[SUBPROTOCOL]
        ) as viewer:
            await text_of_type(viewer, "status")
            process = publisher_process(
                f"{relay.ws_url}/publish/{codec}",
                "--codec",
                codec,
                "--size",
                "320x240",
                "--fps",
                "15",
                "--keyframe-interval",
                str(GOP_SECONDS),
            )
            meta = await text_of_type(viewer, "meta", timeout=30)
            messages: list[bytes] = []
            asked_at: float | None = None
            key_after_request: float | None = None
            started = time.monotonic()
            while time.monotonic() - started < 12 and key_after_request is None:
                if asked_at is None and time.monotonic() - started > 2:
                    await viewer.send('{"type": "keyframe-request"}')
                    asked_at = time.monotonic()
                try:
                    message = await asyncio.wait_for(viewer.recv(), 1.0)
                except TimeoutError:
                    continue
                if isinstance(message, str):
                    continue
                messages.append(message)
                if asked_at is not None and flags_of(message) == KEY and len(messages) > 2:
                    key_after_request = time.monotonic() - asked_at
            assert process.poll() is None, (tmp_path / "publisher-0.log").read_text()
            return meta, messages, key_after_request

    meta, messages, key_after_request = run(scenario(), 60)
    assert meta["codec"].startswith(PREFIXES[codec]), meta
    assert (meta["width"], meta["height"]) == (320, 240), meta
    assert [flags_of(m) for m in messages[:2]] == [CONFIG, KEY]
    assert key_after_request is not None and key_after_request < 5.0, (
        f"no KEY within 5 s of the request: flags {[flags_of(m) for m in messages]}"
    )
    frames = [m[HEADER:] for m in messages[1:]]
    assert all(flags_of(m) in (0, KEY) for m in messages[1:])
    pictures = decode_all(codec, frames)
    assert len(pictures) == len(frames) >= 20
    assert {(p.width, p.height) for p in pictures} == {(320, 240)}
