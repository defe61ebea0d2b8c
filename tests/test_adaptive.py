"""Switching an adaptive viewer between renditions (streamrelay.adaptive) on the
network-free core: a Clock, fake publishers and viewers, no sockets."""

from __future__ import annotations

import json
from typing import Any

from streamrelay.adaptive import AdaptiveSession, watch_adaptive
from streamrelay.streams import PublisherSession, ViewerSession
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage, encode_media, parse_media
from tests.test_abr import SET
from tests.test_streams import Core, FakePublisher, FakeViewer

STREAMS = ["cam", "cam~360p", "cam~180p"]
LIMIT = 400_000
SETTINGS = AdaptiveSession.settings


def message(flags: int, rendition: int, number: int, size: int = 200) -> MediaMessage:
    """A media message of source frame ``number`` (its capture time, the same in every
    rendition, as the renditions contract says) whose payload bytes tell its rendition."""
    return parse_media(encode_media(flags, number, bytes([rendition]) * (size - 9)))


def rendition_of(media: MediaMessage) -> int:
    return media.data[9]


class Renditions:
    """Three GOP-aligned rendition publishers on one core, and adaptive viewers."""

    def __init__(self, **overrides: Any) -> None:
        self.core = Core(viewer_queue_bytes=LIMIT, **overrides)
        self.publishers: list[tuple[PublisherSession, FakePublisher]] = [
            self.core.publish(name) for name in STREAMS
        ]
        self.frame = 0
        for index, (session, _) in enumerate(self.publishers):
            meta = {"type": "meta", "width": SET[index]["width"], "rendition": SET[index]["name"],
                    "renditions": SET}  # fmt: skip
            session.meta(json.dumps(meta).encode())
        self.frames(key=True)

    def frames(self, key: bool = False, sizes: tuple[int, ...] = (6000, 2000, 700)) -> None:
        """One source frame in every rendition (CONFIG first when ``key``)."""
        self.frame += 1
        for index, (session, _) in enumerate(self.publishers):
            if key:
                session.media(message(FLAG_CONFIG, index, self.frame, 40))
                session.media(message(FLAG_KEY, index, self.frame, sizes[index] * 3))
            else:
                session.media(message(0, index, self.frame, sizes[index]))

    def watch(self, name: str = "cam") -> tuple[ViewerSession, FakeViewer]:
        sink = FakeViewer()
        session = watch_adaptive(self.core.registry, name, sink, "10.0.0.1")
        assert isinstance(session, ViewerSession), session
        return session, sink

    def viewers_of(self, name: str) -> int:
        stream = self.core.registry.streams.get(name)
        return len(stream.viewers) if stream is not None else 0

    def tick(self, seconds: float, fps: int = 20, gop: int | None = None) -> None:
        """``seconds`` of source frames at ``fps``, the clock advancing between them; a
        KEY in every rendition each ``gop`` frames (None: none)."""
        for _ in range(round(seconds * fps)):
            self.core.clock.advance(1 / fps)
            self.frames(key=gop is not None and self.frame % gop == 0)


def renditions_seen(viewer: FakeViewer) -> list[int]:
    """The rendition of every media message received, in order."""
    return [rendition_of(parse_media(payload)) for is_binary, payload in viewer.frames if is_binary]


def announcements(viewer: FakeViewer) -> list[dict[str, Any]]:
    return [text for text in viewer.texts() if text.get("type") == "rendition"]


def assert_clean_switches(viewer: FakeViewer) -> None:
    """Never a P-frame of one rendition after a KEY of another; every rendition change
    begins with that rendition's CONFIG, then its KEY, announced before."""
    current = None
    announced = None
    latest = 0
    for is_binary, payload in viewer.frames:
        if not is_binary:
            text = json.loads(payload)
            if text.get("type") == "rendition":
                announced = STREAMS.index(text["stream"])
            continue
        media = parse_media(payload)
        rendition = rendition_of(media)
        assert media.capture_time_us >= latest, "a switch went back in time"
        latest = media.capture_time_us
        if media.is_config:
            assert current is None or rendition == current or rendition == announced
            if rendition != current:
                assert rendition == announced, "a CONFIG of a rendition not announced"
                current = rendition
                awaiting_key = True
            continue
        assert rendition == current, f"media of {rendition} while on {current}"
        if media.is_key:
            awaiting_key = False
        assert not awaiting_key, "a P-frame before the new rendition's KEY"


def back_up(session: ViewerSession, renditions: Renditions, seconds: float) -> None:
    """The viewer's transport is full for ``seconds`` of frames."""
    session.queue.pause_producing()
    renditions.tick(seconds)


