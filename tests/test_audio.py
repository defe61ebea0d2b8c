"""Audio through the relay's core (docs/protocol.md, "Audio"): the AUDIO flag, the GOP
cache's audio, audio only to viewers that ask for it, audio kept through video drop
episodes and dropped, then resumed, under pressure; with a Clock and no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from streamrelay.budget import MESSAGE_OVERHEAD_BYTES
from streamrelay.client import ClientStats, StreamListener
from streamrelay.gop import PENDING_AUDIO_MESSAGES, GopCache
from streamrelay.streams import ViewerSession
from streamrelay.wire import (
    FLAG_AUDIO,
    FLAG_CONFIG,
    FLAG_KEY,
    MediaMessage,
    WireError,
    encode_media,
    parse_media,
)
from tests.test_streams import Core, FakeViewer, config_msg, delta_msg, key_msg, send

AUDIO_BYTES = 160  # a 20 ms Opus packet at ~64 kbit/s


def audio_msg(tag: int, size: int = AUDIO_BYTES) -> MediaMessage:
    """An audio message whose capture time is ``tag``."""
    return parse_media(encode_media(FLAG_AUDIO, tag, b"a" * (size - 9)))


def kinds(viewer: FakeViewer) -> list[tuple[str, int]]:
    """Each media message as (kind, capture time): "A" audio, "K" KEY, "C" CONFIG, "D"."""
    result = []
    for is_binary, payload in viewer.frames:
        if is_binary:
            message = parse_media(payload)
            kind = (
                "A"
                if message.is_audio
                else "K"
                if message.is_key
                else "C"
                if message.is_config
                else "D"
            )
            result.append((kind, message.capture_time_us))
    return result


def audio_watch(core: Core, name: str = "cam") -> tuple[ViewerSession, FakeViewer]:
    """A viewer that asked for audio (``?audio=1``)."""
    sink = FakeViewer()
    session = core.registry.watch(name, sink, audio=True)
    assert isinstance(session, ViewerSession), session
    return session, sink


# -- wire ---------------------------------------------------------------------------------


def test_audio_flag_parses_and_is_exclusive() -> None:
    """0x04 AUDIO is a valid flag on its own; with KEY or CONFIG it breaks v1."""
    message = parse_media(encode_media(FLAG_AUDIO, 7, b"opus"))
    assert message.is_audio and not message.is_key and not message.is_config
    assert message.payload == b"opus"
    for flags in (FLAG_AUDIO | FLAG_KEY, FLAG_AUDIO | FLAG_CONFIG):
        with pytest.raises(WireError, match="exclusive"):
            parse_media(bytes([flags]) + bytes(8) + b"x")


# -- the GOP cache --------------------------------------------------------------------------


def _cache(limit: int = 1 << 20, max_messages: int = 4096) -> tuple[GopCache[Any], list[int]]:
    sizes: list[int] = []
    return GopCache(limit, sizes.append, max_messages), sizes


def _cache_with(*messages: MediaMessage) -> tuple[GopCache[Any], list[int]]:
    """:func:`_cache` after ``messages`` were added to it in this order."""
    cache, sizes = _cache()
    for message in messages:
        cache.add(message.info(), message.capture_time_us)
    return cache, sizes


def _tags(items: list[Any]) -> list[int]:
    return [message.capture_time_us for message, _frame in items]


def test_gop_cache_keeps_audio_from_the_key_in_arrival_order() -> None:
    """Audio after a KEY is cached with its GOP, interleaved in arrival order; audio of
    an older GOP goes with it; a joiner without audio gets the GOP without it."""
    cache, _ = _cache_with(
        key_msg(10),
        audio_msg(11),
        delta_msg(12),
        key_msg(20),
        audio_msg(21),
        delta_msg(22),
        audio_msg(23),
    )
    assert _tags(cache.start_sequence(audio=True)) == [20, 21, 22, 23]
    assert _tags(cache.start_sequence()) == [20, 22]


def test_gop_cache_carries_audio_captured_after_the_key_but_sent_before_it() -> None:
    """The video encoder is slower than the audio one: audio captured at or after a KEY
    that arrived before it belongs to the KEY's GOP (after the KEY, never before it);
    older audio does not."""
    cache, _ = _cache_with(
        key_msg(10),
        audio_msg(95),
        delta_msg(90),
        audio_msg(100),
        audio_msg(105),
        key_msg(100),
        audio_msg(110),
    )
    assert _tags(cache.start_sequence(audio=True)) == [100, 100, 105, 110]
    assert _tags(cache.start_sequence()) == [100]


def test_gop_cache_leaves_out_audio_captured_before_its_key_but_sent_after() -> None:
    """Audio capture buffers more than video: packets captured before a KEY may arrive
    after it; they belong to the GOP that is gone and are not cached."""
    cache, sizes = _cache_with(
        key_msg(100), audio_msg(80), audio_msg(100), delta_msg(110), audio_msg(120)
    )
    assert _tags(cache.start_sequence(audio=True)) == [100, 100, 110, 120]
    assert cache.backlog_bytes == sum(sizes)


def test_audio_before_any_key_waits_in_a_small_bounded_list() -> None:
    """With no KEY yet, audio waits within a second's packets (its memory counted); the
    first KEY takes what was captured from its capture time on."""
    cache, sizes = _cache()
    total = PENDING_AUDIO_MESSAGES + 30
    for tag in range(total):
        cache.add(audio_msg(tag).info(), tag)
    assert not cache.has_keyframe
    assert cache.start_sequence(audio=True) == []
    expected = PENDING_AUDIO_MESSAGES * (AUDIO_BYTES + MESSAGE_OVERHEAD_BYTES)
    assert cache.backlog_bytes == expected == sum(sizes)
    cache.add(key_msg(total - 5).info(), -1)
    assert _tags(cache.start_sequence(audio=True)) == [total - 5, *range(total - 5, total)]
    assert cache.backlog_bytes == sum(sizes)


def test_gop_cache_bounds_count_audio() -> None:
    """Audio counts in the cache's bytes (size plus overhead) and in its message count:
    over either, the cache empties until the next KEY, audio and all."""
    cache, sizes = _cache(max_messages=10)
    cache.add(key_msg(1).info(), 1)
    for tag in range(2, 11):
        cache.add(audio_msg(tag).info(), tag)
    assert cache.message_count == 10
    assert cache.backlog_bytes == sum(sizes) == 100 + 9 * AUDIO_BYTES + 10 * MESSAGE_OVERHEAD_BYTES
    cache.add(audio_msg(11).info(), 11)
    assert not cache.has_keyframe and cache.backlog_bytes == 0 == sum(sizes)
    small, small_sizes = _cache(limit=2 * (AUDIO_BYTES + MESSAGE_OVERHEAD_BYTES))
    small.add(key_msg(1).info(), 1)
    small.add(audio_msg(2).info(), 2)
    small.add(audio_msg(3).info(), 3)
    assert not small.has_keyframe and sum(small_sizes) == small.backlog_bytes


def test_gop_cache_off_keeps_no_audio() -> None:
    """With the cache off (limit 0) no audio is kept, with or without a KEY."""
    cache, sizes = _cache(limit=0)
    cache.add(audio_msg(1).info(), 1)
    cache.add(key_msg(2).info(), 2)
    cache.add(audio_msg(3).info(), 3)
    assert cache.backlog_bytes == 0 == sum(sizes)


# -- fan-out --------------------------------------------------------------------------------


def test_plain_viewers_never_get_audio() -> None:
    """A viewer that did not ask for audio (every v1 viewer) gets no AUDIO message, live
    or in its join burst; an audio viewer gets every one, in order."""
    core = Core()
    publisher, _link = core.publish()
    send(publisher, config_msg(1), key_msg(2), audio_msg(3), delta_msg(4), audio_msg(5))
    _plain_session, plain = core.watch()
    _audio_session, listener = audio_watch(core)
    send(publisher, audio_msg(6), delta_msg(7), audio_msg(8))
    assert kinds(plain) == [("C", 1), ("K", 2), ("D", 4), ("D", 7)]
    assert kinds(listener) == [
        ("C", 1),
        ("K", 2),
        ("A", 3),
        ("D", 4),
        ("A", 5),
        ("A", 6),
        ("D", 7),
        ("A", 8),
    ]


def test_joiner_first_audio_is_after_its_first_key() -> None:
    """A viewer that joins with no cached KEY gets no audio until its first KEY, then the
    audio that follows it."""
    core = Core()
    _session, listener = audio_watch(core)
    publisher, _link = core.publish()
    send(publisher, audio_msg(1), audio_msg(2), config_msg(3), key_msg(4), audio_msg(5))
    assert kinds(listener) == [("C", 3), ("K", 4), ("A", 5)]


def test_live_first_key_audio_starts_at_its_capture_time() -> None:
    """A viewer that waited for its first KEY gets no audio captured before that KEY,
    even when it arrives after it; a viewer that kept up gets every packet."""
    core = Core()
    _s, waiting = audio_watch(core)
    publisher, _link = core.publish()
    send(publisher, key_msg(100), audio_msg(60), audio_msg(80), audio_msg(100), delta_msg(133))
    send(publisher, key_msg(200), audio_msg(180))
    assert kinds(waiting) == [("K", 100), ("A", 100), ("D", 133), ("K", 200), ("A", 180)]


def test_an_edge_always_gets_audio() -> None:
    """A relay pulling the stream (``/relay/``) gets the audio: it may serve audio viewers."""
    core = Core()
    publisher, _link = core.publish()
    send(publisher, key_msg(1), audio_msg(2))
    sink = FakeViewer()
    session = core.registry.relay("cam", sink)
    assert isinstance(session, ViewerSession)
    send(publisher, audio_msg(3))
    assert kinds(sink) == [("K", 1), ("A", 2), ("A", 3)]


def test_audio_notice_from_upstream_reaches_audio_viewers() -> None:
    """An upstream's audio gap (an edge hears ``dropped`` with ``audio``) precedes the
    next audio of every audio viewer with the count; plain viewers hear nothing."""
    core = Core()
    publisher, _link = core.publish()
    send(publisher, key_msg(1))
    _a, listener = audio_watch(core)
    _p, plain = core.watch()
    publisher.audio_gap(4)
    send(publisher, audio_msg(2))
    assert listener.texts()[-1] == {"type": "dropped", "audio": 4}
    assert kinds(listener)[-1] == ("A", 2)
    assert all(text.get("type") != "dropped" for text in plain.texts())


# -- drop episodes ------------------------------------------------------------------------


def test_audio_goes_on_while_video_drops() -> None:
    """A viewer whose link cannot take the video enters a drop episode: its queued video
    is discarded, its queued audio is kept, and new audio is still delivered while the
    backlog is within the bound; the video resumes at a KEY with ``dropped``."""
    core = Core(viewer_queue_bytes=200_000)
    publisher, _link = core.publish()
    send(publisher, key_msg(1))
    session, listener = audio_watch(core)
    session.queue.pause_producing()
    send(publisher, audio_msg(2), delta_msg(3, 5000), audio_msg(4))
    # Over the bound: the video drops, audio stays queued and keeps coming.
    send(publisher, delta_msg(5, 150_000), delta_msg(6, 150_000), audio_msg(7), delta_msg(8))
    assert session.queue.skipping
    session.queue.resume_producing()
    send(publisher, audio_msg(9), delta_msg(10), key_msg(11), audio_msg(12))
    assert kinds(listener) == [
        ("K", 1),
        ("A", 2),
        ("A", 4),
        ("A", 7),
        ("A", 9),
        ("K", 11),
        ("A", 12),
    ]
    dropped = [t for t in listener.texts() if t.get("type") == "dropped"]
    assert dropped == [{"type": "dropped", "messages": 5}]
    assert session.queue.audio_dropped_total == 0


def test_audio_drops_when_even_audio_does_not_fit_and_resumes_with_a_count() -> None:
    """When even the audio cannot keep up (the transport stays full past the bound),
    audio drops too; once there is room again it resumes with ``{"type": "dropped",
    "audio": N}`` just before the first audio delivered, and N counts what was lost."""
    limit = 80_000
    core = Core(viewer_queue_bytes=limit)
    publisher, _link = core.publish()
    send(publisher, key_msg(1))
    session, listener = audio_watch(core)
    queue = session.queue
    queue.pause_producing()
    send(publisher, delta_msg(2, 70_000), delta_msg(3, 20_000))
    assert queue.skipping
    sent = 0
    while queue.backlog_bytes + AUDIO_BYTES + MESSAGE_OVERHEAD_BYTES <= limit:
        sent += 1
        send(publisher, audio_msg(10 + sent))
    lost = 7
    for index in range(lost):
        send(publisher, audio_msg(1000 + index))
    assert queue.audio_dropped_total == lost
    assert queue.backlog_bytes <= limit
    queue.resume_producing()
    send(publisher, audio_msg(2000))
    texts = listener.texts()
    assert texts[-1] == {"type": "dropped", "audio": lost}
    audio_tags = [tag for kind, tag in kinds(listener) if kind == "A"]
    assert audio_tags == [10 + n for n in range(1, sent + 1)] + [2000]
    # The notice sits right before the audio that resumes.
    assert listener.frames[-2] == (False, b'{"type":"dropped","audio":7}')


def test_budget_shed_lets_queued_audio_go_and_counts_it() -> None:
    """The global budget's shed (memory over --max-buffered-bytes) frees queued audio
    too, counted as audio dropped; the viewer's bytes are all given back."""
    core = Core()
    publisher, _link = core.publish()
    send(publisher, key_msg(1))
    session, listener = audio_watch(core)
    queue = session.queue
    queue.pause_producing()
    send(publisher, audio_msg(2), delta_msg(3), audio_msg(4))
    held = queue.backlog_bytes
    assert held > 0
    budget_before = core.registry.budget.total
    queue.shed()
    assert queue.audio_dropped_total == 2
    assert core.registry.budget.total == budget_before - (held - queue.backlog_bytes)
    queue.resume_producing()
    send(publisher, audio_msg(5))
    assert listener.texts()[-1] == {"type": "dropped", "audio": 2}


