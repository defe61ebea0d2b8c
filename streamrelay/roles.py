"""Who is on the other end of a WebSocket: one name for the gate, the tokens, the
protocols and ``streamrelay-token``.

The value of each member is the role word a token signs (``"<role>:<stream>:<expires>"``,
``docs/protocol.md``); the URL paths (``/publish``, ``/watch``, ``/relay``, ``/echo``)
are declared by the endpoints of :mod:`streamrelay.admission`.
"""

from __future__ import annotations

from enum import Enum


class Role(Enum):
    """A connection's role on the relay."""

    PUBLISHER = "publish"
    VIEWER = "view"
    ECHO = "echo"
    # Another relay pulling a stream from this one (an edge, docs/cluster.md).
    RELAY = "relay"

    @property
    def label(self) -> str:
        """How logs name a peer in this role: ``publisher``, ``viewer``, ``echo`` or
        ``relay``."""
        return self.name.lower()
