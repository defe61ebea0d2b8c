"""Waiting with a deadline: polling a condition, and running a coroutine with a bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar, overload

T = TypeVar("T")


@overload
def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = ...,
    *,
    fail: Literal[True] = ...,
) -> T: ...


@overload
def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = ..., *, fail: bool
) -> T: ...


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, *, fail: bool = True
) -> Any:
    """Call ``predicate`` every ``interval`` until it returns a true value, and return
    that value.

    At the deadline it raises :class:`AssertionError` (with the last value), or with
    ``fail=False`` returns the last, false, value: for a test that records what it saw
    in a figure before asserting on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if fail:
                raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
            return value
        time.sleep(interval)


def run(coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
    """``asyncio.run`` with an overall bound of ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())
