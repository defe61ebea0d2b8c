"""Chromium's WebCodecs decodes what the publisher sends, starting at a mid-stream KEY.

This checks the H.264 profile of wire protocol v1 against a real browser: Annex-B chunks,
no ``description``, the ``meta`` codec string, and a KEY that carries its own SPS/PPS.
It uses the browser suite's session Chromium (tests/browser/conftest.py): like the rest
of that suite it fails under CI when Chromium is missing.
"""

from __future__ import annotations

import functools
import http.server
import json
import struct
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from streamrelay.publisher.encoder import EncoderSettings, H264Encoder
from streamrelay.publisher.testpattern import TestPattern
from tests.browser.conftest import Chromium

pytestmark = pytest.mark.browser

# Parses the 9-byte v1 header itself, feeds WebCodecs from the second KEY on, and reports
# how many pictures came out and how many of them differ.
PAGE = """<!doctype html><meta charset="utf-8"><script>
async function decodeStream(skipKeys) {
  // no-store: both profiles' files are written within a second, and a 304 would keep
  // the first profile's meta.
  const fresh = {cache: 'no-store'};
  const meta = await (await fetch('meta.json', fresh)).json();
  const bytes = new Uint8Array(await (await fetch('messages.bin', fresh)).arrayBuffer());
  const view = new DataView(bytes.buffer);
  const canvas = new OffscreenCanvas(meta.width, meta.height);
  const context = canvas.getContext('2d', {willReadFrequently: true});
  const result = {codec: meta.codec, fed: 0, decoded: 0, errors: [], sums: [], sizes: []};
  const decoder = new VideoDecoder({
    output: frame => {
      context.drawImage(frame, 0, 0);
      const pixels = context.getImageData(0, 0, meta.width, meta.height).data;
      let sum = 0;
      for (let i = 0; i < pixels.length; i += 97) sum += pixels[i];
      result.sums.push(sum);
      result.sizes.push([frame.displayWidth, frame.displayHeight]);
      result.decoded++;
      frame.close();
    },
    error: error => result.errors.push(String(error)),
  });
  const config = {codec: meta.codec, optimizeForLatency: true};
  result.supported = (await VideoDecoder.isConfigSupported(config)).supported;
  decoder.configure(config);
  let offset = 0, keys = 0, started = false;
  while (offset < bytes.length) {
    const length = view.getUint32(offset);
    const message = bytes.subarray(offset + 4, offset + 4 + length);
    offset += 4 + length;
    const flags = message[0];
    const timestamp = Number(view.getBigUint64(message.byteOffset + 1));
    if (flags & 2) continue;  // CONFIG: a KEY carries its own SPS/PPS
    if (flags & 1) keys++;
    if (!started && (!(flags & 1) || keys <= skipKeys)) continue;
    started = true;
    decoder.decode(new EncodedVideoChunk({
      type: (flags & 1) ? 'key' : 'delta', timestamp, data: message.subarray(9)}));
    result.fed++;
  }
  await decoder.flush();
  result.distinct = new Set(result.sums).size;
  delete result.sums;
  return result;
}
</script>"""


@pytest.fixture
def served_directory(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``tmp_path`` served over HTTP on loopback: (the folder, its base URL)."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # 127.0.0.1 is a secure context, where WebCodecs exists.
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(5)


def write_stream(directory: Path, profile: str, frames: int = 50, gop: int = 20) -> dict[str, Any]:
    """Encode ``frames`` test-pattern pictures into ``messages.bin`` (length-prefixed v1
    messages) beside ``meta.json`` and the page; returns the stream's meta."""
    encoder = H264Encoder(
        EncoderSettings(
            width=640,
            height=360,
            fps=Fraction(30),
            keyframe_interval_frames=gop,
            preset="veryfast",
            profile=profile,
        )
    )
    pattern = TestPattern(640, 360)
    messages = bytearray()
    for index in range(frames):
        wall_time = 1_700_000_000 + index / 30
        for message in encoder.encode(pattern.render(index, wall_time), int(wall_time * 1e6)):
            packed = message.data
            messages += struct.pack(">I", len(packed)) + packed
    (directory / "messages.bin").write_bytes(bytes(messages))
    meta = encoder.meta()
    assert meta is not None
    (directory / "meta.json").write_text(json.dumps(meta))
    (directory / "index.html").write_text(PAGE)
    return meta


def test_chromium_webcodecs_decodes_from_a_mid_stream_key(
    served_directory: tuple[Path, str], browser: Any, chromium: Chromium
) -> None:
    """For baseline (the default) and high profile streams, Chromium accepts the meta codec string
    and decodes every chunk fed from the second KEY on (no description, no CONFIG), into
    pictures of the right size that change from frame to frame."""
    directory, base_url = served_directory
    page = browser.new_page()
    try:
        for profile in ("baseline", "high"):
            meta = write_stream(directory, profile)
            page.goto(f"{base_url}/index.html")
            result = page.evaluate("decodeStream(1)")
            assert result["supported"], result
            assert result["errors"] == [], result
            assert result["codec"] == meta["codec"]
            assert result["fed"] == 30 and result["decoded"] == 30, result
            assert result["distinct"] >= 27, result
            assert {tuple(size) for size in result["sizes"]} == {(640, 360)}
    finally:
        chromium.close_bounded(page, "closing the page")
