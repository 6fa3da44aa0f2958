// rapidphoto-realtime.js: the browser client of the RapidPhoto relay (PROTOCOL §5, §5.1).
//
// A plain ES module, no build step, no dependencies; the relay serves it at
// /client/rapidphoto-realtime.js.
//
//   import { UploadProgressStream } from "/client/rapidphoto-realtime.js";
//   const stream = new UploadProgressStream({ sessions: ["s1", "s2"], notifications: true, token });
//   stream.on("progress", ({ sessionId, session }) => render(sessionId, session));
//   stream.on("notification", ({ notification }) => toast(notification));
//   stream.on("connection", ({ state, reason }) => showState(state, reason));
//   stream.start();
//
// Why fetch() and not EventSource: EventSource cannot send an Authorization header and does not
// show the status of a refused connection, so it cannot tell 401/403 (final) from 429/503
// (wait Retry-After, then resume); it gives up on all of them alike. This module reads the
// response body itself with a small SSE parser (the WHATWG rules: `event`, `data`, `id`, `retry`,
// comments; CR, LF or CRLF line ends) and applies PROTOCOL §5's rules for each answer.

/** The multi-session stream (PROTOCOL §5.1). */
export const MULTI_SESSION_STREAM_PATH = "/api/upload/sessions/stream";

/** What the relay accepts as a session id (PROTOCOL §3); `notifications` is reserved. */
export const SESSION_ID_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;

/** A session id the relay would accept (anything else makes it answer 400 for the whole stream). */
export function isSessionId(id) {
  return typeof id === "string" && SESSION_ID_PATTERN.test(id) && id !== "notifications";
}

/** Answers that are final: retrying cannot help (PROTOCOL §5 "Checks, in order"). */
const REFUSALS = new Set([400, 401, 403, 404, 405, 410, 431]);
/** STREAM_CLOSED reasons after which the stream stops, and the state it stops in (§5). */
const FINAL_CLOSES = new Map([
  ["completed", "closed"],
  ["forbidden", "error"],
  ["session-not-found", "error"],
  ["token-expired", "error"],
]);
const SESSION_EVENTS = new Set(["SESSION_STARTED", "PHOTO_UPLOADED", "PHOTO_FAILED", "SESSION_COMPLETED"]);
const COUNT_FIELDS = ["totalPhotos", "uploadedPhotos", "failedPhotos", "progressPercent"];
const SEEN_NOTIFICATIONS_MAX = 1000;

/**
 * A Server-Sent Events parser (https://html.spec.whatwg.org/multipage/server-sent-events.html,
 * "Parsing an event stream"), fed decoded text in chunks of any size.
 */
export class SSEParser {
  /**
   * @param {object} handlers
   * @param {(frame: SSEFrame) => void} handlers.onEvent a dispatched event
   * @param {(ms: number) => void} [handlers.onRetry] a valid `retry:` field
   * @param {(text: string) => void} [handlers.onComment] a comment line (heartbeats)
   * @param {string} [lastEventId] the last event id so far (it survives reconnections)
   */
  constructor({ onEvent, onRetry = () => {}, onComment = () => {} }, lastEventId = "") {
    Object.assign(this, { onEvent, onRetry, onComment });
    this.lastEventId = lastEventId;
    this.tail = "";
    this.skipLF = false; // a CR ended the last chunk: an LF starting the next one belongs to it
    this.reset();
  }

  reset() {
    this.type = "";
    this.data = [];
    this.idBuffer = this.lastEventId;
    this.frameId = null;
  }

