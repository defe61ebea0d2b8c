"""A cluster of real ``twistd streamrelay --cluster`` nodes on loopback with a real
``redis-server`` as the directory: viewers on nodes without the stream, takeover across
nodes, an origin crash, a Redis crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support.figures import percentile, record_figure, rounded
from tests.support.media import CONFIG, KEY, flags_of
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.tokens import write_secret
from tests.support.waiting import run
from tests.support.ws_client import PacedPublisher, Viewer, refused

pytestmark = pytest.mark.integration

RELAY_SECRET = b"cluster-test-relay-secret"
CLOSE_REPLACED = 4409
REDIS_OUTAGE = 10.0  # seconds Redis stays SIGKILLed (the figure)


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Redis:
    """A ``redis-server`` on loopback, no persistence, restartable on its port."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt install redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def _hello(self) -> bytes:
        """What the test's own connections send first: AUTH when a password is set."""
        if self.password is None:
            return b""
        return f"*2\r\n$4\r\nAUTH\r\n${len(self.password)}\r\n{self.password}\r\n".encode()

    @property
    def url(self) -> str:
        """The ``--cluster`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - kept by the child
        # The password goes in a configuration file, as in production: never in argv.
        conf = self.directory / "redis.conf"
        conf.write_text(f"requirepass {self.password}\n" if self.password else "")
        self.process = subprocess.Popen(
            [self.binary, str(conf), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(self._hello() + b"PING\r\n")
                    answer = b""
                    while answer.count(b"\r\n") < (2 if self.password else 1):
                        chunk = sock.recv(64)
                        if not chunk:
                            break
                        answer += chunk
                    if answer.endswith(b"+PONG\r\n"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL (a crash: the data, never persisted, is gone)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def keys(self, pattern: str) -> list[str]:
        """KEYS ``pattern`` (the test's own look at the directory)."""
        return keys_on(self.port, pattern, self._hello())


def keys_on(port: int, pattern: str, hello: bytes = b"") -> list[str]:
    """KEYS ``pattern`` on the redis-server at ``port`` (``hello``: an AUTH to send first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        command = f"*2\r\n$4\r\nKEYS\r\n${len(pattern)}\r\n{pattern}\r\n".encode()
        sock.sendall(hello + command)
        data = b""
        sock.settimeout(2)
        while True:
            data += sock.recv(65536)
            if hello and data.startswith(b"+OK\r\n"):
                data = data[5:]
            if not data:
                continue
            lines = data.split(b"\r\n")
            count = int(lines[0][1:])
            if len(lines) >= 2 * count + 2:
                return [line.decode() for line in lines[2 : 2 * count + 1 : 2]]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    """A fresh redis-server for the test (fails loudly when none is installed)."""
    server = Redis(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def node(start_relay: StartRelay, redis: Redis, tmp_path: Path) -> Callable[..., RelayProcess]:
    """``node(*arguments, port=None)``: a cluster node advertising its own loopback port."""
    secret = str(write_secret(tmp_path, "relay.key", RELAY_SECRET))

    def start(*arguments: str, port: int | None = None) -> RelayProcess:
        port = port or free_port()
        return start_relay(
            "--cluster", redis.url, "--advertise", f"ws://127.0.0.1:{port}",
            "--relay-secret-file", secret, *arguments,
            listen=f"tcp:{port}:interface=127.0.0.1", internals=True,
        )

    return start


def api(relay: RelayProcess, path: str) -> Any:
    """GET a JSON API of the relay."""
    with urllib.request.urlopen(relay.http_url + path, timeout=5) as response:
        return json.loads(response.read())


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def has_size(viewer: Viewer, size: int) -> bool:
    """True once the viewer got a media message of ``size`` bytes."""
    return any(len(message) == size for _, message in viewer.media)


def has_at_least(viewer: Viewer, count: int) -> bool:
    """True once the viewer got ``count`` media messages."""
    return len(viewer.media) >= count


def received_since(viewer: Viewer, index: int) -> list[int]:
    """Flags of the media the viewer got from ``index`` on."""
    return [flags_of(message) for _, message in viewer.media[index:]]


@pytest.mark.timeout(60)
def test_viewers_on_other_nodes_get_every_message(node: Callable[..., RelayProcess]) -> None:
    """A publisher on A, viewers on B and C (nodes without the stream): every viewer gets
    every message in order; ``/api/streams?scope=cluster`` on C names A as the origin.
    Records the first frame (KEY) p50/p95 of a viewer on a node without the stream, each
    from a cold start (no pull, the grace over, the cached lookup stale)."""
    a = node()
    b, c = node("--upstream-grace", "0.2"), node("--upstream-grace", "0.2")
    count = 300

    async def scenario() -> None:
        viewers = [await Viewer(f"{n.ws_url}/watch/cam", name=n.ws_url).start() for n in (b, c)]
        publisher = await PacedPublisher(
            f"{a.ws_url}/publish/cam", rate=100, gop=25, size=800
        ).start()
        try:
            await until(lambda: all(len(v.media) >= count for v in viewers), 15, "all messages")
            for viewer in viewers:
                assert viewer.sequences()[:count] == list(range(count)), viewer.name
            listing = await asyncio.to_thread(api, c, "/api/streams?scope=cluster")
            assert listing["cluster"] == [{"name": "cam", "origin": a.ws_url}]
            for viewer in viewers:
                await viewer.close()
            delays = []
            for round_number in range(12):
                await asyncio.sleep(1.2)  # the pull's grace and the cached lookup expire
                target = (b, c)[round_number % 2]
                viewer = await Viewer(f"{target.ws_url}/watch/cam").start()
                await asyncio.wait_for(viewer.first_media.wait(), 5)
                while len(viewer.media) < 2:
                    await asyncio.sleep(0.002)
                assert [flags_of(m) for _, m in viewer.media[:2]] == [CONFIG, KEY]
                delays.append((viewer.media[1][0] - viewer.started_at) * 1000)
                await viewer.close()
            record_figure(
                "cluster_first_frame_cold", nodes=3, samples=len(delays),
                p50_ms=rounded(percentile(delays, 0.5)), p95_ms=rounded(percentile(delays, 0.95)),
            )
            assert percentile(delays, 0.95) <= 500
        finally:
            await publisher.close()
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 55)


@pytest.mark.timeout(60)
def test_no_takeover_holds_cluster_wide(node: Callable[..., RelayProcess]) -> None:
    """``--no-takeover`` on every node: a publisher on B, whose cached view knows A holds
    the stream (B serves a viewer of it and re-reads it), gets 409; one on C, which only
    heard the claim's notification long ago, is admitted and then closed with 4409 when
    its claim is refused; A's publisher is never disturbed."""
    a, b, c = (node("--no-takeover") for _ in range(3))

    async def scenario() -> None:
        first = await PacedPublisher(f"{a.ws_url}/publish/cam", rate=50, gop=10).start()
        viewer = await Viewer(f"{b.ws_url}/watch/cam").start()
        try:
            await asyncio.wait_for(viewer.first_media.wait(), 5)
            # Past the trust of C's notified entry; B's is kept fresh by its re-reads.
            await asyncio.sleep(5.5)
            status, _, _ = await refused(f"{b.ws_url}/publish/cam")
            assert status == 409
            late = await PacedPublisher(f"{c.ws_url}/publish/cam", rate=50, gop=10).start()
            await until(lambda: late.done.is_set(), 5, "C's publisher closed")
            assert late.connection is not None and late.connection.protocol.close_rcvd is not None
            assert late.connection.protocol.close_rcvd.code == CLOSE_REPLACED
            await late.close()
            assert not first.done.is_set()
            count = len(viewer.media)
            await until(lambda: len(viewer.media) > count + 10, 5, "A's stream goes on")
        finally:
            await first.close()
            await viewer.close()

    run(scenario(), 50)


@pytest.mark.timeout(60)
def test_takeover_across_nodes(node: Callable[..., RelayProcess]) -> None:
    """A publisher on B for A's stream wins: A's publisher is closed with 4409; viewers on
    A and C then get B's stream (B's first KEY, and nothing of A's after it)."""
    a, b, c = node(), node(), node()

    async def scenario() -> None:
        first = await PacedPublisher(f"{a.ws_url}/publish/cam", rate=50, gop=10, size=600).start()
        viewers = [await Viewer(f"{n.ws_url}/watch/cam", name=n.ws_url).start() for n in (a, c)]
        second = None
        try:
            for viewer in viewers:
                await asyncio.wait_for(viewer.first_media.wait(), 5)
            await asyncio.sleep(1.5)  # the claim is in the directory
            second = await PacedPublisher(
                f"{b.ws_url}/publish/cam", rate=50, gop=10, size=700
            ).start()
            await until(lambda: first.done.is_set(), 5, "the first publisher closed")
            assert first.connection is not None
            assert first.connection.protocol.close_rcvd is not None
            assert first.connection.protocol.close_rcvd.code == CLOSE_REPLACED
            for viewer in viewers:
                await until(partial(has_size, viewer, 700 + _HEADER), 5, f"B on {viewer.name}")
                sizes = [len(m) for _, m in viewer.media]
                switch = sizes.index(700 + _HEADER)
                assert flags_of(viewer.media[switch][1]) in (CONFIG, KEY)
                assert 600 + _HEADER not in sizes[switch:], viewer.name
                assert viewer.closed_at is None
        finally:
            await first.close()
            if second is not None:
                await second.close()
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 50)


