/* streamrelay player: wire protocol v1 over WebSocket -> WebCodecs VideoDecoder -> <canvas>.
 *
 * Plain script, no build step, no external URLs; runs under the relay's CSP
 * (script-src 'self', style-src 'self': no inline code, no style attributes, no eval).
 *
 * Protocol (see docs/protocol.md): text frames are JSON ({"type":"status"|"meta"|"dropped"}),
 * binary frames are [flags:u8][capture time µs since epoch: u64 BE][payload].
 * flags 0x01 KEY (decoding can start here), 0x02 CONFIG (codec configuration, not a frame).
 * H.264 payloads are Annex-B access units and every KEY carries SPS/PPS in-band, so the decoder
 * is configured with the codec string only (no `description`).
 *
 * For automated tests the page exposes a read-only live view of its counters:
 *   window.streamrelayPlayer = {state, streamName, framesReceived, framesDecoded, framesDropped,
 *     serverDropped, bytesReceived, lastLatencyMs, latencySamplesMs, decoderErrors, reconnects,
 *     keyframeRequests, codec, width, height, error}
 */
'use strict';

(function () {
  // ---- tunables -------------------------------------------------------------------------------
  const SUBPROTOCOL = 'streamrelay.v1';
  const BACKOFF_BASE_MS = 500;        // full-jitter exponential backoff: random(0, min(cap, base*2^n))
  const BACKOFF_CAP_MS = 15000;
  const STABLE_AFTER_MS = 5000;       // a connection open this long resets the backoff
  const CONNECT_TIMEOUT_MS = 10000;   // opening handshake must finish within this
  const LIVE_SILENCE_MS = 30000;      // live but nothing at all received: assume a dead link
  const KEYFRAME_REQUEST_MIN_MS = 1000;
  const KEYFRAME_REREQUEST_MS = 4000; // still waiting for a KEY while deltas flow: ask again
  const LATENCY_SAMPLES_MAX = 1000;
  const STATS_INTERVAL_MS = 1000;
  const WAITING_HINT_MS = 1500;       // "waiting for video" shows only if no frame comes this soon
  // Decoder backlog bounds. A joining viewer gets the relay's cached GOP in one burst: that is
  // fine (it decodes far faster than real time). A decoder that stays behind is not: when the
  // oldest chunk handed to it has waited longer than MAX_BEHIND_MS, or the queue exceeds
  // MAX_DECODE_QUEUE chunks, drop until the next KEY (and ask for one).
  const MAX_BEHIND_MS = 1500;
  const MAX_DECODE_QUEUE = 300;

  const FLAG_KEY = 0x01;
  const FLAG_CONFIG = 0x02;
  const HEADER_BYTES = 9;

  // ---- DOM ------------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const canvas = $('video');
  const stage = $('stage');
  const statusEl = $('status');
  const messageEl = $('message');
  const messageTitleEl = $('message-title');
  const messageDetailEl = $('message-detail');
  const statsEl = $('stats');
  const statFps = $('stat-fps');
  const statKbps = $('stat-kbps');
  const statDropped = $('stat-dropped');
  const statLatency = $('stat-latency');
  const statVideo = $('stat-video');
  const ctx2d = canvas.getContext('2d', { alpha: false });

  // ---- stream name and token from the page URL --------------------------------------------------
  function streamNameFromPath(pathname) {
    const parts = pathname.split('/').filter((p) => p.length > 0);
    if (parts.length === 0) return '';
    try {
      return decodeURIComponent(parts[parts.length - 1]);
    } catch (e) {
      return '';
    }
  }
  const streamName = streamNameFromPath(location.pathname);
  const token = new URLSearchParams(location.search).get('token');

  function watchUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let url = scheme + '//' + location.host + '/watch/' + encodeURIComponent(streamName);
    if (token) url += '?token=' + encodeURIComponent(token);
    return url;
  }

  // ---- state ------------------------------------------------------------------------------------
  let state = 'connecting'; // connecting | live | offline | reconnecting | error | unsupported
  let connState = 'connecting';
  let fatalError = null;    // {title, detail} when decoding cannot work (state 'error')

  const stats = {
    framesReceived: 0,   // media messages (KEY/delta) received
    framesDecoded: 0,    // VideoFrames output by the decoder
    framesDropped: 0,    // media messages not decoded here (waiting for KEY, hidden tab, queue bound, decoder errors)
    serverDropped: 0,    // sum of {"type":"dropped","messages":N} from the relay
    bytesReceived: 0,    // WebSocket payload bytes received (binary + text)
    lastLatencyMs: null,
    decoderErrors: 0,
    reconnects: 0,       // WebSocket connections opened after the first
    keyframeRequests: 0, // keyframe-request messages sent
  };
  const latencyRing = new Float64Array(LATENCY_SAMPLES_MAX);
  let latencyCount = 0; // total samples ever written
  let intervalLatency = [];

  let meta = null;          // latest meta message
  let spsCodec = null;      // codec string derived from the latest SPS (fallback when meta has none)
  let decoder = null;
  let configuredCodec = null;
  let unsupportedCodec = null;
  let needKey = true;       // drop media until the next KEY
  let waitingKeySince = 0;
  let pendingFrame = null;  // newest decoded frame not yet painted
  let inDecoder = [];       // [captureUs, handedAtMs] of chunks given to the decoder, oldest first
  let rafScheduled = false;
  let firstFrameSinceConnect = false;

  let ws = null;
  let wsOpenedAt = 0;
  let lastReceiveAt = 0;
  let attempt = 0;
  let reconnectTimer = null;
  let connectTimer = null;
  let reconnectDueAt = 0;
  let lastCloseInfo = '';
  let stopped = false;
  let lastKeyframeRequestAt = -Infinity;
  let keyframeRequestTimer = null;
  let waitingHintTimer = null;
  let waitingHintShown = false;
  let connectCalls = 0;

  // ---- read-only stats object for tests -----------------------------------------------------------
  const api = {};
  const fields = {
    state: () => state,
    streamName: () => streamName,
    framesReceived: () => stats.framesReceived,
    framesDecoded: () => stats.framesDecoded,
    framesDropped: () => stats.framesDropped,
    serverDropped: () => stats.serverDropped,
    bytesReceived: () => stats.bytesReceived,
    lastLatencyMs: () => stats.lastLatencyMs,
    latencySamplesMs: () => latencySamples(),
    decoderErrors: () => stats.decoderErrors,
    reconnects: () => stats.reconnects,
    keyframeRequests: () => stats.keyframeRequests,
    codec: () => configuredCodec,
    width: () => canvas.width,
    height: () => canvas.height,
    error: () => (fatalError ? fatalError.title : null),
  };
  for (const name of Object.keys(fields)) {
    Object.defineProperty(api, name, { get: fields[name], enumerable: true });
  }
  Object.freeze(api);
  Object.defineProperty(window, 'streamrelayPlayer', { value: api, enumerable: true });

  function latencySamples() {
    const n = Math.min(latencyCount, LATENCY_SAMPLES_MAX);
    const out = new Array(n);
    const start = latencyCount - n;
    for (let i = 0; i < n; i++) out[i] = latencyRing[(start + i) % LATENCY_SAMPLES_MAX];
    return out;
  }

  // ---- UI -----------------------------------------------------------------------------------------
  document.title = (streamName || '?') + ' · streamrelay';
  $('stream-name').textContent = streamName || '(no stream)';

  function setState(next) {
    if (state === next) return;
    state = next;
    statusEl.textContent = next;
    statusEl.className = 'pill pill-' + next;
    document.body.dataset.state = next;
    updateMessage();
  }

  function recomputeState() {
    if (state === 'unsupported') return;
    setState(fatalError ? 'error' : connState);
    updateMessage();
  }

  function showMessage(title, detail) {
    messageTitleEl.textContent = title;
    messageDetailEl.textContent = detail || '';
    messageEl.hidden = false;
  }

  function hideMessage() {
    messageEl.hidden = true;
  }

  function updateMessage() {
    if (state === 'unsupported') return; // set once, stays
    if (fatalError) {
      showMessage(fatalError.title, fatalError.detail);
      return;
    }
    switch (connState) {
      case 'connecting':
        showMessage('Connecting…', 'Opening ' + watchUrl().replace(/\?token=.*$/, '?token=…'));
        break;
      case 'reconnecting': {
        if (reconnectTimer) {
          const secs = Math.max(0, (reconnectDueAt - performance.now()) / 1000);
          showMessage('Reconnecting…', lastCloseInfo + ' Next attempt in ' + secs.toFixed(1) + ' s.');
        } else {
          showMessage('Reconnecting…', lastCloseInfo + ' Attempt ' + attempt + '…');
        }
        break;
      }
      case 'offline':
        showMessage('Stream offline',
          'No publisher is sending “' + streamName + '” right now. Video starts by itself when it does.');
        break;
      case 'live':
        if (!firstFrameSinceConnect && waitingHintShown) {
          showMessage('Waiting for video…',
            document.visibilityState === 'hidden' ? '' : 'Waiting for the next keyframe.');
        } else {
          hideMessage();
        }
        break;
      default:
        hideMessage();
    }
  }

  function armWaitingHint() {
    clearTimeout(waitingHintTimer);
    waitingHintShown = false;
    waitingHintTimer = setTimeout(() => {
      waitingHintShown = true;
      updateMessage();
    }, WAITING_HINT_MS);
  }

  statsEl.addEventListener('click', () => statsEl.classList.toggle('stats-collapsed'));
  canvas.addEventListener('dblclick', () => {
    if (document.fullscreenElement) {
      document.exitFullscreen().catch(() => {});
    } else if (stage.requestFullscreen) {
      stage.requestFullscreen().catch(() => {});
    }
  });

  // Stats overlay, once a second.
  let lastTick = performance.now();
  let lastTickDecoded = 0;
  let lastTickBytes = 0;
  function statsTick() {
    const now = performance.now();
    const dt = (now - lastTick) / 1000;
    if (dt <= 0) return;
    const fps = (stats.framesDecoded - lastTickDecoded) / dt;
    const kbps = ((stats.bytesReceived - lastTickBytes) * 8) / 1000 / dt;
    lastTick = now;
    lastTickDecoded = stats.framesDecoded;
    lastTickBytes = stats.bytesReceived;
    statFps.textContent = fps.toFixed(fps >= 10 ? 0 : 1);
    statKbps.textContent = kbps >= 10 ? Math.round(kbps).toLocaleString('en') : kbps.toFixed(1);
    const dropped = stats.serverDropped + stats.framesDropped;
    statDropped.textContent = String(dropped);
    statDropped.title = stats.serverDropped + ' by the relay (slow link), ' +
      stats.framesDropped + ' here (waiting for a keyframe, hidden tab, decoder)';
    if (intervalLatency.length > 0) {
      intervalLatency.sort((a, b) => a - b);
      const med = intervalLatency[Math.floor(intervalLatency.length / 2)];
      statLatency.textContent = Math.round(med) + ' ms';
      intervalLatency = [];
    } else if (state !== 'live') {
      statLatency.textContent = '–';
    }
    const codec = configuredCodec || (meta && meta.codec) || '';
    statVideo.textContent = canvas.width + '×' + canvas.height + (codec ? ' ' + codec : '');
    if (connState === 'reconnecting') updateMessage();
  }
  setInterval(statsTick, STATS_INTERVAL_MS);

  // ---- WebCodecs support ----------------------------------------------------------------------------
  if (typeof window.VideoDecoder !== 'function' || typeof window.EncodedVideoChunk !== 'function') {
    state = 'unsupported';
    statusEl.textContent = 'unsupported';
    statusEl.className = 'pill pill-error';
    document.body.dataset.state = 'unsupported';
    statsEl.hidden = true;
    if (!window.isSecureContext) {
      showMessage('This page cannot play video: WebCodecs needs a secure context',
        'Browsers offer WebCodecs (the video decoder this player uses) only on secure pages: ' +
        'http://localhost or HTTPS. This page was loaded over plain HTTP from ' + location.host + '. ' +
        'Open it on the relay\'s own machine as http://localhost/…, or have the relay listen on an ' +
        'ssl: endpoint (for example --listen ssl:8443:privateKey=key.pem:certKey=cert.pem) and open ' +
        'https://' + location.hostname + ':8443' + location.pathname + ' (the video then flows over wss:).');
    } else {
      showMessage('This browser has no WebCodecs video decoder',
        'The player needs the WebCodecs VideoDecoder API (recent Chrome, Edge, Firefox, Safari).');
    }
    return;
  }
  if (!streamName) {
    fatalError = { title: 'No stream name in the address', detail: 'Open /view/NAME.' };
    recomputeState();
    return;
  }

  // ---- decoder ------------------------------------------------------------------------------------
  function hex2(n) {
    return (n < 16 ? '0' : '') + n.toString(16).toUpperCase();
  }

  // avc1.PPCCLL from the first SPS (NAL type 7) of an Annex-B buffer, or null.
  function codecFromAnnexB(bytes) {
    const n = bytes.length;
    for (let i = 0; i + 3 < n; i++) {
      if (bytes[i] === 0 && bytes[i + 1] === 0 && bytes[i + 2] === 1) {
        const h = i + 3;
        if ((bytes[h] & 0x1f) === 7 && h + 3 < n) {
          return 'avc1.' + hex2(bytes[h + 1]) + hex2(bytes[h + 2]) + hex2(bytes[h + 3]);
        }
        i += 2;
      }
    }
    return null;
  }

  function wantedCodec() {
    if (meta && typeof meta.codec === 'string' && meta.codec) return meta.codec;
    return spsCodec;
  }

  function setNeedKey() {
    if (!needKey) {
      needKey = true;
      waitingKeySince = performance.now();
    }
  }

  function closePendingFrame() {
    if (pendingFrame) {
      pendingFrame.close();
      pendingFrame = null;
    }
  }

  // Forget decoder state (pending decodes are discarded); the next KEY reconfigures it.
  function resetDecoder() {
    if (decoder && decoder.state !== 'closed') {
      try {
        decoder.reset();
      } catch (e) { /* closed meanwhile */ }
    }
    configuredCodec = null;
    inDecoder = [];
    setNeedKey();
  }

  function decoderBehindMs(now) {
    return inDecoder.length > 0 ? now - inDecoder[0][1] : 0;
  }

  function onDecoderOutput(frame) {
    stats.framesDecoded++;
    let done = 0;
    while (done < inDecoder.length && inDecoder[done][0] <= frame.timestamp) done++;
    if (done > 0) inDecoder.splice(0, done);
    // The chunk timestamp is the publisher's capture time in µs since the epoch.
    const latencyMs = Date.now() - frame.timestamp / 1000;
    stats.lastLatencyMs = Math.round(latencyMs * 10) / 10;
    latencyRing[latencyCount % LATENCY_SAMPLES_MAX] = stats.lastLatencyMs;
    latencyCount++;
    if (intervalLatency.length < LATENCY_SAMPLES_MAX) intervalLatency.push(latencyMs);
    if (!firstFrameSinceConnect) {
      firstFrameSinceConnect = true;
      clearTimeout(waitingHintTimer);
      updateMessage();
    }
    if (document.visibilityState === 'hidden') {
      frame.close();
      return;
    }
    closePendingFrame();
    pendingFrame = frame;
    if (!rafScheduled) {
      rafScheduled = true;
      requestAnimationFrame(paint);
    }
  }

  function paint() {
    rafScheduled = false;
    const frame = pendingFrame;
    pendingFrame = null;
    if (!frame) return;
    try {
      const w = frame.displayWidth;
      const h = frame.displayHeight;
      if (canvas.width !== w || canvas.height !== h) {
        canvas.width = w;
        canvas.height = h;
      }
      ctx2d.drawImage(frame, 0, 0, w, h);
    } finally {
      frame.close();
    }
  }

  function onDecoderError(dec, err) {
    if (dec !== decoder) return; // an old decoder we already replaced
    stats.decoderErrors++;
    decoder = null;
    configuredCodec = null;
    inDecoder = [];
    console.warn('streamrelay: decoder error:', err && err.name, err && err.message);
    if (err && err.name === 'NotSupportedError') {
      // The codec itself is not supported: asking for keyframes would not help.
      unsupportedCodec = wantedCodec();
      fatalError = {
        title: 'This browser cannot decode this stream',
        detail: 'Codec ' + unsupportedCodec + ' is not supported by this browser\'s WebCodecs ' +
          'VideoDecoder (' + (err.message || err.name) + ').',
      };
      recomputeState();
      return;
    }
    setNeedKey();
    requestKeyframe();
  }

  // Returns a decoder configured for `codec`, or null if that cannot be done.
  function ensureDecoder(codec) {
    if (!codec) return null;
    if (codec === unsupportedCodec) return null;
    if (!decoder || decoder.state === 'closed') {
      const dec = new VideoDecoder({
        output: onDecoderOutput,
        error: (e) => onDecoderError(dec, e),
      });
      decoder = dec;
      configuredCodec = null;
    }
    if (configuredCodec !== codec || decoder.state !== 'configured') {
      try {
        decoder.configure({ codec: codec, optimizeForLatency: true });
        configuredCodec = codec;
      } catch (e) {
        // TypeError: not a valid codec string. Try the one derived from the SPS instead.
        if (spsCodec && codec !== spsCodec) return ensureDecoder(spsCodec);
        unsupportedCodec = codec;
        fatalError = {
          title: 'This browser cannot decode this stream',
          detail: 'Invalid or unsupported codec "' + codec + '": ' + (e.message || e),
        };
        recomputeState();
        return null;
      }
    }
    return decoder;
  }

  function onMedia(buf) {
    if (buf.byteLength < HEADER_BYTES) return;
    const view = new DataView(buf);
    const flags = view.getUint8(0);
    const payload = new Uint8Array(buf, HEADER_BYTES);
    if (flags & FLAG_CONFIG) {
      const c = codecFromAnnexB(payload);
      if (c) spsCodec = c;
      return;
    }
    stats.framesReceived++;
    const isKey = (flags & FLAG_KEY) !== 0;
    const now = performance.now();

    if (document.visibilityState === 'hidden') {
      // Do not feed a decoder nobody looks at; resume from a KEY when visible again.
      setNeedKey();
      stats.framesDropped++;
      return;
    }
    if (isKey) {
      const c = codecFromAnnexB(payload);
      if (c) spsCodec = c;
    }
    if (needKey && !isKey) {
      stats.framesDropped++;
      if (now - waitingKeySince > KEYFRAME_REREQUEST_MS &&
          now - lastKeyframeRequestAt > KEYFRAME_REREQUEST_MS) {
        requestKeyframe();
      }
      return;
    }
    if (fatalError) {
      stats.framesDropped++;
      return;
    }
    if (decoder && decoder.state === 'configured' &&
        (decoder.decodeQueueSize > MAX_DECODE_QUEUE || decoderBehindMs(now) > MAX_BEHIND_MS)) {
      // The decoder falls behind: do not queue without bound.
      if (isKey) {
        resetDecoder(); // discard the backlog, start again from this KEY
      } else {
        setNeedKey();
        stats.framesDropped++;
        requestKeyframe();
        return;
      }
    }
    let dec = decoder;
    if (isKey) {
      dec = ensureDecoder(wantedCodec());
    }
    if (!dec || dec.state !== 'configured') {
      stats.framesDropped++;
      setNeedKey();
      return;
    }
    const captureUs = Number(view.getBigUint64(1));
    try {
      dec.decode(new EncodedVideoChunk({
        type: isKey ? 'key' : 'delta',
        timestamp: captureUs,
        data: payload,
      }));
      inDecoder.push([captureUs, now]);
      if (inDecoder.length > 4 * MAX_DECODE_QUEUE) inDecoder.shift(); // chunks the decoder never output
      if (isKey) needKey = false;
    } catch (e) {
      // A synchronous failure (e.g. a delta the decoder refuses): start again from a KEY.
      stats.framesDropped++;
      stats.decoderErrors++;
      console.warn('streamrelay: decode() failed:', e && e.message);
      resetDecoder();
      requestKeyframe();
    }
  }

  function onText(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'status':
        if (msg.state === 'live') {
          if (connState !== 'live') armWaitingHint();
          connState = 'live';
        } else if (msg.state === 'offline') {
          connState = 'offline';
          firstFrameSinceConnect = false;
          setNeedKey(); // a new publisher starts with CONFIG and KEY
        }
        recomputeState();
        break;
      case 'meta': {
        const oldCodec = wantedCodec();
        meta = msg;
        const newCodec = wantedCodec();
        if (newCodec !== oldCodec) {
          if (unsupportedCodec && newCodec !== unsupportedCodec) {
            unsupportedCodec = null;
            fatalError = null;
            recomputeState();
          }
          if (configuredCodec && configuredCodec !== newCodec) resetDecoder();
        }
        const w = Number(msg.width);
        const h = Number(msg.height);
        if (stats.framesDecoded === 0 && w > 0 && h > 0 && w <= 16384 && h <= 16384) {
          canvas.width = w;
          canvas.height = h;
        }
        break;
      }
      case 'dropped':
        if (Number.isFinite(Number(msg.messages))) stats.serverDropped += Number(msg.messages);
        setNeedKey(); // the relay resumes us at a KEY (after CONFIG if it changed)
        break;
      default:
        break;
    }
  }

  // ---- keyframe requests (rate-limited; a need inside the interval is sent at its end) ----------------
  function requestKeyframe() {
    if (keyframeRequestTimer) return;
    const wait = lastKeyframeRequestAt + KEYFRAME_REQUEST_MIN_MS - performance.now();
    if (wait > 0) {
      keyframeRequestTimer = setTimeout(() => {
        keyframeRequestTimer = null;
        if (needKey) requestKeyframe();
      }, wait);
      return;
    }
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    lastKeyframeRequestAt = performance.now();
    stats.keyframeRequests++;
    ws.send(JSON.stringify({ type: 'keyframe-request' }));
  }

  // ---- connection -----------------------------------------------------------------------------------
  function closeReason(code, reason) {
    const known = {
      1000: 'The relay closed the connection',
      1001: 'The relay is going away (restart or shutdown)',
      1003: 'The relay refused data from this page',
      1006: 'Connection lost or refused (relay down or unreachable, or the handshake was ' +
        'refused: unknown stream name, missing or expired token, or a relay limit)',
      1007: 'Protocol error',
      1008: 'The relay closed a stalled connection',
      1009: 'Message too big',
      1011: 'Relay error',
    };
    let text = (known[code] || 'Connection closed') + ' [' + code + ']';
    if (reason) text += ': ' + reason;
    return text + '.';
  }

  function connect() {
    if (stopped) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (connectCalls++ > 0) stats.reconnects++;
    let sock;
    try {
      sock = new WebSocket(watchUrl(), [SUBPROTOCOL]);
    } catch (e) {
      lastCloseInfo = 'Cannot open WebSocket: ' + (e.message || e) + '.';
      scheduleReconnect();
      return;
    }
    ws = sock;
    sock.binaryType = 'arraybuffer';
    wsOpenedAt = 0;
    connState = attempt > 0 ? 'reconnecting' : 'connecting';
    recomputeState();
    clearTimeout(connectTimer);
    connectTimer = setTimeout(() => {
      if (ws === sock && sock.readyState !== WebSocket.OPEN) {
        dropSocket(sock, 'Connection attempt timed out.');
      }
    }, CONNECT_TIMEOUT_MS);

    sock.onopen = () => {
      if (ws !== sock) return;
      clearTimeout(connectTimer);
      wsOpenedAt = performance.now();
      lastReceiveAt = wsOpenedAt;
      firstFrameSinceConnect = false;
      // Until the relay says "live" or "offline", we are connected but know nothing.
      connState = 'connecting';
      resetDecoder(); // start from the relay's CONFIG + KEY
      recomputeState();
    };
    sock.onmessage = (ev) => {
      if (ws !== sock) return;
      lastReceiveAt = performance.now();
      if (typeof ev.data === 'string') {
        stats.bytesReceived += ev.data.length;
        onText(ev.data);
      } else {
        stats.bytesReceived += ev.data.byteLength;
        if (connState !== 'live') {
          // Media before any status message: the stream is evidently live.
          if (connState !== 'offline') {
            connState = 'live';
            armWaitingHint();
            recomputeState();
          }
        }
        onMedia(ev.data);
      }
    };
    sock.onerror = () => { /* onclose follows with the code */ };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      socketGone(closeReason(ev.code, ev.reason));
    };
  }

  // Abandon a socket without waiting for its closing handshake (dead link, stuck handshake).
  function dropSocket(sock, info) {
    sock.onopen = sock.onmessage = sock.onclose = sock.onerror = null;
    try {
      sock.close();
    } catch (e) { /* ignore */ }
    if (ws === sock) socketGone(info);
  }

  function socketGone(info) {
    clearTimeout(connectTimer);
    const stable = wsOpenedAt > 0 && performance.now() - wsOpenedAt >= STABLE_AFTER_MS;
    if (stable) attempt = 0;
    ws = null;
    wsOpenedAt = 0;
    lastCloseInfo = info;
    resetDecoder();
    closePendingFrame();
    firstFrameSinceConnect = false;
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (stopped) return;
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempt));
    const delay = Math.random() * ceiling; // full jitter: tabs do not retry in lockstep
    attempt++;
    reconnectDueAt = performance.now() + delay;
    connState = 'reconnecting';
    recomputeState();
    updateMessage();
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, delay);
  }

  // Watchdog: while live, a link that delivers nothing at all for long is dead (half-open TCP).
  setInterval(() => {
    if (ws && connState === 'live' && ws.readyState === WebSocket.OPEN &&
        performance.now() - lastReceiveAt > LIVE_SILENCE_MS) {
      dropSocket(ws, 'Nothing received for ' + LIVE_SILENCE_MS / 1000 + ' s.');
    }
  }, 2000);

  // Back online after a network change: do not sit out a long backoff.
  window.addEventListener('online', () => {
    if (reconnectTimer && reconnectDueAt - performance.now() > BACKOFF_BASE_MS) {
      clearTimeout(reconnectTimer);
      const delay = Math.random() * BACKOFF_BASE_MS;
      reconnectDueAt = performance.now() + delay;
      reconnectTimer = setTimeout(connect, delay);
    }
  });

  // Hidden tab: stop decoding; when visible again, resume at a KEY and ask for one now.
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'hidden') {
      setNeedKey();
      closePendingFrame();
    } else {
      if (needKey) requestKeyframe();
      updateMessage();
    }
  });

  // Leaving the page: close cleanly (also keeps the page eligible for the back/forward cache).
  window.addEventListener('pagehide', () => {
    stopped = true;
    clearTimeout(reconnectTimer);
    clearTimeout(connectTimer);
    if (ws) {
      const sock = ws;
      ws = null;
      sock.onopen = sock.onmessage = sock.onclose = sock.onerror = null;
      try {
        sock.close(1000, 'page closed');
      } catch (e) { /* ignore */ }
    }
    resetDecoder();
    closePendingFrame();
  });
  window.addEventListener('pageshow', (ev) => {
    if (ev.persisted && stopped) {
      stopped = false;
      attempt = 0;
      connect();
    }
  });

  connect();
})();
