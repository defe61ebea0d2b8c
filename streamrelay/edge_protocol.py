"""``/relay/{stream}``: another relay (an edge) pulling a stream from this one.

The edge is one viewer of the stream with its own, larger queue
(``--relay-queue-bytes``): it gets status, meta and media exactly as a viewer does, and
when it cannot keep up it loses whole groups of pictures as a viewer does.  Besides a
viewer's ``keyframe-request`` it sends ``{"type": "viewers", "count": N}``, how many
viewers it serves, which this relay adds to the count its publisher hears, and
``{"type": "reports", ...}``, its viewers' playback reports, counted here as this relay's
own viewers' (``docs/protocol.md``, "Relay to relay").  Admission (a ``relay`` token signed with
``--relay-secret-file``; refused outright without that secret) is the web gate's.
"""

from __future__ import annotations

from typing import Any

from streamrelay import wire
from streamrelay.logs import relay_logger
from streamrelay.protocol import ViewerProtocol, format_peer
from streamrelay.reports import InvalidReport, ViewerInputGate, parse_forwarded
from streamrelay.roles import Role
from streamrelay.streams import ViewerSession
from streamrelay.wire import WireError

_log = relay_logger(__name__)

# The largest viewer count an edge may report: far above any real audience, and small
# enough that sums stay exact and cheap.
MAX_REPORTED_VIEWERS = 10**9


class EdgeProtocol(ViewerProtocol):
    """An edge relay pulling one stream: a viewer with the relay queue bound that also
    reports its own audience."""

    role = Role.RELAY

    def opened(self) -> None:
        """Join the stream as an edge: status, meta, CONFIG and the cached GOP go out at
        once, as to a viewer."""
        result = self.context.registry.relay(self.stream_name, self)
        if not isinstance(result, ViewerSession):
            self.close_with(wire.CLOSE_TRY_AGAIN_LATER, result.reason)
            return
        self.session = result
        self._log_event("pulls")

    def _log_event(self, what: str) -> None:
        _log.info(
            "Edge {peer} {what} {stream}",
            peer=format_peer(self.transport.getPeer()),
            what=what,
            stream=self.stream_name,
        )

    def message_received(self, payload: bytes, is_binary: bool) -> None:
        """A viewer's messages, plus ``viewers``: an out-of-range count closes 1007."""
        if is_binary:
            super().message_received(payload, is_binary)
            return
        try:
            parsed = wire.parse_text(payload)
        except WireError:
            return
        if parsed.get("type") == "reports":
            self._forwarded_reports(parsed)
            return
        if parsed.get("type") != "viewers":
            super().message_received(payload, is_binary)
            return
        count = parsed.get("count")
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or not 0 <= count <= MAX_REPORTED_VIEWERS
        ):
            self.close_with(wire.CLOSE_INVALID_PAYLOAD, "viewers count must be a whole number")
            return
        if self.session is not None:
            self.session.report_viewers(count)

    def _forwarded_reports(self, parsed: dict[str, Any]) -> None:
        """The edge's viewers' reports: counted here as this relay's own viewers'
        would be (one message per 2 s; bad rows skipped, a bad message ignored)."""
        if self.session is None:
            return
        if self._gate is None:
            self._gate = ViewerInputGate(self._clock)
        window = self.session.stream.reports
        try:
            reports, invalid = parse_forwarded(parsed)
        except InvalidReport:
            window.invalid += 1
            return
        window.invalid += invalid
        if self._gate.allow_report():
            for report in reports:
                self.session.report(report)

    def closed(self) -> None:
        """Leave the stream; its reported viewers go with it."""
        if self.session is not None:
            self._log_event("stopped pulling")
        super().closed()
