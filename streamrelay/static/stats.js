/* streamrelay player: counters, the latency estimate, and the stats overlay that shows them. */

export const LATENCY_SAMPLES_MAX = 1000;

/** The player's counters. Each part of the player increments the ones it owns. */
export class Stats {
  constructor() {
    this.framesReceived = 0;   // media messages (KEY/delta) received
    this.framesDecoded = 0;    // VideoFrames output by the decoder
    this.framesDropped = 0;    // media not decoded here (waiting for KEY, hidden tab, queue bound, decoder errors)
    this.serverDropped = 0;    // sum of {"type":"dropped","messages":N} from the relay
    this.bytesReceived = 0;    // WebSocket payload bytes received (binary + text)
    this.lastLatencyMs = null;
    this.decoderErrors = 0;
    this.reconnects = 0;       // WebSocket connections opened after the first
    this.keyframeRequests = 0; // keyframe-request messages sent
    this._ring = new Float64Array(LATENCY_SAMPLES_MAX);
    this._count = 0;           // total samples ever written
    this._interval = [];       // samples since the overlay last showed them
    this.stalls = 0;           // episodes without a decoded frame while live (reports.js)
    this._reportLatencies = []; // samples since the last viewer report (reports.js)
  }

  /** Latency estimate of one decoded frame: this computer's clock now minus the publisher's
   * capture clock (exact only when both run on the same host). */
  recordLatency(captureUs, nowEpochMs) {
    const latencyMs = nowEpochMs - captureUs / 1000;
    this.lastLatencyMs = Math.round(latencyMs * 10) / 10;
    this._ring[this._count % LATENCY_SAMPLES_MAX] = this.lastLatencyMs;
    this._count++;
    if (this._interval.length < LATENCY_SAMPLES_MAX) this._interval.push(latencyMs);
  }

  /** Latency of one frame painted on the page (capture to canvas, this clock): what the viewer
   * reports (reports.js), nearer the glass than the decode time. */
  recordPaint(captureUs, nowEpochMs) {
    if (this._reportLatencies.length < LATENCY_SAMPLES_MAX) {
      this._reportLatencies.push(nowEpochMs - captureUs / 1000);
    }
  }

  /** The paint latency samples (this clock, uncorrected) since the last call, for a report. */
  takeReportLatencies() {
    const samples = this._reportLatencies;
    this._reportLatencies = [];
    return samples;
  }

  /** The last (up to LATENCY_SAMPLES_MAX) latency samples, oldest first. */
  latencySamples() {
    const n = Math.min(this._count, LATENCY_SAMPLES_MAX);
    const out = new Array(n);
    const start = this._count - n;
    for (let i = 0; i < n; i++) out[i] = this._ring[(start + i) % LATENCY_SAMPLES_MAX];
    return out;
  }

  /** Median latency of the samples since the last call, or null if there were none. */
  takeIntervalMedian() {
    const samples = this._interval;
    if (samples.length === 0) return null;
    this._interval = [];
    samples.sort((a, b) => a - b);
    return samples[Math.floor(samples.length / 2)];
  }
}

/** The <dl id="stats"> overlay: fps, kbit/s, dropped, latency, video size. Click toggles it. */
export class StatsOverlay {
  constructor(doc, stats, now) {
    const $ = (id) => doc.getElementById(id);
    this._root = $('stats');
    this._fps = $('stat-fps');
    this._kbps = $('stat-kbps');
    this._dropped = $('stat-dropped');
    this._latency = $('stat-latency');
    this._video = $('stat-video');
    this._stats = stats;
    this._lastTick = now;
    this._lastDecoded = 0;
    this._lastBytes = 0;
    this._root.addEventListener('click', () => this._root.classList.toggle('stats-collapsed'));
  }

  hide() {
    this._root.hidden = true;
  }

  /** Refresh from the counters; `live` says whether a missing latency sample means "–";
   * `clockOffsetMs` (relay clock minus this one, reports.js) corrects the latency when known;
   * `rendition` names the rendition an adaptive viewer is on. */
  tick(now, { live, width, height, codec, rendition, clockOffsetMs }) {
    const s = this._stats;
    const dt = (now - this._lastTick) / 1000;
    if (dt <= 0) return;
    const fps = (s.framesDecoded - this._lastDecoded) / dt;
    const kbps = ((s.bytesReceived - this._lastBytes) * 8) / 1000 / dt;
    this._lastTick = now;
    this._lastDecoded = s.framesDecoded;
    this._lastBytes = s.bytesReceived;
    this._fps.textContent = fps.toFixed(fps >= 10 ? 0 : 1);
    this._kbps.textContent = kbps >= 10 ? Math.round(kbps).toLocaleString('en') : kbps.toFixed(1);
    this._dropped.textContent = String(s.serverDropped + s.framesDropped);
    this._dropped.title = s.serverDropped + ' by the relay (slow link), ' +
      s.framesDropped + ' here (waiting for a keyframe, hidden tab, decoder)';
    const median = s.takeIntervalMedian();
    if (median !== null) {
      const corrected = Number.isFinite(clockOffsetMs);
      this._latency.textContent = Math.round(median + (corrected ? clockOffsetMs : 0)) + ' ms';
      this._latency.title = corrected
        ? 'Capture to decode, on the relay\'s clock (this computer\'s is ' +
          Math.round(-clockOffsetMs) + ' ms ahead of it)'
        : 'Capture to decode, on this computer\'s clock';
    } else if (!live) {
      this._latency.textContent = '–';
    }
    this._video.textContent = width + '×' + height + (codec ? ' ' + codec : '') +
      (rendition ? ' · ' + rendition : '');
    this._video.title = rendition ? 'rendition ' + rendition + ' (adaptive)' : '';
  }
}
