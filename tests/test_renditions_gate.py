"""Renditions at the web gate and the protocols (fake connections on a Clock):
``BASE~LABEL`` names, tokens minted for the base, ``?abr=1``, and the kernel's unsent
bytes that an adaptive session reads."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamrelay import admission
from streamrelay.adaptive import AdaptiveSession
from streamrelay.admission import Handshake, auth_request
from streamrelay.protocol import ViewerProtocol, kernel_unsent_bytes
from streamrelay.streams import ViewerSession
from streamrelay.tokens import make_token
from tests.fakes import LogCapture, Relay, captured_log
from tests.support.frames import text_frame
from tests.test_abr import SET

VIEW_SECRET = b"view-secret-for-tests"


@pytest.fixture(autouse=True)
def log() -> Iterator[LogCapture]:
    """No test here may log an unhandled error."""
    with captured_log() as capture:
        yield capture
    assert not capture.failures, capture.describe_failures()


def view_token(stream: str) -> str:
    return make_token(VIEW_SECRET, "view", stream, int(time.time()) + 600)


def session_of(relay: Relay, stream: str) -> ViewerSession:
    sessions = [
        protocol.session
        for protocol in relay.context.registry.streams[stream].viewers
        if isinstance(protocol, ViewerProtocol) and protocol.session is not None
    ]
    assert len(sessions) == 1
    return sessions[0]


def test_rendition_names_may_be_published_and_watched() -> None:
    """``/publish/cam~180p`` and ``/watch/cam~180p`` open; a malformed label is 400."""
    relay = Relay()
    relay.publisher("cam~180p")
    relay.viewer("cam~180p")
    assert relay.connect().upgrade("/watch/cam~a.b").status == 400
    assert relay.connect().upgrade("/watch/cam~").status == 400


def test_a_token_for_the_base_admits_its_renditions() -> None:
    """A view token minted for ``cam`` opens ``cam~180p`` too, not ``cam2~180p``; one
    minted for the rendition itself opens it as well."""
    relay = Relay.with_options(view_secret=VIEW_SECRET)
    relay.open(f"/watch/cam~180p?token={view_token('cam')}")
    relay.open(f"/watch/cam~180p?token={view_token('cam~180p')}")
    assert relay.connect().upgrade(f"/watch/cam2~180p?token={view_token('cam')}").status == 401
    # A token for a rendition does not open the base.
    assert relay.connect().upgrade(f"/watch/cam?token={view_token('cam~180p')}").status == 401


def test_the_auth_url_is_told_the_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--auth-url`` gets ``base`` beside the full stream name (the body is built from
    the handshake the gate sees)."""
    relay = Relay()
    captured: list[Any] = []
    original = admission.admit

    def spy(handshake: Handshake) -> Any:
        captured.append(auth_request(handshake).body())
        return original(handshake)

    # Both upgrade paths (twisted.web's and the head's) run the checks through admit.
    monkeypatch.setattr(admission, "admit", spy)
    relay.connect().upgrade("/watch/cam~180p")
    assert captured[0]["stream"] == "cam~180p" and captured[0]["base"] == "cam"


@pytest.mark.parametrize(("query", "adaptive"), [("?abr=1", True), ("?abr=0", False),
                                                  ("?abr=yes", False), ("", False)])  # fmt: skip
def test_abr_1_makes_an_adaptive_viewer_and_other_values_are_ignored(
    query: str, adaptive: bool
) -> None:
    """Only ``abr=1`` asks for adaptive delivery; other values are ignored as unknown
    query parameters are (the viewer is a plain v1 viewer)."""
    relay = Relay()
    relay.viewer(f"cam{query}")
    assert isinstance(session_of(relay, "cam"), AdaptiveSession) is adaptive


def test_an_adaptive_viewer_is_told_its_rendition_before_the_meta() -> None:
    """Through the real protocols: ``rendition`` (start) follows the status and comes
    before the meta; a plain viewer of the same stream gets no ``rendition``."""
    relay = Relay()
    publisher = relay.publisher("cam")
    publisher.send(text_frame({"type": "meta", "width": 640, "renditions": SET}))
    adaptive = relay.viewer("cam?abr=1")
    plain = relay.viewer("cam")
    kinds = [m.json["type"] for m in adaptive.messages(("text",))]
    assert kinds == ["status", "rendition", "meta"]
    assert [m.json["type"] for m in plain.messages(("text",))] == ["status", "meta"]


def test_the_kernel_unsent_bytes_of_a_socket_are_read() -> None:
    """A loopback socket whose peer does not read: what the kernel has not sent shows
    (0 for something that is no socket)."""

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def getHandle(self) -> socket.socket:
            return self.sock

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        accepted.setblocking(False)
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sent = 0
        try:
            while sent < 64 * 1024 * 1024:
                sent += accepted.send(b"x" * 65536)
        except BlockingIOError:
            pass
        assert kernel_unsent_bytes(Transport(accepted)) > 0
        assert kernel_unsent_bytes(object()) == 0
    finally:
        for sock in (client, accepted, server):
            sock.close()


def test_meta_with_a_set_is_relayed_unchanged() -> None:
    """The relay reads the set but forwards the publisher's meta byte for byte."""
    relay = Relay()
    publisher = relay.publisher("cam")
    meta = {"type": "meta", "width": 640, "renditions": SET}
    publisher.send(text_frame(meta))
    viewer = relay.viewer("cam")
    texts = [m.json for m in viewer.messages(("text",))]
    assert texts[-1] == json.loads(json.dumps(meta))
    assert relay.context.registry.streams["cam"].renditions is not None
