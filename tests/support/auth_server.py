"""A user's authorisation endpoint for the ``--auth-url`` tests: ``python -m
tests.support.auth_server`` serves on a loopback port and prints it as ``PORT <n>``.

``POST /auth`` decides by the JSON body's token: ``ok...`` admits (200), ``forbid...``
403, anything else 401.  ``GET /control?mode=M&delay=S`` switches behaviour: ``normal``;
``slow`` (answer after ``delay`` seconds); ``down`` (abort the connection); ``flap``
(500 and 200 in turn).  ``GET /calls`` returns ``{"calls": n, "bodies": [...]}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorTime
from twisted.web import resource, server


class Auth(resource.Resource):
    """The endpoint and its controls."""

    isLeaf = True

    def __init__(self, clock: IReactorTime) -> None:
        super().__init__()
        self.clock = clock
        self.mode = "normal"
        self.delay = 0.0
        self.bodies: list[Any] = []
        self.flaps = 0

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802 (twisted.web API)
        """The controls and the call record."""
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/control":
            self.mode = request.args.get(b"mode", [b"normal"])[0].decode()
            self.delay = float(request.args.get(b"delay", [b"0"])[0])
            return b"{}"
        return json.dumps({"calls": len(self.bodies), "bodies": self.bodies}).encode()

    def render_POST(self, request: server.Request) -> bytes | int:  # noqa: N802
        """Decide by the token, in the current mode."""
        content: Any = request.content
        body = json.loads(content.read())
        self.bodies.append(body)
        if self.mode == "down":
            transport: Any = request.channel.transport
            transport.abortConnection()
            return server.NOT_DONE_YET
        if self.mode == "flap":
            self.flaps += 1
            if self.flaps % 2:
                request.setResponseCode(500)
                return b"flap\n"
        status = _status(body.get("token") or "")
        if self.mode == "slow":
            def answer() -> None:
                if not request.finished and not request._disconnected:
                    request.setResponseCode(status)
                    request.write(b"late\n")
                    request.finish()

            self.clock.callLater(self.delay, answer)
            return server.NOT_DONE_YET
        request.setResponseCode(status)
        return b"decided\n"


def _status(token: str) -> int:
    if token.startswith("ok"):
        return 200
    if token.startswith("forbid"):
        return 403
    return 401


def main() -> None:
    """Serve on an ephemeral loopback port until killed."""
    running: Any = reactor
    port: Any = running.listenTCP(0, server.Site(Auth(running)), interface="127.0.0.1")
    sys.stdout.write(f"PORT {port.getHost().port}\n")
    sys.stdout.flush()
    running.run()


if __name__ == "__main__":
    main()
