/* streamrelay player: what the page shows. The canvas, the status pill, the message panel, and
 * the words in it (messageFor, a pure function of the player's state). */

/** The player's state, as the status pill and <body data-state> show it. */
export const State = Object.freeze({
  CONNECTING: 'connecting',     // opening a socket, or open and the relay has not said more
  LIVE: 'live',                 // the relay says a publisher is sending
  OFFLINE: 'offline',           // the relay says nobody publishes this name now
  STARTING: 'starting',         // the publisher idles on demand and is waking up for us
  RECONNECTING: 'reconnecting', // the socket went away; another attempt is due or under way
  ERROR: 'error',               // this stream cannot play here (see the message)
  UNSUPPORTED: 'unsupported',   // this browser has no WebCodecs (or not on this page)
});

const WAITING_HINT_MS = 1500; // "waiting for video" shows only if no frame comes this soon

export class View {
  constructor(doc, streamName) {
    const $ = (id) => doc.getElementById(id);
    this._doc = doc;
    this._canvas = $('video');
    this._status = $('status');
    this._message = $('message');
    this._messageTitle = $('message-title');
    this._messageDetail = $('message-detail');
    this._ctx2d = this._canvas.getContext('2d', { alpha: false });
    this._state = null;
    this._pending = null; // newest decoded frame not yet painted
    this._paintScheduled = false;
    this.onPainted = null; // (captureUs) => void, after each frame is drawn
    doc.title = (streamName || '?') + ' · streamrelay';
    $('stream-name').textContent = streamName || '(no stream)';
    const stage = $('stage');
    this._canvas.addEventListener('dblclick', () => {
      if (doc.fullscreenElement) {
        doc.exitFullscreen().catch(() => {});
      } else if (stage.requestFullscreen) {
        stage.requestFullscreen().catch(() => {});
      }
    });
  }

  get width() {
    return this._canvas.width;
  }

  get height() {
    return this._canvas.height;
  }

  setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._status.textContent = state;
    this._status.className = 'pill pill-' + state;
    this._doc.body.dataset.state = state;
  }

  /** A message panel over the video; `message` null hides it. */
  setMessage(message) {
    if (!message) {
      this._message.hidden = true;
      return;
    }
    this._messageTitle.textContent = message.title;
    this._messageDetail.textContent = message.detail || '';
    this._message.hidden = false;
  }

  /** The page cannot play at all: say why, once, for good. */
  showUnsupported(loc, secureContext) {
    this._state = State.UNSUPPORTED;
    this._status.textContent = State.UNSUPPORTED;
    this._status.className = 'pill pill-error';
    this._doc.body.dataset.state = State.UNSUPPORTED;
    this._doc.getElementById('stats').hidden = true;
    if (!secureContext) {
      this.setMessage({
        title: 'This page cannot play video: WebCodecs needs a secure context',
        detail: 'Browsers offer WebCodecs (the video decoder this player uses) only on secure ' +
          'pages: http://localhost or HTTPS. This page was loaded over plain HTTP from ' +
          loc.host + '. Open it on the relay\'s own machine as http://localhost/…, or have the ' +
          'relay listen on an ssl: endpoint (for example ' +
          '--listen ssl:8443:privateKey=key.pem:certKey=cert.pem) and open https://' +
          loc.hostname + ':8443' + loc.pathname + ' (the video then flows over wss:).',
      });
    } else {
      this.setMessage({
        title: 'This browser has no WebCodecs video decoder',
        detail: 'The player needs the WebCodecs VideoDecoder API (recent Chrome, Edge, Firefox, Safari).',
      });
    }
  }

  /** Size the canvas before the first frame (from the stream's meta message). */
  presize(w, h) {
    if (w > 0 && h > 0 && w <= 16384 && h <= 16384) {
      this._canvas.width = w;
      this._canvas.height = h;
    }
  }

  /** Paint `frame` at the next animation frame (a newer frame replaces an unpainted one). */
  show(frame) {
    this.dropFrame();
    this._pending = frame;
    if (!this._paintScheduled) {
      this._paintScheduled = true;
      requestAnimationFrame(() => this._paint());
    }
  }

  /** Forget the unpainted frame, if any. */
  dropFrame() {
    if (this._pending) {
      this._pending.close();
      this._pending = null;
    }
  }

  _paint() {
    this._paintScheduled = false;
    const frame = this._pending;
    this._pending = null;
    if (!frame) return;
    try {
      const w = frame.displayWidth;
      const h = frame.displayHeight;
      if (this._canvas.width !== w || this._canvas.height !== h) {
        this._canvas.width = w;
        this._canvas.height = h;
      }
      this._ctx2d.drawImage(frame, 0, 0, w, h);
      // The frame is on the page now: its capture time, for the viewer reports (reports.js).
      if (this.onPainted) this.onPainted(frame.timestamp);
    } finally {
      frame.close();
    }
  }
}

