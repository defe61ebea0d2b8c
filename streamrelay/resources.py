"""The plain HTTP resources: ``/healthz``, ``/metrics``, ``/api/streams``,
``/api/streams/{stream}/thumbnail.jpg``,
``/api/internals`` (with ``--api-internals``), the index page, the player and its static
files, and the 404 for everything else."""

from __future__ import annotations

import gc
import json
import time
from importlib import resources
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web import resource, server

from streamrelay.addresses import is_direct_loopback
from streamrelay.auth_url import (
    AuthRequest,
    UrlAuthorizer,
    forwarded_headers,
    request_query,
    unavailable,
)
from streamrelay.channel import REASONS, channel_of
from streamrelay.context import RelayContext
from streamrelay.limits import Refusal
from streamrelay.names import is_valid_stream_name
from streamrelay.peers import peer_host
from streamrelay.roles import Role
from streamrelay.tokens import TokenError, verify_token

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def plain(
    request: server.Request, status: int, text: str, retry_after: int | None = None
) -> bytes:
    """Set a plain-text answer's status and headers; return its body."""
    request.setResponseCode(status, REASONS.get(status))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    if retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % retry_after)
    return text.encode("utf-8") + b"\n"


def postpath(request: server.Request) -> list[bytes]:
    """The path segments after the resource's own."""
    return request.postpath or []


class HttpResource(resource.Resource):
    """A plain HTTP resource: refused (503) on a connection over the limits."""

    isLeaf = True

    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self.context = context

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        """Apply the connection refusal, then serve GET and HEAD."""
        channel = channel_of(request)
        if channel is not None and channel.refusal is not None:
            channel.close_after_response()
            refusal = channel.refusal
            return plain(request, refusal.status, refusal.reason, refusal.retry_after)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return plain(request, 405, "method not allowed")
        body = self.serve(request)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def serve(self, request: server.Request) -> bytes:
        """Answer the request (subclass hook)."""
        raise NotImplementedError


class NotFound(HttpResource):
    """404 for every unknown path, before any other refusal (the documented order)."""

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """Say it plainly; close afterwards when the connection is over the limits."""
        channel = channel_of(request)
        if channel is not None and channel.refusal is not None:
            channel.close_after_response()
        return self.serve(request)

    def serve(self, request: server.Request) -> bytes:
        """Say it plainly."""
        return plain(request, 404, "not found")


