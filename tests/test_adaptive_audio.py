"""An adaptive viewer that takes audio (``?abr=1&audio=1``) across rendition switches,
on the network-free core: per viewer, audio capture times strictly increase and every
gap is announced by a ``dropped`` notice (docs/protocol.md "Audio")."""

from __future__ import annotations

import json

import pytest

from streamrelay.abr import Decision
from streamrelay.adaptive import AdaptiveSession, watch_adaptive
from streamrelay.limits import Refusal
from streamrelay.streams import SWITCH_AUDIO_MESSAGES, PublisherSession
from streamrelay.wire import (
    FLAG_AUDIO,
    FLAG_CONFIG,
    FLAG_KEY,
    MediaMessage,
    encode_media,
    parse_media,
)
from tests.test_adaptive import LIMIT, Renditions, message
from tests.test_streams import FakeViewer

PACKET_US = 20_000  # one Opus packet


def audio(capture_us: int, rendition: int) -> MediaMessage:
    """An audio packet captured at ``capture_us``, its payload telling its rendition."""
    return parse_media(encode_media(FLAG_AUDIO, capture_us, bytes([rendition]) * 40))


def watch_with_audio(renditions: Renditions) -> tuple[AdaptiveSession, FakeViewer]:
    sink = FakeViewer()
    session = watch_adaptive(renditions.core.registry, "cam", sink, "10.0.0.1", audio=True)
    assert isinstance(session, AdaptiveSession), session
    return session, sink


def audio_events(viewer: FakeViewer) -> list[tuple[str, int]]:
    """("audio", capture time) and ("dropped", count) in the order the viewer got them."""
    events: list[tuple[str, int]] = []
    for is_binary, payload in viewer.frames:
        if is_binary:
            media = parse_media(payload)
            if media.flags & FLAG_AUDIO:
                events.append(("audio", media.capture_time_us))
        else:
            text = json.loads(payload)
            if text.get("type") == "dropped" and "audio" in text:
                events.append(("dropped", text["audio"]))
    return events


def assert_audio_contract(viewer: FakeViewer, step_us: int = PACKET_US) -> list[int]:
    """Capture times strictly increase; a gap of more than a packet has a ``dropped``
    notice before the audio after it.  Returns the capture times."""
    captures: list[int] = []
    announced = 0
    for kind, value in audio_events(viewer):
        if kind == "dropped":
            announced += value
            continue
        if captures:
            assert value > captures[-1], f"audio went back or repeated: {captures[-1]} -> {value}"
            missing = (value - captures[-1]) // step_us - 1
            assert missing <= announced, f"{missing} audio packets lost unannounced before {value}"
        captures.append(value)
        announced = 0
    return captures


def publishers(renditions: Renditions) -> list[PublisherSession]:
    return [session for session, _ in renditions.publishers]


def test_audio_after_a_switch_whose_key_does_not_fit_is_delivered_or_announced() -> None:
    """A backlog near the bound, then a step down whose KEY does not fit: the queue
    waits for a KEY, but the audio that follows is delivered within the bound, and what
    does not fit is counted and announced (it used to vanish, uncounted)."""
    renditions = Renditions()
    session, viewer = watch_with_audio(renditions)
    pubs = publishers(renditions)
    queue = session.queue
    queue.pause_producing()
    t = 100
    while queue.backlog_bytes < LIMIT - 20_000:
        t += 1
        pubs[0].media(message(0, 0, t, 6000))
        for publisher in pubs:
            publisher.media(audio(t, 0))
    session._begin(Decision(1, "down"))
    t += 1
    for index in (1, 0, 2):
        pubs[index].media(message(FLAG_CONFIG, index, t, 40))
        pubs[index].media(message(FLAG_KEY, index, t, 30_000))
    for publisher in pubs:
        publisher.media(audio(t, 0))
    assert session.stream.name == "cam~360p" and queue.waiting_for_key
    first_after = t
    for _ in range(999):
        t += 1
        for publisher in pubs:
            publisher.media(audio(t, 0))
    assert queue.backlog_bytes <= LIMIT
    assert queue.audio_dropped_total > 0
    t += 1
    for index, publisher in enumerate(pubs):
        publisher.media(message(FLAG_CONFIG, index, t, 40))
        publisher.media(message(FLAG_KEY, index, t, 3000))
    queue.resume_producing()
    captures = assert_audio_contract(viewer, step_us=1)
    after = [capture for capture in captures if capture >= first_after]
    assert after, "no audio delivered after the switch"
    assert len(after) + queue.audio_dropped_total == 1000


def skewed_switch(skew_us: int, key_offset_us: int) -> tuple[AdaptiveSession, FakeViewer, int]:
    """Audio every packet on all three renditions, rendition 1 ``skew_us`` behind
    (negative: ahead) of the others; a step down to rendition 1, whose KEY is captured
    ``key_offset_us`` from the newest source audio.  Returns the last capture time
    rendition 1 sent."""
    renditions = Renditions()
    session, viewer = watch_with_audio(renditions)
    pubs = publishers(renditions)
    t = 1_000_000
    last_target = 0
    for step in range(60):
        t += PACKET_US
        pubs[0].media(audio(t, 0))
        pubs[2].media(audio(t, 2))
        if t - skew_us > 1_000_000:
            last_target = t - skew_us
            pubs[1].media(audio(last_target, 1))
        if step == 20:
            session._begin(Decision(1, "down"))
        if step == 25:
            for index in (1, 0, 2):
                pubs[index].media(message(FLAG_CONFIG, index, t + key_offset_us, 40))
                pubs[index].media(message(FLAG_KEY, index, t + key_offset_us, 600))
    assert session.stream.name == "cam~360p"
    return session, viewer, last_target


