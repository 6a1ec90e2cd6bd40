// streamplex.js: a dependency-free ES module client of the streamplex protocol v1 (docs/protocol.md).
//
//   import { Client } from "./streamplex.js";
//   const client = new Client("ws://127.0.0.1:8000/ws", { apiKey });
//   await client.connect();
//   for await (const chunk of client.subscribe("text", { text: "Hello world.", unit: "words" })) console.log(chunk.data);
//
// Browsers cannot set headers on a WebSocket, so the client authenticates with the first frame.

/** The protocol's error codes (the `code` of `error` frames and of `end` errors). */
export const ERROR_CODES = Object.freeze([
  "bad_request", "unknown_op", "unknown_channel", "invalid_params", "duplicate_id", "unknown_id",
  "rate_limited", "forbidden", "too_many_streams", "unavailable", "overloaded", "over_budget", "bad_source", "resume_failed",
  "internal",
]);

/** Close codes after which reconnecting with the same key cannot help. */
const FATAL_CLOSES = new Set([4001, 4002, 4003]);
/** Close codes that ask the client to wait (overloaded, rate limited): even the first reconnect waits the backoff. */
const WAIT_CLOSES = new Set([1013, 4008]);

/** A refused frame or a stream that ended with an error: `code` is one of ERROR_CODES. */
export class StreamplexError extends Error {
  constructor(code, message, { id = null, details = null, retryAfter = null } = {}) {
    super(`${code}: ${message}`);
    this.name = "StreamplexError";
    this.code = code;
    this.id = id;
    this.details = details;
    this.retryAfter = retryAfter;
  }

  static fromFrame(frame) {
    return new StreamplexError(frame.code, frame.message, { id: frame.id ?? null, details: frame.details ?? null, retryAfter: frame.retry_after ?? null });
  }
}