  /** @param {string} text the next decoded piece of the body */
  feed(text) {
    let start = 0;
    if (this.skipLF && text.startsWith("\n")) start = 1;
    this.skipLF = false;
    const chunk = this.tail + text.slice(start);
    start = 0;
    for (let i = 0; i < chunk.length; i++) {
      const c = chunk.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(chunk.slice(start, i));
      if (c === 13) {
        if (i + 1 === chunk.length) this.skipLF = true;
        else if (chunk.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.tail = chunk.slice(start);
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return this.onComment(line.slice(1).trimStart());
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.idBuffer = this.frameId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.onRetry(Number(value));
  }

  dispatch() {
    this.lastEventId = this.idBuffer;
    if (this.data.length > 0) {
      this.onEvent({
        type: this.type || "message",
        data: this.data.join("\n"),
        id: this.frameId,
        lastEventId: this.lastEventId,
      });
    }
    this.reset();
  }
}

/**
 * One SSE stream of the relay over fetch(), with every rule of PROTOCOL §5 for answers and close
 * reasons: resumes after dropped connections, `slow-consumer` and `shutdown` with `Last-Event-ID`
 * after the `retry:` delay (backing off while it keeps failing), waits `Retry-After` on 429/503,
 * stops for good on 204, 400/401/403 and the final `STREAM_CLOSED` reasons.
 * Works for any of the relay's streams; {@link UploadProgressStream} adds the sessions' state.
 *
 * Events (CustomEvent, `detail` as typed): `connection` ({@link ConnectionDetail}),
 * `frame` ({@link SSEFrame} with `json`: every event received, in order).
 */
export class EventStreamClient extends EventTarget {
  /**
   * @param {string | (() => string | null)} url the stream's URL (a function: asked before each
   *   connection; null when there is nothing left to ask for, which ends the stream as completed)
   * @param {StreamOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    /** The last SSE `id:` received: sent back as `Last-Event-ID` on every reconnection. */
    this.lastEventId = options.lastEventId || "";
    /** The reconnection delay, from the stream's `retry:` (PROTOCOL §5 "Retry"). */
    this.retryMs = options.retryMs ?? 2000;
    /** @type {ConnectionDetail} */
    this.connection = { state: "connecting", reason: "", status: 0, retryInMs: 0, message: "" };
    this.failures = 0; // consecutive connections that failed, for the backoff
    this.running = false;
    this.abort = null;
    this.timer = null;
    this.idle = null;
    this.idleExpired = false;
  }

  /** Open the stream (again, after a final stop: e.g. once a renewed token is in place). */
  start() {
    if (this.running) return this;
    this.running = true;
    this.failures = 0;
    this.setConnection("connecting");
    this.connect();
    return this;
  }

  /** Close the stream for good (until `start()`). */
  close() {
    this.stop("closed", "closed by the page");
  }

  /** `stream.on(type, fn)`: `fn(detail)` on every `type` event; returns a function that unsubscribes. */
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  setConnection(state, reason = "", extra = {}) {
    this.connection = { state, reason, status: 0, retryInMs: 0, message: "", ...extra };
    this.emit("connection", this.connection);
  }

  async connect() {
    const abort = (this.abort = new AbortController());
    const headers = { Accept: "text/event-stream", ...(this.options.headers || {}) };
    let response;
    try {
      const token = typeof this.options.token === "function" ? await this.options.token() : this.options.token;
      if (token) headers.Authorization = `Bearer ${token}`;
      if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
      const url = typeof this.url === "function" ? this.url() : this.url;
      if (url === null) return this.stop("closed", "completed");
      response = await fetch(url, {
        headers,
        credentials: this.options.credentials || "same-origin",
        cache: "no-store",
        signal: abort.signal,
      });
    } catch (error) {
      if (abort.signal.aborted) return;
      return this.retry("relay unreachable", 0);
    }
    if (abort.signal.aborted) return;
    const status = response.status;
    if (status === 200 && /^text\/event-stream\b/i.test(response.headers.get("Content-Type") || "")) {
      return this.read(response, abort);
    }
    const message = await errorMessage(response);
    if (abort.signal.aborted) return;
    if (status === 204) return this.stop("closed", "completed", { status });
    if (REFUSALS.has(status)) return this.stop("error", `refused (${status})${message ? ": " + message : ""}`, { status, message });
    const retryAfter = /^\d+$/.test(response.headers.get("Retry-After") || "") ? Number(response.headers.get("Retry-After")) : 0;
    return this.retry(`relay answered ${status}`, status, retryAfter * 1000, message);
  }

  async read(response, abort) {
    this.failures = 0;
    this.setConnection("open", "", { status: 200 });
    let closeReason = null;
    const parser = new SSEParser({
      onRetry: (ms) => { this.retryMs = ms; },
      onEvent: (frame) => {
        if (abort.signal.aborted) return;
        this.lastEventId = frame.lastEventId;
        let json = null;
        try { json = JSON.parse(frame.data); } catch (error) { /* not JSON: passed on as text */ }
        this.emit("frame", { ...frame, json });
        if (frame.type === "STREAM_CLOSED" && json && typeof json.reason === "string") {
          closeReason = json.reason;
          abort.abort(); // the relay ends the response now; nothing of it is wanted after this
        }
      },
    }, this.lastEventId);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    this.watchIdle(abort);
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        this.watchIdle(abort);
        parser.feed(decoder.decode(value, { stream: true }));
      }
    } catch (error) {
      /* aborted by us, or the connection broke: told apart below */
    } finally {
      clearTimeout(this.idle);
    }
    if (closeReason !== null) {
      if (!this.running) return;
      if (FINAL_CLOSES.has(closeReason)) {
        return this.stop(FINAL_CLOSES.get(closeReason), closeReason === "completed" ? "completed" : `stopped: ${closeReason}`);
      }
      // slow-consumer, shutdown, or a reason this client does not know: resume after what
      // was received; the relay's log fills the gap.
      return this.retry(closeReason, 0);
    }
    if (this.idleExpired) {
      this.idleExpired = false;
      return this.retry("no heartbeat", 0);
    }
    if (abort.signal.aborted) return; // close()
    return this.retry("connection lost", 0);
  }