/** "Waiting for video…" shows when the stream went live but no frame came within
 * WAITING_HINT_MS; `showing` says whether it does now. */
export class WaitingHint {
  constructor(onChange) {
    this._onChange = onChange;
    this._timer = null;
    this._due = false;
    this._gotFrame = false;
  }

  get showing() {
    return this._due && !this._gotFrame;
  }

  /** The stream went live: start the clock. */
  arm() {
    clearTimeout(this._timer);
    this._due = false;
    this._timer = setTimeout(() => {
      this._due = true;
      this._onChange();
    }, WAITING_HINT_MS);
  }

  /** A frame was decoded. */
  frame() {
    if (this._gotFrame) return;
    this._gotFrame = true;
    clearTimeout(this._timer);
    this._onChange();
  }

  /** A new socket or publisher: the next frame is the first again. */
  reset() {
    this._gotFrame = false;
  }
}

// Codec string prefix -> the name viewers know the codec by.
const CODEC_NAMES = [
  [/^avc[13]\./, 'H.264'],
  [/^(hvc1|hev1)\./, 'HEVC (H.265)'],
  [/^vp09\./, 'VP9'],
  [/^vp8$/, 'VP8'],
  [/^av01\./, 'AV1'],
];

/** The message panel's words when this browser cannot decode `codec` (a WebCodecs string). */
export function unsupportedCodecMessage(codec) {
  const found = CODEC_NAMES.find(([pattern]) => pattern.test(codec));
  const name = found ? found[1] : 'this stream\'s';
  let hint = 'Try another browser, or ask the publisher to send H.264 (streamrelay-publish --codec h264), which every browser with WebCodecs plays.';
  if (found && found[1].startsWith('HEVC')) {
    hint = 'Browsers decode HEVC only where the platform provides a decoder (usually the graphics hardware). ' + hint;
  }
  return {
    title: 'This browser cannot play ' + name + ' video (' + codec + ')',
    detail: 'Its WebCodecs video decoder does not support the stream\'s codec ' + codec + '. ' + hint,
  };
}

/**
 * The message panel's words for a state, or null for none.
 * @param {object} s - {state, fatal, url, streamName, hidden, waiting, closeInfo, attempt,
 *   backoffMs (ms until the next attempt, or null while an attempt is under way)}
 */
export function messageFor(s) {
  if (s.fatal) return s.fatal;
  switch (s.state) {
    case State.CONNECTING:
      return { title: 'Connecting…', detail: 'Opening ' + s.url.replace(/\?token=.*$/, '?token=…') };
    case State.RECONNECTING:
      if (s.backoffMs !== null) {
        const secs = Math.max(0, s.backoffMs / 1000);
        return { title: 'Reconnecting…', detail: s.closeInfo + ' Next attempt in ' + secs.toFixed(1) + ' s.' };
      }
      return { title: 'Reconnecting…', detail: s.closeInfo + ' Attempt ' + s.attempt + '…' };
    case State.OFFLINE:
      return {
        title: 'Stream offline',
        detail: 'No publisher is sending “' + s.streamName + '” right now. Video starts by itself when it does.',
      };
    case State.STARTING:
      return {
        title: 'Starting…',
        detail: 'The publisher of “' + s.streamName + '” sends only while someone watches; it is starting now.',
      };
    case State.LIVE:
      if (s.waiting) return { title: 'Waiting for video…', detail: s.hidden ? '' : 'Waiting for the next keyframe.' };
      return null;
    default:
      return null;
  }
}
