"""Launch the real plugin, as users do: ``twistd -n --pidfile= streamrelay ...``.

The relay listens on ``tcp:0`` on loopback and logs the address it bound; the launcher
reads it from the log.  ``STREAMRELAY_TEST_REACTOR`` picks the reactor (epoll, poll,
select, asyncio) so the whole integration suite runs under each.

A traceback in the relay's log is a bug: :func:`log_problems` finds the lines that show
one, and the fixtures fail a test whose relay logged any.

Only the standard library is imported here (psutil when first asked for), because
``scripts/run-conformance`` launches its relay with this class from a bare ``python3``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from psutil import Process as PsutilProcess

LOOPBACK = "tcp:0:interface=127.0.0.1"
TWISTD = str(Path(sys.executable).with_name("twistd"))
# The flag that turns on /api/internals (off by default: it runs gc.collect()).
API_INTERNALS = "--api-internals"

_LISTENING = re.compile(r"streamrelay listening on \S+ (https?)://([^/]+)/")
# A Python traceback (also Twisted's "Traceback (failure with no frames)"), and the
# lines Twisted logs for an exception nobody handled.
_PROBLEM = re.compile(r"Traceback \(|Unhandled [Ee]rror|\[Failure instance")
_SECRETS = ("STREAMRELAY_PUBLISH_SECRET", "STREAMRELAY_VIEW_SECRET")


def reactor_name() -> str | None:
    """The reactor chosen for this test run, or None for twistd's default."""
    return os.environ.get("STREAMRELAY_TEST_REACTOR") or None


def log_problems(text: str) -> list[str]:
    """The lines of a relay log that show an exception escaped: tracebacks and
    Twisted's ``Unhandled Error`` / ``Unhandled error in Deferred``."""
    return [line for line in text.splitlines() if _PROBLEM.search(line)]


def log_excerpt(text: str, around: str | None = None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, or ``lines`` lines from the first one that
    contains ``around``."""
    all_lines = text.splitlines()
    if around is not None:
        for index, line in enumerate(all_lines):
            if around in line:
                return "\n".join(all_lines[max(0, index - 5) : index + lines])
    return "\n".join(all_lines[-lines:])


def problems_report(relays: Iterable[RelayProcess]) -> str | None:
    """A failure message naming every relay whose log shows an unhandled exception, with
    the log from the first such line on; None when there is none."""
    parts = []
    for relay in relays:
        problems = relay.log_problems()
        if problems:
            parts.append(
                f"the relay logged {len(problems)} unhandled-error line(s) "
                f"({relay.log_path}):\n{relay.log_excerpt(around=problems[0])}"
            )
    return "\n\n".join(parts) or None


class RelayProcess:
    """One relay process with its captured log.

    ``internals=True`` adds ``--api-internals`` (for tests that read ``/api/internals``);
    ``twistd`` names another twistd than the one beside this interpreter."""

    def __init__(
        self,
        log_path: Path,
        arguments: Sequence[str] = (),
        environment: Mapping[str, str] | None = None,
        listen: str = LOOPBACK,
        reactor: str | None = None,
        cwd: Path | None = None,
        *,
        internals: bool = False,
        twistd: str = TWISTD,
        startup_timeout: float = 20.0,
    ) -> None:
        self.log_path = log_path
        command = [twistd, "-n", "--pidfile="]
        chosen = reactor or reactor_name()
        if chosen:
            command.append(f"--reactor={chosen}")
        command += ["streamrelay", "--listen", listen]
        if internals:
            command.append(API_INTERNALS)
        command += list(arguments)
        self.command = command
        env = dict(os.environ)
        for name in _SECRETS:
            env.pop(name, None)
        env.update(environment or {})
        self._log_file = open(log_path, "ab")  # closed by stop() or kill()
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd or log_path.parent),
        )
        self.http_url, self.ws_url = self._wait_for_address(startup_timeout)
        parts = urlsplit(self.http_url)
        assert parts.hostname is not None and parts.port is not None, self.http_url
        self.host: str = parts.hostname
        self.port: int = parts.port

    def _wait_for_address(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            match = _LISTENING.search(text)
            if match:
                scheme, hostport = match.groups()
                ws_scheme = "wss" if scheme == "https" else "ws"
                return f"{scheme}://{hostport}", f"{ws_scheme}://{hostport}"
            if self.process.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"relay exited with {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"relay did not report its address in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        """Everything the relay logged so far."""
        return self.log_path.read_text("utf-8", "replace")

    def log_problems(self) -> list[str]:
        """Lines of the log so far that show an unhandled exception (see
        :func:`log_problems`)."""
        return log_problems(self.log_text())

    def log_excerpt(self, around: str | None = None, lines: int = 40) -> str:
        """A piece of the log for a failure message (see :func:`log_excerpt`)."""
        return log_excerpt(self.log_text(), around, lines)

    @cached_property
    def psutil(self) -> PsutilProcess:
        """The relay process as :mod:`psutil` sees it."""
        import psutil

        return psutil.Process(self.process.pid)

    def rss(self) -> int:
        """The relay's resident memory in bytes."""
        return int(self.psutil.memory_info().rss)

    def open_files(self) -> int:
        """The relay's open file descriptors."""
        return int(self.psutil.num_fds())

    def cpu_seconds(self) -> float:
        """User plus system CPU time the relay consumed so far."""
        times = self.psutil.cpu_times()
        return float(times.user + times.system)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (-15 / 143 after a clean stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the relay (a crash)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


class StartRelay(Protocol):
    """The ``start_relay`` fixture: ``start_relay(*arguments, **launch_options)``."""

    def __call__(
        self,
        *arguments: str,
        environment: Mapping[str, str] | None = None,
        listen: str = LOOPBACK,
        reactor: str | None = None,
        cwd: Path | None = None,
        internals: bool = False,
    ) -> RelayProcess:
        """Start a relay with these command-line arguments; stopped at teardown."""
        ...
