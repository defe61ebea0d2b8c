"""The per-stream GOP cache: the latest CONFIG and every message since the latest KEY.

A viewer that joins gets the cache at once, so its first frame needs no wait for the next
keyframe.  Over its memory bound, or over its message count, the cache empties until the
next KEY.  Each message is charged its memory cost, its bytes plus
:data:`streamrelay.budget.MESSAGE_OVERHEAD_BYTES`, not only its bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.wire import MediaInfo

Frame = TypeVar("Frame")

# The default of --gop-cache-messages: a 60 fps stream with a keyframe a minute fits.
DEFAULT_GOP_CACHE_MESSAGES = 4096


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
        return held

    @property
    def message_count(self) -> int:
        """Messages in the cached GOP (the CONFIG kept apart not included)."""
        return len(self._items)

    def add(self, message: MediaInfo, frame: Frame) -> None:
        """Record a message the publisher sent, in order."""
        before = self.backlog_bytes
        if message.is_config:
            self.config = (message, frame)
            self._config_in_items = bool(self._items)
            if self._items:
                self._append(message, frame)
        elif message.is_key:
            self._items = []
            self._items_bytes = 0
            self._config_in_items = False
            self._config_at_key = self.config
            self._append(message, frame)
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

    def _drop_items(self) -> None:
        if self._items:
            self.emptied += 1
        self._items = []
        self._items_bytes = 0
        self._config_in_items = False
        self._config_at_key = None

    def _resized(self, before: int) -> None:
        after = self.backlog_bytes
        if after != before:
            self._on_resize(after - before)

    @property
    def sheddable_bytes(self) -> int:
        """Memory :meth:`shed` would free: the cached GOP."""
        return self._items_bytes

    @property
    def has_keyframe(self) -> bool:
        """True when a joining viewer can start from the cache."""
        return bool(self._items)

    def start_sequence(self) -> list[tuple[MediaInfo, Frame]]:
        """What a joining viewer gets first: the CONFIG in effect at the KEY, then the GOP."""
        if not self._items:
            return []
        head = [self._config_at_key] if self._config_at_key is not None else []
        return head + self._items

    def shed(self, counted: bool = True) -> None:
        """Empty the cached GOP until the next KEY (the global budget asks for this;
        ``counted=False``: the publisher went idle, nothing is lost)."""
        before = self.backlog_bytes
        self.discarded += len(self._items) if counted else 0
        self._drop_items()
        self._resized(before)

    def clear(self) -> None:
        """Forget everything, CONFIG included (the publisher went away or was replaced)."""
        before = self.backlog_bytes
        self._drop_items()
        self.config = None
        self._resized(before)