class Metrics(HttpResource):
    """``/metrics``: the relay's Prometheus metrics, for direct loopback requests only on
    the relay's own port (``--metrics-listen`` serves them elsewhere, to anyone who can
    reach that port)."""

    def __init__(self, context: RelayContext, loopback_only: bool = True) -> None:
        super().__init__(context)
        self._loopback_only = loopback_only

    def serve(self, request: server.Request) -> bytes:
        """Render the registry in the format the scraper accepts."""
        if self._loopback_only and not is_direct_loopback(request):
            return plain(request, 403, "metrics are only available from loopback")
        body, content_type = self.context.metrics.exposition(request.getHeader("accept"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


class Health(HttpResource):
    """``/healthz``: 200 ``ok``, 503 while shutting down."""

    def serve(self, request: server.Request) -> bytes:
        """Report liveness."""
        if self.context.shutting_down:
            return plain(request, 503, "shutting down", retry_after=5)
        return plain(request, 200, "ok")


def _json(request: server.Request, body: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


class StreamsApi(HttpResource):
    """``/api/streams``: streams with a publisher or viewers, and connection counts."""

    def serve(self, request: server.Request) -> bytes:
        """Describe the relay's streams as JSON."""
        loopback = is_direct_loopback(request)
        if self.context.config.view_secret is not None and not loopback:
            return plain(request, 403, "stream list is only available from loopback")
        return _json(request, self._local(loopback))

    def _local(self, loopback: bool) -> dict[str, Any]:
        registry = self.context.registry
        return {
            "streams": registry.describe(show_peers=loopback),
            "connections": {
                "publishers": registry.publisher_count,
                "viewers": registry.viewer_count,
                "total": self.context.limiter.total,
            },
        }

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        """``?scope=cluster`` on a cluster node adds every stream of the cluster with its
        origin, read from the directory (asynchronously); otherwise as any resource."""
        origins: Any = self.context.registry.origins
        scope = request.args.get(b"scope", [b""])[0]
        if scope != b"cluster" or origins is None or request.method != b"GET":
            return super().render(request)
        loopback = is_direct_loopback(request)
        channel = channel_of(request)
        refused = channel is not None and channel.refusal is not None
        if refused or (self.context.config.view_secret is not None and not loopback):
            return super().render(request)
        local = self._local(loopback)

        def answer(listing: dict[str, Any]) -> None:
            local["cluster"] = [
                {"name": name, "origin": origin.node} for name, origin in sorted(listing.items())
            ]
            _finish(request, _json(request, local))

        def failed(failure: Any) -> None:
            _finish(request, plain(request, 503, "cluster directory unavailable", 1))

        origins.directory.listing().addCallbacks(answer, failed)
        return server.NOT_DONE_YET


def _finish(request: server.Request, body: bytes) -> None:
    """Write a deferred answer, unless the client left meanwhile."""
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)
        request.finish()


class ThumbnailApi(HttpResource):
    """``/api/streams/{stream}/thumbnail.jpg``: the latest JPEG the stream's publisher
    sent (:mod:`streamrelay.thumbnails`), admitted as a viewer of the stream would be: a
    ``view`` token (``Authorization: Bearer`` or ``?token=``) when the relay has a view
    secret, and ``--auth-url`` asked as for a ``/watch/`` handshake, composed by
    ``--auth-combine`` the same way.  Answers carry an ETag and ``Last-Modified`` with
    ``Cache-Control: private, no-cache``; a matching ``If-None-Match`` gets 304."""

    def __init__(self, context: RelayContext, authorizer: UrlAuthorizer | None = None) -> None:
        super().__init__(context)
        self._authorizer = authorizer

    @staticmethod
    def _stream_name(request: server.Request) -> str | None:
        segments = postpath(request)
        if len(segments) != 2 or segments[1] != b"thumbnail.jpg":
            return None
        return segments[0].decode("utf-8", "replace")

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        """As any resource, unless ``--auth-url`` must be asked: then the answer waits
        for it (a client that leaves cancels the call)."""
        name = self._stream_name(request)
        channel = channel_of(request)
        if (
            name is None
            or not is_valid_stream_name(name)
            or request.method not in (b"GET", b"HEAD")
            or (channel is not None and channel.refusal is not None)
        ):
            return super().render(request)
        verdict = self._credentials(request, name)
        if verdict != "ask":
            return super().render(request)
        assert self._authorizer is not None
        asking = self._authorizer.check(self._auth_request(request, name))
        request.notifyFinish().addErrback(lambda _failure: asking.cancel())

        def answered(refusal: Refusal | None) -> None:
            body = self._answer(request, name, refusal)
            # Written later than render: say the length, or twisted.web would chunk it.
            request.setHeader(b"content-length", b"%d" % len(body))
            _finish(request, b"" if request.method == b"HEAD" else body)

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                answered(unavailable("authorisation check failed"))

        asking.addCallback(answered).addErrback(failed)
        return server.NOT_DONE_YET

    def serve(self, request: server.Request) -> bytes:
        """Check the path and the credentials, then answer."""
        name = self._stream_name(request)
        if name is None:
            return plain(request, 404, "not found")
        if not is_valid_stream_name(name):
            return plain(request, 400, "invalid stream name")
        verdict = self._credentials(request, name)
        # "ask" never reaches here: render() waited for the endpoint's answer.
        return self._answer(request, name, verdict if isinstance(verdict, Refusal) else None)

    def _credentials(self, request: server.Request, name: str) -> Refusal | None | str:
        """A refusal, None (admitted), or "ask" (the ``--auth-url`` endpoint decides)."""
        secret = self.context.config.view_secret
        authorizer = self._authorizer
        if secret is None:
            return None if authorizer is None else "ask"
        token = _token(request)
        refusal: Refusal | None = None
        if token is None:
            refusal = Refusal(401, "token required")
        else:
            try:
                verify_token(secret, token, Role.VIEWER, name, time.time())
            except TokenError as error:
                refusal = Refusal(401, str(error))
        if authorizer is None:
            return refusal
        combine = self.context.config.auth_combine
        if combine == "either":
            return None if refusal is None else "ask"
        return refusal if refusal is not None else "ask"

    def _auth_request(self, request: server.Request, name: str) -> AuthRequest:
        return AuthRequest(
            role=Role.VIEWER.value,
            stream=name,
            client=peer_host(request.getClientAddress()),
            token=_token(request),
            query=request_query(request),
            headers=forwarded_headers(request),
        )

    def _answer(self, request: server.Request, name: str, refusal: Refusal | None) -> bytes:
        if refusal is not None:
            return plain(request, refusal.status, refusal.reason, refusal.retry_after)
        stream = self.context.registry.streams.get(name)
        thumbnail = stream.thumbnail.current if stream is not None else None
        if thumbnail is None:
            return plain(request, 404, "no thumbnail for this stream")
        request.setHeader(b"etag", thumbnail.etag.encode("ascii"))
        request.setHeader(b"last-modified", thumbnail.last_modified.encode("ascii"))
        # Tokens may guard it: private; revalidated on every use, cheaply by ETag.
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        if _etag_matches(request.getHeader("if-none-match"), thumbnail.etag):
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-type", b"image/jpeg")
        return thumbnail.jpeg


def _token(request: server.Request) -> str | None:
    """The token from ``Authorization: Bearer`` or else from ``?token=``."""
    authorization = request.getHeader("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    values = request.args.get(b"token")
    if values:
        return values[0].decode("utf-8", "replace")
    return None


def _etag_matches(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, or ``*``)."""
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


class Internals(HttpResource):
    """``/api/internals`` (``--api-internals``, loopback only): live object counts for
    leak accounting.  Each request runs a full garbage collection, hence the option."""

    def serve(self, request: server.Request) -> bytes:
        """Count live channels and protocols after a full collection."""
        if not is_direct_loopback(request):
            return plain(request, 403, "loopback only")
        gc.collect()
        context = self.context
        counts: dict[str, int] = {}
        for item in list(context.live_objects):
            name = type(item).__name__
            counts[name] = counts.get(name, 0) + 1
        return _json(request, {
            "objects": counts,
            "streams": len(context.registry.streams),
            "pulls": len(getattr(context.registry.puller, "pulls", None) or {}),
            "connections": len(context.connections),
            "limiter": {
                "total": context.limiter.total,
                "addresses": context.limiter.tracked_addresses,
                "refused": context.limiter.refused,
            },
            "handshake_rate": {
                "addresses": context.handshake_rate.tracked_addresses,
                "refused": context.handshake_rate.refused,
            },
            "buffered_bytes": context.registry.budget.total,
            "over_budget": context.over_budget,
        })


# -- pages -------------------------------------------------------------------------------

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".json": b"application/json",
    ".txt": b"text/plain; charset=utf-8",
}


def load_static_files() -> dict[str, bytes]:
    """Read the packaged pages into memory once, before the reactor runs (no file I/O
    on the reactor thread)."""
    files: dict[str, bytes] = {}
    folder = resources.files("streamrelay").joinpath("static")
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in CONTENT_TYPES:
                files[entry.name] = entry.read_bytes()
    return files


class StaticPage(HttpResource):
    """A packaged file served from memory with its content type and a strict CSP."""

    def __init__(self, context: RelayContext, files: dict[str, bytes], name: str | None) -> None:
        super().__init__(context)
        self._files = files
        self._name = name

    def serve(self, request: server.Request) -> bytes:
        """Serve ``name`` (fixed) or the file named by the single path segment."""
        name = self._name
        if name is None:
            if len(postpath(request)) != 1:
                return plain(request, 404, "not found")
            name = postpath(request)[0].decode("utf-8", "replace")
        elif postpath(request) not in ([], [b""]) and name == "index.html":
            return plain(request, 404, "not found")
        content = self._files.get(name)
        if content is None:
            return plain(request, 404, "not found")
        extension = "." + name.rsplit(".", 1)[-1]
        request.setHeader(b"content-type", CONTENT_TYPES[extension])
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        # The player's URL may carry ?token=: never let it leave in a Referer.
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return content


class PlayerPage(StaticPage):
    """``/view/{stream}``: the player page, for a valid stream name."""

    def __init__(self, context: RelayContext, files: dict[str, bytes]) -> None:
        super().__init__(context, files, "player.html")

    def serve(self, request: server.Request) -> bytes:
        """Check the stream name, then serve the player."""
        if len(postpath(request)) != 1:
            return plain(request, 404, "not found")
        if not is_valid_stream_name(postpath(request)[0].decode("utf-8", "replace")):
            return plain(request, 400, "invalid stream name")
        request.postpath = []
        return super().serve(request)
