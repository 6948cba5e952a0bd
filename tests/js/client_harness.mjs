// Runs relay/static/client.js in Node (>= 20, with --experimental-websocket on 20) against a
// real relay, and prints one JSON line per event: {"t": ms since start, "event": ..., ...}.
//
// Environment: RELAY_URL, SECRET (HS256), USER_ID, TTL_S (token lifetime), CLOCK_SKEW_S (this
// "browser's" Date.now() is ahead by that much), RUN_S (then close and exit), MIN_BACKOFF_MS.
import { createHmac } from "node:crypto";
import { ProgressClient } from "../../relay/static/client.js";

const env = process.env;
const skewMs = Number(env.CLOCK_SKEW_S || 0) * 1000;
const realNow = Date.now.bind(Date);
const issuerNow = () => realNow(); // the issuer's clock is right
Date.now = () => realNow() + skewMs; // the browser's clock is off
const t0 = performance.now();

if (env.FAKE_FLAP) {
  // A relay that accepts, says auth_success, then closes with 1013 at once (as a relay did
  // while Redis was down): the client must still back off.
  globalThis.WebSocket = class {
    static OPEN = 1;
    constructor() {
      this.readyState = 0;
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.();
        this.onmessage?.({ data: JSON.stringify({ action: "auth_success", user_id: env.USER_ID }) });
        setTimeout(() => {
          this.readyState = 3;
          this.onclose?.({ code: 1013 });
        }, 10);
      }, 5);
    }
    send() {}
    close() {}
  };
}

function emit(event, extra = {}) {
  process.stdout.write(JSON.stringify({ t: Math.round(performance.now() - t0), event, ...extra }) + "\n");
}

function b64url(data) {
  return Buffer.from(data).toString("base64url");
}

function mint() {
  const iat = Math.floor(issuerNow() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: env.USER_ID, iat, exp: iat + Number(env.TTL_S || 3600) }));
  const sig = createHmac("sha256", env.SECRET).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${sig}`;
}

const client = new ProgressClient({
  url: env.RELAY_URL,
  getToken: async () => {
    emit("token");
    return mint();
  },
  onChange: (batches) => {
    const states = Object.fromEntries(batches.map((b) => [b.batch_id, { status: b.status, seq: b.seq, processed: b.processed }]));
    emit("change", { batches: states });
  },
  onStatus: (status, detail) => emit("status", { status, detail: detail ?? null }),
  minBackoffMs: Number(env.MIN_BACKOFF_MS || 500),
});
client.connect();
setTimeout(() => {
  client.close();
  emit("done");
  process.exit(0);
}, Number(env.RUN_S || 10) * 1000);