@pytest.mark.parametrize(
    ("skew_us", "key_offset_us"),
    [
        (0, 0),
        (2 * PACKET_US, -3 * PACKET_US),
        (-2 * PACKET_US, -3 * PACKET_US),
        (-2 * PACKET_US, 0),
        (3 * PACKET_US, 0),
    ],
)
def test_renditions_audio_out_of_step_is_neither_repeated_nor_lost(
    skew_us: int, key_offset_us: int
) -> None:
    """Whether the new rendition's audio lags, leads or is in step with the old one's,
    and whether its KEY is captured before or with the newest audio: no capture time
    twice, none going back, every packet from the first on to what the new rendition
    sent delivered (audio that ran ahead is replayed from its GOP cache)."""
    _, viewer, last_target = skewed_switch(skew_us, key_offset_us)
    captures = assert_audio_contract(viewer)
    assert captures[-1] == last_target
    expected = list(range(captures[0], last_target + 1, PACKET_US))
    assert captures == expected


def lagging_switch(lag: int, wait: int) -> tuple[AdaptiveSession, FakeViewer]:
    """The viewer's rendition's audio lags the others' by ``lag`` packets; a step down
    waits ``wait`` packets for the target's KEY, which comes with the newest audio."""
    renditions = Renditions()
    session, viewer = watch_with_audio(renditions)
    pubs = publishers(renditions)
    t = 1_000_000
    for step in range(80):
        t += PACKET_US
        pubs[1].media(audio(t, 1))
        pubs[2].media(audio(t, 2))
        if t - lag * PACKET_US > 1_000_000:
            pubs[0].media(audio(t - lag * PACKET_US, 0))
        if step == 10:
            session._begin(Decision(1, "down"))
        if step == 10 + wait:
            for index in (1, 0, 2):
                pubs[index].media(message(FLAG_CONFIG, index, t, 40))
                pubs[index].media(message(FLAG_KEY, index, t, 600))
    assert session.stream.name == "cam~360p"
    return session, viewer


def test_audio_the_new_rendition_sent_before_its_key_is_not_lost() -> None:
    """The old rendition's audio lags by 4 packets: those the new one sent while the
    switch waited for its KEY come right after it, nothing is missing or announced."""
    session, viewer = lagging_switch(lag=4, wait=5)
    captures = assert_audio_contract(viewer)
    assert captures == list(range(captures[0], captures[-1] + 1, PACKET_US))
    assert session.queue.audio_dropped_total == 0


def test_audio_the_new_rendition_sent_before_the_switch_began_is_not_lost() -> None:
    """The same when the KEY comes right after the switch began: the new rendition's
    audio the old one has not delivered yet is taken from its GOP cache."""
    session, viewer = lagging_switch(lag=4, wait=1)
    captures = assert_audio_contract(viewer)
    assert captures == list(range(captures[0], captures[-1] + 1, PACKET_US))
    assert session.queue.audio_dropped_total == 0


def test_a_gap_a_switch_leaves_is_announced() -> None:
    """The old rendition's audio lags by more than the audio kept for a switch
    (SWITCH_AUDIO_MESSAGES packets): the viewer is told how many packets it misses,
    before the audio after them."""
    lag = SWITCH_AUDIO_MESSAGES + 4
    session, viewer = lagging_switch(lag=lag, wait=lag + 2)
    assert ("dropped", 4) in audio_events(viewer)
    assert_audio_contract(viewer)
    assert session.queue.audio_dropped_total == 4


def test_a_switch_to_a_full_rendition_does_not_happen() -> None:
    """--max-viewers-per-stream holds for switches too: a rendition at its limit is not
    switched to (counted), the viewer stays where it is."""
    renditions = Renditions(max_viewers_per_stream=1)
    target_viewer = FakeViewer()
    plain = renditions.core.registry.watch("cam~360p", target_viewer, "10.0.0.2")
    assert not isinstance(plain, Refusal) and renditions.viewers_of("cam~360p") == 1
    session, _ = watch_with_audio(renditions)
    session._begin(Decision(1, "down"))
    renditions.frames(key=True)
    assert session.stream.name == "cam"
    assert renditions.viewers_of("cam~360p") == 1
    registry = renditions.core.registry
    assert registry.rendition_switches_refused == {"viewer_limit": 1}
    assert "down" not in registry.rendition_switches


def test_a_rendition_that_fills_up_while_the_switch_waits_is_not_switched_to() -> None:
    """The target had room when the switch began, but another viewer took the last
    place before its KEY came: no switch, counted, the viewer stays where it is."""
    renditions = Renditions(max_viewers_per_stream=1)
    session, _ = watch_with_audio(renditions)
    session._begin(Decision(1, "down"))
    plain = renditions.core.registry.watch("cam~360p", FakeViewer(), "10.0.0.2")
    assert not isinstance(plain, Refusal), plain
    renditions.frames(key=True)
    assert session.stream.name == "cam"
    assert renditions.viewers_of("cam~360p") == 1 and renditions.viewers_of("cam") == 1
    assert renditions.core.registry.rendition_switches_refused == {"viewer_limit": 1}
    assert not renditions.core.registry.streams["cam~360p"].switchers
