"""The connection lifecycle of a publisher, as one explicit state machine (automat).

States and what moves between them (``core.*`` are the actions taken on the way)::

    idle          start            -> connecting   connect
                  stop             -> stopped      finish
    connecting    tcp_connected    -> handshaking
                  connect_failed   -> waiting      schedule_retry
                  stop             -> stopping     cancel_connect
    handshaking   opened           -> live         go_live
                  stop             -> stopping     drop_connection
    handshaking,  closed           -> waiting      end_session, schedule_retry
    live          replaced         -> stopped      end_session, give_up, finish
    live          stop             -> stopping     close_session
    waiting       retry_due        -> connecting   connect
                  stop             -> stopped      finish
    stopping      tcp_connected    -> stopping     drop_connection
                  opened           -> stopping     close_session
                  connect_failed,
                  closed, replaced -> stopped      end_session, finish
                  stop             -> stopping
    stopped       stop             -> stopped

Every ``stop`` notes its reason first; the first one is the one kept. Each state shows as
a public :class:`ConnectionState` (``handshaking`` as CONNECTING; ``stopping`` keeps the
state it came from until the connection is gone). Inputs that arrive while another runs
(a synchronous connect or close) are queued by automat and run after it.
"""

from __future__ import annotations

import enum
from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder


class ConnectionState(enum.Enum):
    """Where the publisher's connection stands."""

    IDLE = "idle"
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


class LifecycleInputs(Protocol):
    """What happens to a publisher's connection: the machine's inputs."""

    def start(self) -> None:
        """The application starts the publisher."""

    def stop(self, reason: str) -> None:
        """The application stops the publisher."""

    def tcp_connected(self) -> None:
        """The connection attempt reached the relay; the opening handshake starts."""

    def connect_failed(self, why: str) -> None:
        """The connection attempt failed before reaching the relay."""

    def opened(self) -> None:
        """The relay accepted the opening handshake."""

    def closed(self, why: str, held: bool) -> None:
        """The connection ended; ``held`` when it stayed open long enough to count."""

    def replaced(self, why: str) -> None:
        """The relay closed the connection because a newer publisher took the stream."""

    def retry_due(self) -> None:
        """The backoff delay before the next attempt is over."""


class LifecycleCore(Protocol):
    """What the machine does on its transitions (the connector implements it)."""

    def show(self, state: ConnectionState) -> None:
        """Make ``state`` the public connection state."""

    def note_stop(self, reason: str) -> None:
        """Keep the reason of the first stop."""

    def connect(self) -> None:
        """Start a connection attempt."""

    def cancel_connect(self) -> None:
        """Cancel the attempt in flight."""

    def drop_connection(self) -> None:
        """Abort a connection whose opening handshake has not finished."""

    def go_live(self) -> None:
        """Hand the open connection to the publisher as its session."""

    def close_session(self) -> None:
        """Start the closing handshake, with a deadline."""

    def end_session(self) -> None:
        """The session is gone: the publisher forgets it (nothing if there was none)."""

    def schedule_retry(self, why: str, held: bool) -> None:
        """Explain the failure and connect again after a backoff delay."""

    def give_up(self, why: str) -> None:
        """Report that the publisher stops for good because it was replaced."""

    def finish(self) -> None:
        """Stopped: cancel what is pending and tell whoever waits."""


