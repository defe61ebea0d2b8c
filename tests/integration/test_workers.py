"""``--workers 2`` with a real ``twistd streamrelay``: both workers serve the one port,
a stream published on one worker reaches viewers on the other (a pull through the
supervisor's directory), a killed worker comes back and serves, SIGTERM drains all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any

import pytest

from tests.support.http import http_json
from tests.support.media import media_is_intact
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import run
from tests.support.ws_client import PacedPublisher, Viewer, refused

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.name != "posix", reason="POSIX")]

_READY = re.compile(r"Worker (\d+) ready: siblings pull from (http://127\.0\.0\.1:\d+)/")


def worker_urls(relay: RelayProcess, timeout: float = 15.0, after: int = 0) -> dict[int, str]:
    """Each worker's private loopback URL (the latest one per worker), once both are up;
    only log text from offset ``after`` counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {int(n): url for n, url in _READY.findall(relay.log_text()[after:])}
        if len(found) >= 2:
            return found
        time.sleep(0.05)
    raise AssertionError(f"workers not ready in {timeout} s:\n{relay.log_excerpt()}")


def viewers_on(url: str) -> int:
    """Viewers connected to the worker at ``url``."""
    snapshot: dict[str, Any] = http_json(url, "/api/streams")
    return int(snapshot["connections"]["viewers"])


def publishers_on(url: str) -> int:
    """Publishers connected to the worker at ``url``."""
    snapshot: dict[str, Any] = http_json(url, "/api/streams")
    return int(snapshot["connections"]["publishers"])


def ws(url: str) -> str:
    """The WebSocket URL of an HTTP base URL."""
    return "ws" + url[len("http") :]


async def until(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate()`` (a plain function, run in a thread) until true."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(60)
def test_both_workers_serve_and_a_stream_crosses_workers(start_relay: StartRelay) -> None:
    """30 viewers on the shared port are spread over both workers by the kernel, 3 more
    on each worker directly; the publisher lands on one worker; every viewer on either
    worker gets every message intact and in order."""
    relay = start_relay("--workers", "2")
    urls = worker_urls(relay)
    count = 300

    async def scenario() -> None:
        viewers = [
            await Viewer(f"{relay.ws_url}/watch/cross", name=f"shared-{i}").start()
            for i in range(30)
        ]
        for number, url in urls.items():
            viewers += [
                await Viewer(f"{ws(url)}/watch/cross", name=f"worker{number}-{i}").start()
                for i in range(3)
            ]
        shared = {
            number: await asyncio.to_thread(viewers_on, url) - 3 for number, url in urls.items()
        }
        assert sum(shared.values()) == 30, shared
        assert all(value > 0 for value in shared.values()), f"not spread: {shared}"
        publisher = await PacedPublisher(
            f"{relay.ws_url}/publish/cross", rate=100, gop=25, size=1500, limit=count
        ).start()
        try:
            await asyncio.wait_for(publisher.done.wait(), 20)
            deadline = time.monotonic() + 15
            while any(len(v.media) < count for v in viewers) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for viewer in viewers:
                assert viewer.sequences() == list(range(count)), viewer.name
                assert all(media_is_intact(message, 1500) for _, message in viewer.media)
            origins = [n for n, url in urls.items() if publishers_on(url) == 1]
            assert len(origins) == 1, origins
        finally:
            await publisher.close()
            for viewer in viewers:
                await viewer.close()

    run(scenario(), 50)


@pytest.mark.timeout(60)
def test_a_killed_worker_is_restarted_and_serves_again(start_relay: StartRelay) -> None:
    """SIGKILL the worker without the publisher: the supervisor restarts it; viewers
    reconnecting through the shared port get video, and so does a viewer on the restarted
    worker itself (it pulls from its sibling again)."""
    relay = start_relay("--workers", "2")
    urls = worker_urls(relay)

    async def scenario() -> None:
        publisher = await PacedPublisher(
            f"{relay.ws_url}/publish/again", rate=50, gop=10, size=800
        ).start()
        try:
            await until(lambda: sum(publishers_on(u) for u in urls.values()) == 1, 5, "publisher")
            origin = next(n for n, url in urls.items() if publishers_on(url) == 1)
            other = next(n for n in urls if n != origin)
            victim = Viewer(f"{ws(urls[other])}/watch/again", name="victim")
            await victim.start()
            await asyncio.wait_for(victim.first_media.wait(), 5)
            pid = next(
                child.pid for child in relay.psutil.children() if _is_worker(child.pid, urls[other])
            )
            offset = len(relay.log_text())
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(_closed(victim), 5)
            restarted = await asyncio.to_thread(worker_urls_after, relay, offset)
            assert other in restarted
            back = await Viewer(f"{ws(restarted[other])}/watch/again", name="back").start()
            shared = [
                await Viewer(f"{relay.ws_url}/watch/again", name=f"again-{i}").start()
                for i in range(6)
            ]
            for viewer in [back, *shared]:
                await asyncio.wait_for(viewer.first_media.wait(), 5)
                await viewer.close()
            await victim.close()
            assert len(relay.psutil.children()) == 2
        finally:
            await publisher.close()

    run(scenario(), 50)


def worker_urls_after(relay: RelayProcess, offset: int) -> dict[int, str]:
    """Workers that said they were ready after ``offset`` in the log (one is enough)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = {int(n): url for n, url in _READY.findall(relay.log_text()[offset:])}
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no worker restarted:\n{relay.log_excerpt()}")


def _is_worker(pid: int, url: str) -> bool:
    """True when process ``pid`` listens on ``url``'s port."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    return any(
        conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
        for conn in psutil.Process(pid).net_connections()
    )


