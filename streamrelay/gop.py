"""The per-stream GOP cache: the latest CONFIG and every message since the latest KEY.

A viewer that joins gets the cache at once, so its first frame needs no wait for the next
keyframe.  Over its memory bound, or over its message count, the cache empties until the
next KEY.  Each message is charged its memory cost, its bytes plus
:data:`streamrelay.budget.MESSAGE_OVERHEAD_BYTES`, not only its bytes.

Audio (docs/protocol.md, "Audio") is cached with the GOP, in arrival order, and counts in
both bounds like video.  A joiner that takes audio gets it from its KEY's capture time on:
audio captured at or after a KEY but sent before it (a video encoder slower than the
audio one) is carried over to the KEY's GOP, from the old GOP's tail or, while the cache
has no KEY, from a small bounded list of recent audio; audio captured before the KEY but
sent after it (audio capture buffers more than video) is not cached.  A joiner that does
not take audio gets the GOP without it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.wire import FLAG_AUDIO, MediaInfo

Frame = TypeVar("Frame")

# The default of --gop-cache-messages: a 60 fps stream with a keyframe a minute fits.
DEFAULT_GOP_CACHE_MESSAGES = 4096

# Audio kept while the cache has no KEY (none yet, or emptied): a second of 20 ms
# packets, within 64 KiB of memory; older packets go first.
PENDING_AUDIO_MESSAGES = 50
PENDING_AUDIO_BYTES = 64 * 1024
# How far back from its end an old GOP is searched for audio that belongs to a new KEY.
CARRY_SCAN_MESSAGES = 64


class GopCache(Generic[Frame]):
    """Holds ``(message, prepared frame)`` pairs from the latest KEY on, within ``limit``
    bytes of memory and ``max_messages`` messages.

    ``limit`` 0 turns the cache off (the latest CONFIG is still kept, it is tiny and a
    joining viewer needs it before the next KEY).  ``on_resize`` hears every change of
    :attr:`backlog_bytes` so the global budget stays exact.  Each message costs its size
    plus ``message_overhead`` (the objects kept with it).
    """

    def __init__(
        self,
        limit: int,
        on_resize: Callable[[int], None],
        max_messages: int = DEFAULT_GOP_CACHE_MESSAGES,
        message_overhead: int = MESSAGE_OVERHEAD_BYTES,
    ) -> None:
        self.limit = limit
        self.max_messages = max_messages
        self._overhead = message_overhead
        self._on_resize = on_resize
        self.config: tuple[MediaInfo, Frame] | None = None
        self._config_at_key: tuple[MediaInfo, Frame] | None = None
        self._items: list[tuple[MediaInfo, Frame]] = []
        self._items_bytes = 0
        self._config_in_items = False
        # Audio: how many of the items are audio, and what waits for a KEY.
        self._audio_items = 0
        self._key_time_us = 0
        self._pending_audio: deque[tuple[MediaInfo, Frame]] = deque()
        self._pending_audio_bytes = 0
        self.emptied = 0
        # Messages let go because the cache went over its bounds or was shed.
        self.discarded = 0

    def cost(self, message: MediaInfo) -> int:
        """The memory this cache is charged for holding ``message``."""
        return message.size + self._overhead

    @property
    def backlog_bytes(self) -> int:
        """Memory held: the cached GOP plus the CONFIGs kept apart from it."""
        held = self._items_bytes
        if self._config_in_items:
            # The latest CONFIG arrived mid-GOP: it is in the GOP (held once, though
            # listed in both places), and the one in effect at the KEY is kept too.
            if self._config_at_key is not None:
                held += self.cost(self._config_at_key[0])
        elif self.config is not None:
            held += self.cost(self.config[0])
        return held + self._pending_audio_bytes

    @property
    def message_count(self) -> int:
        """Messages in the cached GOP (the CONFIG kept apart not included)."""
        return len(self._items)

    def add(self, message: MediaInfo, frame: Frame) -> None:
        """Record a message the publisher sent, in order."""
        if message.flags & FLAG_AUDIO:
            self._add_audio(message, frame)
            return
        before = self.backlog_bytes
        if message.is_config:
            self.config = (message, frame)
            self._config_in_items = bool(self._items)
            if self._items:
                self._append(message, frame)
        elif message.is_key:
            carried = self._audio_from(message.capture_time_us)
            self._items = []
            self._items_bytes = 0
            self._audio_items = 0
            self._config_in_items = False
            self._config_at_key = self.config
            self._key_time_us = message.capture_time_us
            self._append(message, frame)
            for item in carried:
                self._append(*item)
            self._audio_items = len(carried)
        elif self._items:
            self._append(message, frame)
        if self._items_bytes > self.limit or len(self._items) > self.max_messages:
            # With the cache off (limit 0) nothing was meant to be kept.
            self.discarded += len(self._items) if self.limit else 0
            self._drop_items()
        self._resized(before)

    def _append(self, message: MediaInfo, frame: Frame) -> None:
        self._items.append((message, frame))
        self._items_bytes += self.cost(message)

    def _add_audio(self, message: MediaInfo, frame: Frame) -> None:
        before = self.backlog_bytes
        if self._items:
            if message.capture_time_us < self._key_time_us:
                return  # the previous GOP's, which is gone
            self._append(message, frame)
            self._audio_items += 1
            if self._items_bytes > self.limit or len(self._items) > self.max_messages:
                self.discarded += len(self._items)
                self._drop_items()
        elif self.limit:
            pending = self._pending_audio
            pending.append((message, frame))
            self._pending_audio_bytes += self.cost(message)
            while pending and (
                len(pending) > PENDING_AUDIO_MESSAGES
                or self._pending_audio_bytes > min(PENDING_AUDIO_BYTES, self.limit)
            ):
                self._pending_audio_bytes -= self.cost(pending.popleft()[0])
                self.discarded += 1
        self._resized(before)

    def _audio_from(self, capture_time_us: int) -> list[tuple[MediaInfo, Frame]]:
        """The audio already here that was captured at or after ``capture_time_us`` (a
        new KEY's), in arrival order; the waiting audio is let go."""
        if self._pending_audio:
            carried = [
                item
                for item in self._pending_audio
                if item[0].capture_time_us >= capture_time_us
            ]
            self.discarded += len(self._pending_audio) - len(carried)
            self._drop_pending_audio()
            return carried
        carried = []
        if self._audio_items:
            for item in reversed(self._items[-CARRY_SCAN_MESSAGES:]):
                if item[0].flags & FLAG_AUDIO:
                    if item[0].capture_time_us < capture_time_us:
                        break  # audio arrives in capture order: the rest is older
                    carried.append(item)
            carried.reverse()
        return carried

    def _drop_items(self) -> None:
        if self._items:
            self.emptied += 1
        self._items = []
        self._items_bytes = 0
        self._audio_items = 0
        self._config_in_items = False
        self._config_at_key = None

    def _resized(self, before: int) -> None:
        after = self.backlog_bytes
        if after != before:
            self._on_resize(after - before)

    @property
    def sheddable_bytes(self) -> int:
        """Memory :meth:`shed` would free: the cached GOP (and audio waiting for a KEY)."""
        return self._items_bytes + self._pending_audio_bytes

    @property
    def has_keyframe(self) -> bool:
        """True when a joining viewer can start from the cache."""
        return bool(self._items)

    def start_sequence(self, audio: bool = False) -> list[tuple[MediaInfo, Frame]]:
        """What a joining viewer gets first: the CONFIG in effect at the KEY, then the GOP
        (its audio only for a viewer that takes ``audio``)."""
        if not self._items:
            return []
        head = [self._config_at_key] if self._config_at_key is not None else []
        if audio or not self._audio_items:
            return head + self._items
        return head + [item for item in self._items if not item[0].flags & FLAG_AUDIO]

    def shed(self, counted: bool = True) -> None:
        """Empty the cached GOP until the next KEY (the global budget asks for this;
        ``counted=False``: the publisher went idle, nothing is lost)."""
        before = self.backlog_bytes
        if counted:
            self.discarded += len(self._items) + len(self._pending_audio)
        self._drop_items()
        self._drop_pending_audio()
        self._resized(before)

    def _drop_pending_audio(self) -> None:
        self._pending_audio = deque()
        self._pending_audio_bytes = 0

    def clear(self) -> None:
        """Forget everything, CONFIG included (the publisher went away or was replaced)."""
        before = self.backlog_bytes
        self._drop_items()
        self._drop_pending_audio()
        self.config = None
        self._resized(before)
