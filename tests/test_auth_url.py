"""``--auth-url`` without a network: the answer cache, the decision on the endpoint's
status, the bounds (timeout, concurrency cap, cancellation) on a Clock, and the gate
holding a handshake until the answer (tests.fakes, with the HTTP call faked)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from streamrelay import admission
from streamrelay.auth_url import AnswerCache, AuthRequest, UrlAuthorizer, refusal_for_status
from streamrelay.limits import Refusal
from streamrelay.metrics import RelayMetrics
from streamrelay.tokens import make_token
from tests.fakes import HOST, Peer, Relay
from tests.support.http import request_head, upgrade_headers

SECRET = b"publish-secret-for-tests"


class FakePost:
    """The HTTP call, answered by the test; records each call and its cancellation."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Deferred[int]]] = []
        self.cancelled = 0

    def __call__(self, url: str, body: dict[str, Any], timeout: float) -> Deferred[int]:
        def cancel(_deferred: Deferred[int]) -> None:
            self.cancelled += 1

        call: Deferred[int] = Deferred(cancel)
        self.calls.append((url, body, call))
        return call

    def answer(self, status: int, index: int = -1) -> None:
        """The endpoint answers call ``index`` with ``status``."""
        self.calls[index][2].callback(status)


def _authorizer(
    clock: Clock, post: FakePost, *, cap: int = 10, cache_seconds: float = 5.0
) -> UrlAuthorizer:
    return UrlAuthorizer(
        "http://auth.test/check",
        clock,
        post,
        RelayMetrics(),
        timeout=2.0,
        max_concurrent=cap,
        cache_seconds=cache_seconds,
        cache_size=100,
    )


def _result(deferred: Deferred[Refusal | None]) -> list[Any]:
    found: list[Any] = []
    deferred.addBoth(found.append)
    return found


REQUEST = AuthRequest("view", "cam", "10.0.0.1", "tok-SECRET", {"token": ["tok-SECRET"]},
                      {"cookie": "s=COOKIE"})


def test_the_cache_expires_and_drops_the_least_recently_used() -> None:
    """Entries live ``seconds``, at most ``size`` of them; a read refreshes recency; a
    cache of 0 seconds keeps nothing."""
    clock = Clock()
    cache = AnswerCache(clock, 5.0, 2)
    cache.put("a", None)
    cache.put("b", Refusal(403, "no"))
    assert cache.get("a") == (True, None)
    cache.put("c", None)  # drops b, the least recently used
    assert cache.get("b") == (False, None)
    assert len(cache) == 2
    clock.advance(5.0)
    assert cache.get("a") == (False, None) and cache.get("c") == (False, None)
    off = AnswerCache(clock, 0.0, 2)
    off.put("a", None)
    assert off.get("a") == (False, None)


def test_the_cache_key_hashes_the_credentials() -> None:
    """The key is a digest holding no credential, and differs by role, stream and
    credential."""
    key = REQUEST.cache_key()
    assert "SECRET" not in key and "COOKIE" not in key and len(key) == 64
    assert AuthRequest("publish", "cam", "10.0.0.1", "tok-SECRET").cache_key() != (
        AuthRequest("view", "cam", "10.0.0.1", "tok-SECRET").cache_key()
    )
    assert AuthRequest("view", "cam2", "10.0.0.1", "tok-SECRET").cache_key() != (
        AuthRequest("view", "cam", "10.0.0.1", "tok-SECRET").cache_key()
    )
    assert AuthRequest("view", "cam", "10.0.0.1", "other").cache_key() != (
        AuthRequest("view", "cam", "10.0.0.1", "tok-SECRET").cache_key()
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, None), (204, None), (403, 403), (401, 401), (404, 401), (302, 401), (500, 503),
     (503, 503)],
)
def test_the_status_decides(status: int, expected: int | None) -> None:
    """2xx admits, 403 is 403, other refusals 401, 5xx 503 with Retry-After."""
    refusal = refusal_for_status(status)
    assert (refusal.status if refusal else None) == expected
    if refusal is not None and refusal.status == 503:
        assert refusal.retry_after is not None


def test_definite_answers_are_cached_and_failures_not() -> None:
    """A 200 and a 403 are reused without a call; a 500 is asked again."""
    clock, post = Clock(), FakePost()
    authorizer = _authorizer(clock, post)
    first = _result(authorizer.check(REQUEST))
    assert post.calls[0][1]["token"] == "tok-SECRET"
    post.answer(200)
    assert first == [None]
    assert _result(authorizer.check(REQUEST)) == [None]
    assert len(post.calls) == 1
    other = AuthRequest("view", "cam", "10.0.0.1", "forbidden")
    refused = _result(authorizer.check(other))
    post.answer(403)
    assert refused[0].status == 403
    assert _result(authorizer.check(other))[0].status == 403
    assert len(post.calls) == 2
    failing = AuthRequest("view", "cam", "10.0.0.1", "flap")
    _result(authorizer.check(failing))
    post.answer(500)
    _result(authorizer.check(failing))
    assert len(post.calls) == 4
    clock.advance(5.0)
    _result(authorizer.check(REQUEST))
    assert len(post.calls) == 5
    assert authorizer.in_flight == 1


