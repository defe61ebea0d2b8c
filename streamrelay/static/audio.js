/* streamrelay player: audio (docs/protocol.md, "Audio").
 *
 * AUDIO messages (flag 0x04, one Opus packet, the capture time of its first sample) go to a
 * WebCodecs AudioDecoder; each decoded AudioData is played through Web Audio by an
 * AudioBufferSourceNode started at the AudioContext time when it must be heard: its capture
 * time plus the playout delay. The playout delay is the same for audio and video: the larger
 * of what the audio needs (its arrival latency plus a safety margin) and the video's decode
 * latency; decoded video frames wait (at most MAX_VIDEO_HOLD_MS) until their capture time plus
 * that delay, less the time the page takes to paint a frame it is given (measured), so picture
 * and sound that were captured together are painted and heard together. Both
 * use this computer's clock (Date.now) against the publisher's capture clock, so clock skew
 * between the hosts cancels out.
 *
 * The browser may refuse to start sound without a user gesture (the AudioContext stays
 * 'suspended'): audio is then decoded but not played, and the unmute button says so; clicking
 * it starts (and later mutes and unmutes) the sound. The measured A/V offset (how much later
 * the sound is heard than the picture of the same capture time is painted; 0 is perfect
 * sync) shows in the stats overlay; tests read window.streamrelayAudio. */

export const FLAG_AUDIO = 0x04;
const SAMPLE_RATE = 48000;
const SAFETY_MS = 30;          // audio is scheduled at least this long after it is decoded
const REPLAN_MS = 30;          // the playout delay moves when its target moved this much
const REPLAN_EVERY_MS = 1000;
const MAX_VIDEO_HOLD_MS = 500; // a frame never waits longer than this for its sound
const MAX_HELD_FRAMES = 30;
const MAX_DECODE_QUEUE = 50;   // packets (one second) waiting in the decoder: drop past this
const WINDOW = 50;             // latency samples kept for the playout plan
const OFFSET_SAMPLES = 120;    // A/V offset samples kept
const LOUD = 0.25;             // a beep of the test tone: louder than this
const QUIET_GAP_MS = 300;      // ... after at least this long without one

/** True when this page can play audio (WebCodecs AudioDecoder and Web Audio). */
export function audioSupported(win) {
  return typeof win.AudioDecoder === 'function' && typeof win.EncodedAudioChunk === 'function' &&
    typeof (win.AudioContext || win.webkitAudioContext) === 'function';
}

function median(values) {
  if (values.length === 0) return null;
  const sorted = values.slice().sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function quantile(values, q) {
  if (values.length === 0) return null;
  const sorted = values.slice().sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))];
}

function push(list, value, max) {
  list.push(value);
  if (list.length > max) list.shift();
}

export class AudioPlayer {
  constructor(doc, win) {
    this._win = win;
    this.supported = audioSupported(win);
    this.state = this.supported ? 'none' : 'unsupported'; // none | muted | playing | unsupported | error
    this.muted = false;         // muted by the user (the context may run)
    this.packets = 0;
    this.decoded = 0;
    this.nonSilent = 0;
    this.scheduled = 0;
    this.late = 0;
    this.serverDropped = 0;
    this.decoderErrors = 0;
    this.repeated = 0;          // packets not newer than the last one taken: not played
    this._lastCaptureUs = null;
    this.playoutMs = null;      // capture -> heard, this computer's clock minus the publisher's
    this.avOffsetMs = null;     // median of (sound heard) - (picture presented), same capture time
    this.beeps = [];            // Date.now() times when the test tone's beeps are heard (scheduled)
    this._offsets = [];
    this._arrivals = [];        // decode-time latency of audio (ms after its capture)
    this._videoLatencies = [];  // decode-time latency of video frames
    this._paintDelays = [];     // from handing a frame to the view to the frame it is painted in
    this._plannedAt = 0;
    this._lastLoudCapture = -1e18;
    this._config = null;        // {codec, sampleRate, numberOfChannels} from meta
    this._decoder = null;
    this._ctx = null;
    this._gain = null;
    this._sources = new Set();
    this._held = [];            // [frame, dueMs, show]
    this._holdTimer = null;
    this._button = doc.getElementById('unmute');
    this._offsetLabel = doc.getElementById('stat-av');
    if (this._button) this._button.addEventListener('click', () => this.toggle());
  }