_HEADER = 0  # set below from the media builder


def _header_size() -> int:
    from tests.support.media import media_message

    return len(media_message(0, KEY, 100)) - 100


_HEADER = _header_size()


@pytest.mark.timeout(90)
def test_origin_sigkill_publisher_moves_viewers_stay(node: Callable[..., RelayProcess]) -> None:
    """The origin A is killed; the publisher reconnects to C: viewers on B and C are live
    again within 5 s of the publisher being back, and never disconnected."""
    a, b, c = node(), node(), node()

    async def scenario() -> None:
        publisher = await PacedPublisher(f"{a.ws_url}/publish/cam", rate=50, gop=10).start()
        viewers = [await Viewer(f"{n.ws_url}/watch/cam", name=n.ws_url).start() for n in (b, c)]
        second = None
        try:
            for viewer in viewers:
                await asyncio.wait_for(viewer.first_media.wait(), 5)
            await asyncio.to_thread(a.kill)
            await publisher.close()
            before = [len(v.media) for v in viewers]
            second = await PacedPublisher(f"{c.ws_url}/publish/cam", rate=50, gop=10).start()
            for viewer, count in zip(viewers, before, strict=True):
                took = await until(partial(has_at_least, viewer, count + 2), 5,
                                   f"live again on {viewer.name}")
                assert received_since(viewer, count)[:2] == [CONFIG, KEY], viewer.name
                assert viewer.closed_at is None
                assert took < 5
        finally:
            if second is not None:
                await second.close()
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 60)


