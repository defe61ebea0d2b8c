"""A stream's direct set: the viewers a message goes to straight from the fan-out loop
to their socket, with no per-viewer Python beyond the socket's ``send``; no I/O of its
own (the sends are callables handed in by :mod:`streamrelay.fastwrite`).

Why: with hundreds of viewers per message, each layer between the stream and the
kernel (the queue's fast path, the protocol's state check and byte count, the writer's
transport checks) costs more than the rest of the relay's work together.  For a
viewer that keeps up, none of them decides anything: its queue flows, its WebSocket is
open and its transport holds nothing.  Those conditions are kept as invariants of
membership instead of being checked per message.

Membership (a :class:`Seat`).  A viewer is a member of its stream's set for a kind of
message (video, or audio for the viewers that asked for it: a second set) only while
all of these hold, and whatever may break one takes it out first:

- its queue flows: not paused, nothing queued, not waiting for a KEY, not skipping, not
  closed (the queue leaves as soon as its one-field summary of these turns false);
- its connection is a *direct port* (:func:`streamrelay.fastwrite.writer_for`: a plain
  TCP transport of a POSIX reactor, no TLS, an uncompressed WebSocket in the OPEN
  state), whose transport holds no data, is connected and neither closing, aborting nor
  half-closed, and has not paused its producer: the port calls the queue's
  :meth:`~streamrelay.viewer_queue.ViewerQueue.leave_direct` before anything writes to
  the transport, closes it or switches it to TLS, whoever does it (Autobahn's pings,
  pongs and close frames, text messages, CONFIG messages, the join burst, the rest of a
  partial send), and before it reports the connection lost;
- it is a viewer of this stream (a detach or a rendition switch takes it out);
- (audio) the message is newer than any audio a member had: see :meth:`DirectSet.deliver`.

A viewer enters only in the others' loop, right after a message of this stream went
out to it whole through its queue's fast path and the port says its transport holds
nothing: at entry nothing waits anywhere.  Writes through the queue to a member (a text
message, a CONFIG) stay correct: they go through the careful writer, which sends only
when the transport holds nothing and otherwise hands the bytes to the transport, which
takes the member out.

Order.  Each message goes to each viewer through exactly one loop: the members' (their
``send``), then the others' (their queue, today's path, which may let them in); the
others are listed before the members' loop, so a viewer that leaves during it is not
served twice.  A member that leaves during the members' loop before its turn (another
viewer's write made the budget shed it, say) gets the message through its queue
instead, as it would have had it come later in the loop.

Counts.  The set keeps running totals of what its loop sent (messages, their bytes,
their wire octets, and for audio the last two capture times); a seat keeps the totals
at its last settling and folds the difference into its queue's counters
(``sent_messages``, ``bytes_sent``, the audio capture times) and its connection's wire
octet count when it leaves, and whenever they are read.  So every counter is what the
queue's own path would have counted.  Membership changes are O(1): the members are a
list with each seat's index; a removal swaps the last entry into the hole, and one
during the loop only marks the entry and waits for the loop's end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from streamrelay.wire import MediaInfo

if TYPE_CHECKING:
    from streamrelay.viewer_queue import ViewerQueue

# What the members' loop makes of a send that did not take everything: OSError (the
# transport's own send meets it again and reports the loss), and a seat that left.
_FAILED = -1
_DEPARTED = -2


def _departed(payload: bytes) -> int:
    """The send of a seat that left during the loop: its handler takes the message."""
    return _DEPARTED


class DirectPort(Protocol):
    """A connection's way to its socket (:class:`streamrelay.fastwrite.DirectWriter`)."""

    @property
    def send(self) -> Callable[[bytes], int]:
        """The socket's own ``send``: all that the members' loop calls per viewer."""
        ...

    def payload(self, frame: Any) -> bytes:
        """The bytes of the prepared message ``frame`` as they go on the wire."""
        ...

    def hand_over(self, data: bytes) -> None:
        """Give ``data`` to the transport, after everything sent before it."""

    def watch(self, hook: Callable[[], None] | None) -> None:
        """Call ``hook`` (once) before anything writes to the transport, closes it,
        switches it to TLS or reports it lost; None: stop watching."""

    def sent_directly(self, octets: int) -> None:
        """Count ``octets`` sent by the members' loop (the connection's wire count)."""


class Seat:
    """One viewer's place in one direct set, and the set's totals when it last settled."""

    __slots__ = ("direct", "index", "messages", "octets", "owed", "port", "queue", "size")

    def __init__(self, direct: DirectSet, queue: ViewerQueue, port: DirectPort, index: int):
        self.direct = direct
        self.queue = queue
        self.port = port
        self.index = index
        self.messages = direct.messages
        self.size = direct.bytes
        self.octets = direct.octets
        # Left during the members' loop and not yet counted for its message.
        self.owed = False

    def settle(self) -> None:
        """Fold what the set sent to this viewer since the last settling into its
        queue's and its connection's counters."""
        direct = self.direct
        count = direct.messages - self.messages
        if count:
            queue = self.queue
            queue.count_direct(count, direct.bytes - self.size)
            self.port.sent_directly(direct.octets - self.octets)
            if direct.audio:
                queue.audio_direct(direct.last_capture, direct.prev_capture if count > 1 else None)
            self.messages = direct.messages
            self.size = direct.bytes
            self.octets = direct.octets

    def _count_current(self, info: MediaInfo, octets: int) -> None:
        self.owed = False
        queue = self.queue
        queue.count_direct(1, info.size)
        self.port.sent_directly(octets)
        if self.direct.audio:
            queue.audio_direct(info.capture_time_us, None)

    def missed(self, payload: bytes, sent: int) -> None:
        """The members' loop could not send the whole message to this viewer: hand the
        rest to its transport (the viewer leaves), or, when it left before its turn,
        let its queue decide."""
        direct = self.direct
        current = direct.current
        assert current is not None
        info, frame, octets = current
        queue = self.queue
        if sent == _DEPARTED:
            self.owed = False
            if queue not in direct.rest:
                # It left this stream altogether (a detach, a rendition switch): the
                # message is no longer its to get.
                return
            if direct.audio:
                queue.send_audio(info, frame)
            else:
                queue.send_media(info, frame)
            return
        queue.leave_direct()
        self._count_current(info, octets)
        # Nothing sent (EAGAIN, or an error the transport will meet and report): all of it.
        self.port.hand_over(payload if sent <= 0 else payload[sent:])
        queue.kept_by_transport(info.size)


