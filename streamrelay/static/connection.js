/* streamrelay player: the viewer's WebSocket to /watch/NAME.
 *
 * One socket at a time, subprotocol streamrelay.v1, a connect timeout, a watchdog for dead links,
 * and reconnects with full-jitter exponential backoff (tabs do not retry in lockstep). Its whole
 * state is `phase` (one of Link) plus the backoff bookkeeping. Keyframe requests go out through
 * KeyframeRequester, rate limited. */

import { SUBPROTOCOL, closeReason } from './wire.js';

const BACKOFF_BASE_MS = 500;        // full jitter: random(0, min(cap, base * 2^attempt))
const BACKOFF_CAP_MS = 15000;
const STABLE_AFTER_MS = 5000;       // a connection open this long resets the backoff
const CONNECT_TIMEOUT_MS = 10000;   // the opening handshake must finish within this
const LIVE_SILENCE_MS = 30000;      // traffic expected but nothing at all received: a dead link
const WATCHDOG_INTERVAL_MS = 2000;
const KEYFRAME_REQUEST_MIN_MS = 1000;

/** Where the connection is. */
export const Link = Object.freeze({
  IDLE: 'idle',             // not started yet
  CONNECTING: 'connecting', // a socket's opening handshake is under way
  OPEN: 'open',             // a socket is open
  BACKOFF: 'backoff',       // no socket; the next attempt is due at `reconnectDueAt`
  STOPPED: 'stopped',       // the page was left: no socket, no reconnects until resume()
});

export class Connection {
  /**
   * @param {string} url - the ws(s):// watch URL (with its ?token= if any)
   * @param {Stats} stats - counts bytesReceived and reconnects
   * @param {object} on - callbacks: change() after every phase change, open(), text(string),
   *   media(ArrayBuffer), gone() when a socket is lost (before the reconnect is scheduled)
   * @param {() => boolean} expectTraffic - whether silence now means a dead link
   */
  constructor(url, stats, on, expectTraffic) {
    this.url = url;
    this._stats = stats;
    this._on = on;
    this._expectTraffic = expectTraffic;
    this.phase = Link.IDLE;
    this.attempt = 0;          // reconnect attempts since the last stable connection
    this.reconnectDueAt = 0;   // performance.now() of the next attempt (phase BACKOFF)
    this.closeInfo = '';       // why the last socket went away, for the user
    this._ws = null;
    this._openedAt = 0;
    this._lastReceiveAt = 0;
    this._connects = 0;
    this._connectTimer = null;
    this._reconnectTimer = null;
    setInterval(() => this._watchdog(), WATCHDOG_INTERVAL_MS);
  }

  start() {
    this._connect();
  }

  /** True when a message can be sent now. */
  get isOpen() {
    return this.phase === Link.OPEN && this._ws !== null && this._ws.readyState === WebSocket.OPEN;
  }

  send(message) {
    if (!this.isOpen) return false;
    this._ws.send(JSON.stringify(message));
    return true;
  }

