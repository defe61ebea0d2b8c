"""The per-stream GOP cache: the latest CONFIG and every message since the latest KEY.

A viewer that joins gets the cache at once, so its first frame needs no wait for the next
keyframe.  Over its byte bound the cache empties until the next KEY.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from streamrelay.wire import MediaInfo

Frame = TypeVar("Frame")


class GopCache(Generic[Frame]):
    """Holds ``(message, prepared frame)`` pairs from the latest KEY on, within ``limit`` bytes.

    ``limit`` 0 turns the cache off (the latest CONFIG is still kept, it is tiny and a
    joining viewer needs it before the next KEY).  ``on_resize`` hears every change of
    :attr:`backlog_bytes` so the global budget stays exact.
    """

    def __init__(self, limit: int, on_resize: Callable[[int], None]) -> None:
        self.limit = limit
        self._on_resize = on_resize
        self.config: tuple[MediaInfo, Frame] | None = None
        self._config_at_key: tuple[MediaInfo, Frame] | None = None
        self._items: list[tuple[MediaInfo, Frame]] = []
        self._items_bytes = 0
        self._config_in_items = False
        self.emptied = 0

    @property
    def backlog_bytes(self) -> int:
        """Bytes held: the cached GOP plus the latest CONFIG."""
        # A CONFIG that arrived mid-GOP is held once, though listed in both places.
        config_bytes = self.config[0].size if self.config and not self._config_in_items else 0
        return self._items_bytes + config_bytes

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
        if self._items_bytes > self.limit:
            self._drop_items()
        self._resized(before)

    def _append(self, message: MediaInfo, frame: Frame) -> None:
        self._items.append((message, frame))
        self._items_bytes += message.size

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
        """Bytes :meth:`shed` would free: the cached GOP."""
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

    def shed(self) -> None:
        """Empty the cached GOP until the next KEY (the global budget asks for this)."""
        before = self.backlog_bytes
        self._drop_items()
        self._resized(before)

    def clear(self) -> None:
        """Forget everything, CONFIG included (the publisher went away or was replaced)."""
        before = self.backlog_bytes
        self._drop_items()
        self.config = None
        self._resized(before)
