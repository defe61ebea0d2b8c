"""``/api/streams`` and ``/healthz`` as an operator's script sees them."""

from __future__ import annotations

import asyncio
import datetime
import re
from typing import Any

import pytest

from tests.support.http import http_get
from tests.support.media import CONFIG, DELTA, KEY, media
from tests.support.relay_api import api_streams_async, idle_state, stream_entry
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run, wait_until
from tests.support.ws_client import expect_close, text, ws_connect

pytestmark = pytest.mark.integration

_ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")


def _check_entry_types(entry: dict[str, Any]) -> None:
    assert set(entry) == {
        "name", "live", "state", "viewers", "publisher", "messages_in", "bytes_in", "keyframes",
        "dropped", "bitrate_bps", "fps", "thumbnail", "viewer_reports", "renditions",
        "adaptive_viewers",
    }, sorted(entry)
    assert isinstance(entry["name"], str)
    assert isinstance(entry["live"], bool)
    assert entry["state"] in ("live", "available", "offline")
    assert entry["renditions"] is None or isinstance(entry["renditions"], list)
    assert isinstance(entry["adaptive_viewers"], int) and entry["adaptive_viewers"] >= 0
    for key in ("viewers", "messages_in", "bytes_in", "keyframes", "dropped", "bitrate_bps"):
        assert isinstance(entry[key], int) and not isinstance(entry[key], bool), key
        assert entry[key] >= 0, key
    assert isinstance(entry["fps"], (int, float)) and entry["fps"] >= 0


@pytest.mark.timeout(30)
def test_healthz_answers_ok(relay: RelayProcess) -> None:
    """``GET /healthz`` answers 200 ``ok`` on a fresh relay."""
    response = http_get(relay.http_url, "/healthz")
    assert response.status == 200
    assert response.body.strip() == b"ok"


@pytest.mark.timeout(40)
def test_api_streams_fields_and_types(relay: RelayProcess) -> None:
    """With a publisher and a viewer, ``/api/streams`` lists the stream with every
    documented field and type: the publisher's real ``ip:port`` and an ISO 8601 UTC
    ``since`` (to a loopback requester), counters matching what was sent, rates over the
    last seconds, and connection counts."""

    async def scenario() -> None:
        idle = await api_streams_async(relay)
        assert idle["streams"] == []
        assert set(idle["connections"]) == {"publishers", "viewers", "total"}
        async with ws_connect(f"{relay.ws_url}/publish/cam1") as publisher:
            assert await text(publisher) == {"type": "viewers", "count": 0}
            async with ws_connect(f"{relay.ws_url}/watch/cam1") as viewer:
                sent = [media(CONFIG, b"c" * 10), media(KEY, b"k" * 1000)]
                sent += [media(DELTA, b"d" * 100) for _ in range(8)]
                for message in sent:
                    await publisher.send(message)
                for _ in range(1 + len(sent)):  # status, then every message
                    await viewer.recv()
                snapshot = await api_streams_async(relay)
                entry = stream_entry(snapshot, "cam1")
                assert entry is not None, snapshot
                _check_entry_types(entry)
                assert entry["live"] is True
                assert entry["viewers"] == 1
                assert entry["messages_in"] == len(sent)
                assert entry["bytes_in"] == sum(len(m) for m in sent)
                assert entry["keyframes"] == 1
                assert entry["dropped"] == 0
                assert entry["bitrate_bps"] > 0
                assert entry["fps"] > 0
                peer = entry["publisher"]["peer"]
                host, port = publisher.local_address[:2]
                assert peer == f"{host}:{port}"
                since = entry["publisher"]["since"]
                assert _ISO_UTC.match(since), since
                parsed = datetime.datetime.fromisoformat(since.replace("Z", "+00:00"))
                now = datetime.datetime.now(datetime.timezone.utc)
                assert abs((now - parsed).total_seconds()) < 30
                connections = snapshot["connections"]
                assert connections["publishers"] == 1
                assert connections["viewers"] == 1
                # publisher + viewer + this HTTP request
                assert connections["total"] >= 2
                for key in connections:
                    assert isinstance(connections[key], int)

    run(scenario(), 30)
    wait_until(lambda: idle_state(relay), 5)


@pytest.mark.timeout(40)
def test_api_lists_only_streams_with_publisher_or_viewers(relay: RelayProcess) -> None:
    """A viewer-only stream is listed (live false, publisher null); once everyone left,
    the stream is no longer listed and the counts are back to zero."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/waiting") as viewer:
            await text(viewer)
            entry = stream_entry(await api_streams_async(relay), "waiting")
            assert entry is not None
            _check_entry_types(entry)
            assert entry["live"] is False
            assert entry["publisher"] is None
            assert entry["viewers"] == 1

    run(scenario(), 30)
    snapshot = wait_until(lambda: idle_state(relay), 5)
    assert snapshot["streams"] == []


@pytest.mark.timeout(40)
def test_api_counters_survive_a_takeover(relay: RelayProcess) -> None:
    """A takeover keeps the stream's counters: messages, bytes and keyframes keep
    growing from where the first publisher left them, and the publisher entry shows the
    new publisher."""

    async def scenario() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/keep") as viewer:
            await text(viewer)
            first = await ws_connect(f"{relay.ws_url}/publish/keep").__aenter__()
            first_sent = [media(KEY, b"a" * 50), media(DELTA, b"b" * 50), media(DELTA, b"c")]
            for message in first_sent:
                await first.send(message)
            await asyncio.sleep(0.2)
            before = stream_entry(await api_streams_async(relay), "keep")
            assert before is not None
            assert before["messages_in"] == 3 and before["keyframes"] == 1
            async with ws_connect(f"{relay.ws_url}/publish/keep") as second:
                assert (await expect_close(first))[0] == 4409
                second_sent = [media(KEY, b"x" * 70), media(DELTA, b"y")]
                for message in second_sent:
                    await second.send(message)
                await asyncio.sleep(0.2)
                after = stream_entry(await api_streams_async(relay), "keep")
                assert after is not None
                assert after["messages_in"] == 5
                assert after["keyframes"] == 2
                assert after["bytes_in"] == sum(len(m) for m in first_sent + second_sent)
                host, port = second.local_address[:2]
                assert after["publisher"]["peer"] == f"{host}:{port}"
                assert after["live"] is True and after["viewers"] == 1

    run(scenario(), 30)
