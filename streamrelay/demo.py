"""``--demo``: the test-pattern publisher as a supervised child process on stream ``demo``.

The child is ``python -m streamrelay.publisher`` (encoding never runs in the relay's
process, let alone on its reactor thread), supervised by Twisted's stock
:class:`~twisted.runner.procmon.ProcessMonitor`: restarted with a doubling delay while it
keeps dying young, SIGTERM then SIGKILL on stop, its output logged line by line.  With a
publish secret configured, it gets a token through its environment, never through its
argument list, and only the variables it needs (:data:`CHILD_ENVIRONMENT`): no relay
secret reaches it.  Nothing here imports PyAV: only the child needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from streamrelay.roles import Role
from streamrelay.tokens import make_token

DEMO_STREAM = "demo"
CHILD_NAME = "demo publisher"
TOKEN_VARIABLE = "STREAMRELAY_TOKEN"
TOKEN_LIFETIME_SECONDS = 10 * 365 * 24 * 3600
MAX_LOG_LINE = 400
# What the child gets of the relay's environment: enough to find Python, its packages and
# a locale; never the relay's secrets (STREAMRELAY_*_SECRET and the like).
CHILD_ENVIRONMENT = frozenset(
    {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR", "TZ"}
)

_log = Logger()


class _ChildOutputLogger(Logger):
    """ProcessMonitor's logger for child output, cutting each line to MAX_LOG_LINE."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        """Emit the event with its ``line`` field bounded."""
        line = kwargs.get("line")
        if isinstance(line, str) and len(line) > MAX_LOG_LINE:
            kwargs["line"] = line[:MAX_LOG_LINE] + "..."
        super().emit(level, format, **kwargs)


class DemoPublisherService(ProcessMonitor):
    """Runs and supervises the demo publisher once the relay listens.

    The stock monitor is used as is, with three additions: the child is added on the
    first reactor turn (its URL names the port the listeners bound), ``stopService``
    returns a Deferred that fires once the child has exited (so twistd's shutdown waits
    for SIGTERM, or SIGKILL after ``killTime``), and an overlong output line is logged cut
    instead of dropping the pipe.
    """

    threshold = 60  # a child that ran this long restarts at once, with the delay reset
    minRestartDelay = 1
    maxRestartDelay = 30
    killTime = 5
    log = _ChildOutputLogger()

    def __init__(
        self,
        reactor: Any,
        relay_url: Callable[[], str | None],
        python: str,
        environment: dict[str, str],
        publish_secret: bytes | None,
    ) -> None:
        super().__init__(reactor)
        # Our own handle on the clock: the monitor's ``_clock`` is private.
        self._reactor_clock = reactor
        self._relay_url = relay_url
        self._python = python
        self._environment = {
            key: value for key, value in environment.items() if key in CHILD_ENVIRONMENT
        }
        self._publish_secret = publish_secret
        self._adding: IDelayedCall | None = None
        self._added = False
        self._exited: list[Deferred[None]] = []
        self._stop_deadline: IDelayedCall | None = None

    def startService(self) -> None:
        """Add the child on the next reactor turn, once the listeners are bound."""
        super().startService()
        self._adding = self._reactor_clock.callLater(0, self._add_child)

    def _add_child(self) -> None:
        """Hand the child to the monitor, which starts it at once."""
        self._adding = None
        if self._added:
            return  # started again after a stop: the monitor already restarted the child
        url = self._relay_url()
        if url is None:
            _log.warn("--demo needs a tcp: or ssl: listener; the demo publisher is not started")
            return
        arguments = [self._python, "-m", "streamrelay.publisher", "--url", url, "--quiet"]
        if url.startswith("wss:"):
            arguments.append("--insecure")
        environment = dict(self._environment)
        if self._publish_secret is not None:
            expires = int(self._reactor_clock.seconds()) + TOKEN_LIFETIME_SECONDS
            environment[TOKEN_VARIABLE] = make_token(
                self._publish_secret, Role.PUBLISHER, DEMO_STREAM, expires
            )
        _log.info("Starting the demo publisher on {url}", url=url)
        self._added = True
        self.addProcess(CHILD_NAME, arguments, env=environment)

    def startProcess(self, name: str) -> None:
        """Spawn the child (stock), then make its line loggers survive overlong lines."""
        super().startProcess(name)
        protocol = self.protocols.get(name)
        for receiver in (getattr(protocol, "_output", None), getattr(protocol, "_error", None)):
            if isinstance(receiver, LineReceiver):
                # The stock LineLogger answers an overlong line with loseConnection() on a
                # transport that has none: the pipe breaks and the child dies.  Log the
                # line's head instead and go on.
                receiver.lineLengthExceeded = _cut_line(receiver)  # type: ignore[method-assign]

    def _monitoredProcessExited(self, name: str, reason: Failure | None = None) -> None:
        """Stock handling of a child's exit (the hook is Twisted >= 25.5's), then say when
        it comes back, and complete stopService once no child is left."""
        super()._monitoredProcessExited(name, reason)
        pending = self.restart.get(name)
        if self.running and pending is not None and pending.active():
            _log.warn(
                "Demo publisher ended ({reason}); restarting in {delay:.1f} s",
                reason=reason.getErrorMessage() if reason is not None else "exited",
                delay=pending.getTime() - self._reactor_clock.seconds(),
            )
        if not self.protocols:
            self._fire_exited()

    def _fire_exited(self) -> None:
        if self._stop_deadline is not None and self._stop_deadline.active():
            self._stop_deadline.cancel()
        self._stop_deadline = None
        exited, self._exited = self._exited, []
        for waiting in exited:
            waiting.callback(None)

    def _stop_overdue(self) -> None:
        # The SIGKILL went out at killTime: the child is gone, but the exit hook above
        # (a private one of ProcessMonitor) did not say so.  Shutdown must not hang.
        self._stop_deadline = None
        _log.warn("The demo publisher's exit went unreported; stopping anyway")
        self._fire_exited()

    # IService.stopService may return a Deferred; the stock monitor's returns None.
    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """SIGTERM the child (SIGKILL after ``killTime``); fire once it has exited."""
        if self._adding is not None and self._adding.active():
            self._adding.cancel()
        self._adding = None
        super().stopService()
        exited: Deferred[None] = Deferred()
        if self.protocols:
            self._exited.append(exited)
            if self._stop_deadline is None:
                self._stop_deadline = self._reactor_clock.callLater(
                    self.killTime + 1, self._stop_overdue
                )
        else:
            exited.callback(None)
        return exited


def _cut_line(receiver: LineReceiver) -> Callable[[bytes], None]:
    """A ``lineLengthExceeded`` for ``receiver`` that hands on the head of the line."""

    def exceeded(line: bytes) -> None:
        receiver.lineReceived(line[:MAX_LOG_LINE] + b"...")

    return exceeded
