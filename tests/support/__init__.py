"""The one set of helpers every test suite shares.

- :mod:`.relay_process`: launches the real ``twistd -n streamrelay`` and reads its log
  (the ``start_relay`` / ``relay`` fixtures in ``tests/conftest.py`` use it);
- :mod:`.frames`: WebSocket frames written and parsed by hand;
- :mod:`.http`: HTTP request heads, the response parser, raw and ``http.client`` requests;
- :mod:`.net`: TCP sockets (blocking and asyncio) with chosen source address and buffers;
- :mod:`.raw_ws`: hand-driven WebSocket connections over those sockets;
- :mod:`.proxy`: a TCP proxy that turns into a black hole (half-open paths);
- :mod:`.ws_client`: real WebSocket clients from the ``websockets`` package;
- :mod:`.media`: wire protocol v1 media messages, built from the documented format;
- :mod:`.relay_api`: ``/api/streams`` and ``/api/internals``, RSS and CPU of the relay;
- :mod:`.tokens`: tokens and secret files, from the documented format;
- :mod:`.waiting`: polling with a deadline, bounded ``asyncio.run``;
- :mod:`.certs`: a self-signed certificate for loopback TLS;
- :mod:`.figures`: measured figures and artifacts;
- :mod:`.ci`: whether the run is under CI (missing tools then fail instead of skipping);
- :mod:`.half_frame_publisher`: a publisher process that dies mid-frame (``python -m``).

Nothing here imports the relay's own code: the helpers speak the documented protocol,
so a test that uses them checks the relay against its contract, not against itself.
"""
