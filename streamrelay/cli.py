"""``streamrelay`` (and ``python -m streamrelay``): the relay in the foreground, without
twistd, for containers, process supervisors and Windows.

It takes the options of ``twistd streamrelay`` (the same :class:`~streamrelay.tap.Options`,
so the same defaults and checks) plus ``--reactor``, builds the same service with
:func:`~streamrelay.tap.makeService`, and runs it as twistd does (bind first, then start;
stop the service before the reactor shuts down).  What twistd adds for daemons is left
out: no pid file, no daemonising, no log file, no privilege switch, no ``.tap`` saving.

The log goes to standard output at the info level: text lines, or with ``--json-logs``
one JSON object per line.  SIGTERM (and SIGINT, or Ctrl+C / Ctrl+Break on Windows) drains
as under twistd: new handshakes get 503, connections get 1001, stragglers are aborted
after ``--close-timeout``.  Then the process exits with status 0, where twistd re-raises
the signal (status 143 after SIGTERM).  A usage error exits with 2, a listener that
cannot bind with 1.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

from twisted.application import app, service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from streamrelay import __version__, tap

_log = Logger()

EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2


class ConsoleOptions(app.ReactorSelectionMixin, tap.Options):
    """``twistd streamrelay``'s options plus ``--reactor`` (installed as it is parsed,
    before anything imports the default reactor)."""

    synopsis = "Usage: streamrelay [options]"
    longdesc = (
        tap.Options.longdesc
        + " Runs in the foreground and logs to standard output; SIGTERM drains the "
        "connections and exits with status 0."
    )

    def opt_version(self) -> NoReturn:
        """Print the version and exit."""
        print(f"streamrelay {__version__}")
        raise SystemExit(EXIT_OK)


def parse(arguments: Sequence[str]) -> ConsoleOptions:
    """The options these command-line ``arguments`` give; exits with status 2 and the
    usage on an error."""
    options = ConsoleOptions()
    try:
        options.parseOptions(list(arguments))
    except usage.UsageError as error:
        print(f"streamrelay: {error}\n\n{options}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return options


def _stopping_signals() -> list[signal.Signals]:
    names = ("SIGTERM", "SIGINT", "SIGBREAK")  # SIGBREAK: Ctrl+Break, Windows only
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def _once_stopping(reactor: Any) -> None:
    """A second SIGTERM or Ctrl+C while the relay drains is noted, not an error (the
    reactor's own handler would try to stop it again)."""

    def noted(number: int, frame: FrameType | None) -> None:
        reactor.callFromThread(
            _log.info, "Signal {signal} while stopping: already draining", signal=number
        )

    for number in _stopping_signals():
        signal.signal(number, noted)


def run(options: ConsoleOptions) -> int:
    """Run the relay these options describe until the reactor stops; the exit status."""
    from twisted.internet import reactor

    relay = tap.makeService(options)
    application = service.Application("streamrelay")
    relay.setServiceParent(application)  # with --json-logs: sets the log observer
    observer = application.getComponent(ILogObserver, None)
    if observer is None:
        observer = textFileLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.info)])],
        redirectStandardIO=False,
    )
    _log.info(
        "streamrelay {version} in the foreground, reactor {reactor}",
        version=__version__,
        reactor=type(reactor).__name__,
    )
    relaying = service.IService(application)
    try:
        # Binds every listener now, as twistd does: a port that is taken is an error
        # before the reactor runs, not a relay running without it.
        relaying.privilegedStartService()
    except Exception:
        _log.failure("streamrelay could not start")
        return EXIT_START_FAILED
    app.startApplication(application, False)
    reactor.addSystemEventTrigger("before", "shutdown", _once_stopping, reactor)
    reactor.run()  # type: ignore[attr-defined]
    _log.info("streamrelay stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``streamrelay`` console script."""
    options = parse(sys.argv[1:] if argv is None else argv)
    raise SystemExit(run(options))