  /** A stream silent for longer than `idleTimeoutMs` (heartbeats stopped) is dead: reconnect. */
  watchIdle(abort) {
    clearTimeout(this.idle);
    const timeout = this.options.idleTimeoutMs ?? 45000; // >= 2 x SSE_HEARTBEAT_SECONDS (15 s)
    if (timeout > 0) this.idle = setTimeout(() => { this.idleExpired = true; abort.abort(); }, timeout);
  }

  retry(reason, status, retryAfterMs = 0, message = "") {
    if (!this.running) return;
    this.failures += 1;
    // Retry-After (429/503) says how long to wait: the relay already spreads it at random when it
    // is full. Otherwise the first retry after a working stream waits `retry:` as EventSource
    // does; further failures wait longer, in proportion (up to maxBackoffMs: a relay restarting
    // takes seconds, and a page should find it soon after), spread at random so the clients of a
    // dead relay do not all return together.
    const maxBackoff = this.options.maxBackoffMs ?? 30000;
    let delay = this.retryMs;
    if (retryAfterMs > 0) {
      delay = retryAfterMs;
    } else if (this.failures > 1) {
      // (at least 0.5 s a step: `retry: 0` must not turn a dead relay into a tight loop)
      const backoff = Math.min(maxBackoff, Math.max(this.retryMs, 500) * this.failures);
      delay = Math.max(this.retryMs, backoff * (0.5 + Math.random() / 2));
    }
    this.setConnection("reconnecting", reason, { status, retryInMs: Math.round(delay), message });
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.running) this.connect();
    }, delay);
  }

  stop(state, reason, extra = {}) {
    const wasRunning = this.running;
    this.running = false;
    clearTimeout(this.timer);
    this.timer = null;
    clearTimeout(this.idle);
    if (this.abort) this.abort.abort();
    if (wasRunning || state !== this.connection.state) this.setConnection(state, reason, extra);
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return typeof body.error === "string" ? body.error : "";
  } catch (error) {
    return "";
  }
}

// Log entry ids `<ms>-<seq>`, compared exactly (BigInt: a sequence number may pass 2^53).
function parseEntryId(id) {
  const m = /^(\d+)-(\d+)$/.exec(id || "");
  return m ? [BigInt(m[1]), BigInt(m[2])] : null;
}

/** Whether log entry id `id` is newer than `than` (an id that cannot be compared counts as newer). */
export function isNewerEntry(id, than) {
  const a = parseEntryId(id);
  const b = parseEntryId(than);
  if (!a || !b) return true;
  return a[0] > b[0] || (a[0] === b[0] && a[1] > b[1]);
}

