/* streamrelay player: wire protocol v1 over WebSocket -> WebCodecs VideoDecoder -> <canvas>.
 *
 * The entry module: it reads the stream name and ?token= from the page URL and wires the parts
 * together. ES modules, no build step, no external URLs; runs under the relay's CSP
 * (script-src 'self', style-src 'self': no inline code, no style attributes, no eval).
 *   wire.js        the protocol: frame parsing, SPS -> codec string, close reasons, URLs
 *   connection.js  the WebSocket: reconnects with jitter, watchdog, keyframe requests
 *   decoder.js     media -> VideoDecoder: waiting for KEYs, backlog bounds, error recovery
 *   view.js        canvas, status pill, message panel
 *   stats.js       counters, latency estimate, stats overlay
 *   reports.js     clock offset to the relay, and the viewer reports sent to it
 *   audio.js       audio: AudioDecoder -> Web Audio in sync with the video, unmute control
 *     (window.streamrelayAudio: its counters and the measured A/V offset)
 *
 * For automated tests the page exposes a read-only live view of its counters:
 *   window.streamrelayPlayer = {state, streamName, framesReceived, framesDecoded, framesDropped,
 *     serverDropped, bytesReceived, lastLatencyMs, latencySamplesMs, decoderErrors, reconnects,
 *     keyframeRequests, codec, width, height, error, rendition, renditionSwitches}
 *
 * Renditions (docs/protocol.md): the player asks for adaptive delivery (?abr=1) unless the page
 * URL says ?abr=0; a relay ignores it for streams without renditions. A {"type":"rendition"}
 * message says which rendition follows; its CONFIG and KEY come next, and the decoder is
 * reconfigured at that KEY without discarding what it still decodes of the previous one.
 */

import { AudioPlayer } from './audio.js';
import { Connection, KeyframeRequester, Link } from './connection.js';
import { Decoder } from './decoder.js';
import { ClockSync, Reporter } from './reports.js';
import { Stats, StatsOverlay } from './stats.js';
import { State, View, WaitingHint, messageFor } from './view.js';
import { parseControl, parseMedia, streamNameFromPath, watchUrl } from './wire.js';

const STATS_INTERVAL_MS = 1000;

/** What the relay said about the stream on the current socket. */
const Relay = Object.freeze({ UNKNOWN: 'unknown', LIVE: 'live', OFFLINE: 'offline', STARTING: 'starting' });

class Player {
  constructor(doc, loc) {
    this.doc = doc;
    this.streamName = streamNameFromPath(loc.pathname);
    const params = new URLSearchParams(loc.search);
    this.audio = new AudioPlayer(doc, window);
    this.url = this.audio.url(
      withAbr(watchUrl(loc, this.streamName, params.get('token')), params.get('abr') !== '0'));
    this.rendition = null; // the latest {"type":"rendition"} message
    this.renditionSwitches = 0;
    this.stats = new Stats();
    this.view = new View(doc, this.streamName);
    this.overlay = new StatsOverlay(doc, this.stats, performance.now());
    this.hint = new WaitingHint(() => this.refresh());
    this.relay = Relay.UNKNOWN;
    this.unsupported = false;
    this.pageError = null; // {title, detail} when there is nothing to play at all
    this.connection = null;
    this.keyframes = null;
    this.decoder = null;
    this.clockSync = null;
    this.reporter = null;
  }

  get fatal() {
    return this.pageError || (this.decoder && this.decoder.fatal) || null;
  }

  /** The one state the page shows, derived from the connection, the relay's word and errors. */
  get state() {
    if (this.unsupported) return State.UNSUPPORTED;
    if (this.fatal) return State.ERROR;
    const link = this.connection;
    switch (link ? link.phase : Link.IDLE) {
      case Link.OPEN:
        if (this.relay === Relay.LIVE) return State.LIVE;
        if (this.relay === Relay.STARTING) return State.STARTING;
        return this.relay === Relay.OFFLINE ? State.OFFLINE : State.CONNECTING;
      case Link.BACKOFF:
        return State.RECONNECTING;
      case Link.CONNECTING:
        return link.attempt > 0 ? State.RECONNECTING : State.CONNECTING;
      default:
        return State.CONNECTING;
    }
  }

