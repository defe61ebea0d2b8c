"""Operations against real processes: /metrics scraped and parsed, JSON logs, the
``streamrelay`` console script (serving, draining on SIGTERM, exit statuses), and a
rolling restart of two twistd relays behind a balancer without losing the viewer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.balancer import Balancer
from tests.support.figures import record_figure
from tests.support.http import handshake_request, http_exchange, http_get
from tests.support.media import CONFIG, DELTA, KEY, media
from tests.support.relay_process import LOOPBACK, StartRelay, log_problems
from tests.support.waiting import run, wait_until
from tests.support.ws_client import binary, expect_close, text_of_type, ws_connect

pytestmark = pytest.mark.integration

_METRICS_PORT = re.compile(r"streamrelay metrics on \S+ http://127\.0\.0\.1:(\d+)/metrics")
_LISTENING = re.compile(r"streamrelay listening on \S+ http://127\.0\.0\.1:(\d+)/")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def publish_and_watch(ws_url: str, messages: int) -> None:
    """A publisher sends CONFIG, KEY and deltas; a viewer receives all of them."""
    async with ws_connect(f"{ws_url}/publish/cam") as publisher, ws_connect(
        f"{ws_url}/watch/cam?token=not-a-secret-but-never-logged"
    ) as viewer:
        await text_of_type(viewer, "status")
        await publisher.send(media(CONFIG, b"c" * 10))
        await publisher.send(media(KEY, b"k" * 1000))
        for _ in range(messages - 2):
            await publisher.send(media(DELTA, b"d" * 100))
        for _ in range(messages):
            await binary(viewer)


# -- metrics -----------------------------------------------------------------------------


def test_metrics_from_the_real_relay(start_relay: StartRelay) -> None:
    """The relay's /metrics (loopback) and its --metrics-listen port serve the same
    registry; prometheus_client parses it and the counts follow the traffic."""
    relay = start_relay("--metrics-listen", "tcp:0:interface=127.0.0.1")
    match = wait_until(lambda: _METRICS_PORT.search(relay.log_text()), 10)
    metrics_url = f"http://127.0.0.1:{match.group(1)}"
    run(publish_and_watch(relay.ws_url, 12), 20)
    wait_until(lambda: b"streamrelay_connections_closed_total{" in
               http_get(relay.http_url, "/metrics").body, 5)
    for base in (relay.http_url, metrics_url):
        response = http_get(base, "/metrics")
        assert response.status == 200
        found = samples(response.body.decode())
        assert found[("streamrelay_messages_in_total", ())] == 12
        assert found[("streamrelay_messages_out_total", ())] >= 12
        assert found[("streamrelay_bytes_in_total", ())] == 12 * 9 + 10 + 1000 + 10 * 100
        assert found[("streamrelay_connections_opened_total", (("role", "viewer"),))] == 1
        assert found[("streamrelay_handshake_duration_seconds_count", (("role", "viewer"),))] == 1
        assert found[("process_resident_memory_bytes", ())] > 10_000_000
    # Through a proxy on the same host, the relay's port does not serve it.
    forwarded = http_get(relay.http_url, "/metrics", {"X-Forwarded-For": "203.0.113.9"})
    assert forwarded.status == 403
    assert http_get(metrics_url, "/healthz").status == 404


# -- logs --------------------------------------------------------------------------------


def test_json_logs_from_the_real_relay(start_relay: StartRelay) -> None:
    """--json-logs: every line the process writes is one JSON object (twistd's own lines
    too); the connection lines carry their fields; no token anywhere."""
    relay = start_relay("--json-logs")
    run(publish_and_watch(relay.ws_url, 3), 20)
    http_get(relay.http_url, "/healthz?token=also-never-logged")

    def closed() -> list[dict[str, Any]]:
        records = [json.loads(line) for line in relay.log_text().splitlines() if line]
        return [r for r in records if r.get("kind") == "connection.close"]

    wait_until(lambda: len(closed()) == 2, 10)
    lines = closed()
    records = [json.loads(line) for line in relay.log_text().splitlines() if line]
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    kinds = {r.get("kind") for r in records}
    assert {"connection.open", "connection.close", "http.access"} <= kinds
    viewer = next(r for r in lines if r["role"] == "viewer")
    assert viewer["stream"] == "cam" and viewer["code"] == 1000 and viewer["by"] == "peer"
    assert isinstance(viewer["duration"], float) and viewer["bytes_out"] > 1000
    assert str(viewer["peer"]).startswith("127.0.0.1:")
    assert "never-logged" not in relay.log_text()


def test_a_storm_of_bad_clients_is_bounded_in_the_real_log(start_relay: StartRelay) -> None:
    """300 requests for unknown paths and 300 handshakes with broken keys: with
    --log-rate 5 (bursts of 50) each kind of line stays within its burst plus 5 a second,
    and every access line left out is counted in a summary."""
    relay = start_relay("--log-rate", "5", "--max-handshakes-per-ip", "10000")
    bad_key = [("Sec-WebSocket-Key", "x" * 30)]
    started = time.monotonic()
    for index in range(300):
        http_exchange(relay.port, handshake_request(f"/nowhere/{index}"))
        http_exchange(relay.port, handshake_request("/watch/cam", headers=bad_key),
                      until_close=True)
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # the buckets refill: the next access line brings its summary
    http_exchange(relay.port, handshake_request("/nowhere/after"))
    access_format = '"{client}" - - "{method} {path} {version}"'

    def access_summaries() -> list[int]:
        return [
            int(line.split("] ", 1)[1].split(" ", 1)[0])
            for line in relay.log_text().splitlines()
            if "were suppressed" in line and access_format in line
        ]

    wait_until(lambda: "/nowhere/after" in relay.log_text(), 5)
    text = relay.log_text()
    bound = 50 + 5 * (elapsed + 1.0) + 1
    printed = text.count("GET /nowhere/")
    assert printed <= bound, (printed, bound)
    assert printed + sum(access_summaries()) == 301
    assert text.count("failing WebSocket opening handshake") <= bound
    assert text.count("dropping connection to peer") <= bound
    assert len(text.splitlines()) < 3 * bound + 30


# -- the console script ------------------------------------------------------------------


class ConsoleRelay:
    """``python -m streamrelay`` (the console script's module) with its log in a file."""

    def __init__(self, log_path: Path, *arguments: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed by finish()
        command = [sys.executable, "-m", "streamrelay", *arguments]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(log_path.parent),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )

    def text(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def port(self) -> int:
        """The relay's port, once it logged it."""
        def bound() -> re.Match[str] | None:
            assert self.process.poll() is None, self.text()
            return _LISTENING.search(self.text())

        return int(wait_until(bound, 20).group(1))

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for the exit (killing it after ``timeout``); the exit status."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def console(tmp_path: Path) -> Iterator[list[ConsoleRelay]]:
    """Console-script relays; killed at teardown if still running."""
    started: list[ConsoleRelay] = []
    yield started
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
        relay.finish()


@pytest.mark.parametrize("reactor", [None, "poll"])
def test_console_script_serves_and_drains_on_sigterm(
    console: list[ConsoleRelay], tmp_path: Path, reactor: str | None
) -> None:
    """``python -m streamrelay`` serves /healthz and WebSockets; SIGTERM gives a viewer
    1001, and the process exits with status 0 (twistd would give 143)."""
    arguments = ["--listen", LOOPBACK] + (["--reactor", reactor] if reactor else [])
    relay = ConsoleRelay(tmp_path / "console.log", *arguments)
    console.append(relay)
    port = relay.port()
    assert http_get(f"http://127.0.0.1:{port}", "/healthz").body == b"ok\n"

    async def watch_then_stop() -> tuple[int | None, str]:
        async with ws_connect(f"ws://127.0.0.1:{port}/watch/cam") as viewer:
            await text_of_type(viewer, "status")
            relay.process.send_signal(signal.SIGTERM)
            return await expect_close(viewer)

    assert run(watch_then_stop(), 20) == (1001, "server shutting down")
    assert relay.finish() == 0
    text = relay.text()
    assert "streamrelay stopped" in text
    if reactor:
        assert "PollReactor" in text
    assert log_problems(text) == []


def test_console_script_exits_1_when_it_cannot_listen(
    console: list[ConsoleRelay], tmp_path: Path
) -> None:
    """A port that is taken: one error, status 1, no reactor left running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = ConsoleRelay(tmp_path / "taken.log", "--listen", f"tcp:{port}:interface=127.0.0.1")
        console.append(relay)
        assert relay.finish(20) == 1
    assert "streamrelay could not start" in relay.text()


def test_console_script_usage_error_exits_2(console: list[ConsoleRelay], tmp_path: Path) -> None:
    """A bad option: status 2 and the reason."""
    relay = ConsoleRelay(tmp_path / "usage.log", "--max-connections", "none")
    console.append(relay)
    assert relay.finish(20) == 2
    assert "--max-connections" in relay.text()


# -- rolling restart ---------------------------------------------------------------------


class Reconnecting:
    """A client that reconnects, as the player and the publisher do, with full-jitter
    backoff (first delay uniform in 0-0.5 s) whenever its connection ends."""

    def __init__(self, url: str, publisher: bool) -> None:
        self.url = url
        self.publisher = publisher
        self.closes: list[tuple[float, int | None]] = []
        self.refusals: list[int] = []
        self.media: list[float] = []
        self.opened: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                async with ws_connect(self.url, subprotocols=["streamrelay.v1"]) as ws:
                    self.opened.append(time.monotonic())
                    attempt = 0
                    await (self._publish(ws) if self.publisher else self._watch(ws))
                    # A viewer's message loop simply ends when the relay closes.
                    received = ws.protocol.close_rcvd
                    self.closes.append(
                        (time.monotonic(), received.code if received is not None else None)
                    )
            except InvalidStatus as refused:
                self.refusals.append(refused.response.status_code)
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else None
                self.closes.append((time.monotonic(), code))
            except OSError:
                pass
            await asyncio.sleep(random.uniform(0, min(15.0, 0.5 * 2**attempt)))
            attempt += 1

    async def _publish(self, ws: object) -> None:
        sequence = 0
        while True:
            flags = CONFIG if sequence == 0 else (KEY if sequence % 10 == 1 else DELTA)
            await ws.send(media(flags, b"p" * 200))  # type: ignore[attr-defined]
            sequence += 1
            await asyncio.sleep(0.05)

    async def _watch(self, ws: object) -> None:
        async for message in ws:  # type: ignore[attr-defined]
            if isinstance(message, bytes):
                self.media.append(time.monotonic())


def test_rolling_restart_keeps_viewers(start_relay: StartRelay) -> None:
    """Two relays behind a balancer; the one serving is stopped with SIGTERM.  While it
    drains it answers 503 (the balancer moves new handshakes to the other), its viewer
    and publisher get 1001, reconnect with jitter through the balancer, and media flows
    again from the second relay within seconds."""
    old = start_relay("--close-timeout", "2")
    new = start_relay()
    ports = [old.port, new.port]

    async def scenario() -> dict[str, Any]:
        balancer = await Balancer(ports).start()
        url = f"ws://127.0.0.1:{balancer.port}"
        publisher = Reconnecting(f"{url}/publish/cam", publisher=True)
        viewer = Reconnecting(f"{url}/watch/cam", publisher=False)
        publisher.start()
        viewer.start()
        try:
            await _until(lambda: len(viewer.media) > 5, 10)
            # A viewer that never answers the close keeps the old relay draining for
            # --close-timeout: long enough to see its 503s.
            stuck = socket.create_connection(("127.0.0.1", old.port))
            stuck.sendall(handshake_request("/watch/cam"))
            await asyncio.sleep(0.2)
            stopped_at = time.monotonic()
            old.process.send_signal(signal.SIGTERM)
            draining = await asyncio.to_thread(
                lambda: wait_until(lambda: _health(old.http_url) == 503, 5)
            )
            direct = await asyncio.to_thread(
                http_exchange, old.port, handshake_request("/watch/cam")
            )
            await _until(lambda: viewer.media and viewer.media[-1] > stopped_at + 0.05, 10)
            resumed = viewer.media[-1] - stopped_at
            stuck.close()
            return {
                "draining": draining,
                "direct": (direct.status, direct.header("retry-after")),
                "resumed_after": resumed,
                "viewer_closes": [code for _, code in viewer.closes],
                "publisher_closes": [code for _, code in publisher.closes],
                "old_statuses": balancer.statuses(old.port),
                "new_statuses": balancer.statuses(new.port),
            }
        finally:
            await viewer.stop()
            await publisher.stop()
            await balancer.close()

    outcome = run(scenario(), 60)
    record_figure("rolling-restart", **outcome)
    assert outcome["direct"] == (503, "5")
    assert outcome["viewer_closes"][:1] == [1001], outcome
    assert outcome["publisher_closes"][:1] == [1001], outcome
    resumed = outcome["resumed_after"]
    assert isinstance(resumed, float) and resumed < 5.0, outcome
    # The balancer saw the draining relay refuse (503, or the closed port once it
    # exited) and took both clients to the new one.
    old_statuses = outcome["old_statuses"]
    assert isinstance(old_statuses, list) and old_statuses[:2] == [101, 101], outcome
    assert set(old_statuses[2:]) <= {503, None} and old_statuses[2:], outcome
    assert outcome["new_statuses"] == [101, 101], outcome
    assert old.process.wait(10) in (-signal.SIGTERM, 128 + signal.SIGTERM)


def _health(base_url: str) -> int | None:
    """/healthz's status, None when the connection was closed (an idle connection
    accepted just before the drain began is closed by it)."""
    try:
        return http_get(base_url, "/healthz").status
    except (ConnectionError, OSError):
        return None


async def _until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