/** The socket closed and was not re-established; `closeCode` is the WebSocket close code. */
export class ConnectionClosedError extends StreamplexError {
  constructor(closeCode, reason) {
    super("connection_closed", `connection closed (${closeCode})${reason ? ": " + reason : ""}`);
    this.name = "ConnectionClosedError";
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

/** Close 4001/4002/4003: a wrong key, no auth in time, or too many failures from this address. */
export class AuthenticationError extends ConnectionClosedError {
  constructor(closeCode, reason) {
    super(closeCode, reason);
    this.name = "AuthenticationError";
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A client binary frame: u8 n, the stream id in n bytes of UTF-8, the payload. */
export function encodePush(id, payload) {
  const rawId = encoder.encode(id);
  if (rawId.length < 1 || rawId.length > 255) throw new RangeError("a binary frame's stream id must be 1 to 255 bytes of UTF-8");
  const body = payload instanceof ArrayBuffer ? new Uint8Array(payload) : new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  const frame = new Uint8Array(1 + rawId.length + body.length);
  frame[0] = rawId.length;
  frame.set(rawId, 1);
  frame.set(body, 1 + rawId.length);
  return frame;
}

/** Split a server binary frame (u8 n, id, u32 seq big-endian, payload) into { id, seq, payload }. */
export function decodeBinary(buffer) {
  const bytes = new Uint8Array(buffer);
  const n = bytes[0];
  if (bytes.length < 1 + n + 4) throw new RangeError("truncated binary frame");
  const id = decoder.decode(bytes.subarray(1, 1 + n));
  const seq = new DataView(bytes.buffer, bytes.byteOffset + 1 + n, 4).getUint32(0, false);
  return { id, seq, payload: bytes.subarray(5 + n) };
}

const END = Symbol("end");

/** Pushed input bytes after the server's last `ack`, kept to be sent again after a resume (at most `limit`: past it a push waits). */
export class HeldInput {
  static PIECE = 32 * 1024; // at most this much input per binary frame when held input is sent (again)

  constructor(limit) {
    this.limit = limit;
    this.data = new Uint8Array(0);
    this.length = 0;
    this.base = 0; // position of data[0]: the last acknowledged byte
    this.sent = 0; // position up to which input went out on the current connection
    this.ended = false;
    this.endSent = false;
    this._waiters = [];
  }

  get end() {
    return this.base + this.length;
  }

  /** Whether `n` more bytes may be held now (one push larger than the limit is held alone). */
  fits(n) {
    return this.length === 0 || this.length + n <= this.limit;
  }

  add(bytes) {
    if (this.length + bytes.length > this.data.length) {
      const grown = new Uint8Array(Math.max(this.length + bytes.length, this.data.length * 2, 4096));
      grown.set(this.data.subarray(0, this.length));
      this.data = grown;
    }
    this.data.set(bytes, this.length);
    this.length += bytes.length;
  }

  /** The server no longer needs the input before `position`: drop it (an ack never moves back). */
  ack(position) {
    const drop = Math.min(Math.max(0, position - this.base), this.length);
    if (drop) {
      this.data.copyWithin(0, drop, this.length);
      this.length -= drop;
      this.base += drop;
      this.sent = Math.max(this.sent, this.base);
    }
    this.wake();
  }

  /** After a resume, send again from `position`; false when that input is no longer held. */
  rewind(position) {
    if (position < this.base) return false;
    this.sent = Math.min(position, this.end);
    this.endSent = false;
    return true;
  }

  /** The next bytes to send (from `sent`, at most PIECE), or null when all were sent. */
  piece() {
    if (this.sent >= this.end) return null;
    const start = this.sent - this.base;
    return this.data.slice(start, Math.min(this.length, start + HeldInput.PIECE));
  }

  room(n) {
    return this.fits(n) ? Promise.resolve() : new Promise((resolve) => this._waiters.push({ n, resolve }));
  }

  wake(all = false) {
    this._waiters = this._waiters.filter((w) => {
      if (all || this.fits(w.n)) w.resolve();
      return !(all || this.fits(w.n));
    });
  }
}

/** One stream: iterate it (`for await`), or pass callbacks; leaving the loop unsubscribes. */
export class Subscription {
  constructor(client, channel, params, id, { onChunk, onEnd, onError, resume = true } = {}) {
    this.client = client;
    this.channel = channel;
    this.params = params;
    this.id = id;
    this.resume = resume;
    this.restarts = 0;
    this.retries = 0; // subscribes sent again after a retryable refusal
    this.retryWaitedMs = 0;
    this.lastSeq = -1;
    this.reason = null;
    this.onChunk = onChunk;
    this.onEnd = onEnd;
    this.onError = onError;
    this._items = [];
    this._waiter = null;
    this._terminal = null;
    this._awaitingSubscribed = true;
    this._input = null; // a HeldInput when the server acknowledges this stream's pushed input
    this._pushing = Promise.resolve(); // pushes are held in the order they were made
    this.opened = new Promise((resolve, reject) => {
      this._resolveOpened = resolve;
      this._rejectOpened = reject;
    });
    this.opened.catch(() => {}); // a refusal also reaches the iterator and onError
  }

  get ended() {
    return this._terminal !== null;
  }

  _wake() {
    if (this._waiter) {
      const wake = this._waiter;
      this._waiter = null;
      wake();
    }
  }

  _deliver(chunk) {
    if (this._terminal) return;
    this.lastSeq = chunk.seq;
    if (this.onChunk) this.onChunk(chunk, this);
    else this._items.push(chunk);
    this._wake();
  }

  _subscribed(acks = false) {
    if (!this._awaitingSubscribed) return;
    this._awaitingSubscribed = false;
    this._input = acks ? new HeldInput(this.client.inputBuffer) : null; // a new stream (or one started over) counts its input from 0
    if (this._openedDone) this.restarts += 1;
    this._openedDone = true;
    this._resolveOpened(this);
  }

  _finish(error, reason) {
    if (this._terminal) return;
    this._terminal = error ?? END;
    this.reason = reason ?? (error ? "error" : "complete");
    this._awaitingSubscribed = false;
    if (error) {
      this._rejectOpened(error);
      if (this.onError) this.onError(error, this);
    } else {
      this._resolveOpened(this);
    }
    if (this.onEnd) this.onEnd(this.reason, this);
    if (this._input) {
      this._input.data = new Uint8Array(0); // nothing is sent again for an ended stream
      this._input.length = 0;
      this._input.wake(true);
    }
    this._wake();
  }

  /** Push input: a JSON value, or an ArrayBuffer / typed array (sent as a binary frame). On a stream whose input the
   * server acknowledges, bytes are held until acknowledged: the returned promise waits while `inputBuffer` bytes are held. */
  push(data) {
    return this.client.push(this.id, data);
  }

  /** Mark the end of pushed input. */
  end() {
    return this.client.push(this.id, undefined, { end: true });
  }

  /** Unsubscribe (when still open). */
  cancel() {
    if (this._terminal) return;
    this._finish(null, "unsubscribed");
    this.client._unsubscribe(this);
  }

  async *[Symbol.asyncIterator]() {
    try {
      await this.opened;
      while (true) {
        while (this._items.length === 0) {
          if (this._terminal === END) return;
          if (this._terminal) throw this._terminal;
          await new Promise((resolve) => { this._waiter = resolve; });
        }
        yield this._items.shift();
      }
    } finally {
      this.cancel();
    }
  }
}

/**
 * A connection: one WebSocket, any number of streams. Events (EventTarget): `ready` (detail: the ready frame),
 * `state` (detail: "connecting" | "open" | "reconnecting" | "closed"), `warning` (detail: a refused frame without a stream).
 */
export class Client extends EventTarget {
  constructor(url, { apiKey, reconnect = true, backoff = [500, 30000], maxRetries = Infinity, retry = {}, heartbeatMs = 15000, heartbeatTimeoutMs = 10000, inputBuffer = 4 << 20, WebSocketImpl = globalThis.WebSocket } = {}) {
    super();
    // Refused subscribes with these codes and a `retry_after` are sent again after it, up to maxAttempts per
    // stream and maxWaitMs of waiting in all (`retry: false` turns this off).
    this.retry = retry === false ? null : { codes: ["unavailable", "overloaded", "rate_limited"], maxAttempts: 5, maxWaitMs: 60000, ...retry };
    this._retryTimers = new Set();
    // Several URLs (the nodes of one deployment sharing Redis): each reconnect attempt tries the next one.
    this.urls = Array.isArray(url) ? [...url] : [url];
    if (!this.urls.length) throw new StreamplexError("bad_request", "give at least one URL");
    this.url = this.urls[0];
    this.apiKey = apiKey;
    this.reconnect = reconnect;
    this.backoff = backoff;
    this.maxRetries = maxRetries;
    this.heartbeatMs = heartbeatMs;
    this.heartbeatTimeoutMs = heartbeatTimeoutMs;
    this.inputBuffer = inputBuffer; // bytes of unacknowledged pushed input held per stream (past it, push waits)
    this.WebSocketImpl = WebSocketImpl;
    this.ready = null;
    this.state = "closed";
    this.reconnects = 0;
    this.resumes = 0;
    this._resumeToken = null;
    this._ws = null;
    this._subs = new Map();
    this._pongs = [];
    this._nextId = 1;
    this._closing = false;
    this._heartbeat = null;
  }

  /** The channels this key may use, by name (from the latest `ready`). */
  get channels() {
    return Object.fromEntries((this.ready?.channels ?? []).map((c) => [c.name, c]));
  }

  _setState(state) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: state }));
  }

