"""The adaptive-delivery policy and rendition sets (streamrelay.abr), with no I/O: the
observations carry a Clock's readings."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from streamrelay.abr import (
    MAX_RENDITIONS,
    AbrPolicy,
    AbrSettings,
    Decision,
    Observation,
    Rendition,
    parse_renditions,
)
from streamrelay.names import (
    base_name,
    is_rendition_of,
    is_valid_stream_name,
    rendition_name,
    split_rendition,
)

SET = [
    {"name": "720p", "stream": "cam", "width": 1280, "height": 720, "bitrate": 2_500_000,
     "codec": "avc1.64001f"},
    {"name": "360p", "stream": "cam~360p", "width": 640, "height": 360, "bitrate": 800_000,
     "codec": "avc1.64001f"},
    {"name": "180p", "stream": "cam~180p", "width": 320, "height": 180, "bitrate": 250_000,
     "codec": "avc1.64001f"},
]  # fmt: skip


def renditions() -> tuple[Rendition, ...]:
    parsed = parse_renditions({"type": "meta", "renditions": SET}, "cam")
    assert parsed is not None
    return parsed


# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cam~360p", "a~b", "my.stream~x_1-2", "a" * 64 + "~" + "b" * 16])
def test_rendition_names_are_valid_stream_names(name: str) -> None:
    """``BASE~LABEL``: a v1 base name, ``~``, a label of up to 16 characters."""
    assert is_valid_stream_name(name)


@pytest.mark.parametrize(
    "name", ["cam~", "~360p", "cam~360p~x", "cam~.x", "cam~a.b", "cam~" + "b" * 17, "cam~-a"]
)
def test_malformed_rendition_names_are_refused(name: str) -> None:
    """An empty or over-long label, a second ``~``, or a dot in the label: refused."""
    assert not is_valid_stream_name(name)


def test_name_helpers_split_and_compose() -> None:
    """split/compose are inverse; a base name is its own base."""
    assert split_rendition("cam~360p") == ("cam", "360p")
    assert split_rendition("cam") == ("cam", None)
    assert base_name("cam~360p") == "cam" == base_name("cam")
    assert rendition_name("cam", "360p") == "cam~360p"
    assert rendition_name("cam", None) == "cam"
    assert is_rendition_of("cam~360p", "cam") and is_rendition_of("cam", "cam")
    assert not is_rendition_of("cam2~360p", "cam") and not is_rendition_of("cam~", "cam")


# -- rendition sets --------------------------------------------------------------------


def test_a_set_is_read_highest_bitrate_first() -> None:
    """The set comes back ordered by bitrate, whatever the order announced."""
    parsed = parse_renditions({"renditions": list(reversed(SET))}, "cam")
    assert parsed is not None
    assert [r.stream for r in parsed] == ["cam", "cam~360p", "cam~180p"]
    assert parsed[1] == Rendition("360p", "cam~360p", 640, 360, 800_000, "avc1.64001f")


def _with(index: int, **changes: Any) -> list[dict[str, Any]]:
    entries = [dict(entry) for entry in SET]
    entries[index].update(changes)
    return entries


@pytest.mark.parametrize(
    "entries",
    [
        "not a list",
        [],
        SET[:1],  # one rendition is no set
        [dict(SET[0])]
        + [{**SET[1], "name": f"r{i}", "stream": f"cam~r{i}"} for i in range(MAX_RENDITIONS)],
        _with(1, stream="other~360p"),  # another base's rendition
        _with(1, stream="cam~bad.label"),
        _with(1, name="bad name"),
        _with(1, bitrate=0),
        _with(1, bitrate=-5),
        _with(1, bitrate=True),
        _with(1, bitrate=1.5),
        _with(1, width="640"),
        _with(2, height=None),
        _with(1, codec=5),
        _with(2, name="360p"),  # duplicate name
        _with(2, stream="cam~360p"),  # duplicate stream
        [SET[1], SET[2]],  # without the base itself
        [SET[0], "x", SET[2]],
    ],
)
def test_a_malformed_set_is_ignored(entries: Any) -> None:
    """Anything but a bounded list of this base's well-formed renditions: no set."""
    assert parse_renditions({"renditions": entries}, "cam") is None


def test_no_renditions_member_means_no_set() -> None:
    """A plain v1 meta announces no set."""
    assert parse_renditions({"type": "meta", "width": 640}, "cam") is None


# -- the policy ------------------------------------------------------------------------

LIMIT = 4_000_000
SETTINGS = AbrSettings()


class Driver:
    """A policy observed every interval on a Clock, with a queue the test fills."""

    def __init__(self, current: str = "cam") -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.policy = AbrPolicy(LIMIT, SETTINGS)
        assert self.policy.set_renditions(renditions(), current)
        self.queued = 0
        self.sent = 0
        self.skipping = False

    def step(self, sent: int = 0, queued: int | None = None) -> Decision | None:
        """One interval later, ``sent`` more bytes accepted by the transport."""
        self.clock.advance(SETTINGS.interval)
        self.sent += sent
        if queued is not None:
            self.queued = queued
        return self.policy.observe(
            Observation(self.clock.seconds(), self.queued, self.sent, self.skipping)
        )

    def run(self, seconds: float, rate_bps: float, queued_growth_bps: float = 0) -> list[Decision]:
        """Observe for ``seconds``: the transport accepts ``rate_bps``; the queue grows by
        ``queued_growth_bps`` (negative: drains)."""
        found = []
        for _ in range(round(seconds / SETTINGS.interval)):
            queued = max(0, int(self.queued + queued_growth_bps / 8 * SETTINGS.interval))
            decision = self.step(int(rate_bps / 8 * SETTINGS.interval), queued)
            if decision is not None:
                found.append(decision)
                self.policy.started()
                self.policy.switched(decision.index, decision.reason, self.clock.seconds())
        return found


