/* streamrelay player: what this viewer experiences, reported to the relay (docs/protocol.md,
 * "Viewer reports").
 *
 * ClockSync estimates how far this computer's clock is from the relay's: it sends
 * {"type":"time","t0":T} and the relay answers with its own clock (server_us); from the round
 * trip, NTP style, offset = server - (t0 + t1) / 2, trusting the sample with the shortest round
 * trip (t1 is when the answer reached the page, not when its handler ran behind queued media).
 * Three exchanges at each connection, then one every 10 s, the best of the last 8 kept: inside
 * the relay's allowance (a burst of 4, then one per 5 s) and far inside the viewer's inbound
 * budget (5 frames/s, 4 KiB/s).
 *
 * Reporter sends {"type":"report", latency_ms, fps, dropped, stalls, clock_offset_ms} every 5 s
 * while the stream plays: latency_ms is the median glass-to-glass estimate of the frames painted
 * in the interval (the moment the frame was drawn on the page, on this clock corrected to the
 * relay's, minus the capture time in the frame's header; null until the clock offset is known:
 * the display's own refresh, at most a frame more, is not seen by a page), fps the frames decoded per
 * second, dropped and stalls the counts since the previous report. A stall is an episode of at
 * least STALL_MS without a decoded frame while the stream is live and the page visible. */

export const REPORT_INTERVAL_MS = 5000;
const STALL_MS = 1000;
const SYNC_SAMPLES_AT_OPEN = 3;
const SYNC_EVERY_MS = 10000;
const SYNC_TIMEOUT_MS = 3000;
const SYNC_KEEP = 8;

/** Wall-clock milliseconds since the Unix epoch, with sub-millisecond resolution. */
function epochNowMs() {
  return performance.timeOrigin + performance.now();
}

export class ClockSync {
  constructor(connection) {
    this._connection = connection;
    this._pending = null;      // t0 of the request in flight
    this._pendingTimer = null;
    this._samples = [];        // {offset, rtt}, newest last, at most SYNC_KEEP
    this._toSend = 0;          // exchanges still wanted in this burst
    this.offsetMs = null;      // relay clock minus this clock, or null while unknown
    this.rttMs = null;
    setInterval(() => this._burst(1), SYNC_EVERY_MS);
  }

  /** A new connection: measure afresh (the relay may be another one). */
  onOpen() {
    this._samples = [];
    this.offsetMs = null;
    this.rttMs = null;
    this._pending = null;
    this._burst(SYNC_SAMPLES_AT_OPEN);
  }

  _burst(count) {
    this._toSend = Math.max(this._toSend, count);
    if (this._pending === null) this._sendNext();
  }

  _sendNext() {
    if (this._toSend <= 0) return;
    const t0 = epochNowMs();
    if (!this._connection.send({ type: 'time', t0 })) {
      this._toSend = 0;
      return;
    }
    this._toSend--;
    this._pending = t0;
    clearTimeout(this._pendingTimer);
    // An old relay never answers; a busy one may not: give up on this one and go on.
    this._pendingTimer = setTimeout(() => {
      this._pending = null;
      this._sendNext();
    }, SYNC_TIMEOUT_MS);
  }

  /** The relay's {"type":"time"} answer, received at `receivedAt` (performance.now() scale). */
  onAnswer(msg, receivedAt) {
    const t1 = Number.isFinite(receivedAt) && receivedAt > 0
      ? performance.timeOrigin + receivedAt : epochNowMs();
    const t0 = Number(msg.t0);
    const serverMs = Number(msg.server_us) / 1000;
    if (this._pending === null || t0 !== this._pending || !Number.isFinite(serverMs)) return;
    clearTimeout(this._pendingTimer);
    this._pending = null;
    const rtt = t1 - t0;
    if (rtt >= 0) {
      this._samples.push({ offset: serverMs - (t0 + t1) / 2, rtt });
      if (this._samples.length > SYNC_KEEP) this._samples.shift();
      let best = this._samples[0];
      for (const s of this._samples) if (s.rtt < best.rtt) best = s;
      this.offsetMs = best.offset;
      this.rttMs = best.rtt;
    }
    this._sendNext();
  }
}

const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

export class Reporter {
  /**
   * @param {Connection} connection - sends the reports
   * @param {Stats} stats - the player's counters (takeReportLatencies(), framesDecoded, drops)
   * @param {ClockSync} clock - the offset to the relay's clock
   */
  constructor(connection, stats, clock) {
    this._connection = connection;
    this._stats = stats;
    this._clock = clock;
    this._lastAt = null;
    this._lastDecoded = 0;
    this._lastDropped = 0;
    this._lastStalls = 0;
    this._progressAt = null;   // when a frame was last seen decoded (performance.now())
    this._progressDecoded = 0;
    this._inStall = false;
    this.sent = 0;
    this.last = null;          // the last report sent, for the tests
  }

  _dropped() {
    return this._stats.framesDropped + this._stats.serverDropped;
  }

  /** Called every second: counts stalls, and reports every REPORT_INTERVAL_MS while `playing`
   * (the relay says live and the page is visible). */
  tick(now, playing) {
    const s = this._stats;
    if (!playing) {
      // Not a stall: nothing is expected. Start afresh when playing again.
      this._progressAt = null;
      this._inStall = false;
      this._lastAt = null;
      return;
    }
    if (this._progressAt === null || s.framesDecoded !== this._progressDecoded) {
      this._progressAt = now;
      this._progressDecoded = s.framesDecoded;
      this._inStall = false;
    } else if (!this._inStall && now - this._progressAt >= STALL_MS) {
      this._inStall = true;
      s.stalls++;
    }
    if (this._lastAt === null) {
      this._start(now);
      return;
    }
    if (now - this._lastAt >= REPORT_INTERVAL_MS) this._report(now);
  }

  _start(now) {
    const s = this._stats;
    this._lastAt = now;
    this._lastDecoded = s.framesDecoded;
    this._lastDropped = this._dropped();
    this._lastStalls = s.stalls;
    s.takeReportLatencies();
  }

  _report(now) {
    const s = this._stats;
    const seconds = (now - this._lastAt) / 1000;
    const raw = s.takeReportLatencies();
    const offset = this._clock.offsetMs;
    let latency = null;
    if (raw.length > 0 && offset !== null) {
      raw.sort((a, b) => a - b);
      // Decode time on the relay's clock minus capture time; never below 0 (clock error).
      latency = Math.round(clamp(raw[Math.floor(raw.length / 2)] + offset, 0, 600000) * 10) / 10;
    }
    const report = {
      type: 'report',
      latency_ms: latency,
      fps: Math.round(clamp((s.framesDecoded - this._lastDecoded) / seconds, 0, 1000) * 10) / 10,
      dropped: clamp(this._dropped() - this._lastDropped, 0, 1000000),
      stalls: clamp(s.stalls - this._lastStalls, 0, 10000),
      clock_offset_ms: offset === null ? null : Math.round(offset * 10) / 10,
    };
    this._lastAt = now;
    this._lastDecoded = s.framesDecoded;
    this._lastDropped = this._dropped();
    this._lastStalls = s.stalls;
    if (this._connection.send(report)) {
      this.sent++;
      this.last = report;
    }
  }
}
