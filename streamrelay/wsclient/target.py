"""Relay URLs: ``ws://`` and ``wss://`` (``http(s)://`` accepted), parsed and checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class RelayTarget:
    """A parsed relay URL."""

    url: str = field(repr=False)  # the query may hold secrets: see display_url
    secure: bool
    host: str
    port: int

    @property
    def display_url(self) -> str:
        """The URL without query or credentials, safe to print."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_relay_url(url: str) -> RelayTarget:
    """Validate a ``ws://`` or ``wss://`` URL (``http(s)://`` is accepted and converted)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL must start with ws:// or wss://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"relay URL has no host: {url!r}")
    if parts.fragment:
        raise ValueError("relay URL must not have a #fragment")
    try:
        port = parts.port or (443 if scheme == "wss" else 80)
    except ValueError:
        raise ValueError(f"relay URL has a bad port: {url!r}") from None
    path = parts.path or "/"
    normalized = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    return RelayTarget(normalized, scheme == "wss", parts.hostname, port)