def stepped_down(renditions: Renditions) -> tuple[ViewerSession, FakeViewer]:
    """A viewer whose transport was full for 2 s of frames, then drained after a KEY on
    every rendition: it has stepped down. Returns its session and its viewer."""
    session, viewer = renditions.watch()
    back_up(session, renditions, 2.0)
    renditions.frames(key=True)
    session.queue.resume_producing()
    return session, viewer


def test_an_adaptive_viewer_starts_on_the_top_rendition_and_is_told() -> None:
    """``rendition`` (reason start) comes before the meta and the first CONFIG."""
    renditions = Renditions()
    session, viewer = renditions.watch()
    assert isinstance(session, AdaptiveSession)
    texts = viewer.texts()
    assert texts[0] == {"type": "status", "state": "live"}
    assert texts[1]["type"] == "rendition" and texts[1]["reason"] == "start"
    assert texts[1]["stream"] == "cam" and texts[1]["width"] == 1280
    assert texts[2]["type"] == "meta"
    assert renditions_seen(viewer) == [0, 0]


def test_a_viewer_that_falls_behind_steps_down_at_a_key_before_any_drop() -> None:
    """Backed up: the relay asks the lower rendition for a KEY, switches there, and the
    viewer gets the old backlog, then rendition/meta/CONFIG/KEY of the new one; no drop
    episode, no P-frame of the old one after the new KEY; the counts follow."""
    renditions = Renditions()
    session, viewer = renditions.watch()
    requests_before = len(renditions.publishers[1][1].keyframe_requests) + len(
        renditions.publishers[2][1].keyframe_requests
    )
    back_up(session, renditions, 2.0)
    assert session.stream.name == "cam"  # waiting for the target's KEY
    requests_after = len(renditions.publishers[1][1].keyframe_requests) + len(
        renditions.publishers[2][1].keyframe_requests
    )
    assert requests_after > requests_before
    renditions.frames(key=True)
    assert session.stream.name != "cam"
    assert renditions.viewers_of("cam") == 0
    assert renditions.viewers_of(session.stream.name) == 1
    session.queue.resume_producing()
    renditions.tick(1.0)
    assert session.queue.dropped_total == 0
    assert session.queue.skip_episodes == 0
    assert not any(text.get("type") == "dropped" for text in viewer.texts())
    assert_clean_switches(viewer)
    down = announcements(viewer)[-1]
    assert down["reason"] == "down" and down["stream"] == session.stream.name
    assert set(renditions_seen(viewer)) == {0, STREAMS.index(session.stream.name)}


def test_after_headroom_the_viewer_steps_back_up_one_rendition_at_a_time() -> None:
    """On the lowest rendition with nothing queued for the up hold (and no recent
    capacity measurement holding it down), the viewer steps up at the next natural KEY."""
    renditions = Renditions()
    session, viewer = stepped_down(renditions)
    reached = session.stream.name
    assert reached != "cam"
    # Calm long enough for the hold and for the old measurement to expire, with a
    # natural KEY every two seconds.
    renditions.tick(SETTINGS.estimate_ttl + SETTINGS.up_hold + 2, gop=40)
    assert STREAMS.index(session.stream.name) == STREAMS.index(reached) - 1
    assert announcements(viewer)[-1]["reason"] == "up"
    renditions.tick(0.5)
    assert_clean_switches(viewer)
    assert session.queue.skip_episodes == 0


def test_a_plain_viewer_is_not_adaptive_and_sees_only_its_stream() -> None:
    """Without abr: a plain session, no ``rendition`` message, only its own stream's
    media, and a drop to keyframe as before when it backs up."""
    renditions = Renditions()
    session, viewer = renditions.core.watch("cam")
    assert type(session) is ViewerSession
    back_up(session, renditions, 6.0)
    renditions.frames(key=True)
    session.queue.resume_producing()
    renditions.frames(key=True)
    assert session.stream.name == "cam"
    assert announcements(viewer) == []
    assert set(renditions_seen(viewer)) == {0}
    assert session.queue.skip_episodes == 1


def test_abr_on_a_rendition_name_watches_it_plainly() -> None:
    """``/watch/cam~180p?abr=1``: that stream, not adaptive."""
    renditions = Renditions()
    session, viewer = renditions.watch("cam~180p")
    assert type(session) is ViewerSession
    assert set(renditions_seen(viewer)) == {2}


