"""streamrelay: a live-video relay server on Twisted and Autobahn|Python.

Layers, each in the module named for it; imports run one way, down this list's layers:

- the core, no network I/O: :mod:`streamrelay.wire` (the v1 wire format),
  :mod:`streamrelay.roles` (publisher, viewer, relay, echo), :mod:`streamrelay.names`,
  :mod:`streamrelay.tokens` (HMAC tokens; reads secret files), :mod:`streamrelay.config`
  (every setting, declared once), :mod:`streamrelay.limits` (connection, per-address,
  handshake-rate and waiting-stream limits), :mod:`streamrelay.peers` (the per-address
  key), :mod:`streamrelay.gop` (the GOP cache), :mod:`streamrelay.viewer_queue`
  (per-viewer queue, drop to keyframe), :mod:`streamrelay.budget` (the global bound on
  buffered bytes), :mod:`streamrelay.inbound` (per-connection inbound budget),
  :mod:`streamrelay.rates`, :mod:`streamrelay.liveness` (the ping deadline),
  :mod:`streamrelay.streams` (named streams, their publisher and viewers);
- operations: :mod:`streamrelay.metrics` (Prometheus), :mod:`streamrelay.logs`
  (rate-limited and JSON logging);
- :mod:`streamrelay.context` -- the state every connection shares, and the graceful stop;
- the protocols: :mod:`streamrelay.protocol` (thin Autobahn protocol classes and their
  factory), :mod:`streamrelay.edge_protocol` (``/relay/NAME``: an edge pulling from here);
- relay to relay: :mod:`streamrelay.wsclient` (WebSocket client parts shared with the
  publisher), :mod:`streamrelay.client` (the viewer client, a library too),
  :mod:`streamrelay.upstream` (the pulls of ``--upstream``);
- the web layer: :mod:`streamrelay.addresses` (peer addresses, loopback, proxies),
  :mod:`streamrelay.channel` (the HTTP channel), :mod:`streamrelay.resources` (plain
  endpoints and pages), :mod:`streamrelay.admission` (WebSocket endpoints and their
  checks), :mod:`streamrelay.web` (routing and the ``Site``);
- wiring: :mod:`streamrelay.tap` (twistd Options and ``makeService``),
  :mod:`streamrelay.demo` (the demo publisher), :mod:`streamrelay.cli` (the ``streamrelay``
  console script), :mod:`streamrelay.token_cli`, :mod:`streamrelay.options_doc`;
- :mod:`streamrelay.publisher` -- the desktop publisher, which the relay never imports.
"""

__version__ = "0.1.0"