def _build() -> TypeMachine[LifecycleInputs, LifecycleCore]:
    # automat keeps the core type for annotation only, so a Protocol serves (and lets the
    # tests drive the machine with a recording core); mypy wants a concrete class.
    builder = TypeMachineBuilder(LifecycleInputs, LifecycleCore)  # type: ignore[type-abstract]
    idle = builder.state("idle")
    connecting = builder.state("connecting")
    handshaking = builder.state("handshaking")
    live = builder.state("live")
    waiting = builder.state("waiting")
    stopping = builder.state("stopping")
    stopped = builder.state("stopped")

    @idle.upon(LifecycleInputs.start).to(connecting)
    @waiting.upon(LifecycleInputs.retry_due).to(connecting)
    def connect(inputs: LifecycleInputs, core: LifecycleCore) -> None:
        core.show(ConnectionState.CONNECTING)
        core.connect()

    @idle.upon(LifecycleInputs.stop).to(stopped)
    @waiting.upon(LifecycleInputs.stop).to(stopped)
    def stop_at_once(inputs: LifecycleInputs, core: LifecycleCore, reason: str) -> None:
        core.note_stop(reason)
        core.show(ConnectionState.STOPPED)
        core.finish()

    connecting.upon(LifecycleInputs.tcp_connected).to(handshaking).returns(None)

    @connecting.upon(LifecycleInputs.connect_failed).to(waiting)
    def connect_failed(inputs: LifecycleInputs, core: LifecycleCore, why: str) -> None:
        core.schedule_retry(why, False)
        core.show(ConnectionState.RECONNECTING)

    @connecting.upon(LifecycleInputs.stop).to(stopping)
    def cancel(inputs: LifecycleInputs, core: LifecycleCore, reason: str) -> None:
        core.note_stop(reason)
        core.cancel_connect()

    @handshaking.upon(LifecycleInputs.opened).to(live)
    def go_live(inputs: LifecycleInputs, core: LifecycleCore) -> None:
        core.go_live()
        core.show(ConnectionState.LIVE)

    @handshaking.upon(LifecycleInputs.closed).to(waiting)
    @live.upon(LifecycleInputs.closed).to(waiting)
    def retry(inputs: LifecycleInputs, core: LifecycleCore, why: str, held: bool) -> None:
        core.end_session()
        core.schedule_retry(why, held)
        core.show(ConnectionState.RECONNECTING)

    @handshaking.upon(LifecycleInputs.replaced).to(stopped)
    @live.upon(LifecycleInputs.replaced).to(stopped)
    def give_up(inputs: LifecycleInputs, core: LifecycleCore, why: str) -> None:
        core.end_session()
        core.give_up(why)
        core.note_stop(why)
        core.show(ConnectionState.STOPPED)
        core.finish()

    @handshaking.upon(LifecycleInputs.stop).to(stopping)
    def abort_handshake(inputs: LifecycleInputs, core: LifecycleCore, reason: str) -> None:
        core.note_stop(reason)
        core.drop_connection()

    @live.upon(LifecycleInputs.stop).to(stopping)
    def close(inputs: LifecycleInputs, core: LifecycleCore, reason: str) -> None:
        core.note_stop(reason)
        core.close_session()

    @stopping.upon(LifecycleInputs.tcp_connected).loop()
    def drop_late_connection(inputs: LifecycleInputs, core: LifecycleCore) -> None:
        core.drop_connection()

    @stopping.upon(LifecycleInputs.opened).loop()
    def close_late_session(inputs: LifecycleInputs, core: LifecycleCore) -> None:
        core.close_session()

    @stopping.upon(LifecycleInputs.connect_failed).to(stopped)
    def stopped_before_connecting(inputs: LifecycleInputs, core: LifecycleCore, why: str) -> None:
        core.show(ConnectionState.STOPPED)
        core.finish()

    @stopping.upon(LifecycleInputs.closed).to(stopped)
    def stopped_after_close(
        inputs: LifecycleInputs, core: LifecycleCore, why: str, held: bool
    ) -> None:
        core.end_session()
        core.show(ConnectionState.STOPPED)
        core.finish()

    @stopping.upon(LifecycleInputs.replaced).to(stopped)
    def stopped_while_replaced(inputs: LifecycleInputs, core: LifecycleCore, why: str) -> None:
        core.end_session()
        core.show(ConnectionState.STOPPED)
        core.finish()

    stopping.upon(LifecycleInputs.stop).loop().returns(None)
    stopped.upon(LifecycleInputs.stop).loop().returns(None)
    return builder.build()


LIFECYCLE = _build()
"""``LIFECYCLE(core)`` makes a machine in state ``idle`` driving ``core``."""

__all__ = ["LIFECYCLE", "ConnectionState", "LifecycleCore", "LifecycleInputs"]