class DirectSet:
    """The viewers of one stream for one kind of message (``audio``: audio, to the
    viewers that take it; else video): members and the others (``rest``)."""

    __slots__ = (
        "_entries",
        "_leaving",
        "_looping",
        "audio",
        "bytes",
        "ceiling",
        "current",
        "last_capture",
        "messages",
        "octets",
        "prev_capture",
        "rest",
    )

    def __init__(self, audio: bool = False) -> None:
        self.audio = audio
        # The viewers that are not members, in the order they came.
        self.rest: dict[ViewerQueue, None] = {}
        self._entries: list[tuple[Callable[[bytes], int], Seat]] = []
        # What the members' loop sent, ever.
        self.messages = 0
        self.bytes = 0
        self.octets = 0
        self.last_capture = -1
        self.prev_capture = -1
        # Audio: no member had audio newer than this (a message not newer takes the
        # queues' path, which drops it for those that had it); -1 while there are none.
        self.ceiling = -1
        self._looping = False
        self._leaving: list[Seat] = []
        # The message of the members' loop under way, and its wire size.
        self.current: tuple[MediaInfo, Any, int] | None = None

    @property
    def members(self) -> int:
        """How many viewers get messages straight to their socket now."""
        return len(self._entries) - len(self._leaving)

    def add(self, queue: ViewerQueue) -> None:
        """A viewer joins (as one of the others: it becomes a member in the loop)."""
        self.rest[queue] = None

    def remove(self, queue: ViewerQueue) -> None:
        """A viewer leaves the stream: out of the set, its counters settled."""
        queue.leave_direct()
        self.rest.pop(queue, None)

    def leave(self, seat: Seat) -> None:
        """``seat``'s viewer stops being a member (its queue calls this)."""
        seat.settle()
        if self._looping:
            seat.owed = True
            self._entries[seat.index] = (_departed, seat)
            self._leaving.append(seat)
        else:
            self._drop(seat)
        self.rest[seat.queue] = None

    def _drop(self, seat: Seat) -> None:
        entries = self._entries
        last = entries.pop()
        if last[1] is not seat:
            entries[seat.index] = last
            last[1].index = seat.index
        elif not entries:
            # No member had any audio: a new publisher's clock may start lower.
            self.ceiling = -1

    def _admit(self, queue: ViewerQueue) -> None:
        if self._looping or queue not in self.rest:
            return
        port = queue.direct_port()
        if port is None:
            return
        if self.audio:
            self.ceiling = max(self.ceiling, queue.audio_last_us)
        seat = Seat(self, queue, port, len(self._entries))
        self._entries.append((port.send, seat))
        del self.rest[queue]
        queue.take_seat(seat)

    def deliver(self, info: MediaInfo, frame: Any) -> None:
        """Send one message (not a CONFIG: those take the queues' path) to every viewer
        of the set: the members straight to their socket, then the others through their
        queue, which may let them in.

        Audio goes to the members only when it is newer than any audio a member had
        (capture times only grow, unless a publisher's clock goes back); otherwise,
        and if called again while its loop runs, every viewer takes its queue's path,
        the members with their counters settled first."""
        others = list(self.rest) if self.rest else []
        if self._entries:
            if self._looping or (self.audio and info.capture_time_us <= self.ceiling):
                members = [seat.queue for send, seat in self._entries if send is not _departed]
                for queue in members:
                    queue.settle_direct()
                others = members + others
            else:
                self._send_direct(info, frame)
        if not others:
            return
        if self.audio:
            for queue in others:
                if queue.send_audio(info, frame):
                    self._admit(queue)
        else:
            for queue in others:
                if queue.send_media(info, frame):
                    self._admit(queue)

    def _send_direct(self, info: MediaInfo, frame: Any) -> None:
        entries = self._entries
        payload = entries[0][1].port.payload(frame)
        octets = len(payload)
        self.current = (info, frame, octets)
        self._looping = True
        try:
            # The hot loop: one builtin call per viewer, and nothing else unless a send
            # falls short.
            for send, seat in entries:
                try:
                    sent = send(payload)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = _FAILED
                if sent != octets:
                    seat.missed(payload, sent)
        finally:
            self._looping = False
            self.current = None
            self.messages += 1
            self.bytes += info.size
            self.octets += octets
            if self.audio:
                capture = info.capture_time_us
                self.prev_capture = self.last_capture
                self.last_capture = capture
                self.ceiling = max(self.ceiling, capture)
            if self._leaving:
                self._settle_leaving(info, octets)

    def _settle_leaving(self, info: MediaInfo, octets: int) -> None:
        # Seats that left after their turn had the message whole (before the loop's
        # totals grew, so their settling did not count it): count it now.
        leaving, self._leaving = self._leaving, []
        for seat in leaving:
            if seat.owed:
                seat._count_current(info, octets)
            self._drop(seat)
