"""The relay's settings, as one immutable value built by :mod:`streamrelay.tap`."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class RelayConfig:
    """Every limit and timer of the relay; defaults are the production values."""

    publish_secret: bytes | None = field(default=None, repr=False)
    view_secret: bytes | None = field(default=None, repr=False)
    view_origins: tuple[str, ...] = ("*",)
    publish_origins: tuple[str, ...] = ()

    max_connections: int = 10000
    max_connections_per_ip: int = 100
    max_handshakes_per_ip: float = 50.0
    handshake_burst: int = 100
    max_streams: int = 1000
    max_viewers_per_stream: int = 0
    max_message_bytes: int = 8 * MIB
    max_fragments_per_message: int = 4096
    viewer_queue_bytes: int = 4 * MIB
    gop_cache_bytes: int = 8 * MIB
    max_buffered_bytes: int = 512 * MIB

    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    handshake_timeout: float = 5.0
    close_timeout: float = 2.0
    publisher_idle_timeout: float = 20.0
    viewer_stall_timeout: float = 15.0
    keyframe_request_interval: float = 1.0

    # Inbound budget: what a peer may send, every frame counted (control frames, empty
    # frames and fragments too) with its header; over budget it is closed with 1008.
    # Bursts follow from the rates (streamrelay.inbound.limits_for).
    viewer_frames_per_second: float = 5.0  # WebSocket frames a viewer may send per second.
    viewer_bytes_per_second: int = 4096  # Bytes a viewer may send per second.
    publisher_frames_per_second: float = 2000.0  # WebSocket frames a publisher may send per second.
    publisher_bytes_per_second: int = 16 * MIB  # Bytes a publisher may send per second.

    takeover: bool = True
    echo: bool = False
    # /api/internals (loopback only): leak accounting; runs gc.collect() per request.
    api_internals: bool = False

    # Bounds of the HTTP request head, answered with 431 (twisted.web alone answers 400).
    max_header_bytes: int = 16 * 1024
    max_header_line_bytes: int = 8 * 1024
    max_header_lines: int = 100
