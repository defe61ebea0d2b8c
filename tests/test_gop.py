"""The per-stream GOP cache: what a joining viewer gets at once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.gop import DEFAULT_GOP_CACHE_MESSAGES, GopCache
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaInfo, encode_media, parse_media


def cost(*sizes: int) -> int:
    """What the cache is charged for messages of these sizes: each one's bytes plus the
    per-message overhead of the objects kept with it."""
    return sum(size + MESSAGE_OVERHEAD_BYTES for size in sizes)


def media(flags: int, tag: int, size: int = 100) -> MediaInfo:
    """The description (what the cache holds) of a message whose capture time ``tag``
    identifies it; ``size`` bytes in all."""
    return parse_media(encode_media(flags, tag, b"\x00" * (size - 9))).info()


def config(tag: int, size: int = 40) -> MediaInfo:
    return media(FLAG_CONFIG, tag, size)


def key(tag: int, size: int = 100) -> MediaInfo:
    return media(FLAG_KEY, tag, size)


def delta(tag: int, size: int = 100) -> MediaInfo:
    return media(0, tag, size)


class Cache:
    """A cache whose frames are the messages' tags, with its resize deltas summed."""

    def __init__(self, limit: int, max_messages: int = DEFAULT_GOP_CACHE_MESSAGES) -> None:
        self.total = 0
        self.gop: GopCache[int] = GopCache(limit, self._resized, max_messages)

    def _resized(self, change: int) -> None:
        assert change != 0
        self.total += change

    def add(self, *messages: MediaInfo) -> None:
        for message in messages:
            self.gop.add(message, message.capture_time_us)

    def start(self) -> list[int]:
        """Tags of the start sequence, checking each frame belongs to its message."""
        sequence = self.gop.start_sequence()
        for message, frame in sequence:
            assert frame == message.capture_time_us
        return [message.capture_time_us for message, _ in sequence]


def test_empty_cache_has_nothing_to_start_with() -> None:
    """Before any KEY a joining viewer must wait."""
    cache = Cache(10_000)
    assert cache.start() == []
    cache.add(config(1), delta(2), delta(3))
    assert not cache.gop.has_keyframe
    assert cache.start() == []
    assert cache.gop.config is not None and cache.gop.config[1] == 1


def test_holds_config_then_every_message_since_the_latest_key() -> None:
    """CONFIG, then the latest KEY and what followed it; older GOPs are gone."""
    cache = Cache(10_000)
    cache.add(config(1), key(2), delta(3), delta(4), key(5), delta(6))
    assert cache.gop.has_keyframe
    assert cache.start() == [1, 5, 6]


def test_config_in_effect_at_the_key_comes_first() -> None:
    """A CONFIG sent after the KEY follows in order; the one in effect at the KEY leads."""
    cache = Cache(10_000)
    cache.add(config(1), key(2), delta(3), config(4), delta(5))
    assert cache.start() == [1, 2, 3, 4, 5]
    cache.add(key(6), delta(7))
    assert cache.start() == [4, 6, 7]


def test_config_between_gops_leads_the_next_one() -> None:
    """A CONFIG sent while no GOP is cached applies from the next KEY on."""
    cache = Cache(cost(100, 100) + 50)
    cache.add(config(1), key(2), delta(3), delta(4))  # three messages of GOP: emptied
    assert cache.start() == []
    cache.add(config(5), delta(6), key(7))
    assert cache.start() == [5, 7]


def test_no_config_means_the_gop_alone() -> None:
    """Codecs without configuration messages start at the KEY."""
    cache = Cache(10_000)
    cache.add(key(1), delta(2))
    assert cache.start() == [1, 2]


def test_over_the_bound_empties_until_the_next_key() -> None:
    """When the GOP outgrows --gop-cache-bytes the cache empties and stays empty (deltas
    are useless without their KEY) until the next KEY; CONFIG stays."""
    cache = Cache(cost(100, 100, 100) + 50)
    cache.add(config(1), key(2), delta(3), delta(4))
    assert cache.start() == [1, 2, 3, 4]
    cache.add(delta(5))  # four messages of GOP
    assert cache.start() == []
    assert cache.gop.emptied == 1
    cache.add(delta(6), config(7), delta(8))
    assert cache.start() == []
    assert cache.gop.config is not None and cache.gop.config[1] == 7
    cache.add(key(9), delta(10))
    assert cache.start() == [7, 9, 10]
    assert cache.total == cache.gop.backlog_bytes


def test_a_gop_exactly_at_the_bound_is_kept() -> None:
    """The bound is inclusive."""
    cache = Cache(cost(100, 100, 100))
    cache.add(key(1), delta(2), delta(3))
    assert cache.start() == [1, 2, 3]


def test_a_single_key_larger_than_the_bound_is_not_cached() -> None:
    """A KEY bigger than the whole cache cannot be kept."""
    cache = Cache(cost(1000))
    cache.add(config(1), key(2, size=1001))
    assert cache.start() == []
    assert cache.gop.backlog_bytes == cost(40)


def test_limit_zero_keeps_only_config() -> None:
    """--gop-cache-bytes 0 turns the cache off but keeps the (small) latest CONFIG."""
    cache = Cache(0)
    cache.add(config(1), key(2), delta(3), config(4), key(5))
    assert cache.start() == []
    assert not cache.gop.has_keyframe
    assert cache.gop.config is not None and cache.gop.config[1] == 4
    assert cache.gop.backlog_bytes == cost(40)
    assert cache.total == cost(40)


