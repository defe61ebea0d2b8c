"""The ``--demo`` supervisor (Twisted's ProcessMonitor): start once listening, token in
the environment, restart with backoff, SIGTERM then SIGKILL on stop, output logged line
by line with a bound.  Driven by a Clock and fake processes; nothing is spawned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor

from streamrelay.demo import (
    CHILD_NAME,
    DEMO_STREAM,
    MAX_LOG_LINE,
    TOKEN_VARIABLE,
    DemoPublisherService,
)
from streamrelay.tokens import verify_token

URL = "ws://127.0.0.1:8080/publish/demo"
SECRET = b"demo-secret-value"


@dataclass
class FakeProcess:
    """A spawned child: records signals; :meth:`exit` ends it."""

    protocol: ProcessProtocol
    executable: str
    args: list[str]
    env: dict[str, str]
    signals: list[str] = field(default_factory=list)
    ended: bool = False
    pid: int = 4242

    def signalProcess(self, signal: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def exit(self, reason: Exception | None = None) -> None:
        """The child exits (by default with status 1)."""
        self.ended = True
        self.protocol.processEnded(Failure(reason or ProcessTerminated(exitCode=1)))

    def output(self, data: bytes, stream: str = "stdout") -> None:
        """The child writes ``data`` to stdout or stderr."""
        if stream == "stdout":
            self.protocol.outReceived(data)
        else:
            self.protocol.errReceived(data)

    def loseConnection(self) -> None:
        pass


class ProcessClock(Clock):
    """A Clock that can spawn fake processes (the part of IReactorProcess the monitor uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Any = (),
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, object] | None = None,
    ) -> FakeProcess:
        process = FakeProcess(processProtocol, executable, list(args), dict(env or {}))
        processProtocol.makeConnection(process)  # type: ignore[arg-type]
        self.spawned.append(process)
        return process


def supervisor(
    url: str | None = URL, secret: bytes | None = None
) -> tuple[DemoPublisherService, ProcessClock]:
    """A started supervisor whose listeners are bound at ``url``, and its clock."""
    clock = ProcessClock()
    clock.advance(1_700_000_000)
    service = DemoPublisherService(clock, lambda: url, "/usr/bin/python3", {"HOME": "/h"}, secret)
    service.startService()
    return service, clock


def messages(events: list[LogEvent]) -> list[str]:
    """The formatted log lines."""
    return [formatEvent(event) for event in events]


def test_child_starts_on_the_next_turn_with_the_relay_url() -> None:
    """The child is spawned once the listeners are bound (next reactor turn), as
    ``python -m streamrelay.publisher --url URL --quiet`` with the relay's environment."""
    service, clock = supervisor()
    assert clock.spawned == []
    clock.advance(0)
    [child] = clock.spawned
    assert child.executable == "/usr/bin/python3"
    assert child.args == [
        "/usr/bin/python3",
        "-m",
        "streamrelay.publisher",
        "--url",
        URL,
        "--quiet",
    ]
    assert child.env == {"HOME": "/h"}


def test_tls_listener_makes_the_child_accept_its_certificate() -> None:
    """A wss: URL adds --insecure (the relay's own certificate, over loopback)."""
    _, clock = supervisor("wss://127.0.0.1:8443/publish/demo")
    clock.advance(0)
    assert clock.spawned[0].args[-1] == "--insecure"


def test_token_goes_through_the_environment_never_argv() -> None:
    """With a publish secret the child gets a valid publish token for 'demo' in
    STREAMRELAY_TOKEN; neither token nor secret appears in its arguments."""
    _, clock = supervisor(secret=SECRET)
    clock.advance(0)
    [child] = clock.spawned
    token = child.env[TOKEN_VARIABLE]
    verify_token(SECRET, token, "publish", DEMO_STREAM, clock.seconds() + 86400)
    assert not any(token in arg or SECRET.decode() in arg for arg in child.args)
    assert SECRET.decode() not in "".join(child.env.values())


def test_no_ip_listener_means_no_child() -> None:
    """Without a tcp:/ssl: listener there is no URL: a warning, and nothing spawned."""
    with capturedLogs() as events:
        _, clock = supervisor(url=None)
        clock.advance(0)
        clock.advance(100)
    assert clock.spawned == []
    assert any("--demo needs a tcp: or ssl: listener" in m for m in messages(list(events)))


def test_child_dying_young_restarts_with_doubling_delay_up_to_the_cap() -> None:
    """A child that keeps dying at once comes back after 1, 2, 4, 8, 16, 30, 30 s, and
    not a moment earlier; each restart is logged with its delay."""
    service, clock = supervisor()
    clock.advance(0)
    delays = []
    with capturedLogs() as events:
        for _ in range(7):
            clock.spawned[-1].exit()
            count = len(clock.spawned)
            waited = 0.0
            while len(clock.spawned) == count:
                clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    logged = [m for m in messages(list(events)) if "restarting in" in m]
    assert (
        logged[0] == "Demo publisher ended (A process has ended with a probable error "
        "condition: process ended with exit code 1.); restarting in 1.0 s"
    )
    assert len(logged) == 7
    assert service.running


def test_child_that_ran_long_restarts_at_once_and_resets_the_delay() -> None:
    """After a run longer than a minute, a child's exit restarts it at once and the
    backoff starts again from 1 s."""
    _, clock = supervisor()
    clock.advance(0)
    for _ in range(3):  # build up the delay to 8 s
        clock.spawned[-1].exit()
        clock.advance(30)
    clock.advance(61)
    clock.spawned[-1].exit(ProcessDone(0))
    clock.advance(0)
    assert len(clock.spawned) == 5
    clock.spawned[-1].exit()
    clock.advance(0.9)
    assert len(clock.spawned) == 5
    clock.advance(0.1)
    assert len(clock.spawned) == 6