async def _closed(viewer: Viewer) -> None:
    while viewer.closed_at is None:
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
def test_sigterm_drains_every_worker_and_the_supervisor_exits(start_relay: StartRelay) -> None:
    """Viewers on both workers get 1001 on SIGTERM; the workers and the supervisor exit."""
    relay = start_relay("--workers", "2")
    urls = worker_urls(relay)
    pids = [child.pid for child in relay.psutil.children()]
    assert len(pids) == 2

    async def scenario() -> list[Viewer]:
        viewers = [
            await Viewer(f"{ws(url)}/watch/drain", name=f"w{n}").start() for n, url in urls.items()
        ]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        for viewer in viewers:
            await asyncio.wait_for(_closed(viewer), 10)
        assert time.monotonic() - started < 10
        return viewers

    viewers = run(scenario(), 30)
    assert [viewer.close_code for viewer in viewers] == [1001, 1001]
    relay.process.wait(15)
    import psutil

    assert not [pid for pid in pids if psutil.pid_exists(pid)]


@pytest.mark.timeout(60)
def test_origin_worker_killed_viewers_elsewhere_follow_the_new_origin(
    start_relay: StartRelay,
) -> None:
    """The publisher's worker is SIGKILLed: a viewer on the other worker sees ``offline``
    and stays connected; the publisher comes back on the restarted worker (a new
    address), and the viewer's worker follows the directory there: live again, media
    flowing.  No log line shows a relay token."""
    relay = start_relay("--workers", "2")
    urls = worker_urls(relay)
    origin, other = sorted(urls)

    async def scenario() -> None:
        first = await PacedPublisher(f"{ws(urls[origin])}/publish/moves", rate=50, gop=10).start()
        viewer = await Viewer(f"{ws(urls[other])}/watch/moves", name="stays").start()
        await viewer.wait_status("live", timeout=5)
        await asyncio.wait_for(viewer.first_media.wait(), 5)
        pid = next(c.pid for c in relay.psutil.children() if _is_worker(c.pid, urls[origin]))
        offset = len(relay.log_text())
        os.kill(pid, signal.SIGKILL)
        await first.close()
        lives = len(viewer.statuses())
        await viewer.wait_status("offline", after=lives - 1, timeout=3)
        restarted = await asyncio.to_thread(worker_urls_after, relay, offset)
        assert origin in restarted and restarted[origin] != urls[origin]
        received = len(viewer.media)
        second = await PacedPublisher(
            f"{ws(restarted[origin])}/publish/moves", rate=50, gop=10
        ).start()
        try:
            await viewer.wait_status("live", after=lives, timeout=5)
            deadline = time.monotonic() + 5
            while len(viewer.media) < received + 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(viewer.media) >= received + 20
            assert viewer.closed_at is None
        finally:
            await second.close()
            await viewer.close()

    run(scenario(), 50)
    assert not re.search(r"\b\d{9,12}\.[0-9a-fA-F]{64}\b", relay.log_text())


