// Uses every part of relay/static/client.d.ts the way an application would. The lines under a
// ts-expect-error directive must stay errors: the types may not be looser than the client.
import {
  type BatchProgress,
  type BatchStatus,
  type ConnectionStatus,
  ProgressClient,
  type ProgressClientOptions,
  type StatusDetail,
  type StatusDetails,
  type StatusListener,
  tokenExpiry,
} from "../../relay/static/client.js";

const log: string[] = [];

const options: ProgressClientOptions = {
  url: "wss://relay.example.com/ws",
  getToken: async () => {
    const response = await fetch("/api/relay-token");
    return ((await response.json()) as { token: string }).token;
  },
  onChange: (batches) => {
    for (const b of batches) {
      const done: number = b.processed;
      const rate: number | null = b.rate;
      const eta: number | null = b.eta_seconds;
      const label: string = b.label ?? "(no label)";
      log.push(`${b.batch_id} ${b.status} ${done}/${b.total} ${b.progress_percentage}% ${rate} ${eta} ${label}`);
      log.push(`${b.successful} ok, ${b.failed} failed, seq ${b.seq} at ${b.updated_at}`);
    }
  },
  onStatus: (status, detail) => {
    switch (status) {
      case "connected": // detail: the user id
      case "auth_error": // detail: the relay's message
        log.push(`${status}: ${String(detail)}`);
        break;
      case "reconnecting": // detail: delay in ms
      case "stopped": // detail: close code
        log.push(`${status}: ${Number(detail)}`);
        break;
      case "connecting":
      case "authenticating":
      case "closed":
        log.push(status);
        break;
      default: {
        const never: never = status; // every status is handled above
        log.push(never);
      }
    }
  },
  minBackoffMs: 250,
  maxBackoffMs: 10_000,
};

const client = new ProgressClient(options);
client.connect();
const known: BatchProgress | undefined = client.batches.get("3f0c1d2e-0000-4000-8000-000000000000");
const status: BatchStatus | undefined = known?.status;
const url: string = client.url;
const backoff: number = client.minBackoffMs + client.maxBackoffMs;
const exp: number | null = tokenExpiry("a.b.c");
log.push(`${status} ${url} ${backoff} ${exp}`);
client.close();

// A plain synchronous getToken and only the required options are fine too.
new ProgressClient({ url: "ws://127.0.0.1:8765/ws", getToken: () => "token" }).connect();
// A status handler that only looks at the status also fits.
new ProgressClient({ url: "ws://x/ws", getToken: () => "t", onStatus: (s: ConnectionStatus) => log.push(s) });

const delay: StatusDetails["reconnecting"] = 1200;
const code: StatusDetails["stopped"] = 4003;
const user: StatusDetails["connected"] = "user-7";
const detail: StatusDetail = delay;
const listener: StatusListener = (s, d) => log.push(`${s} ${String(d)}`);
listener("stopped", code);
log.push(String(detail), user);

// @ts-expect-error getToken is required
new ProgressClient({ url: "ws://127.0.0.1:8765/ws" });
// @ts-expect-error not a status the client reports
const wrongStatus: ConnectionStatus = "open";
// @ts-expect-error not a batch status
const wrongBatchStatus: BatchStatus = "running";
// @ts-expect-error the detail of "reconnecting" is a number
const wrongDelay: StatusDetails["reconnecting"] = "soon";
// @ts-expect-error a listener is called with a status, not a frame
listener({ action: "ping" });
// @ts-expect-error no such option
new ProgressClient({ url: "ws://x/ws", getToken: () => "t", reconnect: false });
log.push(String(wrongStatus), String(wrongBatchStatus), String(wrongDelay));

export { log };
