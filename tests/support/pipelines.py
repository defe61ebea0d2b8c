"""Running a publisher pipeline (``streamrelay.publisher``'s capture and encode or remux
threads) in a unit test for the length of a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def running(pipeline: Any, join_timeout: float = 10.0) -> Iterator[None]:
    """Start ``pipeline`` for the block, then stop it: its threads must have ended
    within ``join_timeout`` seconds (else the test fails)."""
    pipeline.start()
    try:
        yield
    finally:
        pipeline.stop()
        assert pipeline.join(join_timeout)
