/* streamrelay player: media messages -> WebCodecs VideoDecoder -> VideoFrames.
 *
 * The decoder is configured with the codec string only (every KEY carries SPS/PPS in-band, so
 * no `description`): the codec from the latest meta message, else the one derived from the SPS.
 * VP9 and AV1 need no `description` either (docs/protocol.md, their v1 profiles). Before the
 * first configuration for a codec, VideoDecoder.isConfigSupported is asked (media is held
 * meanwhile); a codec this browser cannot decode is said plainly on the page.
 * Decoding starts, and restarts after any trouble, at a KEY; while waiting for one, media is
 * dropped and a keyframe is asked for. The backlog handed to the decoder is bounded. */

import { codecFromAnnexB } from './wire.js';
import { unsupportedCodecMessage } from './view.js';

const KEYFRAME_REREQUEST_MS = 4000; // still waiting for a KEY while deltas flow: ask again
// A joining viewer gets the relay's cached GOP in one burst: that is fine (it decodes far
// faster than real time). A decoder that stays behind is not: when the oldest chunk handed to
// it has waited longer than MAX_BEHIND_MS, or its queue exceeds MAX_DECODE_QUEUE chunks, drop
// until the next KEY (and ask for one).
const MAX_BEHIND_MS = 1500;
const MAX_DECODE_QUEUE = 300;

/** Whether `codec` names H.264 (whose Annex-B payloads carry an SPS to learn the codec from). */
function isAvc(codec) {
  return /^avc[13]\./.test(codec);
}

export class Decoder {
  /**
   * @param {Stats} stats - counts framesReceived/Decoded/Dropped, decoderErrors, latency
   * @param {KeyframeRequester} keyframes - asks the relay for a KEY
   * @param {() => boolean} hidden - whether nobody can see the video now (do not decode)
   * @param {object} on - callbacks: frame(VideoFrame) (the receiver closes it), fatal() when
   *   `fatal` changed
   */
  constructor(stats, keyframes, hidden, on) {
    this._stats = stats;
    this._keyframes = keyframes;
    this._hidden = hidden;
    this._on = on;
    this.fatal = null;             // {title, detail} when this stream cannot be decoded here
    this.configuredCodec = null;   // codec the VideoDecoder is configured for
    this.needKey = true;           // drop media until the next KEY
    this._decoder = null;
    this._metaCodec = null;        // codec from the latest meta message
    this._spsCodec = null;         // codec derived from the latest SPS
    this._unsupportedCodec = null;
    this._waitingKeySince = 0;
    this._inDecoder = [];          // [captureUs, handedAtMs] of chunks in the decoder, oldest first
    this._support = new Map();     // codec -> true | false | 'pending' (isConfigSupported)
    this._held = [];               // media waiting for the support check of their codec
  }

  /** The codec to show: the configured one, else the announced one. */
  get codecLabel() {
    return this.configuredCodec || this._metaCodec || '';
  }

  /** Drop media until the next KEY (the relay resumes us at one). */
  waitForKey() {
    if (!this.needKey) {
      this.needKey = true;
      this._waitingKeySince = performance.now();
    }
  }

  /** Forget decoder state (pending decodes are discarded); the next KEY reconfigures it. */
  reset() {
    if (this._decoder && this._decoder.state !== 'closed') {
      try {
        this._decoder.reset();
      } catch (e) { /* closed meanwhile */ }
    }
    this.configuredCodec = null;
    this._inDecoder = [];
    this._held = [];
    this.waitForKey();
  }

  /** The relay switches to another rendition: its CONFIG and KEY come next. The decoder is
   * configured afresh at that KEY (a new codec string, a new resolution), after the chunks of
   * the previous rendition it still holds: no reset, so no frame of either is discarded. */
  renditionChanged() {
    this.configuredCodec = null;
  }

  /** A meta message: a new codec means a new decoder configuration (and maybe a new chance). */
  meta(msg) {
    const oldCodec = this._wantedCodec();
    this._metaCodec = typeof msg.codec === 'string' && msg.codec ? msg.codec : null;
    const newCodec = this._wantedCodec();
    if (newCodec === oldCodec) return;
    if (newCodec) this._checkSupport(newCodec); // ask early: the KEY follows at once
    if (this._unsupportedCodec && newCodec !== this._unsupportedCodec) {
      this._unsupportedCodec = null;
      this._setFatal(null);
    }
    if (this.configuredCodec && this.configuredCodec !== newCodec) this.reset();
  }

  /** A media message as parsed by wire.parseMedia. */
  media(m) {
    if (m.isConfig) {
      this._learnSps(m.payload);
      return;
    }
    const stats = this._stats;
    stats.framesReceived++;
    const now = performance.now();
    if (this._hidden()) {
      // Do not feed a decoder nobody looks at; resume from a KEY when visible again.
      this.waitForKey();
      stats.framesDropped++;
      return;
    }
    if (m.isKey) this._learnSps(m.payload);
    const asking = m.isKey && this._checkSupport(this._wantedCodec()) === 'pending';
    if (asking || this._held.length > 0) {
      // The browser is still asked whether it can decode this codec: hold the media until it
      // answers (bounded; an overflow waits for the next KEY instead).
      if (this._held.length >= MAX_DECODE_QUEUE) {
        stats.framesDropped += this._held.length + 1;
        this._held = [];
        this.waitForKey();
        return;
      }
      this._held.push(m);
      return;
    }
    this._feed(m, now);
  }