def test_budget_counts_audio_in_queues_and_cache() -> None:
    """Audio held for a paused viewer and in the GOP cache counts in the global budget as
    video does: its size plus the per-message overhead."""
    core = Core()
    publisher, _link = core.publish()
    send(publisher, key_msg(1))
    session, _listener = audio_watch(core)
    _plain_session, _plain = core.watch()
    base = core.registry.budget.total
    session.queue.pause_producing()
    send(publisher, audio_msg(2))
    # Once in the cache, once in the paused audio viewer's queue; nothing for the other.
    cost = AUDIO_BYTES + MESSAGE_OVERHEAD_BYTES
    assert core.registry.budget.total - base == 2 * cost


def test_plain_viewer_queue_is_never_offered_audio() -> None:
    """The stream keeps audio viewers apart: a plain viewer's queue is not in the list
    an audio message walks, so it costs nothing per audio message."""
    core = Core()
    core.publish()
    plain_session, _plain = core.watch()
    audio_session, _listener = audio_watch(core)
    stream = core.registry.streams["cam"]
    assert list(stream.audio_viewers.values()) == [audio_session.queue]
    plain_session.close()
    audio_session.close()
    assert stream.audio_viewers == {}


# -- the Python client --------------------------------------------------------------------


def test_client_reports_audio_drop_notices() -> None:
    """The client hands ``{"type": "dropped", "audio": N}`` to ``audio_dropped`` (an edge
    passes it on), not to ``dropped`` (which would be a video gap)."""
    from streamrelay.client import StreamClient

    heard: list[tuple[str, int]] = []

    class Listener(StreamListener):
        def dropped(self, count: int) -> None:
            heard.append(("video", count))

        def audio_dropped(self, count: int) -> None:
            heard.append(("audio", count))

    client = StreamClient.__new__(StreamClient)
    client.listener = Listener()
    client.stats = ClientStats()
    connection: Any = object()
    client.session = connection
    from streamrelay.client import ClientState

    client.state = ClientState.OPEN
    client.message_received(connection, b'{"type":"dropped","audio":3}', False)
    client.message_received(connection, b'{"type":"dropped","messages":2}', False)
    assert heard == [("audio", 3), ("video", 2)]
    assert client.stats.audio_dropped == 3