def test_timeout_cap_and_failure_answer_503_and_never_admit() -> None:
    """A call over the timeout is cancelled and answered 503; over the cap a check is
    503 at once without a call; a failed call is 503; nothing stays in flight."""
    clock, post = Clock(), FakePost()
    authorizer = _authorizer(clock, post, cap=1)
    slow = _result(authorizer.check(REQUEST))
    over = _result(authorizer.check(AuthRequest("view", "cam", "10.0.0.2", "x")))
    assert over[0].status == 503 and len(post.calls) == 1
    clock.advance(2.0)
    assert post.cancelled == 1
    assert slow[0].status == 503 and slow[0].retry_after
    assert authorizer.in_flight == 0
    down = _result(authorizer.check(REQUEST))
    post.calls[-1][2].errback(ConnectionRefusedError("http://auth.test/check?key=K"))
    assert down[0].status == 503
    assert authorizer.in_flight == 0
    assert not clock.getDelayedCalls()


def test_cancelling_a_check_cancels_the_call() -> None:
    """The gate cancels when its client leaves: the call is cancelled, its timer gone,
    its place freed, and nothing cached."""
    clock, post = Clock(), FakePost()
    authorizer = _authorizer(clock, post)
    checking = authorizer.check(REQUEST)
    checking.addErrback(lambda _failure: None)
    checking.cancel()
    assert post.cancelled == 1
    assert authorizer.in_flight == 0
    assert not clock.getDelayedCalls()
    assert len(authorizer.cache) == 0


# -- the gate -----------------------------------------------------------------------------


@pytest.fixture
def post(monkeypatch: pytest.MonkeyPatch) -> FakePost:
    """The relay's HTTP call to the endpoint, faked."""
    fake = FakePost()
    monkeypatch.setattr(admission, "treq_post", lambda _reactor: fake)
    return fake


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


def _send(relay: Relay, target: str, extra: dict[str, str] | None = None,
          host: str = "127.0.0.1") -> Peer:
    peer = relay.connect(host)
    headers = upgrade_headers("streamrelay.v1", host=HOST)
    headers.update(extra or {})
    peer.send(request_head("GET", target, headers))
    return peer


def test_the_gate_holds_the_handshake_until_the_answer(post: FakePost) -> None:
    """Nothing is written while the endpoint is asked; a 200 upgrades (a publisher from
    a non-loopback address, with no secret); a 403 refuses with 403."""
    relay = Relay.with_options(auth_url="http://auth.test/check")
    peer = _send(relay, "/publish/cam?token=abc", host="192.0.2.7")
    assert peer.written == b""
    body = post.calls[0][1]
    assert body["role"] == "publish" and body["client"] == "192.0.2.7"
    assert body["query"] == {"token": ["abc"]} and body["stream"] == "cam"
    post.answer(200)
    assert peer.response().status == 101
    viewer = _send(relay, "/watch/cam?token=no")
    post.answer(403)
    assert viewer.response().status == 403
    assert viewer.closing


def test_a_client_leaving_meanwhile_cancels_the_call(post: FakePost) -> None:
    """The call is cancelled, and the late answer touches nothing."""
    relay = Relay.with_options(auth_url="http://auth.test/check")
    peer = _send(relay, "/watch/cam")
    peer.lose()
    assert post.cancelled == 1
    relay.settle()
    relay.assert_idle()


def test_the_handshake_timeout_bounds_the_call(post: FakePost) -> None:
    """With 1 s of handshake timeout left the call gets 1 s, not --auth-timeout."""
    relay = Relay.with_options(
        auth_url="http://auth.test/check", handshake_timeout=1.0, auth_timeout=2.0
    )
    peer = _send(relay, "/watch/cam")
    relay.clock.advance(1.0)
    response = peer.response()
    assert response.status == 503 and response.header("retry-after")


def test_either_a_token_or_the_endpoint_admits(post: FakePost) -> None:
    """``either``: a valid HMAC token admits without a call; without one the endpoint
    decides."""
    relay = Relay.with_options(auth_url="http://auth.test/check", view_secret=SECRET)
    token = make_token(SECRET, "view", "cam", int(time.time()) + 60)
    assert _send(relay, f"/watch/cam?token={token}").response().status == 101
    assert post.calls == []
    peer = _send(relay, "/watch/cam?token=bad")
    post.answer(200)
    assert peer.response().status == 101


def test_both_need_the_token_and_the_endpoint(post: FakePost) -> None:
    """``both``: a bad token is 401 without a call; a good one is still asked about."""
    relay = Relay.with_options(
        auth_url="http://auth.test/check", view_secret=SECRET, auth_combine="both"
    )
    assert _send(relay, "/watch/cam?token=bad").response().status == 401
    assert post.calls == []
    token = make_token(SECRET, "view", "cam", int(time.time()) + 60)
    peer = _send(relay, f"/watch/cam?token={token}")
    post.answer(401)
    assert peer.response().status == 401
