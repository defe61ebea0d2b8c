"""Hardening 9: security of the HTTP handshake and of the logs.

Two relays, both on loopback:

- ``open``: no secrets (publishing from direct loopback only), ``--echo``, default
  origins (viewers ``*``, publishers none);
- ``locked``: ``--publish-secret-file`` and ``--view-secret-file`` (files written by the
  test), ``--publish-origins null,https://good.example`` and
  ``--view-origins null,https://good.example``.

Checked: a foreign Origin on publish is refused (403); ``Origin: null`` is refused unless
listed; tampered, expired, wrong-role, wrong-stream, wrong-secret and missing tokens get
401 (tokens made with ``streamrelay.tokens.make_token``); a publish forwarded by a
same-host reverse proxy (``X-Forwarded-For`` or ``Forwarded``) is not treated as
loopback (403 without a secret); a plain GET on a WebSocket path gets 426 and no
``Location`` whatever its query; and no token, signature or secret appears anywhere in
either relay's log (access log and Referer included) after every one of these requests
carried them in ``?token=``, ``Authorization`` and ``Referer``.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from streamrelay.tokens import make_token
from tests.support.figures import record_figure
from tests.support.http import handshake_request, http_exchange, plain_request
from tests.support.raw_ws import ws_open
from tests.support.relay_process import StartRelay

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

STREAM = "secure"


def _ws_status(port: int, path: str, headers: list[tuple[str, str]] | None = None) -> int:
    sock, response = ws_open(port, path, headers or [])
    sock.close()
    return response.status


class Tokens:
    """Every token the test made, so that the logs can be searched for them."""

    def __init__(self, publish_secret: bytes, view_secret: bytes) -> None:
        self.publish_secret = publish_secret
        self.view_secret = view_secret
        self.made: list[str] = []

    def make(self, secret: bytes, role: str, stream: str, expires: int) -> str:
        token = make_token(secret, role, stream, expires)
        self.made.append(token)
        return token

    def secrets_and_tokens(self) -> list[str]:
        strings = [self.publish_secret.decode(), self.view_secret.decode()]
        for token in self.made:
            strings += [token, token.partition(".")[2]]
        return strings


def _tamper(token: str) -> str:
    expires, _, signature = token.partition(".")
    last = "0" if signature[-1] != "0" else "1"
    return f"{expires}.{signature[:-1]}{last}"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Tokens]:
    publish_secret = ("pub-" + secrets.token_hex(16)).encode()
    view_secret = ("view-" + secrets.token_hex(16)).encode()
    publish_file = tmp_path / "publish.secret"
    view_file = tmp_path / "view.secret"
    publish_file.write_bytes(publish_secret + b"\n")
    view_file.write_bytes(view_secret + b"\n")
    return publish_file, view_file, Tokens(publish_secret, view_secret)


def test_security_of_handshakes_and_logs(
    start_relay: StartRelay, keys: tuple[Path, Path, Tokens],
) -> None:
    """Origins, proxies and tokens are refused as documented, plain GETs on WebSocket paths
    get 426 without Location, and no token or secret reaches either relay's log."""
    publish_file, view_file, tokens = keys
    open_relay = start_relay("--echo")
    locked = start_relay(
        "--publish-secret-file",
        str(publish_file),
        "--view-secret-file",
        str(view_file),
        "--publish-origins",
        "null,https://good.example",
        "--view-origins",
        "null,https://good.example",
    )
    now = int(time.time())
    publish_ok = tokens.make(tokens.publish_secret, "publish", STREAM, now + 3600)
    view_ok = tokens.make(tokens.view_secret, "view", STREAM, now + 3600)
    # Tokens that must not grant anything; they too must never reach a log.
    bad_tokens = {
        "tampered_signature": _tamper(
            tokens.make(tokens.publish_secret, "publish", STREAM, now + 3600)
        ),
        "tampered_expiry": f"{now + 7200}.{publish_ok.partition('.')[2]}",
        "expired": tokens.make(tokens.publish_secret, "publish", STREAM, now - 10),
        "wrong_role_view_token": tokens.make(tokens.publish_secret, "view", STREAM, now + 3600),
        "wrong_stream": tokens.make(tokens.publish_secret, "publish", "other", now + 3600),
        "wrong_secret": tokens.make(tokens.view_secret, "publish", STREAM, now + 3600),
        "malformed": "not-a-token",
    }
    tokens.made += [bad_tokens["tampered_signature"], bad_tokens["tampered_expiry"]]
    referer = f"http://127.0.0.1:{locked.port}/view/{STREAM}?token={view_ok}"
    results: dict[str, Any] = {}
    op, lp = open_relay.port, locked.port

    # -- origins and proxies on the open relay (no secret) --------------------------
    publish = f"/publish/{STREAM}"
    watch = f"/watch/{STREAM}"
    results["open_publish_no_origin"] = _ws_status(op, publish)
    results["open_publish_foreign_origin"] = _ws_status(
        op, publish, [("Origin", "https://evil.example")]
    )
    results["open_publish_null_origin"] = _ws_status(op, publish, [("Origin", "null")])
    results["open_publish_localhost_origin"] = _ws_status(
        op, publish, [("Origin", "http://localhost:8080")]
    )
    results["open_publish_x_forwarded_for"] = _ws_status(
        op, publish, [("X-Forwarded-For", "203.0.113.9")]
    )
    results["open_publish_x_forwarded_for_loopback"] = _ws_status(
        op, publish, [("X-Forwarded-For", "127.0.0.1")]
    )
    results["open_publish_forwarded"] = _ws_status(
        op, publish, [("Forwarded", "for=203.0.113.9;proto=https")]
    )
    results["open_publish_forwarded_loopback"] = _ws_status(
        op, publish, [("Forwarded", 'for="127.0.0.1"')]
    )
    results["open_publish_x_real_ip"] = _ws_status(
        op, publish, [("X-Real-IP", "203.0.113.9")]
    )
    results["open_view_null_origin_not_listed"] = _ws_status(op, watch, [("Origin", "null")])
    results["open_view_any_origin"] = _ws_status(
        op, watch, [("Origin", "https://anything.example")]
    )
    results["open_api_streams_forwarded"] = http_exchange(
        op, plain_request("/api/streams", headers=[("X-Forwarded-For", "203.0.113.9")])
    ).status

    # -- tokens on the locked relay ---------------------------------------------------
    bearer = [("Authorization", f"Bearer {publish_ok}")]
    results["locked_publish_no_token"] = _ws_status(lp, publish)
    results["locked_publish_bearer"] = _ws_status(lp, publish, bearer)
    results["locked_publish_query_token"] = _ws_status(lp, f"{publish}?token={publish_ok}")
    for name, token in bad_tokens.items():
        results[f"locked_publish_{name}_bearer"] = _ws_status(
            lp, publish, [("Authorization", f"Bearer {token}")]
        )
        results[f"locked_publish_{name}_query"] = _ws_status(lp, f"{publish}?token={token}")
    results["locked_view_no_token"] = _ws_status(lp, watch)
    results["locked_view_token"] = _ws_status(lp, f"{watch}?token={view_ok}")
    results["locked_view_publish_token"] = _ws_status(lp, f"{watch}?token={publish_ok}")
    results["locked_view_expired"] = _ws_status(
        lp, f"{watch}?token={tokens.make(tokens.view_secret, 'view', STREAM, now - 1)}"
    )
    results["locked_view_wrong_stream"] = _ws_status(
        lp, f"{watch}?token={tokens.make(tokens.view_secret, 'view', 'other', now + 60)}"
    )
    results["locked_publish_listed_null_origin"] = _ws_status(
        lp, publish, bearer + [("Origin", "null")]
    )
    results["locked_publish_listed_origin"] = _ws_status(
        lp, publish, bearer + [("Origin", "https://good.example")]
    )
    results["locked_publish_foreign_origin"] = _ws_status(
        lp, publish, bearer + [("Origin", "https://evil.example")]
    )
    results["locked_publish_suffix_origin"] = _ws_status(
        lp, publish, bearer + [("Origin", "https://good.example.evil.test")]
    )
    results["locked_publish_forwarded_with_token"] = _ws_status(
        lp, publish, bearer + [("X-Forwarded-For", "203.0.113.9")]
    )
    results["locked_view_listed_null_origin"] = _ws_status(
        lp, f"{watch}?token={view_ok}", [("Origin", "null")]
    )
    results["locked_view_foreign_origin"] = _ws_status(
        lp, f"{watch}?token={view_ok}", [("Origin", "https://evil.example")]
    )
    results["locked_api_streams_loopback"] = http_exchange(lp, plain_request("/api/streams")).status
    results["locked_api_streams_forwarded"] = http_exchange(
        lp, plain_request("/api/streams", headers=[("X-Forwarded-For", "203.0.113.9")])
    ).status

    # -- plain GETs on WebSocket paths: 426, never a redirect ------------------------
    redirects = [
        "https://evil.example/",
        "//evil.example",
        "javascript:alert(1)",
        "https%3A%2F%2Fevil.example",
    ]
    plain: dict[str, Any] = {}
    for relay_name, port in (("open", op), ("locked", lp)):
        for path in (publish, watch, "/echo"):
            if path == "/echo" and relay_name == "locked":
                continue
            for target in redirects:
                query = f"{path}?redirect={target}&token={view_ok}"
                response = http_exchange(
                    port,
                    plain_request(
                        query,
                        headers=[("Referer", referer), ("Authorization", f"Bearer {publish_ok}")],
                    ),
                )
                plain[f"{relay_name} {query.split('&')[0]}"] = {
                    "status": response.status,
                    "location": response.header("location"),
                    "upgrade": response.header("upgrade"),
                    "body_mentions_evil": b"evil" in response.body,
                }
    # An upgrade Autobahn itself refuses (no Sec-WebSocket-Key), past the token check.
    broken = handshake_request(
        f"{watch}?token={view_ok}&redirect=https://evil.example/", headers=[("Referer", referer)]
    )
    broken = broken.replace(b"Sec-WebSocket-Key", b"X-Not-The-Key")
    autobahn_refusal = http_exchange(lp, broken)
    plain["locked autobahn-refused upgrade"] = {
        "status": autobahn_refusal.status,
        "location": autobahn_refusal.header("location"),
        "body_mentions_evil": b"evil" in autobahn_refusal.body,
    }

    # -- more requests carrying tokens, for the log check -----------------------------
    for port in (op, lp):
        for path in (
            "/healthz",
            "/api/streams",
            "/",
            f"/view/{STREAM}",
            "/static/player.js",
            "/nowhere",
            f"/watch/{STREAM}/extra",
            "/watch/bad%20name",
        ):
            http_exchange(
                port,
                plain_request(
                    f"{path}?token={view_ok}",
                    headers=[("Referer", referer), ("Authorization", f"Bearer {view_ok}")],
                ),
            )
        # A 431 and a malformed request, tokens in the request line.
        http_exchange(
            port,
            plain_request(
                f"/watch/{STREAM}?token={publish_ok}",
                headers=[(f"X-Pad-{index}", "v") for index in range(150)],
            ),
        )
        http_exchange(
            port,
            f"GET /watch/{STREAM}?token={publish_ok} HTTP/1.1\r\n"
            f"Host: x\r\nBad Header Line\r\n\r\n".encode(),
        )
        _ws_status(port, f"{watch}?token={publish_ok}", [("Referer", referer)])
    time.sleep(0.5)
    open_status = open_relay.stop()
    locked_status = locked.stop()
    logs = {"open": open_relay.log_text(), "locked": locked.log_text()}
    leaks = {
        name: sorted(
            {secret[:12] + "..." for secret in tokens.secrets_and_tokens() if secret in text}
        )
        for name, text in logs.items()
    }
    record_figure(
        "security",
        handshake_statuses=results,
        plain_get_on_websocket_paths=plain,
        tokens_and_secrets_searched=len(tokens.secrets_and_tokens()),
        log_lines={name: len(text.splitlines()) for name, text in logs.items()},
        access_log_lines_with_referer=sum(
            1
            for text in logs.values()
            for line in text.splitlines()
            if f"/view/{STREAM}" in line and "GET" in line
        ),
        leaked_in_logs=leaks,
        exit_statuses=[open_status, locked_status],
    )
    expected = {
        "open_publish_no_origin": 101,
        "open_publish_foreign_origin": 403,
        "open_publish_null_origin": 403,
        "open_publish_localhost_origin": 403,
        "open_publish_x_forwarded_for": 403,
        "open_publish_x_forwarded_for_loopback": 403,
        "open_publish_forwarded": 403,
        "open_publish_forwarded_loopback": 403,
        "open_publish_x_real_ip": 403,
        "open_view_null_origin_not_listed": 403,
        "open_view_any_origin": 101,
        "open_api_streams_forwarded": 200,
        "locked_publish_no_token": 401,
        "locked_publish_bearer": 101,
        "locked_publish_query_token": 101,
        "locked_view_no_token": 401,
        "locked_view_token": 101,
        "locked_view_publish_token": 401,
        "locked_view_expired": 401,
        "locked_view_wrong_stream": 401,
        "locked_publish_listed_null_origin": 101,
        "locked_publish_listed_origin": 101,
        "locked_publish_foreign_origin": 403,
        "locked_publish_suffix_origin": 403,
        "locked_publish_forwarded_with_token": 101,
        "locked_view_listed_null_origin": 101,
        "locked_view_foreign_origin": 403,
        "locked_api_streams_loopback": 200,
        "locked_api_streams_forwarded": 403,
    }
    for name in bad_tokens:
        expected[f"locked_publish_{name}_bearer"] = 401
        expected[f"locked_publish_{name}_query"] = 401
    checked = {name: status for name, status in results.items() if name in expected}
    assert checked == expected
    for name, outcome in plain.items():
        assert outcome["location"] is None and not outcome["body_mentions_evil"], name
        if "autobahn" not in name:
            assert outcome["status"] == 426 and outcome["upgrade"] == "websocket", name
    assert not any(leaks.values()), leaks