def test_shed_empties_the_gop_but_keeps_config() -> None:
    """The global budget may take the cached GOP; CONFIG is kept for the next KEY."""
    cache = Cache(10_000)
    cache.add(config(1), key(2), delta(3))
    cache.gop.shed()
    assert cache.start() == []
    assert cache.total == cache.gop.backlog_bytes == cost(40)
    cache.add(delta(4))
    assert cache.start() == []
    cache.add(key(5))
    assert cache.start() == [1, 5]


def test_clear_forgets_everything() -> None:
    """When the publisher leaves or is replaced nothing of its stream remains."""
    cache = Cache(10_000)
    cache.add(config(1), key(2), delta(3))
    cache.gop.clear()
    assert cache.start() == []
    assert cache.gop.config is None
    assert cache.gop.backlog_bytes == 0
    assert cache.total == 0
    cache.add(key(4))
    assert cache.start() == [4]


def test_backlog_counts_held_bytes() -> None:
    """backlog_bytes is the memory the cache holds, each message's bytes plus its
    overhead (it feeds the global budget)."""
    cache = Cache(10_000)
    cache.add(config(1, size=40), key(2, size=500), delta(3, size=60))
    assert cache.gop.backlog_bytes == cost(40, 500, 60)
    assert cache.total == cost(40, 500, 60)


def test_config_in_effect_at_the_key_is_charged_while_a_newer_one_is_cached() -> None:
    """A CONFIG sent mid-GOP is held in the GOP; the one in effect at the KEY is still
    held for joining viewers, and charged too, until the next KEY."""
    cache = Cache(10_000)
    cache.add(config(1), key(2), config(3, size=50))
    assert cache.start() == [1, 2, 3]
    assert cache.gop.backlog_bytes == cache.total == cost(40, 100, 50)
    cache.add(key(4))
    assert cache.start() == [3, 4]
    assert cache.gop.backlog_bytes == cache.total == cost(50, 100)


def test_a_flood_of_tiny_messages_hits_the_message_cap() -> None:
    """Over --gop-cache-messages the cache empties until the next KEY, whatever the
    bytes: the memory of a cache of tiny messages is known (cap x cost)."""
    cache = Cache(10**9, max_messages=100)
    cache.add(config(1), key(2, size=9))
    for tag in range(3, 102):
        cache.add(delta(tag, size=9))
    assert cache.gop.message_count == 100
    assert len(cache.start()) == 101
    cache.add(delta(102, size=9))
    assert cache.start() == []
    assert cache.gop.emptied == 1
    assert cache.total == cache.gop.backlog_bytes == cost(40)
    for tag in range(103, 1000):
        cache.add(delta(tag, size=9))
    assert cache.start() == []
    cache.add(key(1000, size=9), delta(1001, size=9))
    assert cache.start() == [1, 1000, 1001]


def test_the_charge_of_a_tiny_message_is_mostly_overhead() -> None:
    """200,000 payload bytes of 9-byte messages are charged as the memory they take, not
    as 200 KB: the byte bound empties the cache long before."""
    limit = 1_000_000
    cache = Cache(limit, max_messages=10**9)
    cache.add(key(1, size=9))
    most = 0
    for tag in range(2, 20_000):
        cache.add(delta(tag, size=9))
        most = max(most, cache.gop.message_count)
        assert cache.gop.backlog_bytes <= limit
    assert cache.gop.emptied == 1
    assert most == limit // cost(9)


_messages = st.lists(
    st.tuples(st.sampled_from([0, FLAG_KEY, FLAG_CONFIG]), st.integers(9, 300)), max_size=60
)


@given(
    messages=_messages,
    limit=st.integers(0, 1500),
    sheds=st.sets(st.integers(0, 59)),
    clear_at=st.sets(st.integers(0, 59)),
)
def test_resize_deltas_always_sum_to_backlog(
    messages: list[tuple[int, int]], limit: int, sheds: set[int], clear_at: set[int]
) -> None:
    """Whatever arrives, the deltas reported to the budget add up to backlog_bytes (the
    global bound stays exact) and the start sequence is CONFIG? KEY ... in order,
    within the bound, every message of it sent after its KEY."""
    cache = Cache(limit)
    sent: list[MediaInfo] = []
    for index, (flags, size) in enumerate(messages):
        message = media(flags, index, size)
        cache.add(message)
        sent.append(message)
        if index in sheds:
            cache.gop.shed()
        if index in clear_at:
            cache.gop.clear()
            sent = []
        assert cache.total == cache.gop.backlog_bytes
        tags = cache.start()
        if not tags:
            continue
        sequence = [m for m, _ in cache.gop.start_sequence()]
        body = sequence[1:] if sequence[0].is_config else sequence
        assert body[0].is_key
        assert not any(m.is_key for m in body[1:])
        assert cost(*(m.size for m in body)) <= limit
        assert tags == sorted(tags)
        # The body is exactly what was sent from the latest KEY on.
        latest_key = max(i for i, m in enumerate(sent) if m.is_key)
        assert [m.capture_time_us for m in body] == [
            m.capture_time_us for m in sent[latest_key:]
        ]
        if sequence[0].is_config:
            configs_before_key = [m for m in sent[:latest_key] if m.is_config]
            assert sequence[0] is configs_before_key[-1]