  /** Show the current state and its message. */
  refresh() {
    if (this.unsupported) return; // said once, stays
    const state = this.state;
    this.view.setState(state);
    const link = this.connection;
    this.view.setMessage(messageFor({
      state,
      fatal: this.fatal,
      url: this.url,
      streamName: this.streamName,
      hidden: this.doc.visibilityState === 'hidden',
      waiting: this.hint.showing,
      closeInfo: link ? link.closeInfo : '',
      attempt: link ? link.attempt : 0,
      backoffMs: link && link.phase === Link.BACKOFF ? link.reconnectDueAt - performance.now() : null,
    }));
  }

  run(win) {
    setInterval(() => this.tick(), STATS_INTERVAL_MS);
    if (typeof win.VideoDecoder !== 'function' || typeof win.EncodedVideoChunk !== 'function') {
      this.unsupported = true;
      this.view.showUnsupported(win.location, win.isSecureContext);
      return;
    }
    if (!this.streamName) {
      this.pageError = { title: 'No stream name in the address', detail: 'Open /view/NAME.' };
      this.refresh();
      return;
    }
    const connection = new Connection(this.url, this.stats, {
      change: () => this.refresh(),
      open: () => this.onOpen(),
      text: (text, receivedAt) => this.onText(text, receivedAt),
      media: (buf) => this.onMedia(buf),
      gone: () => this.onGone(),
    }, () => this.relay === Relay.LIVE);
    this.keyframes = new KeyframeRequester(connection, this.stats, () => this.decoder.needKey);
    this.decoder = new Decoder(this.stats, this.keyframes, () => this.doc.visibilityState === 'hidden', {
      frame: (frame) => this.onFrame(frame),
      fatal: () => this.refresh(),
    });
    this.connection = connection;
    this.clockSync = new ClockSync(connection);
    this.reporter = new Reporter(connection, this.stats, this.clockSync);
    this.view.onPainted = (captureUs) => this.stats.recordPaint(captureUs, Date.now());
    this.listen(win);
    connection.start();
  }

  listen(win) {
    // Hidden tab: stop decoding; when visible again, resume at a KEY and ask for one now.
    this.doc.addEventListener('visibilitychange', () => {
      if (this.doc.visibilityState === 'hidden') {
        this.decoder.waitForKey();
        this.view.dropFrame();
      } else {
        if (this.decoder.needKey) this.keyframes.request();
        this.refresh();
      }
    });
    // Leaving the page (F5 included): close the socket now, so the relay counts this viewer
    // gone at once rather than when the old document is torn down.
    win.addEventListener('pagehide', () => {
      this.connection.stop();
      this.decoder.reset();
      this.view.dropFrame();
    });
    win.addEventListener('pageshow', (ev) => {
      if (ev.persisted) this.connection.resume();
    });
    win.addEventListener('online', () => this.connection.hurry());
  }

  tick() {
    const state = this.state;
    this.overlay.tick(performance.now(), {
      live: state === State.LIVE,
      width: this.view.width,
      height: this.view.height,
      codec: this.decoder ? this.decoder.codecLabel : '',
      rendition: this.rendition ? this.rendition.name : '',
      clockOffsetMs: this.clockSync ? this.clockSync.offsetMs : null,
    });
    if (state === State.RECONNECTING) this.refresh(); // the countdown
    if (this.reporter) {
      this.reporter.tick(performance.now(), state === State.LIVE && this.doc.visibilityState !== 'hidden');
    }
  }

  onOpen() {
    // Until the relay says "live" or "offline", we are connected but know nothing.
    this.relay = Relay.UNKNOWN;
    this.rendition = null; // the relay says again which one, if any
    this.hint.reset();
    this.decoder.reset(); // start from the relay's CONFIG + KEY
    this.clockSync.onOpen();
  }

  onGone() {
    this.relay = Relay.UNKNOWN;
    this.audio.reset();
    this.decoder.reset();
    this.view.dropFrame();
    this.hint.reset();
  }

