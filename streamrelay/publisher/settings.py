"""What a publisher is configured with: one frozen record, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from streamrelay.wsclient.target import RelayTarget, parse_relay_url

DEFAULT_URL: Final = "ws://127.0.0.1:8080/publish/demo"
USER_AGENT: Final = "streamrelay-publish/0.1"


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    """Where to publish and how: the relay URL, the token, the bounds and the timeouts.

    ``token`` goes out as ``Authorization: Bearer ...``; neither it nor the URL is part
    of the ``repr``, so a settings record can be logged.

    The outbox (messages waiting for a slow network) reports CONGESTED from
    ``queue_high_water_bytes`` until it drains to a quarter of that, and drops frames
    until the next KEY rather than grow past ``queue_limit_bytes``. At most
    ``max_pending_threadsafe_calls`` frames may wait for the reactor thread. Times are in
    seconds: Autobahn's ping interval and timeout (0 turns pings off), the opening and
    closing handshake timeouts, and how long a connection must hold before the reconnect
    backoff starts again from its shortest delay. A publisher replaced by a newer one
    (close code 4409) stops, unless ``reconnect_when_replaced``.

    ``on_demand``: stop capturing and encoding once nobody has watched for
    ``on_demand_grace`` seconds, and resume on the first viewer (:mod:`.ondemand`).
    """

    url: str = field(default=DEFAULT_URL, repr=False)
    token: str | None = field(default=None, repr=False)
    insecure: bool = False
    queue_high_water_bytes: int = 256 * 1024
    queue_limit_bytes: int = 1024 * 1024
    max_pending_threadsafe_calls: int = 8
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    open_timeout: float = 10.0
    close_timeout: float = 2.0
    stable_after: float = 5.0
    reconnect_when_replaced: bool = False
    on_demand: bool = False
    on_demand_grace: float = 10.0
    target: RelayTarget = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n\0")):
            raise ValueError("token must be non-empty and single-line")
        if not 0 < self.queue_high_water_bytes <= self.queue_limit_bytes:
            raise ValueError("need 0 < queue_high_water_bytes <= queue_limit_bytes")
        if self.max_pending_threadsafe_calls < 1:
            raise ValueError("max_pending_threadsafe_calls must be at least 1")
        if not 0 <= self.on_demand_grace <= 86_400:
            raise ValueError("on_demand_grace must be between 0 and 86400 seconds")
        # Frozen: the parsed URL is set once, here.
        object.__setattr__(self, "target", parse_relay_url(self.url))

    @property
    def queue_low_water_bytes(self) -> int:
        """Where a congested outbox counts as drained again."""
        return self.queue_high_water_bytes // 4


__all__ = [
    "DEFAULT_URL",
    "USER_AGENT",
    "PublisherSettings",
    "RelayTarget",
    "parse_relay_url",
]
