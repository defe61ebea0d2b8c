"""Authorisation by the user's own application (``--auth-url``): for a handshake, POST a
JSON description of it to the user's endpoint and admit on 2xx.

:class:`UrlAuthorizer` is the bounded client: one call per handshake at most, a timeout
(never admitting on it), a cap on concurrent calls, and :class:`AnswerCache`, a short LRU
of the endpoint's definite answers keyed by a hash of the credentials (never the
credentials themselves).  The HTTP call itself is injected (:data:`Post`): treq against
the reactor in production, a fake in the unit tests.  No credential reaches a log line
or a refusal reason.

Answers: 2xx admits; 403 refuses with 403; any other 4xx (and 3xx) refuses with 401; a
5xx, a timeout, a connection failure or the cap answers 503 with ``Retry-After`` and is
not cached.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from streamrelay.limits import Refusal
from streamrelay.logs import relay_logger
from streamrelay.metrics import RelayMetrics

_log = relay_logger(__name__)

# Asked again after this many seconds when the endpoint could not answer.
RETRY_AFTER_SECONDS = 2
# Headers forwarded to the endpoint when present (lower-case).
FORWARDED_HEADERS = ("authorization", "cookie", "origin", "user-agent")

# POST ``body`` (JSON-ready) to the URL within ``timeout`` seconds; fires with the status.
Post = Callable[[str, dict[str, Any], float], "Deferred[int]"]


def request_query(request: Any) -> dict[str, list[str]]:
    """An HTTP request's query parameters as text (undecodable bytes replaced), for
    :attr:`AuthRequest.query`."""
    return {
        name.decode("utf-8", "replace"): [value.decode("utf-8", "replace") for value in values]
        for name, values in request.args.items()
    }


def forwarded_headers(request: Any) -> dict[str, str]:
    """The :data:`FORWARDED_HEADERS` an HTTP request has, for :attr:`AuthRequest.headers`."""
    headers = {}
    for name in FORWARDED_HEADERS:
        value = request.getHeader(name)
        if value is not None:
            headers[name] = value
    return headers


@dataclass(frozen=True)
class AuthRequest:
    """What the endpoint is told about one handshake."""

    role: str
    stream: str
    client: str
    token: str | None = None
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # The base stream (``cam`` for the rendition ``cam~360p``; the stream itself else).
    base: str = ""

    def body(self) -> dict[str, Any]:
        """The JSON body of the POST."""
        return {
            "role": self.role,
            "stream": self.stream,
            "base": self.base or self.stream,
            "client": self.client,
            "token": self.token,
            "query": self.query,
            "headers": self.headers,
        }

    def cache_key(self) -> str:
        """(role, stream, credential) as one SHA-256 digest: the credentials (token,
        query, headers) and the client are hashed, never kept in clear."""
        material = json.dumps(
            [self.role, self.stream, self.client, self.token, self.query, self.headers],
            sort_keys=True,
        )
        return hashlib.sha256(material.encode("utf-8")).hexdigest()


def refusal_for_status(status: int) -> Refusal | None:
    """The gate's answer to the endpoint's HTTP ``status`` (None: admitted)."""
    if 200 <= status < 300:
        return None
    if status == 403:
        return Refusal(403, "refused by the authorisation endpoint")
    if status >= 500:
        return unavailable("authorisation endpoint failed")
    return Refusal(401, "not authorised by the authorisation endpoint")


def unavailable(reason: str) -> Refusal:
    """503 + Retry-After: the endpoint could not decide; never an admission."""
    return Refusal(503, reason, retry_after=RETRY_AFTER_SECONDS)


def is_definite(refusal: Refusal | None) -> bool:
    """Whether an answer may be cached: the endpoint's own admit, 401 or 403."""
    return refusal is None or refusal.status in (401, 403)


