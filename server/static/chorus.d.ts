// TypeScript declarations for the Chorus browser client, served by every
// node at /chorus.d.ts beside /chorus.js (protocol v1).
//
//   // @deno-types="https://chat.example.com/chorus.d.ts"   (Deno finds it by itself)
//   import { Chorus } from "https://chat.example.com/chorus.js";

/** A message delivered to a room's handler. */
export interface ChorusMessage {
  room: string;
  /** The JSON the publisher sent. */
  data: unknown;
  /** The room's offset: +1 per message, the same on every node. */
  offset: number;
  /** Changes only when the room's counter was lost. */
  epoch: string;
  /** The publisher's session; absent for HTTP publishes. */
  from?: string;
}

/** The server's `ok` reply to a subscribe. */
export interface SubscribeOk {
  op: "ok";
  id: number;
  /** The room's last offset: the handler gets the messages after it. */
  offset: number;
  epoch: string;
  /** With `since` (after a reconnect): whether everything missed follows. */
  recovered?: boolean;
  missed?: number;
  /** `history_gone`: the missed messages are not kept. */
  code?: string;
}

/** What `onStatus` is told. */
export type ChorusStatus =
  | { connected: true; node: string; session: string }
  | { connected: false; draining: true; afterMs: number }
  | { connected: false; retryInMs: number };

export interface ChorusOptions {
  /**
   * JWT, when the node has auth on: a fixed one (the node closes the
   * connection at its `exp`), or a provider called for every connection and
   * before the token in use expires, whose fresh token is handed to the node
   * (`refresh`) so that the connection and its rooms carry on.
   */
  token?: string | (() => string | Promise<string>);
  /** How long a request waits for its reply (default 10000). */
  timeoutMs?: number;
  onStatus?: (status: ChorusStatus) => void;
  /** Offsets jumped: `missed` messages were lost (pubsub mode); on Kafka a
   * message's `prev` was past the last offset seen, and `missed` is null. */
  onGap?: (room: string, missed: number | null) => void;
  /** The room's history is gone or its epoch changed: reload its state. */
  onReset?: (room: string) => void;
}

/** A request the server refused (`code` as in the protocol), or `timeout`. */
export class ChorusError extends Error {
  constructor(code: string, message: string);
  code: string;
}

export class Chorus {
  constructor(url: string, options?: ChorusOptions);
  /** The session of the current connection (null before the first welcome). */
  session: string | null;
  /** The node serving the current connection. */
  node: string | null;
  /** Joins a room; `handler` gets every message after the current offset. */
  subscribe(room: string, handler: (message: ChorusMessage) => void): Promise<SubscribeOk>;
  unsubscribe(room: string): Promise<{ op: "ok"; id: number }>;
  /** Publishes; `key` makes it idempotent. */
  publish(room: string, data: unknown, options?: { key?: string }): Promise<{ offset: number; epoch: string }>;
  /**
   * Hands the node a fresh token from the provider now (done by itself
   * before the token in use expires). Never rejects: a refused token leaves
   * the connection to end at the old token's `exp`, and the reconnect asks
   * the provider again.
   */
  refresh(): Promise<void>;
  /** Closes the connection for good (no reconnect). */
  close(): void;
}
