"""streamrelay: a live-video relay server on Twisted and Autobahn|Python.

Layers, each in the module named for it:

- :mod:`streamrelay.wire` -- the v1 wire format (media header, text messages);
- :mod:`streamrelay.roles` -- the roles (publisher, viewer, echo) every layer names;
- :mod:`streamrelay.tokens` -- HMAC tokens for publishers and viewers;
- :mod:`streamrelay.limits` -- connection, per-address and handshake-rate limits;
- :mod:`streamrelay.gop` -- the per-stream GOP cache;
- :mod:`streamrelay.viewer_queue` -- per-viewer queue and drop-to-keyframe policy;
- :mod:`streamrelay.budget` -- the global bound on buffered bytes;
- :mod:`streamrelay.streams` -- named streams, their publisher and viewers (no I/O);
- :mod:`streamrelay.context` -- the state every connection shares, and the graceful stop;
- :mod:`streamrelay.protocol` -- thin Autobahn protocol classes and their factory;
- the web layer: :mod:`streamrelay.addresses` (peer addresses, loopback),
  :mod:`streamrelay.channel` (the HTTP channel), :mod:`streamrelay.resources` (plain
  endpoints and pages), :mod:`streamrelay.admission` (WebSocket endpoints and their
  checks), :mod:`streamrelay.web` (routing and the ``Site``);
- :mod:`streamrelay.tap` -- twistd Options and ``makeService``.
"""

__version__ = "0.1.0"
