// A Node.js `ws` relay in the style of jsmpeg's websocket-relay.js: every publisher
// message is sent to each open viewer in a loop.  perMessageDeflate off, no logging,
// no cache.  Same URL shapes as the other peers; echoes streamrelay.v1.
// Usage: node relay.js PORT
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const SUBPROTOCOL = 'streamrelay.v1';
const viewers = new Map();
const port = parseInt(process.argv[2], 10);

const server = new WebSocketServer({
  host: '127.0.0.1',
  port,
  perMessageDeflate: false,
  maxPayload: 64 * 1024 * 1024,
  clientTracking: false,
  handleProtocols: (protocols) => (protocols.has(SUBPROTOCOL) ? SUBPROTOCOL : false),
});

server.on('connection', (socket, request) => {
  const path = request.url || '';
  if (path.startsWith('/publish/')) {
    const name = path.slice('/publish/'.length);
    socket.on('message', (data, isBinary) => {
      const set = viewers.get(name);
      if (!set) return;
      for (const viewer of set) {
        if (viewer.readyState === WebSocket.OPEN) viewer.send(data, { binary: isBinary });
      }
    });
  } else if (path.startsWith('/watch/')) {
    const name = path.slice('/watch/'.length);
    if (!viewers.has(name)) viewers.set(name, new Set());
    const set = viewers.get(name);
    set.add(socket);
    socket.on('close', () => set.delete(socket));
  } else {
    socket.close(1008);
  }
  socket.on('error', () => {});
});