def test_a_viewer_that_keeps_up_stays() -> None:
    """Nothing queued, top rendition: no decision at all."""
    driver = Driver()
    assert driver.run(30, 2_500_000) == []


def test_a_growing_backlog_steps_down_before_the_queue_is_a_quarter_full() -> None:
    """A link at 1.5 Mb/s under a 2.5 Mb/s rendition: the backlog grows at 1 Mb/s;
    the step down comes within about two seconds, long before the queue bound, and goes
    to the highest rendition the measured capacity carries."""
    driver = Driver()
    decisions = driver.run(4, 1_500_000, queued_growth_bps=1_000_000)
    assert decisions and decisions[0].reason == "down"
    first_at = decisions[0]
    assert first_at.index == 1  # 800 kb/s fits 1.5 Mb/s with the margin
    assert driver.queued < SETTINGS.down_fraction * LIMIT


def test_the_step_down_target_follows_the_measured_capacity() -> None:
    """At 500 kb/s measured, 800 kb/s does not fit: straight to the lowest."""
    driver = Driver()
    decisions = driver.run(4, 500_000, queued_growth_bps=2_000_000)
    assert decisions[0] == Decision(2, "down")


def test_a_queue_over_the_down_fraction_steps_down_at_once() -> None:
    """Urgent: over a quarter of the bound, the next observation steps down."""
    driver = Driver()
    assert driver.step(0, int(LIMIT * 0.3)) == Decision(1, "down")


def test_a_drop_episode_steps_down() -> None:
    """A viewer already skipping (a sudden collapse) steps down too."""
    driver = Driver()
    driver.skipping = True
    assert driver.step(0, 0) == Decision(1, "down")


def test_a_steady_small_backlog_is_not_falling_behind() -> None:
    """A backlog that does not grow (bursts drained as fast as they come) stays."""
    driver = Driver()
    for _ in range(40):
        assert driver.step(int(2_500_000 / 8 * SETTINGS.interval), 50_000) is None


def test_the_lowest_rendition_never_steps_down() -> None:
    """On the lowest, the drop to keyframe is the only remedy (unchanged)."""
    driver = Driver("cam~180p")
    assert driver.step(0, int(LIMIT * 0.9)) is None


def test_steps_up_after_headroom_with_capacity_above_the_higher_bitrate() -> None:
    """A capacity measured above 1.25 x 2.5 Mb/s while backlogged: after the up hold
    of headroom, one step up."""
    driver = Driver("cam~360p")
    # Backlogged for two seconds at 4 Mb/s (a burst): capacity 4 Mb/s.
    driver.run(2, 4_000_000, queued_growth_bps=100_000)
    assert driver.policy.capacity == pytest.approx(4_000_000, rel=0.2)
    driver.queued = 0
    decisions = driver.run(SETTINGS.up_hold + 1, 800_000)
    assert decisions == [Decision(0, "up")]


def test_a_recent_capacity_below_the_higher_bitrate_holds_the_viewer_down() -> None:
    """Measured 1 Mb/s: no step up to 2.5 Mb/s while that measurement is recent, a
    probe once it is older than the estimate's lifetime."""
    driver = Driver("cam~360p")
    driver.queued = 200_000
    driver.run(2, 1_000_000, queued_growth_bps=-10)
    assert driver.policy.capacity == pytest.approx(1_000_000, rel=0.2)
    driver.queued = 0
    held = driver.run(SETTINGS.estimate_ttl - 4, 800_000)
    assert held == []
    probed = driver.run(8, 800_000)
    assert probed == [Decision(0, "up")]


def test_a_failed_probe_doubles_the_hold() -> None:
    """Up, then down again within the probe window: the next up waits twice as long."""
    driver = Driver("cam~360p")
    assert driver.run(SETTINGS.up_hold + 0.5, 800_000) == [Decision(0, "up")]
    assert driver.policy.up_hold == SETTINGS.up_hold
    down = driver.run(3, 1_000_000, queued_growth_bps=2_000_000)
    assert down[0].reason == "down"
    assert driver.policy.up_hold == 2 * SETTINGS.up_hold


def test_no_decision_while_a_switch_is_under_way() -> None:
    """Between the decision and the target's KEY the policy waits."""
    driver = Driver()
    driver.policy.started()
    assert driver.step(0, int(LIMIT * 0.9)) is None
    driver.policy.abandoned(driver.clock.seconds())
    assert driver.step(0, int(LIMIT * 0.9)) == Decision(1, "down")


def test_a_set_without_the_current_stream_is_not_adopted() -> None:
    """The viewer's rendition must be in the set."""
    policy = AbrPolicy(LIMIT)
    assert not policy.set_renditions(renditions(), "cam~90p")
    assert policy.rendition is None


def test_a_probe_that_holds_resets_the_hold() -> None:
    """A step up that is not followed by a step down within the probe window: the
    hold is back to its plain length."""
    driver = Driver("cam~360p")
    driver.run(SETTINGS.up_hold + 0.5, 800_000)
    driver.run(3, 1_000_000, queued_growth_bps=2_000_000)
    assert driver.policy.up_hold == 2 * SETTINGS.up_hold
    driver.queued = 0
    ups = driver.run(2 * SETTINGS.up_hold + 1, 250_000)
    assert ups and ups[-1].reason == "up"
    driver.run(SETTINGS.failed_probe_window + 1, 800_000)
    assert driver.policy.up_hold == SETTINGS.up_hold
