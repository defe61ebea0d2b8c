"""The global bound on buffered bytes (--max-buffered-bytes)."""

from __future__ import annotations

from streamrelay.budget import BufferBudget


class Member:
    """A viewer backlog or GOP cache holding ``size`` bytes; shedding keeps ``keeps``."""

    def __init__(self, budget: BufferBudget, name: str, size: int, keeps: int = 0) -> None:
        self.budget = budget
        self.name = name
        self.size = 0
        self.keeps = keeps
        self.shed_count = 0
        self.grow(size)

    @property
    def backlog_bytes(self) -> int:
        return self.size

    @property
    def sheddable_bytes(self) -> int:
        return self.size - min(self.size, self.keeps)

    def grow(self, amount: int) -> None:
        self.size += amount
        self.budget.adjust(amount)

    def shed(self) -> None:
        self.shed_count += 1
        released = self.size - min(self.size, self.keeps)
        self.size -= released
        self.budget.adjust(-released)


def _viewer(budget: BufferBudget, name: str, size: int, keeps: int = 0) -> Member:
    budget.add_viewer(member := Member(budget, name, 0, keeps))
    member.grow(size)
    return member


def _cache(budget: BufferBudget, name: str, size: int, keeps: int = 0) -> Member:
    budget.add_cache(member := Member(budget, name, 0, keeps))
    member.grow(size)
    return member


def test_under_the_bound_nothing_is_shed() -> None:
    """Below --max-buffered-bytes every backlog is left alone."""
    budget = BufferBudget(1000)
    members = [_viewer(budget, "a", 400), _viewer(budget, "b", 300), _cache(budget, "c", 299)]
    assert budget.total == 999
    assert budget.sheds == 0
    assert all(member.shed_count == 0 for member in members)


def test_largest_viewer_backlogs_are_shed_until_under_75_percent() -> None:
    """At the bound, the viewers with the largest backlogs are put into skipping, the
    largest first, until the total is under 75% of the bound; small ones are spared."""
    budget = BufferBudget(1000)
    small = _viewer(budget, "small", 100)
    medium = _viewer(budget, "medium", 200)
    large = _viewer(budget, "large", 250)
    cache = _cache(budget, "cache", 150)
    assert budget.total == 700
    huge = _viewer(budget, "huge", 300)  # 1000: at the bound
    assert huge.shed_count == 1
    assert large.shed_count == 0  # 700 < 750 after the first shed
    assert small.shed_count == medium.shed_count == cache.shed_count == 0
    assert budget.total == 700 < 750


def test_several_viewers_are_shed_when_one_is_not_enough() -> None:
    """Shedding continues down the list of backlogs until under the low-water mark."""
    budget = BufferBudget(1000)
    viewers = [_viewer(budget, f"v{size}", size) for size in (200, 220, 240, 230)]
    cache = _cache(budget, "cache", 100)
    assert budget.total == 990
    viewers[0].grow(10)  # total 1000
    shed = {member.name for member in viewers if member.shed_count}
    assert shed == {"v240", "v230"}  # 1000 -> 760 (still >= 750) -> 530
    assert cache.shed_count == 0
    assert budget.total < 750


def test_gop_caches_are_shed_after_viewers() -> None:
    """When viewer backlogs cannot get the total under 75%, GOP caches are emptied too,
    the largest first."""
    budget = BufferBudget(1000)
    viewer = _viewer(budget, "viewer", 100)
    big = _cache(budget, "big", 500)
    small_cache = _cache(budget, "small", 150)
    tiny = _cache(budget, "tiny", 100)
    assert budget.total == 850
    viewer.grow(150)  # 1000
    assert viewer.shed_count == 1
    assert big.shed_count == 1
    assert small_cache.shed_count == 0 and tiny.shed_count == 0
    assert budget.total == 250


def test_members_that_keep_bytes_do_not_stop_the_shedding() -> None:
    """A viewer that keeps some bytes (a message half written) still leaves room for
    the others to be shed."""
    budget = BufferBudget(1000)
    stubborn = _viewer(budget, "stubborn", 600, keeps=500)
    other = _viewer(budget, "other", 300)
    cache = _cache(budget, "cache", 99)
    cache.grow(1)  # 1000
    assert stubborn.shed_count == 1
    assert other.shed_count == 1
    assert budget.total < 750


def test_shedding_is_not_reentrant() -> None:
    """Adjustments made by shedding itself do not start a nested enforcement."""
    budget = BufferBudget(100)

    class Grower(Member):
        def shed(self) -> None:
            super().shed()
            # Shedding one member makes another grow past the bound again.
            other.grow(10)

    grower = Grower(budget, "grower", 0)
    budget.add_viewer(grower)
    other = _viewer(budget, "other", 0)
    grower.grow(100)
    assert grower.shed_count == 1
    assert budget.total == 10


def test_removed_members_are_not_shed() -> None:
    """A viewer that left is no longer part of the budget."""
    budget = BufferBudget(1000)
    gone = _viewer(budget, "gone", 500)
    gone.grow(-500)
    budget.remove(gone)
    stay = _viewer(budget, "stay", 999)
    stay.grow(1)
    assert gone.shed_count == 0
    assert stay.shed_count == 1
    assert budget.total == 0


def test_zero_limit_means_no_bound() -> None:
    """A limit of 0 disables the global bound."""
    budget = BufferBudget(0)
    member = _viewer(budget, "a", 10**9)
    assert member.shed_count == 0
    assert budget.total == 10**9


def test_bytes_that_cannot_be_shed_do_not_trigger_a_pass_per_message() -> None:
    """When what stays over the bound cannot be shed (bytes already in transports), the
    budget does not re-run a pass, shedding healthy viewers, on every later message: the
    next pass waits until the total grew by a sixteenth of the bound."""
    budget = BufferBudget(1600)
    stuck = [_viewer(budget, f"stuck{index}", 400, keeps=400) for index in range(4)]
    assert budget.total == 1600
    passes_after_first = budget.sheds
    healthy = _viewer(budget, "healthy", 0)
    for _ in range(50):
        healthy.grow(1)
    assert healthy.shed_count == 0, "a small increase over a stuck total must not shed"
    healthy.grow(100)
    assert healthy.shed_count == 1, "past the retry margin the largest sheddable is shed"
    assert all(member.size == 400 for member in stuck)
    assert budget.sheds >= passes_after_first