  /** The /watch URL with ?audio=1 when this page can play audio (a v1 relay ignores it). */
  url(watchUrl) {
    if (!this.supported) return watchUrl;
    return watchUrl + (watchUrl.indexOf('?') >= 0 ? '&' : '?') + 'audio=1';
  }

  /** A meta message: its `audio` member says whether, and how, there is audio. */
  meta(msg) {
    const audio = msg && typeof msg.audio === 'object' && msg.audio ? msg.audio : null;
    if (!this.supported) return;
    if (!audio || audio.codec !== 'opus') {
      this._config = null;
      this._closeDecoder();
      this._setState('none');
      return;
    }
    const config = {
      codec: 'opus',
      sampleRate: Number(audio.sample_rate) || SAMPLE_RATE,
      numberOfChannels: Number(audio.channels) === 2 ? 2 : 1,
    };
    const old = this._config;
    this._config = config;
    if (!old || old.sampleRate !== config.sampleRate || old.numberOfChannels !== config.numberOfChannels) {
      this._closeDecoder();
    }
    this._ensureContext();
  }

  /** A binary message: true when it was audio (handled here), false for video. */
  media(buf) {
    if (buf.byteLength < 9 || !(new Uint8Array(buf, 0, 1)[0] & FLAG_AUDIO)) return false;
    this.packets++;
    const decoder = this._ensureDecoder();
    if (!decoder) return true;
    if (decoder.decodeQueueSize > MAX_DECODE_QUEUE) {
      this.late++; // it would be too late to play anyway
      return true;
    }
    const captureUs = Number(new DataView(buf).getBigUint64(1));
    // The relay sends capture times strictly increasing (docs/protocol.md, "Audio"); a
    // packet that is not would be heard twice, over the one already scheduled.
    if (this._lastCaptureUs !== null && captureUs <= this._lastCaptureUs) {
      this.repeated++;
      return true;
    }
    this._lastCaptureUs = captureUs;
    try {
      decoder.decode(new EncodedAudioChunk({
        type: 'key', timestamp: captureUs, data: new Uint8Array(buf, 9),
      }));
    } catch (e) {
      this.decoderErrors++;
      this._closeDecoder();
    }
    return true;
  }

  /** The relay dropped `count` audio messages (it resumes with the next one). */
  dropped(count) {
    this.serverDropped += count;
  }

  /** A new socket, or the publisher went away: stop what is scheduled, start again. */
  reset() {
    this._closeDecoder();
    for (const source of this._sources) {
      try { source.stop(); } catch (e) { /* not started */ }
    }
    this._sources.clear();
    this._flushHeld(false);
    this.playoutMs = null;
    this._arrivals = [];
    this._videoLatencies = [];
    this._lastCaptureUs = null;
  }

  /** Show a decoded video frame now, or when its sound is heard (see the header). */
  present(frame, show) {
    const now = Date.now();
    const latency = now - frame.timestamp / 1000;
    push(this._videoLatencies, latency, WINDOW);
    const delay = this.playoutMs;
    const paint = median(this._paintDelays) || 0;
    const hold = this.state === 'playing' && delay !== null ? delay - latency - paint : 0;
    if (hold <= 1 || hold > MAX_VIDEO_HOLD_MS || this._held.length >= MAX_HELD_FRAMES) {
      this._flushHeld(true);
      this._shown(frame, now);
      show(frame);
      return;
    }
    this._held.push([frame, now + hold, show]);
    this._armHold();
  }

  /** Start the sound (a user gesture), or mute and unmute it. */
  toggle() {
    const ctx = this._ensureContext();
    if (!ctx) return;
    if (ctx.state !== 'running') {
      this.muted = false;
      ctx.resume().then(() => this._update(), () => this._update());
    } else {
      this.muted = !this.muted;
    }
    if (this._gain) this._gain.gain.value = this.muted ? 0 : 1;
    this._update();
  }