class AnswerCache:
    """Definite answers for ``seconds``, at most ``size`` of them, least recently used
    dropped first."""

    def __init__(self, clock: IReactorTime, seconds: float, size: int) -> None:
        self._clock = clock
        self._seconds = seconds
        self._size = size
        self._entries: OrderedDict[str, tuple[float, Refusal | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[bool, Refusal | None]:
        """``(found, answer)`` for ``key``; an expired entry is dropped and not found."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        expires, answer = entry
        if expires <= self._clock.seconds():
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, answer

    def put(self, key: str, answer: Refusal | None) -> None:
        """Remember ``answer`` (a no-op when caching is off)."""
        if self._seconds <= 0 or self._size <= 0:
            return
        self._entries[key] = (self._clock.seconds() + self._seconds, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class UrlAuthorizer:
    """Asks ``url`` whether a handshake may proceed; bounded in time, in concurrent
    calls and by its cache."""

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        post: Post,
        metrics: RelayMetrics,
        *,
        timeout: float,
        max_concurrent: int,
        cache_seconds: float,
        cache_size: int,
    ) -> None:
        self.url = url
        self.clock = clock
        self.post = post
        self.metrics = metrics
        self.timeout = timeout
        self.max_concurrent = max_concurrent
        self.cache = AnswerCache(clock, cache_seconds, cache_size)
        self.in_flight = 0

    def check(self, request: AuthRequest, timeout: float | None = None) -> Deferred[Refusal | None]:
        """The endpoint's answer for ``request`` (a refusal, or None to admit), within
        ``timeout`` (default: the configured one).  Cancelling the result cancels the
        call."""
        key = request.cache_key()
        found, answer = self.cache.get(key)
        if found:
            self.metrics.auth_cache_hit()
            return _fired(answer)
        if self.in_flight >= self.max_concurrent:
            self.metrics.auth_call("over_capacity", None)
            return _fired(unavailable("too many authorisation calls in progress"))
        self.in_flight += 1
        started = self.clock.seconds()
        limit = timeout or self.timeout
        # Why the call ended early, if it did: "timeout" or "cancelled" (by the gate).
        ended: list[str] = []
        call = self.post(self.url, request.body(), limit)

        def expire() -> None:
            ended.append("timeout")
            call.cancel()

        timer = self.clock.callLater(limit, expire)

        def cancel(_result: Deferred[Refusal | None]) -> None:
            ended.append("cancelled")
            call.cancel()

        result: Deferred[Refusal | None] = Deferred(cancel)

        def answered(status: int) -> Refusal | None:
            refusal = refusal_for_status(status)
            outcome = "admitted" if refusal is None else f"refused_{refusal.status}"
            if refusal is not None and refusal.status == 503:
                outcome = "failed"
            self.metrics.auth_call(outcome, self.clock.seconds() - started)
            if is_definite(refusal):
                self.cache.put(key, refusal)
            return refusal

        def failed(failure: Failure) -> Refusal | None:
            elapsed = self.clock.seconds() - started
            if ended and ended[0] == "cancelled":
                # The client went away: nobody to answer.
                self.metrics.auth_call("cancelled", None)
                return None
            if ended:
                self.metrics.auth_call("timeout", elapsed)
                _log.info("Authorisation endpoint timed out", kind="auth.timeout")
                return unavailable("authorisation endpoint timed out")
            self.metrics.auth_call("failed", elapsed)
            # The exception's type only: its text may quote the URL, which may hold a key.
            _log.info(
                "Authorisation endpoint unreachable: {error}",
                kind="auth.failed",
                error=type(failure.value).__name__,
            )
            return unavailable("authorisation endpoint unavailable")

        def done(answer: Refusal | None) -> None:
            self.in_flight -= 1
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(answer)

        call.addCallbacks(answered, failed).addCallback(done)
        return result


def _fired(answer: Refusal | None) -> Deferred[Refusal | None]:
    result: Deferred[Refusal | None] = Deferred()
    result.callback(answer)
    return result


def treq_post(reactor: Any) -> Post:
    """The production :data:`Post`: treq on ``reactor``, the body discarded unread."""
    import treq

    def post(url: str, body: dict[str, Any], timeout: float) -> Deferred[int]:
        # The timeout is the caller's (Deferred.addTimeout cancels this chain).
        requested: Deferred[Any] = treq.post(url, json=body, reactor=reactor, persistent=False)

        def status(response: Any) -> Deferred[int]:
            code = int(response.code)
            # Read (and drop) the body so that the connection is released.
            drained: Deferred[Any] = treq.content(response)
            drained.addErrback(lambda _failure: None)
            return drained.addCallback(lambda _content: code)

        return requested.addCallback(status)

    return post
