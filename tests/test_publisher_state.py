"""The publisher's connection lifecycle machine, driven with a core that records actions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from automat import NoTransition

from streamrelay.publisher.state import LIFECYCLE, ConnectionState, LifecycleInputs


class RecordingCore:
    """Records each action the machine takes; ``on_connect`` plays a synchronous
    endpoint that reports back while the machine is still in its transition."""

    def __init__(self) -> None:
        self.actions: list[str] = []
        self.shown: list[ConnectionState] = []
        self.on_connect: Callable[[], None] | None = None

    def show(self, state: ConnectionState) -> None:
        self.shown.append(state)

    def note_stop(self, reason: str) -> None:
        self.actions.append(f"note_stop:{reason}")

    def connect(self) -> None:
        self.actions.append("connect")
        if self.on_connect is not None:
            self.on_connect()

    def cancel_connect(self) -> None:
        self.actions.append("cancel_connect")

    def drop_connection(self) -> None:
        self.actions.append("drop_connection")

    def go_live(self) -> None:
        self.actions.append("go_live")

    def close_session(self) -> None:
        self.actions.append("close_session")

    def end_session(self) -> None:
        self.actions.append("end_session")

    def schedule_retry(self, why: str, held: bool) -> None:
        self.actions.append(f"schedule_retry:{why}:{held}")

    def give_up(self, why: str) -> None:
        self.actions.append(f"give_up:{why}")

    def finish(self) -> None:
        self.actions.append("finish")

    def take(self) -> list[str]:
        """The actions since the last call."""
        actions, self.actions = self.actions, []
        return actions


def machine() -> tuple[LifecycleInputs, RecordingCore]:
    core = RecordingCore()
    return LIFECYCLE(core), core


def live_machine() -> tuple[LifecycleInputs, RecordingCore]:
    inputs, core = machine()
    inputs.start()
    inputs.tcp_connected()
    inputs.opened()
    core.take()
    core.shown.clear()
    return inputs, core


def test_connect_open_close_retry_and_open_again() -> None:
    """idle -> connecting -> handshaking -> live; a close schedules a retry (the session
    is ended first), and the retry connects again; each step shows its public state."""
    inputs, core = machine()
    inputs.start()
    assert core.take() == ["connect"]
    inputs.tcp_connected()
    assert core.take() == []
    inputs.opened()
    assert core.take() == ["go_live"]
    inputs.closed("connection closed (1001)", True)
    assert core.take() == ["end_session", "schedule_retry:connection closed (1001):True"]
    inputs.retry_due()
    assert core.take() == ["connect"]
    assert core.shown == [
        ConnectionState.CONNECTING,
        ConnectionState.LIVE,
        ConnectionState.RECONNECTING,
        ConnectionState.CONNECTING,
    ]


def test_failures_before_the_session_retry_without_ending_a_session_twice() -> None:
    """A failed connect and a refused handshake both lead to a retry; a refusal in the
    handshake ends no session (end_session is a no-op for the core then)."""
    inputs, core = machine()
    inputs.start()
    inputs.connect_failed("cannot connect: refused")
    assert core.take() == ["connect", "schedule_retry:cannot connect: refused:False"]
    inputs.retry_due()
    inputs.tcp_connected()
    inputs.closed("relay refused the connection: 401 Unauthorized", False)
    assert core.take() == [
        "connect",
        "end_session",
        "schedule_retry:relay refused the connection: 401 Unauthorized:False",
    ]


@pytest.mark.parametrize(
    ("reach", "actions", "final"),
    [
        ([], ["note_stop:bye", "finish"], ConnectionState.STOPPED),
        (["start"], ["note_stop:bye", "cancel_connect"], None),
        (["start", "tcp_connected"], ["note_stop:bye", "drop_connection"], None),
        (["start", "tcp_connected", "opened"], ["note_stop:bye", "close_session"], None),
    ],
)
def test_stop_from_each_state(
    reach: list[str], actions: list[str], final: ConnectionState | None
) -> None:
    """stop finishes at once when nothing is in flight; otherwise it cancels the connect,
    aborts the handshake or closes the session, and the machine is stopping (public
    state unchanged) until the connection is gone."""
    inputs, core = machine()
    for name in reach:
        getattr(inputs, name)()
    core.take()
    core.shown.clear()
    inputs.stop("bye")
    assert core.take() == actions
    assert core.shown == ([final] if final else [])


def test_stop_while_waiting_cancels_the_retry_by_finishing() -> None:
    """While waiting to retry, stop finishes at once (finish cancels the timer)."""
    inputs, core = machine()
    inputs.start()
    inputs.connect_failed("cannot connect: refused")
    core.take()
    inputs.stop("bye")
    assert core.take() == ["note_stop:bye", "finish"]
    assert core.shown[-1] is ConnectionState.STOPPED
    with pytest.raises(NoTransition):
        inputs.retry_due()


@pytest.mark.parametrize(
    ("event", "arguments"),
    [("connect_failed", ("cancelled",)), ("closed", ("gone", False)), ("replaced", ("r",))],
)
def test_stopping_ends_when_the_connection_is_gone(
    event: str, arguments: tuple[object, ...]
) -> None:
    """Whatever ends the connection while stopping, the machine finishes and stops; a
    second stop is ignored, before and after."""
    inputs, core = live_machine()
    inputs.stop("bye")
    inputs.stop("again")
    core.take()
    getattr(inputs, event)(*arguments)
    expected = ["finish"] if event == "connect_failed" else ["end_session", "finish"]
    assert core.take() == expected
    assert core.shown == [ConnectionState.STOPPED]
    inputs.stop("after")
    assert core.take() == []


def test_a_handshake_that_completes_while_stopping_is_closed() -> None:
    """stop during the handshake aborts it; if the relay's 101 arrives anyway, the session
    is closed rather than used; a late TCP connect is dropped."""
    inputs, core = machine()
    inputs.start()
    inputs.stop("bye")
    inputs.tcp_connected()
    inputs.opened()
    assert core.take() == [
        "connect",
        "note_stop:bye",
        "cancel_connect",
        "drop_connection",
        "close_session",
    ]
    assert ConnectionState.LIVE not in core.shown


def test_replaced_gives_up_for_good() -> None:
    """Close code 4409 ends the session and stops the machine with the replacement as the
    reason; nothing restarts it."""
    inputs, core = live_machine()
    inputs.replaced("replaced by a newer publisher of the same stream")
    why = "replaced by a newer publisher of the same stream"
    assert core.take() == ["end_session", f"give_up:{why}", f"note_stop:{why}", "finish"]
    assert core.shown == [ConnectionState.STOPPED]
    for name in ("start", "retry_due", "opened", "tcp_connected"):
        with pytest.raises(NoTransition):
            getattr(inputs, name)()


def test_inputs_that_make_no_sense_in_a_state_are_refused() -> None:
    """The machine has no transition for events that cannot happen in a state (start
    twice, open before connecting, a retry while live)."""
    inputs, _ = machine()
    for name in ("opened", "tcp_connected", "retry_due"):
        with pytest.raises(NoTransition):
            getattr(inputs, name)()
    inputs.start()
    with pytest.raises(NoTransition):
        inputs.start()
    live, _ = live_machine()
    with pytest.raises(NoTransition):
        live.retry_due()


def test_a_synchronous_report_runs_after_the_transition_that_caused_it() -> None:
    """An endpoint that connects (or fails) inside connect() reports while the machine is
    still moving to connecting: automat queues the input and runs it right after."""
    inputs, core = machine()
    core.on_connect = inputs.tcp_connected
    inputs.start()
    inputs.opened()
    assert core.take() == ["connect", "go_live"]

    failing, core2 = machine()
    core2.on_connect = lambda: failing.connect_failed("cannot connect: refused")
    failing.start()
    assert core2.take() == ["connect", "schedule_retry:cannot connect: refused:False"]
    assert core2.shown == [ConnectionState.CONNECTING, ConnectionState.RECONNECTING]