def test_stop_sends_sigterm_and_waits_for_the_child() -> None:
    """Stopping sends SIGTERM, completes once the child has exited, and restarts nothing."""
    service, clock = supervisor()
    clock.advance(0)
    [child] = clock.spawned
    stopped: list[object] = []
    service.stopService().addCallback(stopped.append)
    assert child.signals == ["TERM"]
    assert stopped == []
    child.exit(ProcessTerminated(signal=15))
    assert stopped == [None]
    clock.advance(100)
    assert child.signals == ["TERM"] and len(clock.spawned) == 1
    assert clock.getDelayedCalls() == []


def test_child_ignoring_sigterm_gets_sigkill_after_the_grace_period() -> None:
    """A child still running 5 s after SIGTERM is killed; stop completes when it is gone."""
    service, clock = supervisor()
    clock.advance(0)
    [child] = clock.spawned
    stopped: list[object] = []
    service.stopService().addCallback(stopped.append)
    clock.advance(4.9)
    assert child.signals == ["TERM"]
    clock.advance(0.1)
    assert child.signals == ["TERM", "KILL"]
    assert stopped == []
    child.exit(ProcessTerminated(signal=9))
    assert stopped == [None]
    assert clock.getDelayedCalls() == []


def test_stop_during_backoff_cancels_the_restart() -> None:
    """Stopping while a restart is pending cancels it and completes at once."""
    service, clock = supervisor()
    clock.advance(0)
    clock.spawned[0].exit()
    stopped: list[object] = []
    service.stopService().addCallback(stopped.append)
    assert stopped == [None]
    clock.advance(100)
    assert len(clock.spawned) == 1
    assert clock.getDelayedCalls() == []


def test_stop_before_the_first_turn_spawns_nothing() -> None:
    """A relay stopped before its first reactor turn never starts the child."""
    service, clock = supervisor()
    stopped: list[object] = []
    service.stopService().addCallback(stopped.append)
    clock.advance(100)
    assert stopped == [None] and clock.spawned == []


def test_child_output_is_logged_line_by_line() -> None:
    """stdout and stderr are logged a line at a time, whatever the chunking."""
    _, clock = supervisor()
    clock.advance(0)
    child = clock.spawned[0]
    with capturedLogs() as events:
        child.output(b"first li")
        child.output(b"ne\nsecond line\nthi")
        child.output(b"warning: slow\n", "stderr")
        child.output(b"rd\n")
    assert messages(list(events)) == [
        f"[{CHILD_NAME}] first line",
        f"[{CHILD_NAME}] second line",
        f"[{CHILD_NAME}] warning: slow",
        f"[{CHILD_NAME}] third",
    ]


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
@pytest.mark.parametrize("length", [1000, 20_000, 200_000])
def test_long_output_lines_are_cut_and_logging_goes_on(stream: str, length: int) -> None:
    """A long line is logged cut to MAX_LOG_LINE characters; one longer than the line
    buffer neither breaks the child's pipe nor stops the lines after it."""
    _, clock = supervisor()
    clock.advance(0)
    child = clock.spawned[0]
    with capturedLogs() as events:
        for start in range(0, length, 4096):
            child.output(b"x" * min(4096, length - start), stream)
        child.output(b"\n", stream)
        child.output(b"after\n", stream)
    lines = [m.removeprefix(f"[{CHILD_NAME}] ") for m in messages(list(events))]
    assert lines[0] == "x" * MAX_LOG_LINE + "..."
    assert lines[-1] == "after"
    assert all(len(line) <= MAX_LOG_LINE + 3 for line in lines)
    assert not any(event.get("log_failure") for event in events)
    assert child.signals == [] and not child.ended


def test_stop_completes_even_if_the_exit_hook_is_never_called() -> None:
    """Should Twisted rename the private exit hook the supervisor overrides, stop still
    completes, one second after the SIGKILL."""
    service, clock = supervisor()
    clock.advance(0)
    [child] = clock.spawned
    # The stock handling only, as if ours were no longer called.
    service._monitoredProcessExited = (  # type: ignore[method-assign]
        lambda name, reason=None: ProcessMonitor._monitoredProcessExited(service, name, reason)
    )
    stopped: list[object] = []
    with capturedLogs() as events:
        service.stopService().addCallback(stopped.append)
        clock.advance(5)
        assert child.signals == ["TERM", "KILL"]
        child.exit(ProcessTerminated(signal=9))
        assert stopped == []
        clock.advance(1)
    assert stopped == [None] and clock.getDelayedCalls() == []
    assert any("unreported" in line for line in messages(list(events)))


def test_the_child_gets_only_the_variables_it_needs() -> None:
    """The relay's secrets in its environment never reach the child: it gets PATH, HOME,
    locale and Python's variables, and its token."""
    clock = ProcessClock()
    environment = {
        "PATH": "/usr/bin",
        "HOME": "/h",
        "LANG": "C.UTF-8",
        "PYTHONPATH": "/src",
        "STREAMRELAY_PUBLISH_SECRET": "publish-secret",
        "STREAMRELAY_RELAY_SECRET": "relay-secret",
        "AWS_SECRET_ACCESS_KEY": "other",
    }
    service = DemoPublisherService(clock, lambda: URL, "/usr/bin/python3", environment, SECRET)
    service.startService()
    clock.advance(0)
    [child] = clock.spawned
    assert set(child.env) == {"PATH", "HOME", "LANG", "PYTHONPATH", TOKEN_VARIABLE}
