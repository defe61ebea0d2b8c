/* streamrelay index: lists streams from GET /api/streams, refreshed every 2 s.
 * Built with DOM nodes and textContent only (stream names are data, never markup). */
'use strict';

(function () {
  const POLL_MS = 2000;
  const HIDDEN_POLL_MS = 15000;   // a background tab polls rarely
  const ERROR_BACKOFF_CAP_MS = 30000;
  const FETCH_TIMEOUT_MS = 5000;

  const listEl = document.getElementById('streams');
  const emptyEl = document.getElementById('empty');
  const statusEl = document.getElementById('list-status');
  const summaryEl = document.getElementById('summary');

  // The publish hint, for this very relay.
  const wsScheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  document.getElementById('publish-cmd').textContent =
    'streamrelay-publish ' + wsScheme + '//' + location.host + '/publish/NAME';
  document.getElementById('watch-url').textContent =
    location.protocol + '//' + location.host + '/view/NAME';

  const rows = new Map(); // stream name -> {li, fields}
  let errors = 0;
  let timer = null;
  let inFlight = null;
  let lastOkAt = 0;

  function viewHref(name) {
    return '/view/' + encodeURIComponent(name);
  }

  // The thumbnail (GET /api/streams/NAME/thumbnail.jpg): reloaded only when the listing shows a
  // new ETag (the publisher sends one every few seconds), hidden while there is none or it
  // cannot be had (a relay with viewer tokens answers 401).
  function thumbnailHref(name, etag) {
    return '/api/streams/' + encodeURIComponent(name) + '/thumbnail.jpg?v=' +
      encodeURIComponent(String(etag).replace(/"/g, '').slice(0, 16));
  }

  function updateThumbnail(row, s) {
    const etag = s.live && s.thumbnail && typeof s.thumbnail.etag === 'string' ? s.thumbnail.etag : null;
    if (etag === row.thumbEtag) return;
    row.thumbEtag = etag;
    if (etag === null) {
      row.thumb.hidden = true;
      row.thumb.removeAttribute('src');
      return;
    }
    row.thumb.src = thumbnailHref(s.name, etag);
  }

  function formatBitrate(bps) {
    const n = Number(bps) || 0;
    if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + ' Mbit/s';
    if (n >= 1e3) return Math.round(n / 1e3) + ' kbit/s';
    return Math.round(n) + ' bit/s';
  }

  function formatFps(fps) {
    const n = Number(fps) || 0;
    return (n >= 10 ? Math.round(n) : n.toFixed(1)) + ' fps';
  }

  function formatSince(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return '';
    let s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return 'for ' + s + ' s';
    let m = Math.floor(s / 60);
    if (m < 60) return 'for ' + m + ' min';
    const h = Math.floor(m / 60);
    m %= 60;
    if (h < 48) return 'for ' + h + ' h ' + m + ' min';
    return 'for ' + Math.floor(h / 24) + ' days';
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function makeRow(name) {
    const li = el('li', 'stream');
    const a = el('a', 'stream-link');
    a.href = viewHref(name);
    const thumb = el('img', 'stream-thumb');
    thumb.alt = '';
    thumb.hidden = true;
    thumb.decoding = 'async';
    thumb.addEventListener('load', () => { thumb.hidden = false; });
    thumb.addEventListener('error', () => { thumb.hidden = true; });
    a.append(thumb);
    const top = el('span', 'stream-top');
    const badge = el('span', 'pill');
    const title = el('span', 'stream-title', name);
    top.append(badge, title);
    const info = el('span', 'stream-info');
    const viewers = el('span', 'stat');
    const bitrate = el('span', 'stat');
    const fps = el('span', 'stat');
    const since = el('span', 'stat stat-muted');
    const latency = el('span', 'stat');
    info.append(viewers, bitrate, fps, latency, since);
    a.append(top, info);
    li.append(a);
    const row = { li, a, badge, viewers, bitrate, fps, latency, since, thumb, thumbEtag: null };
    rows.set(name, row);
    return row;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function updateRow(row, s) {
    // "available": the publisher is connected but idles on demand until someone watches.
    const available = s.state === 'available';
    const live = !!s.live && !available;
    row.li.classList.toggle('stream-offline', !live && !available);
    updateThumbnail(row, s);
    const state = available ? 'available' : live ? 'live' : 'offline';
    row.badge.className = 'pill pill-' + state;
    setText(row.badge, state);
    const v = Number(s.viewers) || 0;
    setText(row.viewers, v + (v === 1 ? ' viewer' : ' viewers'));
    setText(row.bitrate, live ? formatBitrate(s.bitrate_bps) : '');
    setText(row.fps, live ? formatFps(s.fps) : '');
    // What the players report (last minute): the latency viewers really see.
    const reported = s.viewer_reports && s.viewer_reports.latency_ms;
    const p50 = reported ? Number(reported.p50) : NaN;
    setText(row.latency, live && Number.isFinite(p50) ? Math.round(p50) + ' ms latency' : '');
    row.latency.title = reported
      ? 'Glass-to-glass latency the players reported over the last minute: median ' +
        Math.round(p50) + ' ms, 95th percentile ' + Math.round(Number(reported.p95)) + ' ms, ' +
        (Number(s.viewer_reports.stalls) || 0) + ' stalls'
      : '';
    setText(row.since, available ? 'starts when watched'
      : live ? (s.publisher ? formatSince(s.publisher.since) : '') : 'waiting for a publisher');
    row.a.title = available ? 'Watch ' + s.name + ' (its publisher starts sending when you do)'
      : live
        ? 'Watch ' + s.name + (s.dropped ? ' (' + s.dropped + ' messages dropped to slow viewers)' : '')
        : s.name + ' is offline; its viewers wait for a publisher';
  }

  function render(data) {
    const all = Array.isArray(data && data.streams) ? data.streams : [];
    const shown = all
      .filter((s) => s && typeof s.name === 'string' && (s.live || Number(s.viewers) > 0))
      .sort((a, b) => (Number(!!b.live) - Number(!!a.live)) ||
        (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

    const keep = new Set(shown.map((s) => s.name));
    for (const [name, row] of rows) {
      if (!keep.has(name)) {
        row.li.remove();
        rows.delete(name);
      }
    }
    // Re-append in order; appendChild of an existing node moves it (focus is kept).
    let prev = null;
    for (const s of shown) {
      const row = rows.get(s.name) || makeRow(s.name);
      updateRow(row, s);
      const expected = prev ? prev.nextSibling : listEl.firstChild;
      if (expected !== row.li) listEl.insertBefore(row.li, expected);
      prev = row.li;
    }
    emptyEl.hidden = shown.length > 0;
    listEl.hidden = shown.length === 0;

    const live = all.filter((s) => s && s.live && s.state !== 'available').length;
    const available = all.filter((s) => s && s.state === 'available').length;
    const c = (data && data.connections) || {};
    const viewers = Number(c.viewers) || 0;
    summaryEl.textContent = live + (live === 1 ? ' live stream' : ' live streams') + ' · ' +
      (available ? available + ' available · ' : '') +
      viewers + (viewers === 1 ? ' viewer' : ' viewers');
  }

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.classList.toggle('list-status-error', !!isError);
    statusEl.hidden = !text;
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  function nextDelay() {
    if (errors > 0) {
      // Exponential backoff with full jitter while the relay does not answer.
      const ceiling = Math.min(ERROR_BACKOFF_CAP_MS, POLL_MS * Math.pow(2, errors - 1));
      return POLL_MS / 2 + Math.random() * ceiling;
    }
    return document.visibilityState === 'hidden' ? HIDDEN_POLL_MS : POLL_MS;
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    if (inFlight) return;
    const ctrl = new AbortController();
    inFlight = ctrl;
    const killer = setTimeout(() => ctrl.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch('/api/streams', {
        cache: 'no-store',
        credentials: 'same-origin',
        headers: { Accept: 'application/json' },
        signal: ctrl.signal,
      });
      if (resp.status === 403) {
        errors++;
        setStatus('The stream list is not public on this relay (viewer tokens are required, ' +
          'so it lists streams only to requests from its own host). Open /view/NAME?token=… directly.', true);
      } else if (!resp.ok) {
        throw new Error('HTTP ' + resp.status);
      } else {
        const data = await resp.json();
        errors = 0;
        lastOkAt = Date.now();
        render(data);
        setStatus('', false);
      }
    } catch (e) {
      errors++;
      const what = e && e.name === 'AbortError' ? 'no answer' : (e && e.message) || 'error';
      const delay = nextDelay();
      let text = 'Relay not reachable (' + what + '); retrying in ' + Math.ceil(delay / 1000) + ' s.';
      if (lastOkAt) text += ' The list below may be stale.';
      setStatus(text, true);
      clearTimeout(killer);
      inFlight = null;
      schedule(delay);
      return;
    }
    clearTimeout(killer);
    inFlight = null;
    schedule(nextDelay());
  }

  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && errors === 0 && !inFlight) poll();
  });

  poll();
})();