  /** Open the socket and authenticate; resolves with the `ready` frame, rejects with AuthenticationError or ConnectionClosedError. */
  connect() {
    this._closing = false;
    this._setState("connecting");
    return this._open();
  }

  _open(resume = false) {
    return new Promise((resolve, reject) => {
      const ws = new this.WebSocketImpl(this.url);
      ws.binaryType = "arraybuffer";
      let authenticated = false;
      let resuming = false;
      const opened = (frame) => {
        this._ws = ws;
        this._startHeartbeat();
        this._setState("open");
        this.dispatchEvent(new CustomEvent("ready", { detail: frame }));
        resolve(frame);
      };
      ws.onopen = () => ws.send(JSON.stringify({ op: "auth", api_key: this.apiKey }));
      ws.onmessage = (event) => {
        if (!authenticated) {
          const frame = JSON.parse(event.data);
          if (frame.op !== "ready") return;
          authenticated = true;
          this.ready = frame;
          const previous = this._resumeToken;
          this._resumeToken = frame.resume?.token ?? previous;
          if (resume && previous && this._subs.size) {
            // take the dropped session over: each stream goes on after the last seq this client saw
            resuming = true;
            const streams = Object.fromEntries([...this._subs.values()].map((sub) => [sub.id, sub.lastSeq]));
            const inputs = Object.fromEntries([...this._subs.values()].filter((sub) => sub._input).map((sub) => [sub.id, sub._input.base]));
            ws.send(JSON.stringify({ op: "resume", token: previous, streams, inputs }));
            return;
          }
          opened(frame);
          return;
        }
        if (resuming) {
          resuming = false;
          const answer = JSON.parse(event.data);
          if (answer.op === "resumed") {
            this.resumes += 1;
            for (const [id, entry] of Object.entries(answer.streams ?? {})) {
              const sub = this._subs.get(id);
              if (!sub) continue;
              sub._resumed = true; // `resumed: false` is followed by its `end` (reason resume_gap)
              // its held input goes out again from where the server asks
              if (sub._input && Number.isInteger(entry?.input) && !sub._input.rewind(entry.input)) console.warn(`stream ${id}: its input from byte ${entry.input} is no longer held`);
            }
          }
          opened(this.ready);
          return;
        }
        this._onMessage(event.data);
      };
      ws.onclose = (event) => {
        const error = FATAL_CLOSES.has(event.code) ? new AuthenticationError(event.code, event.reason) : new ConnectionClosedError(event.code, event.reason);
        if (!authenticated) {
          reject(error);
          return;
        }
        this._onClose(ws, error);
      };
      ws.onerror = () => {}; // the close event that follows carries the code
    });
  }

