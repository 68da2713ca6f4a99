// Chorus WebSocket client (protocol v1), served by every node at /chorus.js.
//
//   import { Chorus } from "/chorus.js";
//   const chorus = new Chorus("wss://chat.example.com/ws", {
//     token: () => fetch("/my-token").then((r) => r.text()), // or a fixed string
//   });
//   await chorus.subscribe("lobby", (msg) => console.log(msg.offset, msg.data));
//   const { offset } = await chorus.publish("lobby", { text: "hi" });
//
// What it takes care of:
// - tokens: `token` is a JWT, or a function returning one (or a promise of
//   one), called for every connection and before the token in use expires:
//   the fresh one is handed to the node (`refresh`), so the connection and
//   its rooms carry on; with a fixed string the node closes the connection
//   at the token's `exp`;
// - reconnects with exponential backoff (0.5 s doubling to 10 s, with
//   jitter), reset only by a connection that lasted (so a node that refuses
//   the token, or closes at once, is not hammered), and after `after_ms`
//   when a draining node sends `reconnect`;
// - re-subscribes every room after a reconnect with `since` = the last
//   message it delivered, so a node in durable mode replays what was missed;
// - reports what it could not recover: `onGap(room, missed)` when offsets
//   jump (pubsub mode loses messages in outages; on Kafka, when a message's
//   `prev` is past the last offset it had, with `missed` null), `onReset(room)` when the
//   server answers `history_gone` (also sent as a `gap` frame when a node
//   could not fill a hole from history), the room's epoch changed, or its
//   offsets went back within one epoch — reload the room's state from your
//   backend then;
// - requests time out (default 10 s) and reject with the server's error. A
//   publish rejected with `outcome_unknown` (or `timeout`, or a connection
//   that closed before the answer) may have been delivered: retry it with
//   the same `key` so that it is delivered at most once.

export class ChorusError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

/** Seconds until a JWT's `exp` (read, not verified); undefined without one. */
function secondsLeft(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const { exp } = JSON.parse(atob(part));
    return typeof exp === "number" ? exp - Date.now() / 1000 : undefined;
  } catch {
    return undefined;
  }
}

/** A connection that stayed up this long resets the backoff. */
const STABLE_MS = 5000;


/** The offset up to which room `r` is complete when `f` arrives: after a
 * recovered replay, the recovering `ok`'s offset once `f` is past it. */
function completeUpTo(r, f) {
  if (r.upto === undefined || f.offset <= r.upto) return r.offset;
  const upto = r.upto;
  r.upto = undefined;
  return Math.max(r.offset, upto);
}

/** Whether messages of the room came between offset `had` and `f`. */
function missedBefore(f, had) {
  return f.prev === undefined ? f.offset > had + 1 : f.prev > had;
}