def test_on_the_lowest_rendition_the_drop_to_keyframe_applies_unchanged() -> None:
    """Nothing lower to go to: the viewer skips to the next KEY with ``dropped``."""
    renditions = Renditions()
    session, viewer = renditions.watch()
    session.queue.pause_producing()
    renditions.tick(8.0, gop=40)
    assert session.stream.name == "cam~180p"
    back_up(session, renditions, 30.0)
    assert session.queue.skipping
    session.queue.resume_producing()
    renditions.frames(key=True)
    assert any(text.get("type") == "dropped" for text in viewer.texts())
    assert session.stream.name == "cam~180p"
    assert_clean_switches(viewer)


def test_a_stream_without_renditions_keeps_an_adaptive_viewer_on_it() -> None:
    """abr on a stream whose meta announces no set: a plain v1 viewer in effect."""
    core = Core(viewer_queue_bytes=LIMIT)
    publisher, _ = core.publish("solo")
    publisher.meta(b'{"type":"meta","width":640}')
    sink = FakeViewer()
    session = watch_adaptive(core.registry, "solo", sink, None)
    assert isinstance(session, AdaptiveSession)
    publisher.media(message(FLAG_CONFIG, 0, 1, 40))
    publisher.media(message(FLAG_KEY, 0, 1, 3000))
    session.queue.pause_producing()
    for number in range(2, 200):
        core.clock.advance(0.05)
        publisher.media(message(0, 0, number, 3000))
    assert session.stream.name == "solo"
    assert not any(text.get("type") == "rendition" for text in sink.texts())
    # No observation timer while no set is announced: it costs a plain viewer's nothing.
    assert session._ticker is None  # type: ignore[attr-defined]


def test_a_set_announced_later_starts_adaptation() -> None:
    """An adaptive viewer that joined before the set was known is told its rendition
    (start) when the base's meta announces one, and is observed from then on."""
    core = Core(viewer_queue_bytes=LIMIT)
    publisher, _ = core.publish("cam")
    sink = FakeViewer()
    session = watch_adaptive(core.registry, "cam", sink, None)
    assert isinstance(session, AdaptiveSession)
    assert session._ticker is None  # type: ignore[attr-defined]
    publisher.meta(json.dumps({"type": "meta", "renditions": SET}).encode())
    starts = announcements(sink)
    assert [s["reason"] for s in starts] == ["start"] and starts[0]["stream"] == "cam"
    assert session._ticker is not None  # type: ignore[attr-defined]
    assert session.rendition is not None and session.rendition.stream == "cam"
    session.close()
    assert session._ticker is None  # type: ignore[attr-defined]


def test_a_malformed_set_leaves_the_stream_plain() -> None:
    """A meta whose set is malformed is ignored: no renditions, no crash."""
    core = Core()
    publisher, _ = core.publish("cam")
    bad = [dict(entry) for entry in SET]
    bad[1]["bitrate"] = -1
    publisher.meta(json.dumps({"type": "meta", "renditions": bad}).encode())
    assert core.registry.streams["cam"].renditions is None
    publisher.meta(json.dumps({"type": "meta", "renditions": SET}).encode())
    assert core.registry.streams["cam"].renditions is not None


def test_a_switch_whose_target_sends_no_key_is_given_up() -> None:
    """No KEY on the target within the switch timeout: the viewer stays, the target no
    longer holds it, and a later decision may try again."""
    renditions = Renditions()
    session, _viewer = renditions.watch()
    back_up(session, renditions, 1.5)
    target = next(
        stream for stream in renditions.core.registry.streams.values() if stream.switchers
    )
    renditions.tick(SETTINGS.switch_timeout + 0.5)
    assert not target.switchers or session.stream.name == "cam"
    assert session.stream.name == "cam"


def test_closing_during_a_switch_leaves_nothing_behind() -> None:
    """A viewer gone while waiting for the target's KEY: no switcher, no viewer, no
    timer left."""
    renditions = Renditions()
    session, _viewer = renditions.watch()
    back_up(session, renditions, 2.0)
    registry = renditions.core.registry
    assert any(stream.switchers for stream in registry.streams.values())
    session.close()
    assert not any(stream.switchers for stream in registry.streams.values())
    assert registry.viewer_count == 0
    # The session's own timers (observation, switch timeout) are gone.
    assert session._ticker is None and session._timeout is None  # type: ignore[attr-defined]


def test_the_viewer_counts_sent_to_each_rendition_follow_the_viewer() -> None:
    """The publisher of the rendition the viewer is on is told 1, the others 0: the
    publisher's sum stays right."""
    renditions = Renditions()
    session, _viewer = renditions.watch()
    renditions.tick(0.5)
    assert renditions.publishers[0][1].counts[-1][1] == 1
    back_up(session, renditions, 2.0)
    renditions.frames(key=True)
    session.queue.resume_producing()
    renditions.tick(0.5)
    on = STREAMS.index(session.stream.name)
    counts = [publisher.counts[-1][1] if publisher.counts else 0
              for _, publisher in renditions.publishers]  # fmt: skip
    assert counts[on] == 1 and sum(counts) == 1