@pytest.mark.timeout(40)
def test_workers_stop_when_the_supervisor_is_killed(start_relay: StartRelay) -> None:
    """SIGKILL leaves the supervisor no time to stop its workers: they notice its end
    (their standard input closes) and exit, releasing the port."""
    import psutil

    relay = start_relay("--workers", "2")
    worker_urls(relay)
    workers = relay.psutil.children()
    assert len(workers) == 2
    relay.kill()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, alive


@pytest.mark.timeout(60)
def test_takeover_across_workers_closes_the_old_publisher_with_4409(
    start_relay: StartRelay,
) -> None:
    """A publisher on worker 1, a viewer on worker 1; a second publisher of the same
    stream on worker 2 wins: the first is closed with 4409, the viewer on worker 1 stays
    connected and gets the second publisher's media (pulled from worker 2)."""
    relay = start_relay("--workers", "2")
    urls = worker_urls(relay)
    one, two = sorted(urls)

    async def scenario() -> None:
        first = await PacedPublisher(f"{ws(urls[one])}/publish/take", rate=50, gop=10).start()
        viewer = await Viewer(f"{ws(urls[one])}/watch/take", name="stays").start()
        second = None
        try:
            await asyncio.wait_for(viewer.first_media.wait(), 5)
            await asyncio.sleep(0.3)  # worker 1's publish is registered
            second = await PacedPublisher(
                f"{ws(urls[two])}/publish/take", rate=50, gop=10, size=333
            ).start()
            await asyncio.wait_for(first.done.wait(), 5)
            assert first.connection is not None
            received = first.connection.protocol.close_rcvd
            assert received is not None and received.code == 4409
            deadline = time.monotonic() + 5
            while (
                not any(len(message) == 333 for _, message in viewer.media)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            assert any(len(message) == 333 for _, message in viewer.media)
            assert viewer.closed_at is None
            assert await asyncio.to_thread(publishers_on, urls[one]) == 0
        finally:
            await first.close()
            if second is not None:
                await second.close()
            await viewer.close()

    run(scenario(), 50)


@pytest.mark.timeout(60)
def test_no_takeover_holds_across_workers(start_relay: StartRelay) -> None:
    """``--workers 2 --no-takeover``: a publisher on worker 1 keeps its stream; a second
    publisher of it on worker 2 is refused with 409 while a viewer on worker 2 gets the
    first one's media; once the first leaves, worker 2 admits a publisher."""
    relay = start_relay("--workers", "2", "--no-takeover")
    urls = worker_urls(relay)
    one, two = sorted(urls)

    async def scenario() -> None:
        first = await PacedPublisher(f"{ws(urls[one])}/publish/keep", rate=50, gop=10).start()
        viewer = await Viewer(f"{ws(urls[two])}/watch/keep").start()
        try:
            await asyncio.wait_for(viewer.first_media.wait(), 10)
            status, _, body = await refused(f"{ws(urls[two])}/publish/keep")
            assert status == 409, body
            assert first.connection is not None and first.connection.protocol.close_rcvd is None
            await first.close()
            await asyncio.sleep(0.5)  # worker 1's unpublish reaches the directory
            later = await PacedPublisher(f"{ws(urls[two])}/publish/keep", rate=50, gop=10).start()
            await later.close()
        finally:
            await first.close()
            await viewer.close()

    run(scenario(), 50)

