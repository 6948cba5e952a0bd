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
//
// - The backoff starts over only once a connection has stayed up for STABLE_MS: a relay that
//   accepts and then closes (1013 while Redis is down) cannot make it reconnect in a loop.
// - Token refresh follows the token's own lifetime (exp - iat), counted from when the token was
//   received on this machine's monotonic clock: a browser clock that is off changes nothing.
// - Each new connection's snapshot replaces what the client knew (batches the relay no longer
//   has are dropped), and frames are applied in the order the relay sends them: the relay never
//   sends a batch backwards on one connection, except on purpose after Redis lost its data
//   (batches then restart at seq 1).

const NO_RECONNECT = new Set([1000, 4001, 4002, 4003, 4004]);
const TOKEN_EXPIRED = 4005;
const REFRESH_MARGIN_MS = 30_000;
const MIN_REFRESH_MS = 5_000; // never refresh more often than this, whatever the token says
const RETRY_REFRESH_MS = 5_000;
const STABLE_MS = 10_000; // a connection up this long resets the reconnect backoff
const SNAPSHOT_SETTLE_MS = 100; // after auth_success, one onChange for the snapshot's start

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
    this._stableTimer = null;
    this._settleTimer = null;
    this._settling = false;
    this._token = null; // { token, receivedAt (performance.now() ms) } of this connection
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
    this._token = { token, receivedAt: performance.now() };
    const ws = new WebSocket(this.url);
    this._ws = ws;
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: "auth", token }));
      this.onStatus("authenticating");
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._onMessage(ws, event.data, generation); // not after close()
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

  _onMessage(ws, data, generation) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.action) {
      case "auth_success":
        if (this._stableTimer === null) {
          this._stableTimer = setTimeout(() => { this._attempt = 0; }, STABLE_MS);
          this._startSnapshot(); // the first auth_success of a connection: a snapshot follows
        }
        this._scheduleRefresh(generation); // also after an in-band refresh was accepted
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

  _startSnapshot() {
    // The new connection's snapshot replaces what we knew; render once it has begun to arrive.
    this.batches = new Map();
    this._settling = true;
    this._settleTimer = setTimeout(() => {
      this._settling = false;
      this.onChange([...this.batches.values()]);
    }, SNAPSHOT_SETTLE_MS);
  }

  _apply(payload) {
    if (!payload || typeof payload.batch_id !== "string") return;
    this.batches.set(payload.batch_id, payload);
    if (!this._settling) this.onChange([...this.batches.values()]);
  }

  _scheduleRefresh(generation) {
    const held = this._token;
    const lifetime = held ? tokenLifetimeMs(held.token) : null;
    if (lifetime === null) return;
    const margin = Math.min(REFRESH_MARGIN_MS, lifetime / 2);
    const due = held.receivedAt + lifetime - margin;
    const wait = Math.max(MIN_REFRESH_MS, due - performance.now());
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
    this._token = { token, receivedAt: performance.now() };
    ws.send(JSON.stringify({ type: "auth", token })); // the relay answers auth_success
  }

  _clearTimers() {
    clearTimeout(this._retryTimer);
    clearTimeout(this._refreshTimer);
    clearTimeout(this._stableTimer);
    clearTimeout(this._settleTimer);
    this._retryTimer = this._refreshTimer = this._stableTimer = this._settleTimer = null;
    if (this._settling) {
      this._settling = false;
      this.onChange([...this.batches.values()]);
    }
  }
}

// The claims of a JWT, or null. The signature is the server's business.
function tokenClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    const claims = JSON.parse(atob(padded));
    return claims !== null && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

// The `exp` claim (seconds) of a JWT, or null.
export function tokenExpiry(token) {
  const exp = tokenClaims(token)?.exp;
  return typeof exp === "number" ? exp : null;
}

// How long (ms) a JWT is valid from when it was issued: exp - iat, both from the issuer's clock,
// so this machine's clock does not matter. Without `iat`, the time left by this machine's clock
// (the best there is). null without `exp`.
export function tokenLifetimeMs(token) {
  const claims = tokenClaims(token);
  if (!claims || typeof claims.exp !== "number") return null;
  if (typeof claims.iat === "number") return Math.max(0, (claims.exp - claims.iat) * 1000);
  return Math.max(0, claims.exp * 1000 - Date.now());
}
