"""Hardening 5 (issue 8): meta that is not standard JSON is refused, not relayed.

Python's ``json`` accepts ``NaN``, ``Infinity`` and ``-Infinity``; browsers' ``JSON.parse``
does not, so a player would drop such a ``meta`` silently.  docs/protocol.md says text
messages are JSON: each variant, at the top level and nested, closes the publisher with
1007 and a reason, and the viewer that watches the stream never receives it.  A standard
``meta`` sent afterwards by a new publisher does reach the viewer (so the check is not
merely that nothing arrives).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest

from tests.support.figures import record_figure
from tests.support.frames import OP_TEXT, FrameParser, client_frame
from tests.support.raw_ws import wait_for_close, ws_open
from tests.support.relay_process import StartRelay

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(60)]

CONSTANTS = ("NaN", "Infinity", "-Infinity")
TEMPLATES = (
    '{"type":"meta","fps":%s}',
    '{"type":"meta","codec":"avc1.42C01F","extra":{"list":[1,2,{"deep":%s}]}}',
)


def test_nan_and_infinity_in_meta_close_with_1007(start_relay: StartRelay) -> None:
    """Every non-standard constant, top level or nested: 1007 with a reason, nothing
    relayed to the viewer; a standard meta still is."""
    relay = start_relay()
    viewer, response = ws_open(relay.port, "/watch/meta")
    assert response.status == 101
    parser = FrameParser()
    texts = [json.loads(f.payload) for f in parser.feed(response.rest) if f.opcode == OP_TEXT]
    outcomes: list[dict[str, Any]] = []
    try:
        for template in TEMPLATES:
            for constant in CONSTANTS:
                publisher, response = ws_open(relay.port, "/publish/meta")
                assert response.status == 101
                started = time.monotonic()
                publisher.sendall(client_frame(OP_TEXT, (template % constant).encode()))
                outcome = wait_for_close(publisher, 5, initial=response.rest, reply=True)
                publisher.close()
                outcomes.append(
                    {
                        "constant": constant,
                        "nested": "deep" in template,
                        "code": outcome.code,
                        "reason": outcome.reason,
                        "seconds": round(time.monotonic() - started, 4),
                    }
                )
        publisher, response = ws_open(relay.port, "/publish/meta")
        assert response.status == 101
        good = b'{"type":"meta","fps":30}'
        publisher.sendall(client_frame(OP_TEXT, good))
        viewer.settimeout(0.2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and {"type": "meta", "fps": 30} not in texts:
            with contextlib.suppress(TimeoutError):
                chunk = viewer.recv(65536)
                texts += [json.loads(f.payload) for f in parser.feed(chunk) if f.opcode == OP_TEXT]
        publisher.close()
    finally:
        viewer.close()
    metas = [text for text in texts if text.get("type") == "meta"]
    record_figure(
        "meta that is not JSON",
        cases=len(outcomes),
        codes=sorted({o["code"] for o in outcomes}),
        reasons=sorted({o["reason"] for o in outcomes}),
        slowest_close_s=max(o["seconds"] for o in outcomes),
        metas_relayed=metas,
    )
    assert [o["code"] for o in outcomes] == [1007] * len(outcomes), outcomes
    assert all(o["constant"] in o["reason"] for o in outcomes), outcomes
    assert metas == [{"type": "meta", "fps": 30}], texts
