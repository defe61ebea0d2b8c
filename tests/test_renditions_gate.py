"""Renditions at the web gate and the protocols (fake connections on a Clock):
``BASE~LABEL`` names, tokens minted for the base, ``?abr=1``, and the kernel's unsent
bytes that an adaptive session reads."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest

from streamrelay import admission
from streamrelay.adaptive import AdaptiveSession
from streamrelay.admission import Handshake, auth_request
from streamrelay.protocol import ViewerProtocol, kernel_unsent_bytes
from streamrelay.streams import ViewerSession
from streamrelay.tokens import make_token
from streamrelay.wire import FLAG_KEY, encode_media, parse_media
from tests.fakes import Relay
from tests.support.frames import text_frame
from tests.test_abr import SET

VIEW_SECRET = b"view-secret-for-tests"


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


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


def test_the_kernel_is_not_asked_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """Elsewhere the ioctl number is Linux's alone: it is not issued at all, and the
    unsent bytes read 0 (the queue's own figures are all the policy sees)."""
    from streamrelay import protocol

    issued: list[int] = []

    def ioctl(fileno: int, request: int, arg: bytes) -> bytes:
        issued.append(request)
        return b"\1\0\0\0"

    class Handle:
        def fileno(self) -> int:
            return 0

    class Transport:
        def getHandle(self) -> Handle:
            return Handle()

    monkeypatch.setattr(protocol.fcntl, "ioctl", ioctl)
    monkeypatch.setattr(protocol.sys, "platform", "darwin")
    assert kernel_unsent_bytes(Transport()) == 0
    assert issued == []
    monkeypatch.setattr(protocol.sys, "platform", "linux")
    assert kernel_unsent_bytes(Transport()) == 1
    assert issued == [protocol._SIOCOUTQNSD]


def test_a_handle_the_ioctl_refuses_reads_as_zero() -> None:
    """A descriptor that is no socket (a pipe, a TLS wrapper's object without one): the
    ioctl's error is the fallback's 0, not an exception in the ABR tick."""
    read_end, write_end = os.pipe()

    class Handle:
        def fileno(self) -> int:
            return read_end

    class Transport:
        transport = None

        def getHandle(self) -> Handle:
            return Handle()

    try:
        assert kernel_unsent_bytes(Transport()) == 0
    finally:
        os.close(read_end)
        os.close(write_end)


def test_api_streams_shows_the_set_and_the_adaptive_viewers_on_each_rendition() -> None:
    """``/api/streams``: the base stream lists its renditions (name, stream, size,
    bitrate); each stream counts its adaptive viewers apart from its plain ones, and an
    adaptive viewer that moves counts on the rendition it is on."""
    from streamrelay.abr import Decision

    relay = Relay()
    for name, entry in zip(("cam", "cam~360p", "cam~180p"), SET, strict=True):
        relay.publisher(name).send(
            text_frame({"type": "meta", "width": entry["width"], "renditions": SET})
        )
    relay.viewer("cam?abr=1")
    relay.viewer("cam")

    def listing() -> dict[str, Any]:
        body = relay.connect().request("GET", "/api/streams", {"Host": "relay.test"}).json()
        return {stream["name"]: stream for stream in body["streams"]}

    streams = listing()
    assert [r["stream"] for r in streams["cam"]["renditions"]] == [e["stream"] for e in SET]
    assert streams["cam"]["renditions"][1] == {
        key: SET[1][key] for key in ("name", "stream", "width", "height", "bitrate")
    }
    assert streams["cam"]["viewers"] == 2 and streams["cam"]["adaptive_viewers"] == 1
    assert streams["cam~360p"]["adaptive_viewers"] == 0
    session = session_of_type(relay, "cam", AdaptiveSession)
    session._begin(Decision(1, "down"))
    key = encode_media(FLAG_KEY, 2_000_000, b"k" * 100)
    relay.context.registry.streams["cam~360p"].publish_media(parse_media(key))
    streams = listing()
    assert streams["cam"]["adaptive_viewers"] == 0 and streams["cam"]["viewers"] == 1
    assert streams["cam~360p"]["adaptive_viewers"] == 1
    assert streams["cam~360p"]["viewers"] == 1


def session_of_type(relay: Relay, stream: str, kind: type) -> Any:
    """The one session of ``kind`` among ``stream``'s viewers."""
    sessions = [
        protocol.session
        for protocol in relay.context.registry.streams[stream].viewers
        if isinstance(protocol, ViewerProtocol) and isinstance(protocol.session, kind)
    ]
    assert len(sessions) == 1
    return sessions[0]