  // -- internals ------------------------------------------------------------------------------

  _ensureContext() {
    if (this._ctx || !this.supported) return this._ctx;
    const Ctx = this._win.AudioContext || this._win.webkitAudioContext;
    try {
      this._ctx = new Ctx({ sampleRate: SAMPLE_RATE, latencyHint: 'interactive' });
    } catch (e) {
      this._setState('error');
      return null;
    }
    this._gain = this._ctx.createGain();
    this._gain.connect(this._ctx.destination);
    this._ctx.addEventListener('statechange', () => this._update());
    this._update();
    return this._ctx;
  }

  _ensureDecoder() {
    if (this._decoder && this._decoder.state === 'configured') return this._decoder;
    if (!this._config || !this.supported) return null;
    const decoder = new AudioDecoder({
      output: (data) => this._output(data),
      error: () => {
        this.decoderErrors++;
        if (this._decoder === decoder) this._decoder = null;
      },
    });
    try {
      decoder.configure(this._config);
    } catch (e) {
      this.decoderErrors++;
      this._setState('error');
      return null;
    }
    this._decoder = decoder;
    return decoder;
  }

  _closeDecoder() {
    const decoder = this._decoder;
    this._decoder = null;
    if (decoder && decoder.state !== 'closed') {
      try { decoder.close(); } catch (e) { /* closed meanwhile */ }
    }
  }

  _update() {
    if (!this._config) {
      this._setState(this.supported ? 'none' : 'unsupported');
    } else if (this._ctx) {
      this._setState(this._ctx.state === 'running' && !this.muted ? 'playing' : 'muted');
    }
  }

  _setState(state) {
    if (this.state === 'unsupported') return;
    this.state = state;
    const button = this._button;
    if (!button) return;
    button.hidden = state === 'none' || state === 'unsupported';
    const suspended = !this._ctx || this._ctx.state !== 'running';
    button.textContent = state === 'playing' ? 'Mute' :
      state === 'error' ? 'No sound' : suspended ? 'Unmute (sound is off)' : 'Unmute';
    button.setAttribute('aria-pressed', state === 'playing' ? 'false' : 'true');
  }

  _output(data) {
    try {
      this.decoded++;
      const frames = data.numberOfFrames;
      const channels = data.numberOfChannels;
      const captureMs = data.timestamp / 1000;
      const now = Date.now();
      push(this._arrivals, now - captureMs, WINDOW);
      const planes = [];
      for (let c = 0; c < channels; c++) {
        const plane = new Float32Array(frames);
        data.copyTo(plane, { planeIndex: c, format: 'f32-planar' });
        planes.push(plane);
      }
      const loudAt = this._inspect(planes[0], captureMs, data.sampleRate);
      this._plan(now);
      if (this._schedule(planes, captureMs, data.sampleRate) && loudAt !== null) {
        push(this.beeps, loudAt + this.playoutMs, 64); // when this beep is heard
      }
    } finally {
      data.close();
    }
  }

  // Counts non-silent packets; the capture time of a test-tone beep that starts here, or null.
  _inspect(samples, captureMs, rate) {
    let peak = 0;
    let loudAt = -1;
    for (let i = 0; i < samples.length; i++) {
      const v = Math.abs(samples[i]);
      if (v > peak) peak = v;
      if (loudAt < 0 && v > LOUD) loudAt = i;
    }
    if (peak > 0.01) this.nonSilent++;
    if (loudAt < 0) return null;
    const at = captureMs + (loudAt * 1000) / rate;
    const onset = at - this._lastLoudCapture > QUIET_GAP_MS;
    this._lastLoudCapture = captureMs + (samples.length * 1000) / rate;
    return onset ? at : null;
  }

  // The playout delay: what the audio needs, or the video's latency when that is larger.
  _plan(now) {
    // The sound card's own delay comes on top (what is scheduled now is heard that late).
    const ctx = this._ctx;
    const output = ctx ? (ctx.outputLatency || ctx.baseLatency || 0) * 1000 : 0;
    const needed = quantile(this._arrivals, 0.9) + SAFETY_MS + output;
    const video = median(this._videoLatencies);
    const target = Math.max(needed, video === null ? needed : video);
    if (this.playoutMs === null ||
        (now - this._plannedAt > REPLAN_EVERY_MS && Math.abs(target - this.playoutMs) > REPLAN_MS)) {
      this.playoutMs = Math.round(target);
      this._plannedAt = now;
    }
  }

