/* streamrelay player: the wire protocol v1 as the player sees it (see docs/protocol.md).
 * Pure functions, no DOM and no sockets.
 *
 * Text frames are JSON ({"type":"status"|"meta"|"dropped"}); binary frames are
 * [flags:u8][capture time µs since epoch: u64 BE][payload], flags 0x01 KEY (decoding can start
 * here), 0x02 CONFIG (codec configuration, not a frame). H.264 payloads are Annex-B access units
 * and every KEY carries SPS/PPS in-band. */

export const SUBPROTOCOL = 'streamrelay.v1';
export const FLAG_KEY = 0x01;
export const FLAG_CONFIG = 0x02;
export const HEADER_BYTES = 9;

/** A binary frame as {isKey, isConfig, captureUs, payload}, or null when it is too short. */
export function parseMedia(buf) {
  if (buf.byteLength < HEADER_BYTES) return null;
  const view = new DataView(buf);
  const flags = view.getUint8(0);
  return {
    isKey: (flags & FLAG_KEY) !== 0,
    isConfig: (flags & FLAG_CONFIG) !== 0,
    captureUs: Number(view.getBigUint64(1)),
    payload: new Uint8Array(buf, HEADER_BYTES),
  };
}

/** A text frame as an object, or null when it is not a JSON object. */
export function parseControl(text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch (e) {
    return null;
  }
  return msg && typeof msg === 'object' ? msg : null;
}

function hex2(n) {
  return (n < 16 ? '0' : '') + n.toString(16).toUpperCase();
}

/** avc1.PPCCLL from the first SPS (NAL type 7) of an Annex-B buffer, or null. */
export function codecFromAnnexB(bytes) {
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

const CLOSE_REASONS = {
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

/** A sentence for the user about a close code and reason. */
export function closeReason(code, reason) {
  let text = (CLOSE_REASONS[code] || 'Connection closed') + ' [' + code + ']';
  if (reason) text += ': ' + reason;
  return text + '.';
}

/** The stream name: the last path segment of the page URL, decoded ('' if none or invalid). */
export function streamNameFromPath(pathname) {
  const parts = pathname.split('/').filter((p) => p.length > 0);
  if (parts.length === 0) return '';
  try {
    return decodeURIComponent(parts[parts.length - 1]);
  } catch (e) {
    return '';
  }
}

/** The /watch/NAME WebSocket URL on the page's own host, carrying the page's ?token= if any. */
export function watchUrl(loc, streamName, token) {
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  let url = scheme + '//' + loc.host + '/watch/' + encodeURIComponent(streamName);
  if (token) url += '?token=' + encodeURIComponent(token);
  return url;
}
