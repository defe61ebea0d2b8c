"""The shared handshake-deadline timer (streamrelay.deadlines), on a Clock."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.task import Clock

from streamrelay.deadlines import Deadlines
from tests.fakes import captured_log


def active(clock: Clock) -> list[object]:
    """The clock's pending calls."""
    return [call for call in clock.getDelayedCalls() if call.active()]


def test_deadlines_fire_in_order_at_their_own_time() -> None:
    """Each key's callback runs exactly ``length`` after it was armed, in arming
    order, with one delayed call at a time."""
    clock = Clock()
    deadlines = Deadlines(clock, 5.0)
    fired: list[tuple[str, float]] = []
    def firing(name: str) -> Callable[[], None]:
        return lambda: fired.append((name, clock.seconds()))

    for name, at in (("a", 0.0), ("b", 1.0), ("c", 1.5)):
        clock.advance(at - clock.seconds())
        deadlines.arm(name, firing(name))
        assert len(active(clock)) == 1
    clock.advance(3.4)  # t = 4.9
    assert fired == []
    clock.advance(0.1)
    assert fired == [("a", 5.0)]
    clock.advance(1.0)
    assert fired == [("a", 5.0), ("b", 6.0)]
    clock.advance(0.5)
    assert fired == [("a", 5.0), ("b", 6.0), ("c", 6.5)]
    assert active(clock) == [] and len(deadlines) == 0


def test_disarmed_keys_never_fire_and_an_idle_wheel_holds_no_timer() -> None:
    """Disarming the only key cancels the timer; disarming the earliest of several
    leaves the others on time."""
    clock = Clock()
    deadlines = Deadlines(clock, 2.0)
    fired: list[str] = []
    deadlines.arm("a", lambda: fired.append("a"))
    deadlines.disarm("a")
    assert active(clock) == [] and "a" not in deadlines
    deadlines.arm("b", lambda: fired.append("b"))
    clock.advance(1.0)
    deadlines.arm("c", lambda: fired.append("c"))
    deadlines.disarm("b")
    clock.advance(1.0)
    assert fired == []
    clock.advance(1.0)
    assert fired == ["c"] and active(clock) == []
    deadlines.disarm("never armed")


def test_arming_twice_keeps_the_first_deadline() -> None:
    """A key armed again before its deadline is not pushed back."""
    clock = Clock()
    deadlines = Deadlines(clock, 2.0)
    fired: list[float] = []
    deadlines.arm("a", lambda: fired.append(clock.seconds()))
    clock.advance(1.5)
    deadlines.arm("a", lambda: fired.append(-1.0))
    clock.advance(0.5)
    assert fired == [2.0]


def test_a_failing_callback_does_not_stop_the_others() -> None:
    """An error in one callback is logged; later deadlines still run."""
    clock = Clock()
    deadlines = Deadlines(clock, 1.0)
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    deadlines.arm("a", broken)
    deadlines.arm("b", lambda: fired.append("b"))
    with captured_log() as log:
        clock.advance(1.0)
    assert fired == ["b"]
    assert len(log.failures) == 1


def test_callbacks_may_disarm_others() -> None:
    """A callback that disarms a later key (a connection closing another) is safe."""
    clock = Clock()
    deadlines = Deadlines(clock, 1.0)
    fired: list[str] = []
    def first() -> None:
        fired.append("a")
        deadlines.disarm("b")

    deadlines.arm("a", first)
    deadlines.arm("b", lambda: fired.append("b"))
    clock.advance(1.0)
    assert fired == ["a"] and active(clock) == []