/**
 * One stream for a set of upload sessions and, optionally, the user's notifications
 * (PROTOCOL §5.1), and the state of each session kept from its snapshots and events.
 *
 * Events (CustomEvent with `detail`; or `stream.on(type, detail => …)`):
 * - `progress` ({@link ProgressDetail}): a session's state changed (a snapshot or an event);
 * - `sessionclosed` ({@link SessionClosedDetail}): the relay closed one session of the stream
 *   (`SESSION_CLOSED`: it never appeared, or belongs to another user); the others go on;
 * - `notification` ({@link NotificationDetail}): a notification of the user, once each;
 * - `duplicate` ({@link DuplicateDetail}): an event already applied, ignored;
 * - `connection` ({@link ConnectionDetail}): the stream's state; `closed` and `error` are final;
 * - `frame` ({@link SSEFrame}): every event received, as received (unknown types included).
 */
export class UploadProgressStream extends EventStreamClient {
  /**
   * @param {StreamOptions & {sessions?: string[], notifications?: boolean, baseUrl?: string, maxFailures?: number}} options
   *   `sessions`: the ids to watch (at most RELAY_MAX_SESSIONS_PER_STREAM, 32 by default);
   *   `notifications`: also the user's notifications; `baseUrl`: the relay's origin ("" for the
   *   page's own); `maxFailures`: failed photos kept per session (100, as many as a snapshot lists).
   */
  constructor(options = {}) {
    const ids = [...new Set(options.sessions || [])];
    // Each connection asks for the sessions the relay has not closed: one closed as `forbidden`
    // belongs to someone else, and asking for it again would get 403 for the whole stream.
    super(() => {
      const open = [...this.sessions.values()].filter((s) => s.closed === null);
      if (open.length === 0 && !options.notifications) return null; // nothing left to watch
      const query = new URLSearchParams(open.map((s) => ["session", s.sessionId]));
      if (options.notifications) query.append("notifications", "1");
      return `${options.baseUrl || ""}${MULTI_SESSION_STREAM_PATH}?${query}`;
    }, options);
    /** @type {Map<string, SessionState>} every session asked for, in the order asked */
    this.sessions = new Map(ids.map((id) => [id, newSession(id)]));
    this.maxFailures = options.maxFailures ?? 100;
    this.seenNotifications = new Set();
    this.addEventListener("frame", (event) => this.apply(event.detail));
  }

  apply(frame) {
    const data = frame.json;
    if (!data || typeof data !== "object") return;
    if (frame.type === "notification") return this.applyNotification(data);
    const session = this.sessions.get(data.sessionId);
    if (!session) return;
    if (frame.type === "SESSION_SNAPSHOT") {
      Object.assign(session, pickCounts(data), { lastEventId: data.eventId ?? null, closed: null });
      session.failures = new Map();
      for (const f of data.failures || []) this.addFailure(session, f.photoId, f.reason);
      return this.emit("progress", { sessionId: session.sessionId, session, event: data });
    }
    if (frame.type === "SESSION_CLOSED") {
      session.closed = String(data.reason || "");
      return this.emit("sessionclosed", { sessionId: session.sessionId, reason: session.closed, session });
    }
    if (!SESSION_EVENTS.has(frame.type)) return;
    const eventId = typeof data.eventId === "string" ? data.eventId : null;
    if (session.lastEventId !== null && eventId !== null && !isNewerEntry(eventId, session.lastEventId)) {
      return this.emit("duplicate", { sessionId: session.sessionId, type: frame.type, eventId });
    }
    if (eventId !== null) session.lastEventId = eventId;
    Object.assign(session, pickCounts(data));
    if (frame.type === "PHOTO_FAILED") this.addFailure(session, data.photoId, data.reason);
    if (frame.type === "PHOTO_UPLOADED") session.failures.delete(data.photoId); // uploaded after all
    this.emit("progress", { sessionId: session.sessionId, session, event: data });
  }

  addFailure(session, photoId, reason) {
    session.failures.delete(photoId); // the most recent failure goes last
    session.failures.set(String(photoId), String(reason ?? ""));
    for (const oldest of session.failures.keys()) {
      if (session.failures.size <= this.maxFailures) break;
      session.failures.delete(oldest);
    }
  }

  applyNotification(data) {
    const eventId = typeof data.eventId === "string" ? data.eventId : null;
    if (eventId !== null && this.seenNotifications.has(eventId)) {
      return this.emit("duplicate", { sessionId: null, type: "notification", eventId });
    }
    if (eventId !== null) {
      this.seenNotifications.add(eventId);
      if (this.seenNotifications.size > SEEN_NOTIFICATIONS_MAX) {
        this.seenNotifications.delete(this.seenNotifications.values().next().value);
      }
    }
    this.emit("notification", { notification: data, eventId });
  }
}

