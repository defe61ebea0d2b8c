"""The relay's own HTTP answers to refusals made before, or without, a twisted.web
request (the channel's 431, 413 and 400, and the handshakes refused from their head by
:mod:`streamrelay.upgrade`): complete plain-text responses that close the connection,
built once per (status, reason) -- refusals come in storms, from a small set of reasons.
"""

from __future__ import annotations

import time
from functools import lru_cache

from twisted.web import http

REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Content Too Large",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@lru_cache(maxsize=256)
def _answer_parts(
    status: int, reason: str, retry_after: int | None, upgrade: bool
) -> tuple[bytes, bytes]:
    # The status line, and every header after Date with the body: a refusal costs a
    # lookup and a join (refusals come in storms, from a small set of reasons).
    body = reason.encode("utf-8") + b"\n"
    lines = [
        b"Content-Type: text/plain; charset=utf-8",
        b"Cache-Control: no-store",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    if retry_after is not None:
        lines.append(b"Retry-After: %d" % retry_after)
    if upgrade:
        lines.append(b"Upgrade: websocket")
    first = b"HTTP/1.1 %d %s\r\nDate: " % (status, REASONS.get(status, b"Error"))
    return first, b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + body


_date_cache: tuple[int, bytes] = (-1, b"")


def _http_date(now: float) -> bytes:
    # RFC 9110 6.6.1: an origin server with a clock sends Date; formatted once a second.
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, http.datetimeToString(second))
    return _date_cache[1]


def raw_answer(
    status: int, reason: str, retry_after: int | None = None, now: float | None = None
) -> bytes:
    """A complete plain-text response that closes the connection, for refusals made
    before (or without) a twisted.web request: status, ``Date``, ``Content-Type``,
    ``Cache-Control: no-store``, ``Content-Length``, ``Connection: close``, and
    ``Retry-After`` when given (``Upgrade: websocket`` with a 426)."""
    first, rest = _answer_parts(status, reason, retry_after, status == 426)
    return first + _http_date(time.time() if now is None else now) + rest
