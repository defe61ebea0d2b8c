"""The streamrelay desktop publisher: pushes live H.264 to a relay over wire protocol v1.

Command line: ``streamrelay-publish`` or ``python -m streamrelay.publisher`` (see
:mod:`streamrelay.publisher.cli`).

Library use, for a desktop application that has its own frames
=================================================================

Install with ``pip install 'streamrelay[publisher]'`` (the relay alone needs no PyAV;
neither do :class:`Publisher` and the H.264 packaging, only encoding and capture do).

The network side is :class:`Publisher`, configured by one :class:`PublisherSettings`
record. It runs on the Twisted reactor (the reactor must run, usually in the main thread),
connects, reconnects with backoff and jitter, re-sends meta and CONFIG after every
reconnect, and tells you when to produce a keyframe::

    from streamrelay.publisher import H264Packager, Publisher, PublisherSettings, Readiness

    publisher = Publisher(PublisherSettings("ws://127.0.0.1:8080/publish/desk", token=token))
    packager = H264Packager()      # Annex-B access units -> CONFIG / KEY / delta messages
    publisher.on_keyframe_request = my_encoder.force_idr        # relay asked, or reconnect
    publisher.on_viewers = lambda count: print("viewers:", count)
    publisher.start()

    # In the encoder thread, for every picture:
    if publisher.readiness is not Readiness.READY:               # offline or network behind
        skip_this_picture_and_force_idr_on_the_next()            # drop raw frames at the source
    else:
        for message in packager.package(access_unit, capture_time_us):
            if message.is_config:
                publisher.send_meta_threadsafe(
                    {"codec": packager.codec_string, "width": w, "height": h, "fps": fps})
                publisher.send_config_threadsafe(message.payload, message.capture_time_us)
            elif not publisher.send_frame_threadsafe(
                    message.payload, key=message.is_key,
                    capture_time_us=message.capture_time_us):
                force_idr_on_the_next()                          # dropped at the handoff

    # On the way out (reactor thread): publisher.stop() returns a Deferred.

Threads: every ``Publisher`` method runs in the reactor thread, except ``readiness`` and
the ``*_threadsafe`` methods (``send_meta_threadsafe``, ``send_config_threadsafe``,
``send_frame_threadsafe``, ``stop_threadsafe``), which hand over with
``reactor.callFromThread``. At most ``max_pending_threadsafe_calls`` frames may wait for
the reactor: past that ``send_frame_threadsafe`` drops (and returns False) until the next
KEY, so nothing queues without bound. Callbacks, set as attributes (``on_viewers(count)``,
``on_keyframe_request()``, ``on_state_change(state)``), run in the reactor thread; keep
them short (set a flag the encoder thread reads).

Publishing on demand: ``PublisherSettings(url, on_demand=True, on_demand_grace=10)``
makes the publisher go idle once nobody has watched for the grace period: ``readiness``
is then IDLE (capture and encode nothing: close or pause the source), ``send_frame``
refuses frames, the relay is told (``{"type": "publisher-state", "state": "idle"}``) and
marks the stream "available". On the first viewer it turns active, sends the CONFIG again
and asks for a KEY through ``on_keyframe_request``. Observe it with ``activity``
(:class:`Activity`, any thread) and ``on_activity_change(activity)``; the decision itself
is :class:`OnDemand` in :mod:`.ondemand`. An application that publishes several
connections from one source leaves ``on_demand`` off, feeds one :class:`OnDemand` their
summed ``viewers`` and applies its decision with ``Publisher.set_activity``.

Reactor-thread API: ``start()``, ``stop() -> Deferred``, ``when_stopped() -> Deferred``,
``send_meta(dict)``, ``send_config(bytes, capture_time_us=None)``,
``send_frame(bytes, key=..., capture_time_us=None) -> bool``; state in ``state``
(:class:`ConnectionState`), ``connected``, ``viewers``, ``stats``, ``dropped``,
``last_error``.

Renditions (several GOP-aligned encodings of one source, one connection each; the top
one at the URL's stream, the others at ``STREAM~LABEL``)::

    renditions = parse_renditions("1280x720@2500k,640x360@800k,320x180@250k")
    publisher = RenditionPublisher(PublisherSettings(url, token=token), renditions)
    encoders = RenditionEncoders(renditions, fps=Fraction(30), keyframe_interval_frames=60)
    pipeline = RenditionPipeline(source, encoders, publisher.publishers,
                                 publisher.rendition_set, reactor=reactor, fps=Fraction(30))
    publisher.on_keyframe_request = pipeline.request_keyframe   # any connection: all
    publisher.on_viewers = lambda total: ...                    # summed over the set

An application with its own encoders sends each rendition through
``publisher.publisher(label)`` (a :class:`Publisher`), with the meta of
:func:`~.renditions.rendition_meta`, and keeps keyframes on the same source frames.

Building blocks:

- :mod:`streamrelay.wire`, the one codec of the wire protocol (re-exported here:
  :class:`MediaMessage`, ``encode_media``, ``parse_media``, :class:`WireError`,
  ``meta_message``, ``now_us``, the flags);
- :mod:`.h264`: ``split_annexb``, ``join_annexb``, ``extract_parameter_sets``,
  ``parse_sps``/``codec_string_from_sps``, ``avcc_to_annexb``, :class:`H264Packager`;
- :mod:`.encoder` (needs PyAV): :class:`H264Encoder` and :class:`EncoderSettings`: libx264
  with zerolatency, no B-frames, in-band SPS/PPS, forced IDRs on request;
- :mod:`.vp9`, :mod:`.av1`: the VP9 and AV1 v1 profiles (codec strings, CONFIG,
  :class:`~.vp9.Vp9Packager`, :class:`~.av1.Av1Packager`); :mod:`.codecs` (needs PyAV):
  ``create_encoder("h264"|"vp9"|"av1", settings)``, libvpx-vp9 and SVT-AV1 set for live;
- :mod:`.sources` (needs PyAV): test pattern, screen, file and camera sources;
- :mod:`.pipeline` (needs PyAV): :class:`CapturePipeline`, the capture/encode thread with
  drop-at-source;
- :mod:`.mediathread`: what the capture, source and audio threads share (start, idle
  wait, end report);
- :mod:`.renditions` (the ``--renditions`` list, the ``BASE~LABEL`` naming, the meta),
  :mod:`.rendition_publisher` (:class:`RenditionPublisher`) and, with PyAV,
  :mod:`.rendition_pipeline` (:class:`RenditionEncoders`, :class:`RenditionPipeline`);
- :mod:`.remux` (needs PyAV): ``SourcePipeline``, a file or URL source remuxed without
  re-encoding (or transcoded when a browser could not play it), built on
  :mod:`.bitstream` (AVCC to Annex-B), :mod:`.timeline` (PTS to capture times) and
  :mod:`.hevc` (HEVC pass-through).

Inside the network side: :mod:`.settings` (the record), :mod:`.connector` (the
connection lifecycle, a state machine in :mod:`.state`), :mod:`.connection` (the
Autobahn factory made from the settings), :mod:`.outbox` and :mod:`.handoff` (the two
bounded queues).  What the relay's own client shares with it -- the Autobahn protocol
and refusals read from the HTTP response, relay URLs, TCP and TLS endpoints, the
backoff -- is :mod:`streamrelay.wsclient` (:class:`Backoff` and :class:`RelayTarget`
are re-exported here, part of this API).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from streamrelay.wire import (
    FLAG_CONFIG,
    FLAG_KEY,
    HEADER_SIZE,
    SUBPROTOCOL,
    MediaMessage,
    WireError,
    encode_media,
    meta_message,
    now_us,
    parse_media,
)
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.target import RelayTarget

from .client import ConnectionState, Publisher, PublisherStats, Readiness
from .h264 import (
    H264Error,
    H264Packager,
    SpsInfo,
    avcc_to_annexb,
    codec_string_from_sps,
    extract_parameter_sets,
    join_annexb,
    parse_sps,
    split_annexb,
)
from .ondemand import Activity, OnDemand
from .rendition_publisher import RenditionPublisher
from .renditions import Rendition, RenditionError, RenditionSet, parse_renditions
from .settings import DEFAULT_URL, PublisherSettings

if TYPE_CHECKING:
    from .encoder import EncoderSettings, H264Encoder
    from .pipeline import CapturePipeline
    from .rendition_pipeline import RenditionEncoders, RenditionPipeline

# PyAV is needed only to encode or capture: importing it lazily keeps the network side and
# the packaging helpers usable by an application that brings its own encoder.
_LAZY = {
    "EncoderSettings": "encoder",
    "H264Encoder": "encoder",
    "CapturePipeline": "pipeline",
    "RenditionEncoders": "rendition_pipeline",
    "RenditionPipeline": "rendition_pipeline",
}


def __getattr__(name: str) -> Any:
    """Import the PyAV-backed names on first use."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module_name}", __name__), name)


__all__ = [
    "DEFAULT_URL",
    "Activity",
    "OnDemand",
    "FLAG_CONFIG",
    "FLAG_KEY",
    "HEADER_SIZE",
    "SUBPROTOCOL",
    "Backoff",
    "CapturePipeline",
    "ConnectionState",
    "EncoderSettings",
    "H264Encoder",
    "H264Error",
    "H264Packager",
    "MediaMessage",
    "Publisher",
    "PublisherSettings",
    "PublisherStats",
    "Readiness",
    "RelayTarget",
    "Rendition",
    "RenditionEncoders",
    "RenditionError",
    "RenditionPipeline",
    "RenditionPublisher",
    "RenditionSet",
    "SpsInfo",
    "WireError",
    "avcc_to_annexb",
    "codec_string_from_sps",
    "encode_media",
    "extract_parameter_sets",
    "join_annexb",
    "meta_message",
    "now_us",
    "parse_media",
    "parse_renditions",
    "parse_sps",
    "split_annexb",
]
