"""A rate-limiting TCP proxy on loopback whose limit the test changes at run time (a
viewer's link getting worse, then better).

It is :class:`tests.support.proxy.TcpProxy` with its pacer reading the limit afresh
every tick: :meth:`Throttle.set_rate` takes effect within one tick (10 ms).  The server
side reads only as fast as it forwards and has a small receive window, so the server's
writes back up as on a slow network link.  ``None`` lifts the limit."""

from __future__ import annotations

import asyncio

from tests.support.proxy import TcpProxy

# What "no limit" forwards a tick (1 GB/s): far above anything a test sends.
UNLIMITED_PER_TICK = 10_000_000


class Throttle(TcpProxy):
    """Forwards server-to-client at most :attr:`limit` bytes a second (None: unlimited)."""

    def __init__(self, upstream_port: int, limit: int | None, **options: object) -> None:
        # A rate keeps the server side paced (TcpProxy decides that per connection).
        super().__init__(upstream_port, rate=limit or UNLIMITED_PER_TICK * 100, **options)  # type: ignore[arg-type]
        self.limit = limit
        self.forwarded = 0

    async def start(self) -> Throttle:
        """Start listening and pacing."""
        await super().start()
        return self

    def set_rate(self, limit: int | None) -> None:
        """Forward at most ``limit`` bytes a second from now on (None: no limit)."""
        self.limit = limit

    async def _pace(self, rate: int) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        credit = 0.0
        while True:
            await asyncio.sleep(self.TICK)
            now = loop.time()
            elapsed, last = now - last, now
            if self.limit is None:
                budget = UNLIMITED_PER_TICK
                credit = 0.0
            else:
                # Credit for the time that really passed (a late tick on a loaded
                # machine does not lower the rate), at most a tenth of a second of it.
                credit = min(credit + self.limit * elapsed, self.limit * 0.1)
                budget = int(credit)
                credit -= budget
            if budget <= 0:
                continue
            for pacer in list(self.pacers):
                before = len(pacer.pending)
                pacer.forward(budget)
                self.forwarded += before - len(pacer.pending)