@pytest.mark.timeout(90)
def test_redis_crash_running_pulls_lose_nothing_and_nodes_reregister(
    node: Callable[..., RelayProcess], redis: Redis
) -> None:
    """Redis is SIGKILLed for 10 s: a running pull (A to B) loses no message, a new viewer
    of the known stream on B is served meanwhile; Redis back (empty), A re-registers its
    node and its stream without a restart, and a viewer on C (never looked up before)
    gets the stream."""
    a, b, c = node(), node(), node()
    count = 800  # 16 s at 50/s: the stream runs through the outage and past it

    async def scenario() -> None:
        viewer = await Viewer(f"{b.ws_url}/watch/cam").start()
        publisher = await PacedPublisher(
            f"{a.ws_url}/publish/cam", rate=50, gop=10, limit=count
        ).start()
        late = fresh = None
        try:
            await asyncio.wait_for(viewer.first_media.wait(), 5)
            await asyncio.to_thread(redis.kill)
            killed = time.monotonic()
            await asyncio.sleep(2)
            late = await Viewer(f"{b.ws_url}/watch/cam").start()
            await asyncio.wait_for(late.first_media.wait(), 3)
            await asyncio.sleep(max(0.0, REDIS_OUTAGE - (time.monotonic() - killed)))
            assert viewer.closed_at is None and not publisher.done.is_set()
            await asyncio.to_thread(redis.start)
            prefix = "streamrelay:streamrelay:"
            await until(lambda: f"{prefix}stream:cam" in redis.keys(prefix + "*"), 5,
                        "the stream re-registered")
            assert f"{prefix}node:ws://127.0.0.1:{a.port}" in redis.keys(prefix + "node:*")
            fresh = await Viewer(f"{c.ws_url}/watch/cam").start()
            await asyncio.wait_for(fresh.first_media.wait(), 5)
            await asyncio.wait_for(publisher.done.wait(), 20)
            await until(lambda: len(viewer.media) >= count, 5, "every message on B")
            assert viewer.sequences() == list(range(count))
            assert viewer.closed_at is None
            metrics = await asyncio.to_thread(_metrics, b)
            assert "streamrelay_directory_errors_total" in metrics
        finally:
            await publisher.close()
            for each in (viewer, late, fresh):
                if each is not None:
                    await each.close()

    run(scenario(), 70)


