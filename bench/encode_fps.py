"""Encode speed of the publisher's codecs on this machine: ``python -m bench.encode_fps``.

Encodes pre-rendered test-pattern pictures (so only the encoder is timed, with the
publisher's own settings: libx264 veryfast/baseline, libvpx-vp9 realtime cpu-used 8,
SVT-AV1 real-time preset 10; 2 Mbit/s, 2 s GOP at 30 fps, default threads) and prints
frames per second of wall time and of CPU time per codec and size.  A figure for a
report, not a test: it depends on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction

from streamrelay.publisher.codecs import CODECS, create_encoder
from streamrelay.publisher.encoder import EncoderSettings
from streamrelay.publisher.testpattern import TestPattern

SIZES = ((1280, 720), (640, 360))


def measure(codec: str, width: int, height: int, frames: int) -> dict[str, float | str]:
    """Encode ``frames`` pictures; return wall and CPU frames per second."""
    pattern = TestPattern(width, height)
    pictures = [pattern.render(index, 1_700_000_000 + index / 30) for index in range(frames)]
    encoder = create_encoder(
        codec,
        EncoderSettings(width=width, height=height, fps=Fraction(30), keyframe_interval_frames=60),
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for index, picture in enumerate(pictures):
        encoder.encode(picture, index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    encoder.close()
    return {
        "codec": codec,
        "size": f"{width}x{height}",
        "fps_wall": round(frames / wall, 1),
        "fps_per_cpu_second": round(frames / cpu, 1),
    }


def main() -> None:
    """Measure every codec at every size and print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=150)
    args = parser.parse_args()
    for width, height in SIZES:
        for codec in CODECS:
            print(json.dumps(measure(codec, width, height, args.frames)), flush=True)


if __name__ == "__main__":
    main()