  _feed(m, now) {
    const stats = this._stats;
    if (this.needKey && !m.isKey) {
      stats.framesDropped++;
      if (now - this._waitingKeySince > KEYFRAME_REREQUEST_MS &&
          now - this._keyframes.lastSentAt > KEYFRAME_REREQUEST_MS) {
        this._keyframes.request();
      }
      return;
    }
    if (this.fatal) {
      stats.framesDropped++;
      return;
    }
    if (this._isBehind(now)) {
      if (m.isKey) {
        this.reset(); // discard the backlog, start again from this KEY
      } else {
        this.waitForKey();
        stats.framesDropped++;
        this._keyframes.request();
        return;
      }
    }
    const dec = m.isKey ? this._ensureDecoder(this._wantedCodec()) : this._decoder;
    if (!dec || dec.state !== 'configured') {
      stats.framesDropped++;
      this.waitForKey();
      return;
    }
    try {
      dec.decode(new EncodedVideoChunk({
        type: m.isKey ? 'key' : 'delta',
        timestamp: m.captureUs,
        data: m.payload,
      }));
      this._inDecoder.push([m.captureUs, now]);
      if (this._inDecoder.length > 4 * MAX_DECODE_QUEUE) this._inDecoder.shift(); // never output
      if (m.isKey) this.needKey = false;
    } catch (e) {
      // A synchronous failure (e.g. a delta the decoder refuses): start again from a KEY.
      stats.framesDropped++;
      stats.decoderErrors++;
      console.warn('streamrelay: decode() failed:', e && e.message);
      this.reset();
      this._keyframes.request();
    }
  }

  /** Ask the browser (once per codec) whether it can decode `codec`; the answer so far. */
  _checkSupport(codec) {
    if (!codec) return true; // nothing to ask about: _ensureDecoder says what is missing
    const known = this._support.get(codec);
    if (known !== undefined) return known;
    if (this._support.size >= 64) this._support.clear(); // a publisher cycling codec strings
    this._support.set(codec, 'pending');
    const answered = (supported) => {
      this._support.set(codec, supported);
      if (!supported && codec === this._wantedCodec()) this._unsupported(codec);
      const held = this._held;
      this._held = [];
      const now = performance.now();
      for (const m of held) this._feed(m, now);
    };
    VideoDecoder.isConfigSupported({ codec: codec, optimizeForLatency: true }).then(
      (result) => answered(Boolean(result && result.supported)),
      () => answered(false)); // TypeError: not even a valid codec string
    return 'pending';
  }

  // This browser cannot decode `codec`: say so plainly, ask for nothing more.
  _unsupported(codec) {
    this._unsupportedCodec = codec;
    this._setFatal(unsupportedCodecMessage(codec));
  }

  _learnSps(payload) {
    // Only H.264 payloads are Annex-B with an SPS: elsewhere a start-code-like byte run
    // would yield a bogus avc1 string.
    if (this._metaCodec && !isAvc(this._metaCodec)) return;
    const codec = codecFromAnnexB(payload);
    if (codec) this._spsCodec = codec;
  }

  _wantedCodec() {
    return this._metaCodec || this._spsCodec;
  }

  // The decoder falls behind: do not queue without bound.
  _isBehind(now) {
    const dec = this._decoder;
    if (!dec || dec.state !== 'configured') return false;
    const behindMs = this._inDecoder.length > 0 ? now - this._inDecoder[0][1] : 0;
    return dec.decodeQueueSize > MAX_DECODE_QUEUE || behindMs > MAX_BEHIND_MS;
  }

  _setFatal(fatal) {
    this.fatal = fatal;
    this._on.fatal();
  }

  _output(frame) {
    this._stats.framesDecoded++;
    const backlog = this._inDecoder;
    let done = 0;
    while (done < backlog.length && backlog[done][0] <= frame.timestamp) done++;
    if (done > 0) backlog.splice(0, done);
    // The chunk timestamp is the publisher's capture time in µs since the epoch.
    this._stats.recordLatency(frame.timestamp, Date.now());
    this._on.frame(frame);
  }

  _error(dec, err) {
    if (dec !== this._decoder) return; // an old decoder already replaced
    this._stats.decoderErrors++;
    this._decoder = null;
    this.configuredCodec = null;
    this._inDecoder = [];
    console.warn('streamrelay: decoder error:', err && err.name, err && err.message);
    if (err && err.name === 'NotSupportedError') {
      // The codec itself is not supported: asking for keyframes would not help.
      this._unsupported(this._wantedCodec());
      return;
    }
    this.waitForKey();
    this._keyframes.request();
  }

  // A decoder configured for `codec`, or null if that cannot be done.
  _ensureDecoder(codec) {
    if (!codec || codec === this._unsupportedCodec) return null;
    if (this._support.get(codec) === false) {
      this._unsupported(codec);
      return null;
    }
    if (!this._decoder || this._decoder.state === 'closed') {
      const dec = new VideoDecoder({
        output: (frame) => this._output(frame),
        error: (e) => this._error(dec, e),
      });
      this._decoder = dec;
      this.configuredCodec = null;
    }
    if (this.configuredCodec !== codec || this._decoder.state !== 'configured') {
      try {
        this._decoder.configure({ codec: codec, optimizeForLatency: true });
        this.configuredCodec = codec;
      } catch (e) {
        // TypeError: not a valid codec string. Try the one derived from the SPS instead.
        if (this._spsCodec && codec !== this._spsCodec) return this._ensureDecoder(this._spsCodec);
        this._unsupportedCodec = codec;
        this._setFatal({
          title: 'This browser cannot decode this stream',
          detail: 'Invalid or unsupported codec "' + codec + '": ' + (e.message || e),
        });
        return null;
      }
    }
    return this._decoder;
  }
}
