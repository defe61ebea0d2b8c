"""A publisher process that dies in the middle of a frame.

``python -m tests.support.half_frame_publisher PORT STREAM FIRST COUNT`` (from the
repository root): publish ``COUNT`` complete 1000-byte messages numbered from ``FIRST``
(CONFIG, KEY, deltas), then half of a 256 KiB KEY frame numbered
:data:`PARTIAL_SEQUENCE`, print ``HALF`` and wait to be killed."""

from __future__ import annotations

import sys
import time

from tests.support.frames import OP_BINARY, client_frame
from tests.support.media import KEY, flags_for, media_message
from tests.support.raw_ws import ws_open

PARTIAL_SEQUENCE = 999_999_999
MESSAGE_BYTES = 1000
PARTIAL_BYTES = 256 * 1024


def main(argv: list[str]) -> int:
    """Publish, send half a frame, say ``HALF`` and sleep (see the module docstring)."""
    port, stream, first, count = int(argv[0]), argv[1], int(argv[2]), int(argv[3])
    sock, response = ws_open(port, f"/publish/{stream}")
    if response.status != 101:
        print(f"REFUSED {response.status}", flush=True)
        return 1
    for index in range(count):
        message = media_message(first + index, flags_for(index, 10), MESSAGE_BYTES)
        sock.sendall(client_frame(OP_BINARY, message))
    partial = client_frame(OP_BINARY, media_message(PARTIAL_SEQUENCE, KEY, PARTIAL_BYTES))
    sock.sendall(partial[: len(partial) // 2])
    print("HALF", flush=True)
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