def _metrics(relay: RelayProcess) -> str:
    with urllib.request.urlopen(relay.http_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.timeout(90)
def test_origin_sigstop_directory_expires_it_and_it_yields_on_waking(
    node: Callable[..., RelayProcess], redis: Redis
) -> None:
    """The origin A is stopped (SIGSTOP: half-dead, its sockets open): its node and
    stream expire from the directory within the 3 s TTL (plus a heartbeat); the
    publisher reconnects to C and B's viewer is live again from C; A, woken, finds the
    newer epoch at its first heartbeat and closes its stale publisher with 4409."""
    a, b, c = node(), node(), node()
    prefix = "streamrelay:streamrelay:"

    async def scenario() -> None:
        publisher = await PacedPublisher(f"{a.ws_url}/publish/cam", rate=50, gop=10).start()
        viewer = await Viewer(f"{b.ws_url}/watch/cam").start()
        second = None
        try:
            await asyncio.wait_for(viewer.first_media.wait(), 5)
            await asyncio.sleep(1.2)
            os.kill(a.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            await until(lambda: f"{prefix}node:ws://127.0.0.1:{a.port}" not in redis.keys(
                prefix + "node:*"), 5, "A's node expired")
            assert time.monotonic() - stopped < 4.5
            await until(lambda: not redis.keys(prefix + "stream:*"), 2, "A's stream expired")
            before = len(viewer.media)
            second = await PacedPublisher(f"{c.ws_url}/publish/cam", rate=50, gop=10).start()
            await until(partial(has_at_least, viewer, before + 2), 5, "live again from C")
            assert received_since(viewer, before)[:2] == [CONFIG, KEY]
            assert viewer.closed_at is None
            os.kill(a.process.pid, signal.SIGCONT)
            await until(lambda: publisher.done.is_set(), 5, "A's stale publisher closed")
            assert publisher.connection is not None
            received = publisher.connection.protocol.close_rcvd
            assert received is not None and received.code == CLOSE_REPLACED
            await asyncio.sleep(1.5)
            assert redis.keys(prefix + "stream:*") == [f"{prefix}stream:cam"]
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
            await publisher.close()
            if second is not None:
                await second.close()
            await viewer.close()

    run(scenario(), 60)


@pytest.mark.timeout(90)
def test_publisher_flapping_between_two_nodes(
    node: Callable[..., RelayProcess], redis: Redis
) -> None:
    """A publisher moves between A and B every 500 ms for 8 s (the new connection first,
    the old one closed 100 ms later): at the end exactly one origin, the viewers on A, B
    and C all live from the last publisher, and at most one pull per node."""
    a, b, c = node(), node(), node()
    relays = (a, b, c)
    prefix = "streamrelay:streamrelay:"

    async def scenario() -> None:
        viewers = [await Viewer(f"{n.ws_url}/watch/cam", name=n.ws_url).start() for n in relays]
        current: PacedPublisher | None = None
        try:
            for flip in range(16):
                target = (a, b)[flip % 2]
                fresh = await PacedPublisher(
                    f"{target.ws_url}/publish/cam", rate=50, gop=10
                ).start()
                if current is not None:
                    await asyncio.sleep(0.1)
                    await current.close()
                current = fresh
                await asyncio.sleep(0.4)
            last = (a, b)[15 % 2]
            await asyncio.sleep(2.5)  # settle: heartbeats and re-reads
            assert redis.keys(prefix + "stream:*") == [f"{prefix}stream:cam"]
            listing = await asyncio.to_thread(api, c, "/api/streams?scope=cluster")
            assert listing["cluster"] == [{"name": "cam", "origin": last.ws_url}]
            counts = [len(v.media) for v in viewers]
            await until(lambda: all(len(v.media) > n + 20 for v, n in zip(
                viewers, counts, strict=True)), 5, "every viewer live")
            assert all(v.closed_at is None for v in viewers)
            for relay in relays:
                internals = await asyncio.to_thread(api, relay, "/api/internals")
                expected = 0 if relay is last else 1
                assert internals["pulls"] == expected, (relay.ws_url, internals)
        finally:
            if current is not None:
                await current.close()
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 70)


@pytest.mark.timeout(90)
def test_rejoin_during_the_grace_while_the_origin_moves(
    node: Callable[..., RelayProcess],
) -> None:
    """On C, a viewer leaves (its pull enters the grace) and a new one joins while the
    publisher moves between A and B, at varied moments: every rejoining viewer gets a
    CONFIG and a KEY within 5 s."""
    a, b, c = node(), node(), node()

    async def scenario() -> None:
        current = await PacedPublisher(f"{a.ws_url}/publish/cam", rate=50, gop=10).start()
        viewer = await Viewer(f"{c.ws_url}/watch/cam").start()
        try:
            await asyncio.wait_for(viewer.first_media.wait(), 5)
            for round_number, pause in enumerate((0.0, 0.05, 0.2, 0.0, 0.1, 0.4)):
                await viewer.close()
                target = (b, a)[round_number % 2]
                fresh = await PacedPublisher(
                    f"{target.ws_url}/publish/cam", rate=50, gop=10
                ).start()
                await asyncio.sleep(pause)
                viewer = await Viewer(f"{c.ws_url}/watch/cam").start()
                await current.close()
                current = fresh
                await until(partial(has_at_least, viewer, 2), 5, f"video in round {round_number}")
                assert received_since(viewer, 0)[:2] == [CONFIG, KEY], round_number
                # ... and from the new origin: the stream goes on after the old one closed.
                count = len(viewer.media)
                await until(partial(has_at_least, viewer, count + 10), 5, "still live")
        finally:
            await current.close()
            await viewer.close()

    run(scenario(), 70)


def start_sentinel(
    redis: Redis, folder: Path, *settings: str
) -> tuple[int, subprocess.Popen[bytes]]:
    """A real ``redis-server --sentinel`` watching ``redis`` as master ``main`` (quorum
    1), with extra ``settings`` lines; its port and process."""
    port = free_port()
    conf = folder / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
        f"sentinel monitor main 127.0.0.1 {redis.port} 1\n"
        + "".join(f"{line}\n" for line in settings)
    )
    with open(folder / "sentinel.log", "ab") as log:
        process = subprocess.Popen(
            [redis.binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
    return port, process


def sentinel_nodes(
    start_relay: StartRelay, sentinel_port: int, folder: Path, count: int = 2
) -> list[RelayProcess]:
    """``count`` nodes whose directory is found through the Sentinel at ``sentinel_port``."""
    secret = str(write_secret(folder, "relay.key", RELAY_SECRET))
    nodes = []
    for _ in range(count):
        node_port = free_port()
        nodes.append(start_relay(
            "--cluster", f"redis+sentinel://127.0.0.1:{sentinel_port}/main/0",
            "--advertise", f"ws://127.0.0.1:{node_port}", "--relay-secret-file", secret,
            listen=f"tcp:{node_port}:interface=127.0.0.1",
        ))
    return nodes


@contextlib.asynccontextmanager
async def cam_of_a_watched_on_b(
    a: RelayProcess, b: RelayProcess, limit: int
) -> AsyncIterator[tuple[Viewer, PacedPublisher]]:
    """A viewer of ``cam`` on ``b``, then a publisher of ``limit`` messages (50/s, a KEY
    every 10) of ``cam`` on ``a``; both closed at the end of the block, publisher first."""
    viewer = await Viewer(f"{b.ws_url}/watch/cam").start()
    publisher = await PacedPublisher(
        f"{a.ws_url}/publish/cam", rate=50, gop=10, limit=limit
    ).start()
    try:
        yield viewer, publisher
    finally:
        await publisher.close()
        await viewer.close()


@pytest.mark.timeout(60)
def test_the_directory_through_sentinel(
    start_relay: StartRelay, redis: Redis, tmp_path: Path
) -> None:
    """``--cluster redis+sentinel://...``: the nodes find the master through a Sentinel
    (a real ``redis-server --sentinel``) and a viewer on B gets A's stream."""
    port, sentinel = start_sentinel(redis, tmp_path)
    try:
        a, b = sentinel_nodes(start_relay, port, tmp_path)

        async def scenario() -> None:
            async with cam_of_a_watched_on_b(a, b, 100) as (viewer, publisher):
                await asyncio.wait_for(publisher.done.wait(), 10)
                await until(partial(has_at_least, viewer, 100), 10, "every message on B")
                assert viewer.sequences() == list(range(100))

        run(scenario(), 40)
    finally:
        sentinel.kill()
        sentinel.wait()


@pytest.mark.timeout(120)
def test_a_sentinel_failover_costs_seconds(
    start_relay: StartRelay, redis: Redis, tmp_path: Path
) -> None:
    """Redis under Sentinel, master SIGKILLed: the Sentinel promotes the replica, the
    running pull (A → B) loses no message, the nodes find the new master by themselves
    and register there, and a stream published after the failover is found across
    nodes."""
    replica_port = free_port()
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    children = []
    with open(tmp_path / "replica.log", "ab") as log:
        children.append(subprocess.Popen(
            [redis.binary, "--port", str(replica_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(replica_dir),
             "--replicaof", "127.0.0.1", str(redis.port)],
            stdout=log, stderr=subprocess.STDOUT,
        ))

    def replicating() -> bool:
        with socket.create_connection(("127.0.0.1", redis.port), timeout=1) as sock:
            sock.sendall(b"INFO replication\r\n")
            return b"connected_slaves:1" in sock.recv(4096)

    deadline = time.monotonic() + 10
    while not replicating():
        assert time.monotonic() < deadline, "the replica did not attach"
        time.sleep(0.1)
    sentinel_port, sentinel = start_sentinel(
        redis, tmp_path,
        "sentinel down-after-milliseconds main 1000", "sentinel failover-timeout main 5000",
    )
    children.append(sentinel)
    try:
        a, b = sentinel_nodes(start_relay, sentinel_port, tmp_path)

        async def scenario() -> None:
            later: list[Any] = []
            try:
                async with cam_of_a_watched_on_b(a, b, 800) as (viewer, publisher):
                    await until(partial(has_at_least, viewer, 50), 15, "A's stream on B")
                    redis.kill()
                    # The Sentinel needs down-after (1 s) plus an election to promote.
                    # Both nodes: each reaches the new master on its own reconnection.
                    await until(
                        lambda: _is_master(replica_port) and all(
                            any(key.endswith(node.ws_url)
                                for key in keys_on(replica_port, "streamrelay:*:node:*"))
                            for node in (a, b)
                        ),
                        30, "the nodes registered on the promoted replica",
                    )
                    # Publishing until the end: a viewer joining late gets the stream from
                    # its latest KEY on, however long the lookup took.
                    second = await PacedPublisher(
                        f"{b.ws_url}/publish/after", rate=50, gop=10
                    ).start()
                    later.append(second)
                    other = await Viewer(f"{a.ws_url}/watch/after").start()
                    later.append(other)
                    await until(partial(has_at_least, other, 50), 30, "a stream published after")
                    await asyncio.wait_for(publisher.done.wait(), 30)
                    await until(partial(has_at_least, viewer, 800), 10, "every message on B")
                    assert viewer.sequences() == list(range(800))
            finally:
                for item in later:
                    await item.close()

        run(scenario(), 105)
    finally:
        for child in children:
            child.kill()
            child.wait()


def _is_master(port: int) -> bool:
    """True when the redis-server on ``port`` reports the master role."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"INFO replication\r\n")
        return b"role:master" in sock.recv(4096)


@pytest.mark.timeout(60)
def test_a_redis_with_a_password(start_relay: StartRelay, tmp_path: Path) -> None:
    """A Redis with ``requirepass``: nodes given ``--cluster-password-file`` register and
    find each other (a viewer on B gets A's stream); a node with a wrong password says
    plainly that Redis refused it and goes on serving its own streams; no log holds
    either password."""
    password, wrong = "redis-pass-7f3a9c", "not-the-pass-c41d"
    server = Redis(tmp_path, password=password)
    secret = str(write_secret(tmp_path, "relay.key", RELAY_SECRET))
    good_file = write_secret(tmp_path, "redis.pass", password.encode())
    wrong_file = write_secret(tmp_path, "wrong.pass", wrong.encode())

    def start(password_file: Path) -> RelayProcess:
        port = free_port()
        return start_relay(
            "--cluster", server.url, "--advertise", f"ws://127.0.0.1:{port}",
            "--relay-secret-file", secret, "--cluster-password-file", str(password_file),
            listen=f"tcp:{port}:interface=127.0.0.1",
        )

    try:
        a, b, c = start(good_file), start(good_file), start(wrong_file)

        async def scenario() -> None:
            viewer = await Viewer(f"{b.ws_url}/watch/cam").start()
            local = await Viewer(f"{c.ws_url}/watch/own").start()
            publishers = [
                await PacedPublisher(f"{a.ws_url}/publish/cam", rate=50, gop=10, limit=100).start(),
                await PacedPublisher(f"{c.ws_url}/publish/own", rate=50, gop=10, limit=50).start(),
            ]
            try:
                await until(partial(has_at_least, viewer, 100), 15, "every message on B")
                assert viewer.sequences() == list(range(100))
                await until(partial(has_at_least, local, 50), 15, "C's own stream")
                nodes = await asyncio.to_thread(server.keys, "streamrelay:*:node:*")
                assert sorted(nodes) == sorted(
                    f"streamrelay:streamrelay:node:{n.ws_url}" for n in (a, b)
                )
                await until(lambda: "could not auth" in c.log_text(), 10, "C's refusal logged")
            finally:
                for publisher in publishers:
                    await publisher.close()
                await viewer.close()
                await local.close()

        run(scenario(), 45)
        for relay in (a, b, c):
            log = relay.log_text()
            assert password not in log and wrong not in log
    finally:
        server.kill()


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nobody listens on."""
    for _ in range(50):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def answers(url: str) -> bool:
    """True once ``url`` answers HTTP."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(os.name != "posix", reason="--workers is POSIX only")
@pytest.mark.timeout(60)
def test_workers_are_cluster_nodes(
    start_relay: StartRelay, node: Callable[..., RelayProcess], redis: Redis, tmp_path: Path
) -> None:
    """``--workers 2 --cluster``: each worker registers as a node of its own (its
    ``--worker-relay-ports`` port); a publisher on worker 1 (on its relay port), viewers
    on worker 2's port, on the shared port (spread over both workers) and on a plain
    node C: every viewer gets every message in order, and C names worker 1 as the
    origin."""
    secret = str(write_secret(tmp_path, "workers-relay.key", RELAY_SECRET))
    port, base = free_port(), free_port_run(2)
    box = start_relay(
        "--cluster", redis.url, "--advertise", f"ws://127.0.0.1:{port}",
        "--relay-secret-file", secret, "--workers", "2", "--worker-relay-ports", str(base),
        listen=f"tcp:{port}:interface=127.0.0.1",
    )
    workers = [f"ws://127.0.0.1:{base}", f"ws://127.0.0.1:{base + 1}"]
    c = node()
    prefix = "streamrelay:streamrelay:"
    count = 300

    async def scenario() -> None:
        for url in workers:
            http = "http" + url[len("ws"):] + "/healthz"
            await until(partial(answers, http), 15, f"worker at {url}")
        nodes = {f"{prefix}node:{url}" for url in workers}
        await until(lambda: nodes <= set(redis.keys(prefix + "node:*")), 5, "both workers nodes")
        viewers = [await Viewer(f"{workers[1]}/watch/cam", name="worker2").start()]
        viewers += [
            await Viewer(f"{box.ws_url}/watch/cam", name=f"shared-{i}").start() for i in range(6)
        ]
        viewers.append(await Viewer(f"{c.ws_url}/watch/cam", name="node-c").start())
        publisher = await PacedPublisher(
            f"{workers[0]}/publish/cam", rate=100, gop=25, size=800, limit=count
        ).start()
        try:
            await asyncio.wait_for(publisher.done.wait(), 20)
            await until(lambda: all(len(v.media) >= count for v in viewers), 10, "every message")
            for viewer in viewers:
                assert viewer.sequences() == list(range(count)), viewer.name
            listing = await asyncio.to_thread(api, c, "/api/streams?scope=cluster")
            assert listing["cluster"] == [{"name": "cam", "origin": workers[0]}]
        finally:
            await publisher.close()
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 50)