  onText(text, receivedAt) {
    const msg = parseControl(text);
    if (!msg) return;
    switch (msg.type) {
      case 'status':
        if (msg.state === 'live' && msg.publisher === 'idle') {
          // On demand: the publisher is connected but idle; our arrival wakes it up.
          this.relay = Relay.STARTING;
          this.hint.reset();
        } else if (msg.state === 'live') {
          if (this.relay !== Relay.LIVE) this.hint.arm();
          this.relay = Relay.LIVE;
        } else if (msg.state === 'offline') {
          this.relay = Relay.OFFLINE;
          this.hint.reset();
          this.audio.reset();
          this.decoder.waitForKey(); // a new publisher starts with CONFIG and KEY
        }
        this.refresh();
        break;
      case 'meta':
        this.audio.meta(msg);
        this.decoder.meta(msg);
        if (this.stats.framesDecoded === 0) this.view.presize(Number(msg.width), Number(msg.height));
        break;
      case 'rendition':
        // The relay switches us: that rendition's meta, CONFIG and KEY follow.
        if (typeof msg.name === 'string') {
          if (this.rendition && msg.reason !== 'start') this.renditionSwitches++;
          this.rendition = msg;
          this.decoder.renditionChanged();
        }
        break;
      case 'time':
        this.clockSync.onAnswer(msg, receivedAt);
        break;
      case 'dropped':
        if (msg.messages === undefined && Number.isFinite(Number(msg.audio))) {
          this.audio.dropped(Number(msg.audio)); // audio only: the video goes on
          break;
        }
        if (Number.isFinite(Number(msg.messages))) this.stats.serverDropped += Number(msg.messages);
        this.decoder.waitForKey(); // the relay resumes us at a KEY (after CONFIG if it changed)
        break;
      default:
        break;
    }
  }

  onMedia(buf) {
    if (this.relay === Relay.UNKNOWN || this.relay === Relay.STARTING) {
      // Media before any (or after an idle) status message: the stream is evidently live.
      this.relay = Relay.LIVE;
      this.hint.arm();
      this.refresh();
    }
    if (this.audio.media(buf)) return;
    const m = parseMedia(buf);
    if (m) this.decoder.media(m);
  }

  onFrame(frame) {
    this.hint.frame();
    if (this.doc.visibilityState === 'hidden') {
      frame.close();
      return;
    }
    this.audio.present(frame, (f) => this.view.show(f));
  }
}

/** `url` asking for adaptive delivery (a v1 relay ignores the parameter). */
function withAbr(url, abr) {
  if (!abr) return url;
  return url + (url.includes('?') ? '&' : '?') + 'abr=1';
}

/** The read-only live view of the player's counters that the tests read. */
function exposeForTests(win, player) {
  const stats = player.stats;
  const fields = {
    state: () => player.state,
    streamName: () => player.streamName,
    framesReceived: () => stats.framesReceived,
    framesDecoded: () => stats.framesDecoded,
    framesDropped: () => stats.framesDropped,
    serverDropped: () => stats.serverDropped,
    bytesReceived: () => stats.bytesReceived,
    lastLatencyMs: () => stats.lastLatencyMs,
    latencySamplesMs: () => stats.latencySamples(),
    decoderErrors: () => stats.decoderErrors,
    reconnects: () => stats.reconnects,
    keyframeRequests: () => stats.keyframeRequests,
    codec: () => (player.decoder ? player.decoder.configuredCodec : null),
    width: () => player.view.width,
    height: () => player.view.height,
    error: () => (player.fatal ? player.fatal.title : null),
    rendition: () => (player.rendition ? player.rendition.name : null),
    renditionSwitches: () => player.renditionSwitches,
    stalls: () => stats.stalls,
    clockOffsetMs: () => (player.clockSync ? player.clockSync.offsetMs : null),
    clockRttMs: () => (player.clockSync ? player.clockSync.rttMs : null),
    reportsSent: () => (player.reporter ? player.reporter.sent : 0),
    lastReport: () => (player.reporter && player.reporter.last ? { ...player.reporter.last } : null),
  };
  const api = {};
  for (const name of Object.keys(fields)) {
    Object.defineProperty(api, name, { get: fields[name], enumerable: true });
  }
  Object.defineProperty(win, 'streamrelayPlayer', { value: Object.freeze(api), enumerable: true });
}

const player = new Player(document, location);
exposeForTests(window, player);
player.audio.expose(window);
player.run(window);
