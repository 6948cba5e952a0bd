// Types for client.js, the progress relay's browser client (an ES module, no dependencies).
// Kept true by tests/test_typescript.py: tests/typescript/ type-checks a usage file against this
// file and compares it with the declarations TypeScript infers from client.js itself.
// Protocol: docs/PROTOCOL.md section 4.

/** A batch's lifecycle status; the last three are terminal. */
export type BatchStatus = "pending" | "processing" | "completed" | "failed" | "cancelled";

/** The latest state of one batch: the `payload` of a `batch_progress` frame. */
export interface BatchProgress {
  batch_id: string;
  status: BatchStatus;
  total: number;
  processed: number;
  successful: number;
  failed: number;
  /** 100 * processed / total, clamped to [0, 100]; 0 when total is 0; 100 once completed. */
  progress_percentage: number;
  /** Per batch, strictly increasing: the client never goes back to an older state. */
  seq: number;
  /** ISO-8601 UTC with milliseconds and `Z` (Redis time of the change). */
  updated_at: string;
  /** Items per second over recent updates; null when unknown. */
  rate: number | null;
  /** Seconds left at the current rate; null when unknown, total is 0, or terminal. */
  eta_seconds: number | null;
  label: string | null;
}

/** Every status `onStatus` reports, with the detail that comes with it. */
export interface StatusDetails {
  /** Asking `getToken()` for a token, then opening the WebSocket. */
  connecting: undefined;
  /** Open; the auth message was sent. */
  authenticating: undefined;
  /** Authenticated (detail: the user id); the snapshot of the user's batches follows. */
  connected: string;
  /** Waiting before the next attempt (detail: the delay in ms, with backoff and jitter). */
  reconnecting: number;
  /** The relay refused the token (detail: its message); a close follows. */
  auth_error: string;
  /** Closed with a code after which the client does not reconnect (detail: the code:
   * 1000, or 4001-4004). Call connect() again, e.g. after a new sign-in. */
  stopped: number;
  /** close() was called. */
  closed: undefined;
}

export type ConnectionStatus = keyof StatusDetails;

/** The detail `onStatus` passes along with a status (see StatusDetails for which is which). */
export type StatusDetail = StatusDetails[ConnectionStatus];

/** Called on every status change: `detail` is `StatusDetails[status]`. */
export type StatusListener = (status: ConnectionStatus, detail?: StatusDetail) => void;

export interface ProgressClientOptions {
  /** The relay's WebSocket URL, e.g. "wss://relay.example.com/ws". */
  url: string;
  /** A fresh JWT for the signed-in user; asked for on every connection and before the
   * current token expires (a rejected promise counts as a failed attempt: backoff). */
  getToken: () => string | Promise<string>;
  /** The user's batches (latest state each), after each change. Each new connection's
   * snapshot replaces the list: batches the relay no longer has are dropped. */
  onChange?: (batches: BatchProgress[]) => void;
  /** Connection status changes. */
  onStatus?: StatusListener;
  /** First reconnect delay ceiling in ms (default 500); doubles per failed attempt, and starts
   * over once a connection has stayed up for 10 s. */
  minBackoffMs?: number;
  /** Largest reconnect delay ceiling in ms (default 30000). */
  maxBackoffMs?: number;
}

export class ProgressClient {
  constructor(options: ProgressClientOptions);
  readonly url: string;
  readonly getToken: () => string | Promise<string>;
  readonly onChange: (batches: BatchProgress[]) => void;
  readonly onStatus: StatusListener;
  readonly minBackoffMs: number;
  readonly maxBackoffMs: number;
  /** batch_id -> latest state, as received on the current connection (do not modify; a new
   * Map per connection). */
  readonly batches: Map<string, BatchProgress>;
  /** Connect, and keep reconnecting until close() (or a close code that stops it). */
  connect(): void;
  /** Close the connection (code 1000) and stop reconnecting. */
  close(): void;
}

/** The `exp` claim (seconds since the epoch) of a JWT, or null. The signature is not checked. */
export function tokenExpiry(token: string): number | null;

/**
 * How long (ms) a JWT is valid from when it was issued: `exp - iat`, both from the issuer's
 * clock, so the browser's clock does not matter. Without `iat`, the time left by the browser's
 * clock. null without `exp`. The client refreshes its token by this lifetime.
 */
export function tokenLifetimeMs(token: string): number | null;