class KernelHeldViewer(FakeViewer):
    """A viewer whose kernel send buffer holds ``unsent`` bytes (the queue sees none)."""

    unsent = 0

    def unsent_bytes(self) -> int:
        return self.unsent


def test_a_backlog_held_in_the_kernel_steps_down_too() -> None:
    """The queue is empty but the socket's send buffer grows (a kernel that buffers
    megabytes): the session reads it from the sink and steps down all the same."""
    renditions = Renditions()
    sink = KernelHeldViewer()
    session = watch_adaptive(renditions.core.registry, "cam", sink, None)
    assert isinstance(session, AdaptiveSession)
    for _ in range(60):
        sink.unsent += 4000  # 80 kB/s more than the link takes
        renditions.tick(0.05, gop=None)
        if any(stream.switchers for stream in renditions.core.registry.streams.values()):
            break
    assert session.queue.queued_bytes == 0
    renditions.frames(key=True)
    assert session.stream.name != "cam"
    assert announcements(sink)[-1]["reason"] == "down"


def test_a_key_older_than_what_the_viewer_saw_does_not_switch_it() -> None:
    """A target KEY captured before the latest frame of the viewer's rendition (an edge's
    fresh pull replays its upstream's cached GOP) is passed over; the next live KEY
    switches."""
    renditions = Renditions()
    session, viewer = renditions.watch()
    back_up(session, renditions, 2.0)
    target_name = next(
        name for name, stream in renditions.core.registry.streams.items() if stream.switchers
    )
    target = renditions.core.registry.streams[target_name]
    index = STREAMS.index(target_name)
    target_session = renditions.publishers[index][0]
    target_session.media(message(FLAG_KEY, index, renditions.frame - 5, 900))
    assert session.stream.name == "cam"
    renditions.frames(key=True)
    assert session.stream is target
    session.queue.resume_producing()
    renditions.tick(0.5)
    assert_clean_switches(viewer)


def test_a_viewer_whose_rendition_goes_offline_moves_to_a_live_one() -> None:
    """The lower rendition's publisher leaves while the others stay: the viewer, told
    ``offline``, is moved to the nearest live rendition at once (a KEY is asked for) and
    told ``live`` again before the switch."""
    renditions = Renditions()
    session, viewer = stepped_down(renditions)
    on = STREAMS.index(session.stream.name)
    assert on > 0
    renditions.publishers[on][0].close()
    live = [(index, pair) for index, pair in enumerate(renditions.publishers) if index != on]
    asked = sum(len(link.keyframe_requests) for _, (_, link) in live)
    renditions.core.clock.advance(SETTINGS.interval * 2)
    assert sum(len(link.keyframe_requests) for _, (_, link) in live) > asked
    for index, (publisher, _) in live:
        publisher.media(message(FLAG_KEY, index, renditions.frame + 1, 900))
    assert session.stream.live and session.stream.name != STREAMS[on]
    states = [text["state"] for text in viewer.texts() if text["type"] == "status"]
    assert states[-2:] == ["offline", "live"]
    assert_clean_switches(viewer)
    # Counted for /metrics: the start, the step down, the move off the offline one.
    assert renditions.core.registry.rendition_switches == {"start": 1, "down": 1, "offline": 1}


def test_a_step_up_on_a_long_gop_asks_for_a_key_after_half_the_switch_timeout() -> None:
    """No natural KEY within half the switch timeout (a long GOP): the target is asked
    for one, and the switch happens when it comes."""
    renditions = Renditions()
    session, viewer = stepped_down(renditions)
    low = STREAMS.index(session.stream.name)
    higher = renditions.publishers[low - 1][1]
    # Calm, no KEY at all, until the step up is decided and has waited half the timeout.
    asked = len(higher.keyframe_requests)
    waited = 0.0
    while len(higher.keyframe_requests) == asked:
        renditions.tick(0.1)
        waited += 0.1
        assert waited < SETTINGS.estimate_ttl + SETTINGS.up_hold + SETTINGS.switch_timeout
    assert session.stream.name == STREAMS[low]
    switching = renditions.core.registry.streams[STREAMS[low - 1]].switchers
    assert switching  # the step up is under way, waiting for its KEY
    renditions.frames(key=True)
    assert session.stream.name == STREAMS[low - 1]
    assert_clean_switches(viewer)
