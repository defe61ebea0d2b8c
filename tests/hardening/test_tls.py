"""Hardening 10: TLS.

The test makes a self-signed certificate (``cryptography``: EC P-256, SAN IP 127.0.0.1
and DNS localhost) and starts the relay with
``--listen ssl:0:interface=127.0.0.1:privateKey=KEY:certKey=CERT``. A ``wss://`` publisher
and three ``wss://`` viewers (``websockets`` with an SSL context trusting only that
certificate) exchange 200 messages of 64 KiB (at 50 a second), byte for byte and in order; the
relay's log reports an ``https://`` URL; ``/healthz`` answers over HTTPS; and two bad
peers do no harm: one speaking plain HTTP to the TLS port, one opening TCP and never
starting the TLS handshake (closed within ``--handshake-timeout`` + 1 s).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import make_certificate
from tests.support.figures import record_figure, rounded
from tests.support.media import media_is_intact
from tests.support.net import connect
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.ws_client import PacedPublisher, Viewer

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

MESSAGES = 200
MESSAGE_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT = 2.0


async def _exchange(relay: RelayProcess, context: ssl.SSLContext) -> dict[str, Any]:
    viewers = [
        await Viewer(f"{relay.ws_url}/watch/tls", name=f"tls-{index}", ssl=context).start()
        for index in range(3)
    ]
    started = time.monotonic()
    publisher = PacedPublisher(
        f"{relay.ws_url}/publish/tls",
        rate=50,
        gop=20,
        size=MESSAGE_BYTES,
        limit=MESSAGES,
        ssl=context,
    )
    await publisher.start()
    await asyncio.wait_for(publisher.done.wait(), 30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(len(v.media) < MESSAGES for v in viewers):
        await asyncio.sleep(0.02)
    seconds = time.monotonic() - started
    await publisher.close()
    for viewer in viewers:
        await viewer.close()
    return {
        "viewers": viewers,
        "sent": publisher.sent,
        "seconds": seconds,
        "publisher_received": publisher.received,
    }


def _plain_http_to_tls(port: int) -> str:
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        try:
            data = sock.recv(4096)
        except (ConnectionResetError, TimeoutError) as error:
            return type(error).__name__
        return "closed" if not data else f"{len(data)} bytes"


def _silent_tcp_closed_after(port: int) -> float | None:
    with connect(port) as sock:
        started = time.monotonic()
        sock.settimeout(HANDSHAKE_TIMEOUT + 5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return None
        return time.monotonic() - started


def test_tls_publisher_and_viewers_end_to_end(start_relay: StartRelay, tmp_path: Path) -> None:
    """Over TLS a publisher and three viewers exchange 200 messages of 64 KiB intact and in
    order, and a plain-HTTP peer and a silent TCP peer do no harm."""
    key_path, cert_path = make_certificate(tmp_path)
    relay = start_relay(
        "--handshake-timeout",
        str(HANDSHAKE_TIMEOUT),
        listen=f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}",
    )
    context = ssl.create_default_context(cafile=str(cert_path))
    url_logged = re.search(
        r"streamrelay listening on \S+ (https://127\.0\.0\.1:\d+/)", relay.log_text()
    )
    with urllib.request.urlopen(
        relay.http_url + "/healthz", context=context, timeout=5
    ) as response:
        healthz = (response.status, response.read().strip())
    outcome = asyncio.run(_exchange(relay, context))
    plain = _plain_http_to_tls(relay.port)
    silent = _silent_tcp_closed_after(relay.port)
    viewers: list[Viewer] = outcome["viewers"]
    expected = list(range(MESSAGES))
    in_order = [viewer.sequences() == expected for viewer in viewers]
    intact = [
        all(media_is_intact(message, MESSAGE_BYTES) for _, message in viewer.media)
        for viewer in viewers
    ]
    record_figure(
        "tls",
        listen="ssl:0:interface=127.0.0.1 (self-signed EC P-256)",
        url_logged=url_logged.group(1) if url_logged else None,
        ws_url=relay.ws_url,
        healthz=[healthz[0], healthz[1].decode()],
        messages=MESSAGES,
        message_bytes=MESSAGE_BYTES,
        dropped_notices=sum(1 for v in viewers for _, m in v.texts if m.get("type") == "dropped"),
        viewers=len(viewers),
        viewers_in_order=sum(in_order),
        viewers_intact=sum(intact),
        seconds=rounded(outcome["seconds"]),
        megabytes_per_second_per_viewer=rounded(
            MESSAGES * MESSAGE_BYTES / 1e6 / outcome["seconds"], 1
        ),
        publisher_got_viewer_count=any(
            m.get("type") == "viewers" for m in outcome["publisher_received"]
        ),
        plain_http_to_tls_port=plain,
        silent_tcp_closed_after_s=None if silent is None else rounded(silent),
        handshake_timeout_s=HANDSHAKE_TIMEOUT,
    )
    assert relay.ws_url.startswith("wss://")
    assert url_logged is not None
    assert healthz == (200, b"ok")
    assert outcome["sent"] == MESSAGES
    assert all(in_order) and all(intact)
    assert silent is not None and silent <= HANDSHAKE_TIMEOUT + 1
    # The relay still serves after the bad peers.
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")
