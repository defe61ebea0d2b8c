"""An adaptive viewer (``/watch/BASE?abr=1``): one viewer queue moved between the
renditions of a base stream (docs/protocol.md "Renditions"), with no I/O.

The viewer joins the base stream (the top rendition) like any viewer.  Every
:attr:`~streamrelay.abr.AbrSettings.interval` its queue is shown to the
:class:`~streamrelay.abr.AbrPolicy`; when the policy decides on a switch, the session
waits on the target stream for its next KEY (renditions are GOP-aligned; a step down asks
for that KEY at once) and then, in the same turn: lets the viewer go from the old
stream, queues the ``rendition`` announcement and the target's ``meta``, and hands the
queue to the target stream, which sends its CONFIG and that KEY.  What the old stream had
already queued goes first; nothing of it comes after, so the viewer never sees a P-frame
of one rendition after a KEY of another.  The viewer counts as a viewer of the rendition
it is on.  On an edge relay a target that is not pulled yet is pulled for the switch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall

from streamrelay.abr import AbrPolicy, AbrSettings, Decision, Observation, Rendition
from streamrelay.limits import Refusal
from streamrelay.logs import relay_logger
from streamrelay.names import base_name
from streamrelay.reports import ViewerReport
from streamrelay.streams import SWITCH_AUDIO_MAX_BYTES, Stream, StreamRegistry, ViewerSession
from streamrelay.viewer_queue import ViewerSink
from streamrelay.wire import FLAG_AUDIO, MediaInfo, encode_text

_log = relay_logger(__name__)


class AdaptiveSession(ViewerSession):
    """A viewer's handle that follows the rendition the policy chooses; ``stream`` is
    the rendition it is on."""

    __slots__ = (
        "_audio", "_base", "_pending", "_policy", "_ticker", "_timeout", "_unsent", "announced"
    )

    # Tests may replace the policy's thresholds.
    settings = AbrSettings()

    def __init__(
        self,
        registry: StreamRegistry,
        stream: Stream,
        sink: ViewerSink,
        address: str | None,
        audio: bool = False,
    ) -> None:
        self._base = stream.name
        self._audio = audio
        self._policy = AbrPolicy(registry.config.viewer_queue_bytes, self.settings)
        # The stream switched to, the decision, and whether it flees an offline stream.
        self._pending: tuple[Stream, Decision, bool] | None = None
        self._timeout: IDelayedCall | None = None
        self._ticker: IDelayedCall | None = None
        # The bytes the viewer's kernel socket holds unsent, where the sink can tell: a
        # backlog that the queue alone cannot see (a send buffer grows to megabytes).
        self._unsent: Callable[[], int] | None = getattr(sink, "unsent_bytes", None)
        intro = None
        policy = self._policy
        if stream.renditions and policy.set_renditions(stream.renditions, stream.name):
            assert policy.rendition is not None
            intro = self._announcement(policy.rendition, "start", registry)
        self.announced = intro is not None
        if self.announced:
            _count(registry.rendition_switches, "start")
        super().__init__(registry, stream, sink, address, intro=intro, audio=audio)
        stream.adaptive_viewers.add(sink)
        if self.announced:
            self._schedule()
        else:
            self._wait_for_a_set()

    def _wait_for_a_set(self) -> None:
        # No timer while the base announces no set: a plain stream costs nothing more.
        self.stream.set_listeners[self._sink] = self._set_known

    def _set_known(self) -> None:
        if not self.closed and self._ticker is None:
            self._learn_renditions()
            self._schedule()

    @staticmethod
    def _announcement(
        rendition: Rendition, reason: str, registry: StreamRegistry
    ) -> tuple[Any, int]:
        raw = encode_text(rendition.announcement(reason))
        return registry.frame_factory(raw, False), len(raw)

    @property
    def rendition(self) -> Rendition | None:
        """The rendition the viewer is on (None while its base announces no set)."""
        return self._policy.rendition

    def report(self, report: ViewerReport) -> None:
        """The viewer's report goes to its base stream (the set's: the one whose summary
        the publisher shows), whichever rendition the viewer is on; to that rendition
        only while the base has no publisher here (on an edge: not pulled)."""
        if self.closed:
            return
        base = self._registry.streams.get(self._base)
        target = base if base is not None and base.publisher is not None else self.stream
        target.viewer_report(report)

    # -- observing -------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self.closed:
            self._ticker = self._registry.clock.callLater(self.settings.interval, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        try:
            self._observe()
        finally:
            if self._policy.renditions:
                self._schedule()
            elif not self.closed:
                self._wait_for_a_set()

    def _learn_renditions(self) -> None:
        base = self._registry.streams.get(self._base)
        fresh = base.renditions if base is not None else None
        policy = self._policy
        # A set that leaves out the rendition the viewer is on is not adopted; the one
        # known stays (on an edge the base is not pulled while nobody is on it).
        if not fresh or fresh == policy.renditions or self._pending is not None:
            return
        if policy.set_renditions(fresh, self.stream.name) and not self.announced:
            self.announced = True
            _count(self._registry.rendition_switches, "start")
            rendition = policy.rendition
            assert rendition is not None
            frame, size = self._announcement(rendition, "start", self._registry)
            self.queue.send_text(frame, size, "rendition")

    def _observe(self) -> None:
        if self.closed:
            return
        self._learn_renditions()
        if not self._policy.renditions:
            return
        if not self.stream.live and self._pending is None:
            # The rendition's own publisher left (the others may still be live): move
            # to the nearest live one rather than wait on an offline stream.
            refuge = self._live_refuge()
            if refuge is not None:
                self._begin(refuge, urgent=True)
            return
        queue = self.queue
        # Beyond the queue: the transport's buffer (estimated) and the kernel's.
        below = queue.backlog_bytes - queue.queued_bytes
        if self._unsent is not None:
            below += self._unsent()
        seen = Observation(
            self._registry.clock.seconds(),
            queue.queued_bytes + below,
            queue.bytes_sent - below,
            queue.skipping,
        )
        decision = self._policy.observe(seen)
        if decision is not None:
            self._begin(decision)

    def _live_refuge(self) -> Decision | None:
        """The nearest rendition live here, lower ones first, or None."""
        policy = self._policy
        streams = self._registry.streams
        order = list(range(policy.current + 1, len(policy.renditions)))
        order += list(range(policy.current - 1, -1, -1))
        for index in order:
            stream = streams.get(policy.renditions[index].stream)
            if stream is not None and stream.live:
                return Decision(index, "down" if index > policy.current else "up")
        return None

    # -- switching -------------------------------------------------------------------

    def _begin(self, decision: Decision, urgent: bool = False) -> None:
        registry = self._registry
        rendition = self._policy.renditions[decision.index]
        if rendition.stream == self.stream.name:
            return
        target = registry._stream(rendition.stream)
        if not target.live and registry.puller is None:
            # Nothing publishes that rendition here (and nothing could pull it).
            registry._forget_if_idle(target)
            self._policy.abandoned(registry.clock.seconds())
            return
        if self._full(target):
            registry._forget_if_idle(target)
            return
        self._policy.started()
        self._pending = (target, decision, urgent)
        target.switchers[self._sink] = self._at_key
        if self._audio and not target.switch_audio:
            # The target's audio from before the switch began too: its cached GOP's.
            target.switch_audio.extend(
                item
                for item in target.gop.start_sequence(True)
                if item[0].flags & FLAG_AUDIO and item[0].size <= SWITCH_AUDIO_MAX_BYTES
            )
        registry._want_pull(target)
        if decision.reason == "down" or urgent:
            # Renditions are GOP-aligned: the KEY asked for comes in every rendition.
            target.need_keyframe()
        # A step up waits for a natural KEY, but not longer than half the switch
        # timeout (a long GOP): then it asks for one.
        half = self.settings.switch_timeout / 2
        self._timeout = registry.clock.callLater(half, self._waited_half, target)

    def _full(self, target: Stream) -> bool:
        """True (counted, and the policy told) when ``target`` has as many viewers as
        --max-viewers-per-stream allows: a switch is a join, bound the same way."""
        registry = self._registry
        limit = registry.config.max_viewers_per_stream
        if not limit or len(target.viewers) < limit:
            return False
        _count(registry.rendition_switches_refused, "viewer_limit")
        self._policy.abandoned(registry.clock.seconds())
        return True

    def _waited_half(self, target: Stream) -> None:
        self._timeout = None
        if self._pending is None or self._pending[0] is not target:
            return
        target.need_keyframe()
        half = self.settings.switch_timeout / 2
        self._timeout = self._registry.clock.callLater(half, self._give_up)

    def _end_wait(self) -> Stream | None:
        pending, self._pending = self._pending, None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if pending is None:
            return None
        target = pending[0]
        target.switchers.pop(self._sink, None)
        if not target.switchers:
            target.switch_audio.clear()
        return target

    def _let_go(self, stream: Stream) -> None:
        registry = self._registry
        registry._forget_if_idle(stream)
        if registry.puller is not None and not stream.viewers and not stream.switchers:
            registry.puller.release(stream.name)

    def _give_up(self) -> None:
        self._timeout = None
        target = self._end_wait()
        _count(self._registry.rendition_switches_refused, "no_key")
        self._policy.abandoned(self._registry.clock.seconds())
        if target is not None:
            self._let_go(target)

    def _at_key(self, target: Stream, key: MediaInfo, frame: Any) -> None:
        """``target``'s KEY is here: the switch happens now."""
        pending = self._pending
        if pending is None or pending[0] is not target or self.closed:
            return
        old = self.stream
        if key.capture_time_us < old.latest_capture_us:
            # An older KEY (an edge's new pull starts with its upstream's cached GOP):
            # the viewer would go back in time; the next one will do.
            return
        decision, urgent = pending[1], pending[2]
        # The target's latest audio, from before its KEY and after (cached with it).
        audio: list[tuple[MediaInfo, Any]] | tuple[()] = ()
        if self._audio:
            cached = target.gop.start_sequence(True)
            audio = sorted(
                [*target.switch_audio, *(item for item in cached if item[0].flags & FLAG_AUDIO)],
                key=lambda item: item[0].capture_time_us,
            )
        self._end_wait()
        if self._full(target):
            # Filled up while the switch waited for this KEY.
            self._let_go(target)
            return
        queue = old.release_viewer(self._sink)
        if queue is None:
            return
        rendition = self._policy.renditions[decision.index]
        registry = self._registry
        if not old.live:
            # The viewer was told its rendition went offline: the new one is live.
            status, status_size = registry.status_frame("live")
            queue.send_text(status, status_size, "status")
        frame_size = self._announcement(rendition, decision.reason, registry)
        queue.send_text(frame_size[0], frame_size[1], "rendition")
        if target.meta is not None:
            queue.send_text(target.meta[0], target.meta[1], "meta")
        target.adopt_viewer(self._sink, queue, audio=self._audio)
        queue.switch_source(target.gop.config, key, frame, audio)
        self.stream = target
        _count(registry.rendition_switches, "offline" if urgent else decision.reason)
        self._policy.switched(decision.index, decision.reason, self._registry.clock.seconds())
        _log.debug(
            "Viewer of {base} stepped {reason} to {stream}",
            base=self._base,
            reason=decision.reason,
            stream=target.name,
        )
        self._let_go(old)

    # -- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """The viewer connection is gone: stop observing, give up a switch under way,
        leave the rendition it is on."""
        if self.closed:
            return
        if self._ticker is not None and self._ticker.active():
            self._ticker.cancel()
        self._ticker = None
        self.stream.set_listeners.pop(self._sink, None)
        target = self._end_wait()
        self.closed = True
        registry = self._registry
        registry.waiting.release(self._base, self._address)
        self.stream.detach_viewer(self._sink)
        self._let_go(self.stream)
        if target is not None:
            self._let_go(target)


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def watch_adaptive(
    registry: StreamRegistry,
    name: str,
    sink: ViewerSink,
    address: str | None,
    audio: bool = False,
) -> ViewerSession | Refusal:
    """Attach a viewer that asked for ``abr=1``: adaptive on a base stream; a
    rendition's own name is watched as a plain stream."""
    if base_name(name) != name:
        return registry.watch(name, sink, address, audio=audio)
    return registry.watch(name, sink, address, session_type=AdaptiveSession, audio=audio)