  _startHeartbeat() {
    clearInterval(this._heartbeat);
    if (!this.heartbeatMs) return;
    this._heartbeat = setInterval(() => {
      this.ping(this.heartbeatTimeoutMs).catch(() => {
        // no pong in time: the socket is dead even if the browser has not noticed yet
        if (this._ws) this._ws.close(4000, "heartbeat timeout");
      });
    }, this.heartbeatMs);
  }

  _onMessage(raw) {
    if (typeof raw !== "string") {
      const { id, seq, payload } = decodeBinary(raw);
      this._subs.get(id)?._deliver({ seq, data: payload, dropped: 0, binary: true });
      return;
    }
    const frame = JSON.parse(raw);
    const sub = typeof frame.id === "string" ? this._subs.get(frame.id) : undefined;
    switch (frame.op) {
      case "chunk":
        sub?._deliver({ seq: frame.seq, data: frame.data, dropped: frame.dropped ?? 0, binary: false });
        break;
      case "subscribed":
        sub?._subscribed(frame.ack === true);
        break;
      case "ack":
        if (sub?._input && Number.isInteger(frame.input)) sub._input.ack(frame.input);
        break;
      case "end":
        if (sub) this._ended(sub, frame);
        break;
      case "error": {
        const error = StreamplexError.fromFrame(frame);
        if (sub && sub._awaitingSubscribed && this._retryLater(sub, error)) break;
        if (sub && sub._awaitingSubscribed) {
          this._subs.delete(sub.id);
          sub._finish(error, "error");
        } else if (sub) {
          if (sub.onError) sub.onError(error, sub);
          else this.dispatchEvent(new CustomEvent("warning", { detail: error }));
        } else {
          this.dispatchEvent(new CustomEvent("warning", { detail: error }));
        }
        break;
      }
      case "pong":
        this._pongs.shift()?.resolve();
        break;
      default:
        break;
    }
  }