  // The AudioContext time at which a sound is heard at `epochMs` (Date.now() time).
  _contextTime(epochMs) {
    const ctx = this._ctx;
    const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (stamp && stamp.performanceTime > 0) {
      const sinceStamp = performance.now() - stamp.performanceTime;
      return stamp.contextTime + (epochMs - (Date.now() - sinceStamp)) / 1000;
    }
    return ctx.currentTime + (epochMs - Date.now()) / 1000 - (ctx.outputLatency || ctx.baseLatency || 0);
  }

  _schedule(planes, captureMs, rate) {
    const ctx = this._ctx;
    if (!ctx || ctx.state !== 'running' || this.playoutMs === null) return false;
    const when = this._contextTime(captureMs + this.playoutMs);
    if (when < ctx.currentTime + 0.005) {
      this.late++;
      if (this.late % 5 === 0) this._plannedAt = 0; // replan at the next packet
      return false;
    }
    const buffer = ctx.createBuffer(planes.length, planes[0].length, rate);
    planes.forEach((plane, c) => buffer.copyToChannel(plane, c));
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this._gain);
    source.onended = () => this._sources.delete(source);
    this._sources.add(source);
    source.start(when);
    this.scheduled++;
    return true;
  }

  _armHold() {
    if (this._holdTimer !== null || this._held.length === 0) return;
    const wait = Math.max(0, this._held[0][1] - Date.now());
    this._holdTimer = setTimeout(() => {
      this._holdTimer = null;
      const now = Date.now();
      while (this._held.length > 0 && this._held[0][1] <= now + 1) {
        const [frame, , show] = this._held.shift();
        this._shown(frame, now);
        show(frame);
      }
      this._armHold();
    }, wait);
  }

  _flushHeld(show) {
    clearTimeout(this._holdTimer);
    this._holdTimer = null;
    const held = this._held;
    this._held = [];
    const now = Date.now();
    for (const [frame, , showFrame] of held) {
      if (show) {
        this._shown(frame, now);
        showFrame(frame);
      } else {
        frame.close();
      }
    }
  }

  // A frame is handed to the view now, which paints it at the next animation frame: a
  // callback queued after the view's runs right after that paint, and measures how much
  // later than the picture its sound is heard.
  _shown(frame, now) {
    if (this.state !== 'playing' || this.playoutMs === null) return;
    const captureMs = frame.timestamp / 1000;
    requestAnimationFrame(() => {
      const painted = Date.now();
      push(this._paintDelays, painted - now, WINDOW);
      if (this.playoutMs === null) return;
      push(this._offsets, this.playoutMs - (painted - captureMs), OFFSET_SAMPLES);
      this.avOffsetMs = Math.round(median(this._offsets) * 10) / 10;
      if (this._offsetLabel) this._offsetLabel.textContent = this.avOffsetMs.toFixed(0) + ' ms';
    });
  }

  /** The read-only view the tests read (window.streamrelayAudio). */
  expose(win) {
    const api = {};
    const fields = ['state', 'muted', 'packets', 'decoded', 'nonSilent', 'scheduled', 'late',
      'serverDropped', 'decoderErrors', 'playoutMs', 'avOffsetMs'];
    for (const name of fields) {
      Object.defineProperty(api, name, { get: () => this[name], enumerable: true });
    }
    Object.defineProperty(api, 'contextState', {
      get: () => (this._ctx ? this._ctx.state : null), enumerable: true,
    });
    Object.defineProperty(api, 'avOffsetSamplesMs', { get: () => this._offsets.slice(), enumerable: true });
    Object.defineProperty(api, 'beeps', { get: () => this.beeps.slice(), enumerable: true });
    Object.defineProperty(win, 'streamrelayAudio', { value: Object.freeze(api), enumerable: true });
  }
}
