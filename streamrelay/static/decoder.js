/* streamrelay player: media messages -> WebCodecs VideoDecoder -> VideoFrames.
 *
 * The decoder is configured with the codec string only (every KEY carries SPS/PPS in-band, so
 * no `description`): the codec from the latest meta message, else the one derived from the SPS.
 * Decoding starts, and restarts after any trouble, at a KEY; while waiting for one, media is
 * dropped and a keyframe is asked for. The backlog handed to the decoder is bounded. */

import { codecFromAnnexB } from './wire.js';

const KEYFRAME_REREQUEST_MS = 4000; // still waiting for a KEY while deltas flow: ask again
// A joining viewer gets the relay's cached GOP in one burst: that is fine (it decodes far
// faster than real time). A decoder that stays behind is not: when the oldest chunk handed to
// it has waited longer than MAX_BEHIND_MS, or its queue exceeds MAX_DECODE_QUEUE chunks, drop
// until the next KEY (and ask for one).
const MAX_BEHIND_MS = 1500;
const MAX_DECODE_QUEUE = 300;

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

  _learnSps(payload) {
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
      this._unsupportedCodec = this._wantedCodec();
      this._setFatal({
        title: 'This browser cannot decode this stream',
        detail: 'Codec ' + this._unsupportedCodec + ' is not supported by this browser\'s ' +
          'WebCodecs VideoDecoder (' + (err.message || err.name) + ').',
      });
      return;
    }
    this.waitForKey();
    this._keyframes.request();
  }

  // A decoder configured for `codec`, or null if that cannot be done.
  _ensureDecoder(codec) {
    if (!codec || codec === this._unsupportedCodec) return null;
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