  _ended(sub, frame) {
    if (frame.reason === "shutdown" && sub.resume && this.reconnect) {
      sub._awaitingSubscribed = true; // subscribed again once reconnected
      return;
    }
    if (frame.reason === "error") {
      const error = new StreamplexError(frame.error.code, frame.error.message, { id: sub.id, retryAfter: frame.error.retry_after ?? null });
      if (sub.lastSeq < 0 && this._retryLater(sub, error)) return; // refused before its first chunk: nothing to start over
      this._subs.delete(sub.id);
      sub._finish(error, "error");
      return;
    }
    this._subs.delete(sub.id);
    if (frame.reason === "shutdown") sub._finish(new StreamplexError("shutdown", "the server shut down", { id: sub.id }), "shutdown");
    else if (frame.reason === "resume_gap") sub._finish(new StreamplexError("resume_gap", "chunks were lost while the connection was down", { id: sub.id }), "resume_gap");
    else if (frame.reason === "producer_lost") sub._finish(new StreamplexError("producer_lost", "its server node died and the stream cannot go on elsewhere", { id: sub.id }), "producer_lost");
    else if (frame.reason === "input_lost") sub._finish(new StreamplexError("input_lost", "the pushed input the stream needs to go on is no longer held", { id: sub.id }), "input_lost");
    else sub._finish(null, frame.reason);
  }

  /** Subscribe `sub` again after the error's `retryAfter` when the retry policy allows it; false when the error stands. */
  _retryLater(sub, error) {
    const policy = this.retry;
    if (!policy || error.retryAfter == null || !policy.codes.includes(error.code)) return false;
    const waitMs = error.retryAfter * 1000;
    if (sub.retries >= policy.maxAttempts || sub.retryWaitedMs + waitMs > policy.maxWaitMs) return false;
    sub.retries += 1;
    sub.retryWaitedMs += waitMs;
    sub._awaitingSubscribed = true;
    const timer = setTimeout(() => {
      this._retryTimers.delete(timer);
      if (this._subs.get(sub.id) !== sub || sub.ended) return;
      try {
        this._send({ op: "subscribe", id: sub.id, channel: sub.channel, params: sub.params });
      } catch (sendError) {
        if (!this._ws) return; // disconnected: the reconnect subscribes it again
        this._subs.delete(sub.id);
        sub._finish(sendError, "error");
      }
    }, waitMs);
    this._retryTimers.add(timer);
    return true;
  }

  _onClose(ws, error) {
    if (this._ws !== ws) return;
    this._ws = null;
    clearInterval(this._heartbeat);
    for (const pong of this._pongs.splice(0)) pong.reject(error);
    if (this._closing || !this.reconnect || error instanceof AuthenticationError) {
      this._failAll(error);
      this._setState("closed");
      return;
    }
    this._setState("reconnecting");
    this._reconnect(error);
  }

  /** Connect again and resume: the first attempt at once (a node that died, a drain: the session is waiting on
   * another node), unless the server asked to wait (1013, 4008); then with backoff. */
  async _reconnect(lastError) {
    let delay = this.backoff[0];
    const start = this.urls.indexOf(this.url);
    const wait = WAIT_CLOSES.has(lastError?.closeCode);
    for (let attempt = 1; !this._closing; attempt += 1) {
      if (attempt > 1 || wait) await new Promise((resolve) => setTimeout(resolve, delay * (0.5 + Math.random() / 2)));
      if (this._closing) return;
      if (this.urls.length > 1) this.url = this.urls[(start + attempt) % this.urls.length];
      try {
        await this._open(true);
        this.reconnects += 1;
        this._resubscribe();
        return;
      } catch (error) {
        lastError = error;
        if (error instanceof AuthenticationError || attempt >= this.maxRetries) break;
      }
      if (attempt > 1 || wait) delay = Math.min(this.backoff[1], delay * 2);
    }
    this._failAll(lastError);
    this._setState("closed");
  }

  _resubscribe() {
    for (const sub of [...this._subs.values()]) {
      if (sub._resumed) {
        sub._resumed = false;
        if (sub._input) this._sendHeld(sub);
        continue;
      }
      if (!sub.resume) {
        this._subs.delete(sub.id);
        sub._finish(new StreamplexError("connection_lost", "the connection was lost", { id: sub.id }), "lost");
        continue;
      }
      sub._awaitingSubscribed = true;
      this._send({ op: "subscribe", id: sub.id, channel: sub.channel, params: sub.params });
    }
  }

  _failAll(error) {
    for (const sub of this._subs.values()) sub._finish(error, "error");
    this._subs.clear();
  }

  _send(frame) {
    if (!this._ws || this._ws.readyState !== 1) throw new ConnectionClosedError(1006, "not connected");
    this._ws.send(typeof frame === "string" || frame instanceof Uint8Array ? frame : JSON.stringify(frame));
  }

