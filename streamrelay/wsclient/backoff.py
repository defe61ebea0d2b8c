"""Exponential reconnect backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Reconnect delays: uniform in [0, min(maximum, initial * factor**attempt)].

    Full jitter spreads the reconnects of many publishers that lost the same relay at the
    same moment, instead of bringing them back in lockstep.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        factor: float = 2.0,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        if factor < 1:
            raise ValueError("factor must be at least 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._uniform = uniform
        self.attempts = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        ceiling = self.initial
        for _ in range(self.attempts):
            ceiling *= self.factor
            if ceiling >= self.maximum:
                return self.maximum
        return ceiling

    def next_delay(self) -> float:
        """Return the delay before the next attempt, and count the attempt."""
        delay = self._uniform() * self.ceiling()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from the initial ceiling (after a connection that held)."""
        self.attempts = 0
