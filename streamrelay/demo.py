"""``--demo``: the test-pattern publisher as a supervised child process on stream ``demo``.

The child is ``python -m streamrelay.publisher`` (encoding never runs in the relay's
process, let alone on its reactor thread).  It is restarted with backoff when it dies
and stopped with the server.  With a publish secret configured, it gets a token through
its environment, never through its argument list.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from streamrelay.tokens import make_token

_log = Logger()

DEMO_STREAM = "demo"
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0
STOP_GRACE_SECONDS = 5.0
MAX_LOG_LINE = 400


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: DemoPublisherService) -> None:
        self._supervisor = supervisor
        self._partial = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._log_lines(data)

    def errReceived(self, data: bytes) -> None:
        self._log_lines(data)

    def _log_lines(self, data: bytes) -> None:
        # Status lines end in \r on a terminal; treat both as line ends, keep a bound.
        text = (self._partial + data).replace(b"\r", b"\n")
        *lines, self._partial = text.split(b"\n")
        self._partial = self._partial[-MAX_LOG_LINE:]
        for line in lines:
            if line.strip():
                shown = line[:MAX_LOG_LINE].decode("utf-8", "replace")
                _log.info("demo publisher: {line}", line=shown)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self._supervisor._child_ended(reason)


class DemoPublisherService(service.Service):
    """Runs and supervises the demo publisher once the relay listens."""

    def __init__(
        self,
        reactor: Any,
        relay_url: Callable[[], str | None],
        python: str,
        environment: dict[str, str],
        publish_secret: bytes | None,
    ) -> None:
        self._reactor = reactor
        self._relay_url = relay_url
        self._python = python
        self._environment = environment
        self._publish_secret = publish_secret
        self._child: Any = None
        self._child_protocol: _ChildProtocol | None = None
        self._restart: IDelayedCall | None = None
        self._delay = RESTART_DELAY_MIN
        self._started_at = 0.0
        self._stopping = False

    def startService(self) -> None:
        """Start the child on the next reactor turn, once listeners are bound."""
        super().startService()
        self._stopping = False
        self._restart = self._reactor.callLater(0, self._spawn)

    def _spawn(self) -> None:
        self._restart = None
        url = self._relay_url()
        if url is None:
            _log.warn("--demo needs a tcp: or ssl: listener; the demo publisher is not started")
            return
        environment = dict(self._environment)
        arguments = [self._python, "-m", "streamrelay.publisher", "--url", url, "--quiet"]
        if url.startswith("wss:"):
            arguments.append("--insecure")
        if self._publish_secret is not None:
            expires = int(time.time()) + 10 * 365 * 24 * 3600
            environment["STREAMRELAY_TOKEN"] = make_token(
                self._publish_secret, "publish", DEMO_STREAM, expires
            )
        self._child_protocol = _ChildProtocol(self)
        self._started_at = self._reactor.seconds()
        _log.info("Starting the demo publisher on {url}", url=url)
        self._child = self._reactor.spawnProcess(
            self._child_protocol, self._python, arguments, env=environment
        )

    def _child_ended(self, reason: Failure) -> None:
        self._child = None
        if self._stopping:
            return
        if self._reactor.seconds() - self._started_at > 60:
            self._delay = RESTART_DELAY_MIN
        delay = random.uniform(self._delay / 2, self._delay)
        self._delay = min(RESTART_DELAY_MAX, self._delay * 2)
        _log.warn(
            "Demo publisher ended ({reason}); restarting in {delay:.1f} s",
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restart = self._reactor.callLater(delay, self._spawn)

    def stopService(self) -> Deferred[None] | None:
        """Stop the child: SIGTERM, then SIGKILL after a grace period."""
        super().stopService()
        self._stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        child, child_protocol = self._child, self._child_protocol
        if child is None or child_protocol is None or child_protocol.ended.called:
            return None
        try:
            child.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return None
        killer = self._reactor.callLater(STOP_GRACE_SECONDS, self._kill, child)

        def ended(result: None) -> None:
            if killer.active():
                killer.cancel()

        child_protocol.ended.addCallback(ended)
        return child_protocol.ended

    @staticmethod
    def _kill(child: Any) -> None:
        try:
            child.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