  /**
   * Open a stream of `channel` with `params`. Returns a Subscription: iterate it, or give `onChunk`/`onEnd`/`onError`.
   * With `resume` (default), a stream cut by a reconnect or a server shutdown is subscribed again (it starts over).
   */
  subscribe(channel, params = {}, options = {}) {
    const id = options.id ?? `${channel.slice(0, 8)}-${this._nextId++}`;
    if (this._subs.has(id)) throw new StreamplexError("duplicate_id", `stream id ${id} is already open`, { id });
    const sub = new Subscription(this, channel, params, id, options);
    this._subs.set(id, sub);
    try {
      this._send({ op: "subscribe", id, channel, params });
    } catch (error) {
      this._subs.delete(id);
      sub._finish(error, "error");
    }
    return sub;
  }

  /** Push to a stream: binary data (ArrayBuffer, typed array) as a binary frame, anything else as a `push` op.
   * On a stream whose input the server acknowledges (`subscribed` with `ack`: a live transcription), bytes are held until
   * acknowledged, sent again after a resume from where the server asks, and the returned promise waits while
   * `inputBuffer` bytes are held (a disconnected client holds them too). */
  push(id, data, { end = false } = {}) {
    const sub = this._subs.get(id);
    const binary = data instanceof ArrayBuffer || ArrayBuffer.isView(data);
    if (sub?._input && (binary || data === undefined || data === null)) {
      const held = sub._input;
      const bytes = binary ? (data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength)) : new Uint8Array(0);
      sub._pushing = sub._pushing.then(async () => {
        await held.room(bytes.length);
        if (sub.ended) throw sub._terminal === END ? new StreamplexError("unknown_id", `stream ${id} has ended`, { id }) : sub._terminal;
        held.add(bytes);
        held.ended ||= end;
        this._sendHeld(sub);
      });
      const pushed = sub._pushing;
      sub._pushing = pushed.catch(() => {});
      return pushed;
    }
    if (binary) {
      this._send(encodePush(id, data));
      if (end) this._send({ op: "push", id, end: true });
      return;
    }
    const frame = { op: "push", id };
    if (data !== undefined && data !== null) frame.data = data;
    if (end) frame.end = true;
    this._send(frame);
  }

  /** Send what `sub`'s held input has not sent on this connection, then its end once pushed (nothing while disconnected). */
  _sendHeld(sub) {
    const held = sub._input;
    if (!held || sub.ended || !this._ws || this._ws.readyState !== 1) return;
    for (let piece = held.piece(); piece; piece = held.piece()) {
      this._send(encodePush(sub.id, piece));
      held.sent += piece.length;
    }
    if (held.ended && !held.endSent) {
      this._send({ op: "push", id: sub.id, end: true });
      held.endSent = true;
    }
  }

  _unsubscribe(sub) {
    if (this._subs.get(sub.id) !== sub) return;
    this._subs.delete(sub.id);
    if (this._ws && this._ws.readyState === 1) this._send({ op: "unsubscribe", id: sub.id });
  }

  /** A protocol ping; resolves with the round trip in milliseconds. */
  ping(timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const start = performance.now();
      const timer = setTimeout(() => {
        const i = this._pongs.indexOf(entry);
        if (i >= 0) this._pongs.splice(i, 1);
        reject(new StreamplexError("timeout", "no pong in time"));
      }, timeoutMs);
      const entry = {
        resolve: () => { clearTimeout(timer); resolve(performance.now() - start); },
        reject: (error) => { clearTimeout(timer); reject(error); },
      };
      this._pongs.push(entry);
      try {
        this._send({ op: "ping" });
      } catch (error) {
        this._pongs.splice(this._pongs.indexOf(entry), 1);
        entry.reject(error);
      }
    });
  }

  /** Close the socket (1000); open streams end with ConnectionClosedError. */
  close() {
    this._closing = true;
    clearInterval(this._heartbeat);
    for (const timer of this._retryTimers) clearTimeout(timer);
    this._retryTimers.clear();
    if (this._ws) this._ws.close(1000, "client closed");
    else this._failAll(new ConnectionClosedError(1000, "client closed"));
  }
}
