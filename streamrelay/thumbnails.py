"""A stream's thumbnail: the latest small JPEG its publisher sent, checked but never decoded.

A publisher sends ``{"type": "thumbnail", "jpeg": "<base64>"}`` every few seconds
(docs/protocol.md).  The relay accepts at most one per :data:`MIN_INTERVAL_SECONDS` per
stream and ignores the rest before decoding their base64, so a flood costs a JSON parse
and nothing more; an accepted one must be valid base64 of at most
:data:`~streamrelay.wire.MAX_THUMBNAIL_BYTES` that starts with a JPEG SOI marker.  Only
the latest is kept, its bytes counted in the relay's buffer budget, and it is served over
HTTP with an ETag; no decoder runs in the relay.  Network-free: the clock is injected.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.interfaces import IReactorTime

from streamrelay import wire
from streamrelay.wire import WireError

# At most one thumbnail a second per stream is kept; the bundled publisher sends one
# every 5 s.
MIN_INTERVAL_SECONDS: Final = 1.0


class ThumbnailTooBig(WireError):
    """A thumbnail over :data:`~streamrelay.wire.MAX_THUMBNAIL_BYTES` (close 1009)."""


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """One accepted JPEG with what HTTP caching needs."""

    jpeg: bytes
    etag: str
    received_at: float

    @property
    def last_modified(self) -> str:
        """``received_at`` as an HTTP date (RFC 9110)."""
        moment = datetime.datetime.fromtimestamp(int(self.received_at), datetime.timezone.utc)
        return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


def decode_thumbnail(message: Mapping[str, Any]) -> bytes:
    """The JPEG of a ``thumbnail`` message; raises :class:`WireError` (1007) when it is
    not base64 of a JPEG, :class:`ThumbnailTooBig` (1009) when it is too large."""
    encoded = message.get("jpeg")
    if not isinstance(encoded, str):
        raise WireError("thumbnail without a base64 jpeg string")
    # Checked before decoding: base64 is 4 characters for 3 bytes.
    if len(encoded) > (wire.MAX_THUMBNAIL_BYTES + 2) // 3 * 4:
        raise ThumbnailTooBig("thumbnail over the size limit")
    try:
        jpeg = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as error:
        raise WireError("thumbnail is not valid base64") from error
    if len(jpeg) > wire.MAX_THUMBNAIL_BYTES:
        raise ThumbnailTooBig("thumbnail over the size limit")
    if not jpeg.startswith(wire.JPEG_SOI):
        raise WireError("thumbnail is not a JPEG")
    return jpeg


class ThumbnailSlot:
    """A stream's latest thumbnail; ``on_size_change(delta)`` tells the buffer budget."""

    def __init__(
        self,
        clock: IReactorTime,
        on_size_change: Callable[[int], None],
        min_interval: float = MIN_INTERVAL_SECONDS,
    ) -> None:
        self._clock = clock
        self._on_size_change = on_size_change
        self._min_interval = min_interval
        self._last_accepted: float | None = None
        self.current: Thumbnail | None = None
        self.accepted = 0
        self.ignored = 0

    def offer(self, message: Mapping[str, Any]) -> bool:
        """Keep the thumbnail of ``message`` unless one came less than the interval ago
        (then it is ignored, undecoded: False).  Raises :class:`WireError` as
        :func:`decode_thumbnail` does."""
        now = self._clock.seconds()
        if self._last_accepted is not None and now - self._last_accepted < self._min_interval:
            self.ignored += 1
            return False
        jpeg = decode_thumbnail(message)
        self._last_accepted = now
        etag = '"' + hashlib.sha256(jpeg).hexdigest()[:32] + '"'
        self._replace(Thumbnail(jpeg, etag, now))
        self.accepted += 1
        return True

    def clear(self) -> None:
        """Forget the thumbnail (its publisher left or was replaced) and the rate history."""
        self._last_accepted = None
        self._replace(None)

    def _replace(self, thumbnail: Thumbnail | None) -> None:
        before = len(self.current.jpeg) if self.current is not None else 0
        after = len(thumbnail.jpeg) if thumbnail is not None else 0
        self.current = thumbnail
        if after != before:
            self._on_size_change(after - before)
