// Progress relay browser client: a dependency-free ES module.
//
//   const client = new ProgressClient({
//     url: "ws://127.0.0.1:8765/ws",
//     getToken: async () => (await (await fetch("/token")).json()).token,
//     onChange: (batches) => render(batches),       // every batch known so far
//     onStatus: (status, detail) => show(status),   // connecting | authenticating | connected |
//   });                                             // reconnecting | auth_error | stopped | closed
//   client.connect();
//   ...
//   client.close();
//
// Protocol: docs/PROTOCOL.md. The client authenticates with its first message, answers pings,
// refreshes its token before it expires, and reconnects with exponential backoff and jitter
// except after close codes 1000 and 4001-4004 (a fresh token is asked for every connection).

const NO_RECONNECT = new Set([1000, 4001, 4002, 4003, 4004]);
const TOKEN_EXPIRED = 4005;
const REFRESH_MARGIN_MS = 30_000;
const RETRY_REFRESH_MS = 5_000;

export class ProgressClient {
  constructor({ url, getToken, onChange = () => {}, onStatus = () => {}, minBackoffMs = 500,
                maxBackoffMs = 30_000 }) {
    this.url = url;
    this.getToken = getToken;
    this.onChange = onChange;
    this.onStatus = onStatus;
    this.minBackoffMs = minBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.batches = new Map(); // batch_id -> latest payload
    this._ws = null;
    this._generation = 0; // bumped on every connect/close: stale callbacks see a mismatch
    this._attempt = 0;
    this._retryTimer = null;
    this._refreshTimer = null;
    this._closed = true;
  }

  connect() {
    if (!this._closed) return; // already connected or connecting
    this._closed = false;
    this._open(0);
  }

  close() {
    this._closed = true;
    this._generation += 1;
    this._clearTimers();
    if (this._ws) this._ws.close(1000, "client closed");
    this._ws = null;
    this.onStatus("closed");
  }

  async _open(delayMs) {
    const generation = ++this._generation;
    this._clearTimers();
    if (delayMs > 0) {
      this.onStatus("reconnecting", Math.round(delayMs));
      await new Promise((resolve) => { this._retryTimer = setTimeout(resolve, delayMs); });
      if (generation !== this._generation) return;
    }
    this.onStatus("connecting");
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      if (generation === this._generation && !this._closed) this._reconnect();
      return;
    }
    if (generation !== this._generation || this._closed) return;
    const ws = new WebSocket(this.url);
    this._ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "auth", token }));
      this.onStatus("authenticating");
      this._scheduleRefresh(token, generation);
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._onMessage(ws, event.data); // not after close()
    };
    ws.onclose = (event) => {
      if (generation !== this._generation || this._closed) return;
      this._ws = null;
      this._clearTimers();
      if (NO_RECONNECT.has(event.code)) {
        this.onStatus("stopped", event.code);
      } else if (event.code === TOKEN_EXPIRED) {
        this._attempt = 0;
        this._open(0); // at once, with a fresh token
      } else {
        this._reconnect();
      }
    };
  }

  _reconnect() {
    const ceiling = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** this._attempt);
    this._attempt += 1;
    this._open(ceiling / 2 + Math.random() * (ceiling / 2)); // exponential backoff, jitter
  }

  _onMessage(ws, data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.action) {
      case "auth_success":
        this._attempt = 0;
        this.onStatus("connected", frame.user_id);
        break;
      case "auth_error":
        this.onStatus("auth_error", frame.message);
        break; // the server closes with 4001-4004
      case "ping":
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ action: "pong" }));
        break;
      case "batch_progress":
        this._apply(frame.payload);
        break;
      default: // unknown frames are ignored
    }
  }

  _apply(payload) {
    if (!payload || typeof payload.batch_id !== "string") return;
    const known = this.batches.get(payload.batch_id);
    if (known && typeof known.seq === "number" && payload.seq <= known.seq) return;
    this.batches.set(payload.batch_id, payload);
    this.onChange([...this.batches.values()]);
  }

  _scheduleRefresh(token, generation) {
    const exp = tokenExpiry(token);
    if (exp === null) return;
    const left = exp * 1000 - Date.now();
    const wait = left > 2 * REFRESH_MARGIN_MS ? left - REFRESH_MARGIN_MS : Math.max(left / 2, 0);
    clearTimeout(this._refreshTimer);
    this._refreshTimer = setTimeout(() => this._refresh(generation), wait);
  }

  async _refresh(generation) {
    let token;
    try {
      token = await this.getToken();
    } catch {
      if (generation === this._generation) {
        this._refreshTimer = setTimeout(() => this._refresh(generation), RETRY_REFRESH_MS);
      }
      return;
    }
    const ws = this._ws;
    if (generation !== this._generation || !ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({ type: "auth", token }));
    this._scheduleRefresh(token, generation);
  }

  _clearTimers() {
    clearTimeout(this._retryTimer);
    clearTimeout(this._refreshTimer);
    this._retryTimer = this._refreshTimer = null;
  }
}

// The `exp` claim (seconds) of a JWT, or null. The signature is the server's business.
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    const exp = JSON.parse(atob(padded)).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}
