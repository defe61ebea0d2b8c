"""The twisted.web side of the one port: the relay's ``Site`` and its resource tree.

The web layer, by concern (imports run one way: tap -> web -> protocols -> core):

- :mod:`streamrelay.channel` -- the HTTP channel: limits, head bounds (431), bodies
  (413), the handshake deadline, the WebSocket upgrade;
- :mod:`streamrelay.admission` -- the WebSocket endpoints and their ordered checks
  (404, 400, 426, 503, 403, 401, 409), then the hand-over to Autobahn;
- :mod:`streamrelay.resources` -- ``/healthz``, ``/api/*``, the pages;
- this module -- routing (:class:`Root`), the ``Site`` and its access log.

The shared state is :class:`~streamrelay.context.RelayContext`, re-exported here.
"""

from __future__ import annotations

from typing import Any

from twisted.web import resource, server

from streamrelay.admission import StreamGate, endpoints
from streamrelay.channel import RelayChannel
from streamrelay.context import RelayContext
from streamrelay.resources import (
    Health,
    Internals,
    NotFound,
    PlayerPage,
    StaticPage,
    StreamsApi,
    load_static_files,
    postpath,
)

__all__ = ["RelayContext", "RelayRequest", "RelaySite", "Root", "load_static_files"]


class Root(resource.Resource):
    """Routes the first path segment to its resource."""

    def __init__(self, context: RelayContext, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.context = context
        files = load_static_files() if files is None else files
        self._not_found = NotFound(context)
        self._routes: dict[bytes, resource.Resource] = {
            b"": StaticPage(context, files, "index.html"),
            b"healthz": Health(context),
            b"static": StaticPage(context, files, None),
            b"view": PlayerPage(context, files),
        }
        for endpoint in endpoints(context):
            self._routes[endpoint.path] = StreamGate(context, endpoint)
        self._api = _ApiFolder(context)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        """Pick the resource for the first segment; 404 for anything unknown."""
        if path == b"api":
            return self._api
        return self._routes.get(path, self._not_found)

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """Requests for ``/`` are routed by ``getChildWithDefault``; this is a fallback."""
        return self._not_found.render(request)


class _ApiFolder(resource.Resource):
    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self._children: dict[bytes, resource.Resource] = {b"streams": StreamsApi(context)}
        if context.config.api_internals:
            self._children[b"internals"] = Internals(context)
        self._not_found = NotFound(context)

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """``/api`` itself is not a resource."""
        return self._not_found.render(request)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        child = self._children.get(path)
        if child is not None and postpath(request) in ([], [b""]):
            return child
        return self._not_found


# -- the site and its access log ---------------------------------------------------------


def _redacted_path(uri: bytes) -> str:
    # Tokens travel in the query string: the access log keeps only the path.
    return uri.split(b"?", 1)[0].split(b"#", 1)[0].decode("utf-8", "replace")


def access_log_line(timestamp: str, request: server.Request) -> str:
    """Combined log format with the query strings of the URI and the Referer removed."""
    referer = request.getHeader("referer")
    agent = request.getHeader("user-agent") or ""
    client = request.getClientAddress()
    host = getattr(client, "host", "-")
    method = request.method.decode("ascii", "replace")
    path = _redacted_path(request.uri)
    version = request.clientproto.decode("ascii", "replace")
    shown_referer = _redacted_path(referer.encode()) if referer else "-"
    shown_agent = agent.replace('"', "'")[:200]
    return (
        f'"{host}" - - {timestamp} "{method} {path} {version}" {request.code} '
        f'{request.sentLength or "-"} "{shown_referer}" "{shown_agent}"'
    )


class RelayRequest(server.Request):
    """A request whose description in log lines never shows the query (tokens)."""

    def __repr__(self) -> str:
        """Method and path only."""
        method = self.method.decode("ascii", "replace") if self.method else "?"
        path = _redacted_path(self.uri) if self.uri else "?"
        return f"<RelayRequest method={method} path={path}>"


class RelaySite(server.Site):
    """The relay's ``Site``: its channels share the :class:`RelayContext`."""

    protocol = RelayChannel  # type: ignore[assignment]
    requestFactory = RelayRequest

    def __init__(self, context: RelayContext, root: resource.Resource) -> None:
        # The reactor given here times every channel (HTTPFactory sets channel.callLater).
        super().__init__(
            root,
            logFormatter=access_log_line,
            reactor=context.clock,
            timeout=max(30, int(context.config.handshake_timeout)),
        )
        self.context = context

    def buildProtocol(self, addr: Any) -> Any:
        """Every channel knows the shared context, and is counted for leak accounting."""
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.context = self.context
            self.context.track(channel)
        return channel
