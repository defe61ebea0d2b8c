"""Admission to the WebSocket endpoints, decided in the HTTP handshake before any
WebSocket exists.

Each endpoint is one :class:`Endpoint` record (path, role, protocol factory, token
secret, allowed origins, stream check).  A handshake passes :data:`CHECKS` in order,
the refusal table of ``docs/protocol.md``; the first refusal is the answer.  (431 and
413 are the channel's: they are decided while the request head is read.)  A handshake
that passes every check is handed to Autobahn by :class:`StreamGate`.

With ``--auth-url`` the credential check may ask the user's endpoint
(:mod:`streamrelay.auth_url`): the gate then holds the request (``NOT_DONE_YET``) until
the answer, within the handshake timeout, cancels the call if the client goes away, and
runs the checks after it (503 limits again, 409) once admitted.

(Over 400 lines: the checks are the refusal table, one function per row, and are read
in order with the gate that runs them, synchronously or awaiting ``--auth-url``.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from autobahn.util import wildcards2patterns
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET

from streamrelay import wire
from streamrelay.addresses import is_direct_loopback
from streamrelay.auth_url import (
    AuthRequest,
    UrlAuthorizer,
    forwarded_headers,
    request_query,
    treq_post,
    unavailable,
)
from streamrelay.channel import RelayChannel, channel_of
from streamrelay.context import RelayContext
from streamrelay.edge_protocol import EdgeProtocol
from streamrelay.limits import Refusal
from streamrelay.logs import autobahn_logger, relay_logger
from streamrelay.names import base_name, is_valid_stream_name
from streamrelay.peers import peer_host
from streamrelay.protocol import (
    EchoProtocol,
    PublisherProtocol,
    RelayFactory,
    ViewerProtocol,
)
from streamrelay.resources import plain, postpath
from streamrelay.roles import Role
from streamrelay.tokens import TokenError, verify_token

_log = relay_logger(__name__)


class OriginPolicy:
    """Which ``Origin`` headers an endpoint accepts: Autobahn's wildcard patterns, and
    ``null`` (sandboxed pages, ``file://``) only when listed as such."""

    def __init__(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        self._patterns = wildcards2patterns([origin for origin in allowed if origin != "null"])
        self._null_allowed = "null" in allowed

    def allows(self, origin: str) -> bool:
        """Whether a handshake carrying ``Origin: origin`` may proceed."""
        if origin == "null":
            return self._null_allowed
        return any(pattern.match(origin) for pattern in self._patterns)


@dataclass(frozen=True)
class Endpoint:
    """One WebSocket endpoint and everything its admission depends on."""

    path: bytes  # the first path segment
    role: Role
    factory: RelayFactory
    # /{path}/{stream} when true, /{path} alone when false.
    named: bool = True
    # Tokens for this role are signed with it; None: no token needed.
    secret: bytes | None = None
    # None: the Origin header is not checked.
    origins: OriginPolicy | None = None
    # With no secret, only direct loopback peers are admitted.
    loopback_without_secret: bool = False
    # With no secret, nobody is admitted (the endpoint is off).
    closed_without_secret: bool = False
    # Why the stream would refuse this role now (503 limits, 409 taken), or None.
    stream_check: Callable[[str, str], Refusal | None] | None = None
    # --auth-url: the user's endpoint decides too (None: tokens alone).
    authorizer: UrlAuthorizer | None = None
    # How the endpoint composes with the token: "either" or "both".
    combine: str = "either"


def endpoints(context: RelayContext) -> list[Endpoint]:
    """The relay's WebSocket endpoints for its configuration."""
    config = context.config
    registry = context.registry
    authorizer = None
    if config.auth_url:
        authorizer = UrlAuthorizer(
            config.auth_url,
            context.clock,
            treq_post(context.clock),
            context.metrics,
            timeout=config.auth_timeout,
            max_concurrent=config.auth_max_concurrent,
            cache_seconds=config.auth_cache_seconds,
            cache_size=config.auth_cache_entries,
        )
    found = [
        Endpoint(
            path=b"publish",
            role=Role.PUBLISHER,
            factory=RelayFactory(context, PublisherProtocol, config.max_message_bytes),
            secret=config.publish_secret,
            origins=OriginPolicy(config.publish_origins),
            loopback_without_secret=True,
            stream_check=registry.check_publisher,
            authorizer=authorizer,
            combine=config.auth_combine,
        ),
        Endpoint(
            path=b"watch",
            role=Role.VIEWER,
            factory=RelayFactory(context, ViewerProtocol, wire.MAX_VIEWER_MESSAGE_BYTES),
            secret=config.view_secret,
            origins=OriginPolicy(config.view_origins),
            stream_check=registry.check_viewer,
            authorizer=authorizer,
            combine=config.auth_combine,
        ),
        Endpoint(
            path=b"relay",
            role=Role.RELAY,
            factory=RelayFactory(context, EdgeProtocol, wire.MAX_VIEWER_MESSAGE_BYTES),
            secret=config.relay_secret,
            # Relays send no Origin header: one that does is a web page.
            origins=OriginPolicy(()),
            closed_without_secret=True,
            stream_check=registry.check_relay,
            authorizer=authorizer,
            combine=config.auth_combine,
        ),
    ]
    if config.echo:
        found.append(
            Endpoint(
                path=b"echo",
                role=Role.ECHO,
                factory=RelayFactory(
                    context, EchoProtocol, config.max_message_bytes, compression=True
                ),
                named=False,
            )
        )
    return found


@dataclass
class Handshake:
    """One opening handshake on an endpoint, as the checks see it."""

    endpoint: Endpoint
    context: RelayContext
    request: server.Request
    channel: RelayChannel | None

    @property
    def segments(self) -> list[bytes]:
        """The path segments after the endpoint's own."""
        return postpath(self.request)

    @property
    def stream(self) -> str:
        """The stream name the path asks for ("" for endpoints without one)."""
        segments = self.segments
        if not self.endpoint.named or not segments:
            return ""
        return segments[0].decode("utf-8", "replace")

    @cached_property
    def stream_refusal(self) -> Refusal | None:
        """Why the stream refuses this role now; asked once per handshake."""
        check = self.endpoint.stream_check
        if check is None:
            return None
        return check(self.stream, peer_host(self.request.getClientAddress()))

    def token(self) -> str | None:
        """The token from ``Authorization: Bearer`` or else from ``?token=``."""
        authorization = self.request.getHeader("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        values = self.request.args.get(b"token")
        if values:
            return values[0].decode("utf-8", "replace")
        return None


Check = Callable[[Handshake], Refusal | None]


# -- the checks, in the order of the refusal table ------------------------------------


def path_names_the_endpoint(handshake: Handshake) -> Refusal | None:
    """404: ``/{path}/{stream}`` exactly (``/{path}`` for endpoints without a stream)."""
    segments = handshake.segments
    if handshake.endpoint.named:
        known = len(segments) == 1 and bool(segments[0])
    else:
        known = segments in ([], [b""])
    return None if known else Refusal(404, "not found")


def stream_name_is_valid(handshake: Handshake) -> Refusal | None:
    """400: a stream name must match ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, optionally
    followed by a rendition label (``~[A-Za-z0-9][A-Za-z0-9_-]{0,15}``)."""
    if handshake.endpoint.named and not is_valid_stream_name(handshake.stream):
        return Refusal(400, "invalid stream name")
    return None


def is_websocket_upgrade(handshake: Handshake) -> Refusal | None:
    """426: only a GET asking to upgrade to a WebSocket opens one."""
    upgrade = (handshake.request.getHeader("upgrade") or "").lower()
    if handshake.request.method != b"GET" or upgrade != "websocket":
        return Refusal(426, "this is a WebSocket endpoint")
    return None


def relay_is_running(handshake: Handshake) -> Refusal | None:
    """503: no new WebSocket while the relay shuts down."""
    if handshake.context.shutting_down:
        return Refusal(503, "server shutting down", retry_after=5)
    return None


def transport_is_supported(handshake: Handshake) -> Refusal | None:
    """503: an upgrade needs the relay's own channel."""
    if handshake.channel is None:
        return Refusal(503, "unsupported transport", retry_after=5)
    return None


def connection_is_within_limits(handshake: Handshake) -> Refusal | None:
    """503: the connection, in total or per address, was over the limits at accept."""
    return handshake.channel.refusal if handshake.channel is not None else None


def handshake_rate_is_within_limits(handshake: Handshake) -> Refusal | None:
    """503: the per-address handshake rate (this takes one of the address's tokens)."""
    address = peer_host(handshake.request.getClientAddress())
    return handshake.context.handshake_rate.allow(address)


def stream_has_room(handshake: Handshake) -> Refusal | None:
    """503: the stream limit, or the stream's viewer limit."""
    refusal = handshake.stream_refusal
    return refusal if refusal is not None and refusal.status == 503 else None


def origin_is_allowed(handshake: Handshake) -> Refusal | None:
    """403: an ``Origin`` header the endpoint does not list."""
    origins = handshake.endpoint.origins
    origin = handshake.request.getHeader("origin")
    if origins is not None and origin is not None and not origins.allows(origin):
        return Refusal(403, "origin not allowed")
    return None


def peer_may_go_without_token(handshake: Handshake) -> Refusal | None:
    """403: publishing with no secret configured is for direct loopback peers only."""
    endpoint = handshake.endpoint
    if (
        endpoint.loopback_without_secret
        and endpoint.secret is None
        and endpoint.authorizer is None
        and not is_direct_loopback(handshake.request)
    ):
        return Refusal(403, "publishing is only allowed from loopback without a secret")
    return None


def endpoint_has_its_secret(handshake: Handshake) -> Refusal | None:
    """403: an endpoint that needs a secret (``/relay``) is off without one."""
    endpoint = handshake.endpoint
    if endpoint.closed_without_secret and endpoint.secret is None and endpoint.authorizer is None:
        return Refusal(403, f"{endpoint.role.value} endpoint is off: no secret configured")
    return None


def token_is_valid(handshake: Handshake) -> Refusal | None:
    """401: with a secret, a token for this role and stream that has not expired; a
    token for a base stream admits its renditions (``BASE~LABEL``) too."""
    secret = handshake.endpoint.secret
    if secret is None:
        return None
    token = handshake.token()
    if token is None:
        return Refusal(401, "token required")
    stream = handshake.stream
    role = handshake.endpoint.role
    now = time.time()
    try:
        verify_token(secret, token, role, stream, now)
    except TokenError as error:
        base = base_name(stream)
        if base == stream:
            return Refusal(401, str(error))
        try:
            verify_token(secret, token, role, base, now)
        except TokenError as base_error:
            return Refusal(401, str(base_error))
    return None


def stream_is_free(handshake: Handshake) -> Refusal | None:
    """409: the stream already has a publisher (``--no-takeover``)."""
    return handshake.stream_refusal


CHECKS: tuple[Check, ...] = (
    path_names_the_endpoint,  # 404
    stream_name_is_valid,  # 400
    is_websocket_upgrade,  # 426 (431 and 413 come from the channel, while the head is read)
    relay_is_running,  # 503
    transport_is_supported,  # 503
    connection_is_within_limits,  # 503
    handshake_rate_is_within_limits,  # 503
    stream_has_room,  # 503
    origin_is_allowed,  # 403
    peer_may_go_without_token,  # 403
    endpoint_has_its_secret,  # 403
    token_is_valid,  # 401
    stream_is_free,  # 409
)


# Headers Autobahn never sees: the token was checked in the HTTP handshake already.
_NOT_REPLAYED = frozenset({b"authorization", b"proxy-authorization"})


def admit(handshake: Handshake) -> Refusal | None:
    """The first refusal :data:`CHECKS` finds, or None: the handshake may proceed."""
    for check in CHECKS:
        refusal = check(handshake)
        if refusal is not None:
            return refusal
    return None


# With --auth-url: the checks before the credentials, and those after the endpoint's
# answer (the state may have changed while it was asked).
_BEFORE_CREDENTIALS = CHECKS[: CHECKS.index(token_is_valid)]
_AFTER_CREDENTIALS: tuple[Check, ...] = (relay_is_running, stream_has_room, stream_is_free)


def admit_or_ask(handshake: Handshake) -> Refusal | None | Deferred[Refusal | None]:
    """As :func:`admit`, but where the endpoint has an authorizer and the token does not
    settle it, a Deferred firing with the answer of the user's endpoint followed by the
    remaining checks (cancel it to cancel the call)."""
    authorizer = handshake.endpoint.authorizer
    if authorizer is None:
        return admit(handshake)
    for check in _BEFORE_CREDENTIALS:
        refusal = check(handshake)
        if refusal is not None:
            return refusal
    endpoint = handshake.endpoint
    if endpoint.secret is not None:
        token_refusal = token_is_valid(handshake)
        if token_refusal is None and endpoint.combine == "either":
            return stream_is_free(handshake)
        if token_refusal is not None and endpoint.combine == "both":
            return token_refusal
    asking = authorizer.check(auth_request(handshake), _time_left(handshake, authorizer))
    return asking.addCallback(lambda refusal: refusal or _after_credentials(handshake))


def _time_left(handshake: Handshake, authorizer: UrlAuthorizer) -> float:
    """The auth timeout, cut to what is left of the handshake timeout."""
    channel = handshake.channel
    if channel is None:
        return authorizer.timeout
    config = handshake.context.config
    left = channel.request_began + config.handshake_timeout - handshake.context.clock.seconds()
    return max(0.001, min(authorizer.timeout, left))


def _after_credentials(handshake: Handshake) -> Refusal | None:
    # The stream's answer is asked again: it may have changed during the call.
    handshake.__dict__.pop("stream_refusal", None)
    for check in _AFTER_CREDENTIALS:
        refusal = check(handshake)
        if refusal is not None:
            return refusal
    return None


def auth_request(handshake: Handshake) -> AuthRequest:
    """What the user's endpoint is told about ``handshake``."""
    request = handshake.request
    return AuthRequest(
        role=handshake.endpoint.role.value,
        stream=handshake.stream,
        base=base_name(handshake.stream),
        client=peer_host(request.getClientAddress()),
        token=handshake.token(),
        query=request_query(request),
        headers=forwarded_headers(request),
    )


def wants_abr(request: server.Request) -> bool:
    """``?abr=1``: the viewer asks for adaptive delivery (docs/protocol.md,
    "Renditions").  Any other value is ignored, as unknown query parameters are."""
    values = (request.args or {}).get(b"abr") or [b""]
    return bool(values[0] == b"1")


# -- the resource ------------------------------------------------------------------------


def build_protocol(endpoint: Endpoint, stream: str, request: Any, client: Any) -> Any:
    """The endpoint's WebSocket protocol for an admitted request, with what the request
    asks for set on it: the one place both upgrade paths (twisted.web's and the head's,
    :mod:`streamrelay.upgrade`) take it from."""
    protocol: Any = endpoint.factory.build(client, stream)
    protocol.client_host = peer_host(client)
    if endpoint.role is Role.VIEWER and wants_abr(request):
        protocol.abr = True
    # Audio only for viewers that ask (docs/protocol.md, "Audio").
    protocol.wants_audio = request.args.get(b"audio", [b""])[-1] in (b"1", b"true")
    protocol.log = autobahn_logger()
    return protocol


class StreamGate(resource.Resource):
    """One WebSocket endpoint: every refusal in the HTTP handshake, then Autobahn."""

    isLeaf = True

    def __init__(self, context: RelayContext, endpoint: Endpoint) -> None:
        super().__init__()
        self.context = context
        self.endpoint = endpoint

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        """Refuse with a status and reason, or upgrade to a WebSocket."""
        handshake = Handshake(self.endpoint, self.context, request, channel_of(request))
        outcome = admit_or_ask(handshake)
        if isinstance(outcome, Deferred):
            self._await(handshake, outcome)
            return NOT_DONE_YET
        if outcome is not None:
            return self._refuse(handshake, outcome)
        self._hand_over(handshake)
        return NOT_DONE_YET

    def _await(self, handshake: Handshake, outcome: Deferred[Refusal | None]) -> None:
        """Hold the request until the user's endpoint answers; a client that leaves
        meanwhile cancels the call."""
        request = handshake.request
        gone = False

        def left(_failure: Failure) -> None:
            nonlocal gone
            gone = True
            outcome.cancel()

        request.notifyFinish().addErrback(left)

        def answered(refusal: Refusal | None) -> None:
            if gone:
                return
            if refusal is not None:
                body = self._refuse(handshake, refusal)
                request.write(body)
                request.finish()
            else:
                self._hand_over(handshake)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            _log.failure("Authorisation check failed", failure, kind="auth.error")
            answered(unavailable("authorisation check failed"))

        outcome.addCallback(answered).addErrback(failed)

    @staticmethod
    def _refuse(handshake: Handshake, refusal: Refusal) -> bytes:
        handshake.context.metrics.refused(refusal.status)
        if handshake.channel is not None:
            handshake.channel.close_after_response()
        if refusal.status == 426:
            handshake.request.setHeader(b"upgrade", b"websocket")
        return plain(handshake.request, refusal.status, refusal.reason, refusal.retry_after)

    def _hand_over(self, handshake: Handshake) -> None:
        request, channel = handshake.request, handshake.channel
        assert channel is not None  # transport_is_supported
        client = request.getClientAddress()
        protocol = build_protocol(self.endpoint, handshake.stream, request, client)
        channel.upgrade(protocol)
        # Autobahn parses the handshake itself: replay the head twisted.web consumed,
        # without the query string or the credential headers, which may carry a token
        # (checked above already; Autobahn logs the whole request at debug level).
        head = [request.method + b" " + request.path + b" HTTP/1.1"]
        for header_name, values in request.requestHeaders.getAllRawHeaders():
            if header_name.lower() in _NOT_REPLAYED:
                continue
            for value in values:
                head.append(header_name + b": " + value)
        protocol.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")
        # Autobahn resolves is_open once the 101 is out and onOpen ran (which may have
        # started a close already, e.g. a publisher over --max-streams).
        if protocol.is_open.called:
            channel.websocket_opened(protocol, client)
        else:
            # Autobahn refused the handshake itself (a bad Sec-WebSocket-* header): it
            # answers 400 for all but a few rare cases.
            self.context.metrics.refused(400)