  /** Leaving the page: close cleanly now and do not reconnect (also keeps the page eligible for
   * the back/forward cache, and the relay counts the viewer gone at once). */
  stop() {
    if (this.phase === Link.STOPPED) return;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._connectTimer);
    this._reconnectTimer = this._connectTimer = null;
    const sock = this._ws;
    this._ws = null;
    this.phase = Link.STOPPED;
    if (sock) detachAndClose(sock, 1000, 'page closed');
  }

  /** Back from the back/forward cache: start afresh. */
  resume() {
    if (this.phase !== Link.STOPPED) return;
    this.phase = Link.IDLE;
    this.attempt = 0;
    this._connect();
  }

  /** Back online after a network change: do not sit out a long backoff. */
  hurry() {
    if (this.phase === Link.BACKOFF && this.reconnectDueAt - performance.now() > BACKOFF_BASE_MS) {
      this._schedule(Math.random() * BACKOFF_BASE_MS);
    }
  }

  _connect() {
    if (this.phase === Link.STOPPED) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    if (this._connects++ > 0) this._stats.reconnects++;
    let sock;
    try {
      sock = new WebSocket(this.url, [SUBPROTOCOL]);
    } catch (e) {
      this.closeInfo = 'Cannot open WebSocket: ' + (e.message || e) + '.';
      this._backoff();
      return;
    }
    this._ws = sock;
    sock.binaryType = 'arraybuffer';
    this._openedAt = 0;
    this.phase = Link.CONNECTING;
    this._on.change();
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(() => {
      if (this._ws === sock && sock.readyState !== WebSocket.OPEN) {
        this._drop(sock, 'Connection attempt timed out.');
      }
    }, CONNECT_TIMEOUT_MS);

    sock.onopen = () => {
      if (this._ws !== sock) return;
      clearTimeout(this._connectTimer);
      this._openedAt = this._lastReceiveAt = performance.now();
      this.phase = Link.OPEN;
      this._on.open();
      this._on.change();
    };
    sock.onmessage = (ev) => {
      if (this._ws !== sock) return;
      this._lastReceiveAt = performance.now();
      if (typeof ev.data === 'string') {
        this._stats.bytesReceived += ev.data.length;
        // When the message arrived (not when this handler ran): the clock exchange needs it.
        this._on.text(ev.data, ev.timeStamp);
      } else {
        this._stats.bytesReceived += ev.data.byteLength;
        this._on.media(ev.data);
      }
    };
    sock.onerror = () => { /* onclose follows with the code */ };
    sock.onclose = (ev) => {
      if (this._ws === sock) this._gone(closeReason(ev.code, ev.reason));
    };
  }

  // Abandon a socket without waiting for its closing handshake (dead link, stuck handshake).
  _drop(sock, info) {
    detachAndClose(sock);
    if (this._ws === sock) this._gone(info);
  }

  _gone(info) {
    clearTimeout(this._connectTimer);
    if (this._openedAt > 0 && performance.now() - this._openedAt >= STABLE_AFTER_MS) this.attempt = 0;
    this._ws = null;
    this._openedAt = 0;
    this.closeInfo = info;
    this._on.gone();
    this._backoff();
  }

  _backoff() {
    if (this.phase === Link.STOPPED) return;
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, this.attempt));
    this.attempt++;
    this._schedule(Math.random() * ceiling); // full jitter
    this._on.change();
  }

  _schedule(delay) {
    clearTimeout(this._reconnectTimer);
    this.phase = Link.BACKOFF;
    this.reconnectDueAt = performance.now() + delay;
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  // While traffic is expected, a link that delivers nothing at all for long is dead (half-open TCP).
  _watchdog() {
    if (this.isOpen && this._expectTraffic() &&
        performance.now() - this._lastReceiveAt > LIVE_SILENCE_MS) {
      this._drop(this._ws, 'Nothing received for ' + LIVE_SILENCE_MS / 1000 + ' s.');
    }
  }
}

function detachAndClose(sock, code, reason) {
  sock.onopen = sock.onmessage = sock.onclose = sock.onerror = null;
  try {
    if (code) sock.close(code, reason);
    else sock.close();
  } catch (e) { /* already closing */ }
}

/** Sends {"type":"keyframe-request"} at most once per KEYFRAME_REQUEST_MIN_MS; a need inside the
 * interval is sent at its end if `stillWanted()` then. */
export class KeyframeRequester {
  constructor(connection, stats, stillWanted) {
    this._connection = connection;
    this._stats = stats;
    this._stillWanted = stillWanted;
    this._timer = null;
    this.lastSentAt = -Infinity;
  }

  request() {
    if (this._timer) return;
    const wait = this.lastSentAt + KEYFRAME_REQUEST_MIN_MS - performance.now();
    if (wait > 0) {
      this._timer = setTimeout(() => {
        this._timer = null;
        if (this._stillWanted()) this.request();
      }, wait);
      return;
    }
    if (this._connection.send({ type: 'keyframe-request' })) {
      this.lastSentAt = performance.now();
      this._stats.keyframeRequests++;
    }
  }
}