export class Chorus {
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? 10000;
    this.onStatus = options.onStatus ?? (() => {});
    this.onGap = options.onGap ?? (() => {});
    this.onReset = options.onReset ?? (() => {});
    this.rooms = new Map(); // room -> { handler, epoch, offset }
    this.pending = new Map(); // id -> { resolve, reject, timer }
    this.nextId = 1;
    this.backoffMs = 500;
    this.closedByUser = false;
    this.session = null;
    this.node = null;
    this.notReady();
    this.connect();
  }

  /** The current token: the fixed one, or a fresh one from the provider. */
  async freshToken() {
    return typeof this.token === "function" ? await this.token() : this.token;
  }

  /** Requests wait for the next `welcome` (they are sent once connected). */
  notReady() {
    this.ready = new Promise((resolve) => (this.markReady = resolve));
  }

  connect() {
    this.openedAt = undefined;
    this.freshToken().then(
      (token) => this.open(token),
      () => this.onClose(), // the provider failed: back off and ask again
    );
  }

  open(token) {
    if (this.closedByUser) return;
    const url = token ? `${this.url}${this.url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : this.url;
    const ws = new WebSocket(url, "chorus.v1");
    this.ws = ws;
    this.tokenInUse = token;
    ws.onmessage = (ev) => this.onFrame(JSON.parse(ev.data));
    // Once per socket: a refused upgrade (401, 503) may fire only `error`.
    let ended = false;
    ws.onclose = ws.onerror = () => {
      if (ended) return;
      ended = true;
      this.onClose();
    };
  }

  /** With a token provider, hands the node a fresh token before this one expires. */
  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (typeof this.token !== "function") return;
    const left = secondsLeft(this.tokenInUse);
    if (left === undefined) return;
    const margin = Math.min(30, left / 5);
    this.refreshTimer = setTimeout(() => this.refresh(), Math.max(0, left - margin) * 1000);
  }

  async refresh() {
    const ws = this.ws;
    try {
      const token = await this.freshToken();
      await this.request({ op: "refresh", token });
      if (ws !== this.ws) return;
      this.tokenInUse = token;
      this.scheduleRefresh();
    } catch (e) {
      // Refused or no answer: the node closes the connection at the old
      // token's expiry, and the reconnect asks the provider again.
    }
  }

  onFrame(f) {
    switch (f.op) {
      case "welcome":
        this.session = f.session;
        this.node = f.node;
        this.openedAt = Date.now();
        this.onStatus({ connected: true, node: f.node, session: f.session });
        this.markReady();
        this.scheduleRefresh();
        for (const room of this.rooms.keys()) this.resubscribe(room);
        break;
      case "message":
        this.deliver(f);
        break;
      case "gap": {
        // Messages up to f.offset are gone from the history: reload.
        const r = this.rooms.get(f.room);
        if (!r) break;
        r.epoch = f.epoch;
        r.offset = f.offset;
        this.onReset(f.room);
        break;
      }
      case "reconnect":
        this.onStatus({ connected: false, draining: true, afterMs: f.after_ms });
        setTimeout(() => this.ws.close(), f.after_ms);
        break;
      case "error":
      case "ok":
      case "pong": {
        const p = f.id !== undefined && this.pending.get(f.id);
        if (!p) break;
        this.pending.delete(f.id);
        clearTimeout(p.timer);
        if (f.op === "error") p.reject(new ChorusError(f.code, f.message));
        else p.resolve(f);
        break;
      }
    }
  }

  deliver(f) {
    const r = this.rooms.get(f.room);
    if (!r) return;
    if (r.epoch !== undefined && r.epoch !== f.epoch) {
      this.onReset(f.room);
    } else if (r.offset !== undefined && missedBefore(f, completeUpTo(r, f))) {
      // Kafka mode: offsets skip other rooms' records, `prev` says where
      // the room's previous message is, and how many were missed is unknown.
      this.onGap(f.room, f.prev === undefined ? f.offset - r.offset - 1 : null);
    } else if (r.offset !== undefined && f.offset <= r.offset) {
      // The server never sends an offset twice: the room's counter went
      // back without a new epoch (a broker that lost writes), so these are
      // new messages under reused offsets, not duplicates.
      this.onReset(f.room);
    }
    r.epoch = f.epoch;
    r.offset = f.offset;
    r.handler({ room: f.room, data: f.data, offset: f.offset, epoch: f.epoch, from: f.from });
  }

  onClose() {
    clearTimeout(this.refreshTimer);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      // A publish already sent may have been delivered.
      p.reject(p.op === "publish"
        ? new ChorusError("outcome_unknown", "connection closed before the answer")
        : new ChorusError("unavailable", "connection closed"));
    }
    this.pending.clear();
    if (this.closedByUser) return;
    if (this.openedAt !== undefined) this.notReady();
    // Only a connection that lasted resets the backoff: one refused at the
    // upgrade (a bad or expired token: 401) or closed at once keeps it growing.
    if (this.openedAt !== undefined && Date.now() - this.openedAt >= STABLE_MS) this.backoffMs = 500;
    this.openedAt = undefined;
    const wait = this.backoffMs * (0.5 + Math.random() / 2);
    this.backoffMs = Math.min(this.backoffMs * 2, 10000);
    this.onStatus({ connected: false, retryInMs: Math.round(wait) });
    setTimeout(() => this.connect(), wait);
  }

  async request(frame) {
    await this.ready;
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ChorusError("timeout", `no reply to ${frame.op} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer, op: frame.op });
      this.ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  /** Joins a room; `handler` gets every message after the current offset. */
  async subscribe(room, handler) {
    this.rooms.set(room, { handler, epoch: undefined, offset: undefined });
    const ok = await this.request({ op: "subscribe", room });
    const r = this.rooms.get(room);
    if (r && r.offset === undefined) {
      r.epoch = ok.epoch;
      r.offset = ok.offset;
    }
    return ok;
  }

  async resubscribe(room, attempt = 0) {
    const r = this.rooms.get(room);
    if (!r) return;
    const ws = this.ws;
    const frame = { op: "subscribe", room };
    if (r.epoch !== undefined) frame.since = { epoch: r.epoch, offset: r.offset };
    try {
      const ok = await this.request(frame);
      if (frame.since && ok.recovered === true) {
        // The replay follows the ok; after it the room is complete up to
        // ok.offset (on Kafka the last replayed offset may be lower).
        r.upto = ok.offset;
        return;
      }
      if (frame.since) this.onReset(room); // history_gone: reload the room's state
      r.epoch = ok.epoch;
      r.offset = ok.offset;
    } catch (e) {
      // The node's broker is briefly away (a Redis failover): the
      // connection stays, so try again on it, backing off. Anything else
      // waits for the next reconnect.
      const open = (ws.readyState ?? 1) === 1;
      if (e.code === "unavailable" && open && this.ws === ws && this.rooms.has(room)) {
        const delay = Math.min(250 * 2 ** attempt, 5000);
        setTimeout(() => {
          if (this.ws === ws) this.resubscribe(room, attempt + 1);
        }, delay);
      }
    }
  }

  async unsubscribe(room) {
    this.rooms.delete(room);
    return this.request({ op: "unsubscribe", room });
  }

  /**
   * Publishes; resolves with `{offset, epoch}`. `key` makes it idempotent:
   * after a rejection with code `outcome_unknown` or `timeout`, publishing
   * again with the same key delivers it at most once.
   */
  async publish(room, data, { key } = {}) {
    const frame = { op: "publish", room, data };
    if (key !== undefined) frame.key = key;
    const ok = await this.request(frame);
    return { offset: ok.offset, epoch: ok.epoch };
  }

  close() {
    this.closedByUser = true;
    clearTimeout(this.refreshTimer);
    this.ws?.close();
  }
}