function newSession(sessionId) {
  return {
    sessionId, status: "PENDING", totalPhotos: 0, uploadedPhotos: 0, failedPhotos: 0,
    progressPercent: 0, failures: new Map(), lastEventId: null, closed: null,
  };
}

/** The counts and status a payload carries (events carry totals, not increments: PROTOCOL §4). */
function pickCounts(data) {
  const picked = {};
  for (const field of COUNT_FIELDS) if (Number.isFinite(data[field])) picked[field] = data[field];
  if (typeof data.status === "string") picked.status = data.status;
  return picked;
}

/**
 * @typedef {object} StreamOptions
 * @property {string | (() => string | null | Promise<string | null>)} [token] a JWT sent as
 *   `Authorization: Bearer` (a function is asked before each connection: it may renew it).
 *   Without one, the relay's cookie authenticates (set `credentials: "include"` across origins).
 * @property {RequestCredentials} [credentials] fetch's credentials mode ("same-origin").
 * @property {Record<string, string>} [headers] more request headers.
 * @property {string} [lastEventId] where to resume (a cursor kept from an earlier stream).
 * @property {number} [retryMs] the reconnection delay until the relay's `retry:` says (2000).
 * @property {number} [maxBackoffMs] the longest wait between failing attempts (30000).
 * @property {number} [idleTimeoutMs] silence after which the connection counts as dead (45000; 0: never).
 */

/**
 * @typedef {"connecting" | "open" | "reconnecting" | "closed" | "error"} ConnectionState
 * `closed` (completed, 204, or `close()`) and `error` (a refusal or a final close reason) are final
 * until `start()` is called again.
 */

/**
 * @typedef {object} ConnectionDetail
 * @property {ConnectionState} state
 * @property {string} reason why: `completed`, `refused (401): token has expired`,
 *   `stopped: token-expired`, `slow-consumer`, `shutdown`, `connection lost`, `relay answered 429`…
 * @property {number} status the HTTP status behind it, when there is one (else 0)
 * @property {number} retryInMs when `reconnecting`: the wait before the next attempt
 * @property {string} message the relay's error message (`{"error": …}`), when it sent one
 */

/**
 * @typedef {object} SSEFrame
 * @property {string} type the SSE `event:` (`message` when absent)
 * @property {string} data the SSE `data:` lines joined
 * @property {string | null} id this frame's own `id:` (null when it had none)
 * @property {string} lastEventId the stream's last event id after this frame (the resume cursor)
 * @property {any} [json] `data` parsed, or null when it is not JSON (`frame` events only)
 */

/**
 * @typedef {object} SessionState
 * @property {string} sessionId
 * @property {"PENDING" | "IN_PROGRESS" | "COMPLETED"} status `PENDING` until its first snapshot
 * @property {number} totalPhotos
 * @property {number} uploadedPhotos
 * @property {number} failedPhotos
 * @property {number} progressPercent
 * @property {Map<string, string>} failures photos failed now: photoId -> reason, oldest first
 * @property {string | null} lastEventId the log entry id of the newest event applied
 * @property {null | "session-not-found" | "forbidden" | string} closed why the relay closed it, if it did
 */

/**
 * @typedef {object} ProgressDetail
 * @property {string} sessionId
 * @property {SessionState} session its state after the change
 * @property {object} event the payload applied (`SESSION_SNAPSHOT`, `PHOTO_UPLOADED`, …)
 */

/**
 * @typedef {object} SessionClosedDetail
 * @property {string} sessionId
 * @property {string} reason `session-not-found` or `forbidden`
 * @property {SessionState} session
 */

/**
 * @typedef {object} NotificationDetail
 * @property {object} notification the payload: `kind` (e.g. `UPLOAD_SESSION_COMPLETED`), `sessionId`, counts
 * @property {string | null} eventId its log entry id
 */

/**
 * @typedef {object} DuplicateDetail
 * @property {string | null} sessionId null for a notification
 * @property {string} type
 * @property {string} eventId
 */
