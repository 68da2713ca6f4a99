// The bundled browser client (/chorus.js) against a scripted WebSocket:
// what it tells the app when a room's offsets misbehave, and how a publish
// without an answer is rejected. Run by `cargo test` (server/tests/chorus_js.rs).
import assert from "node:assert/strict";
import { test } from "node:test";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {}
  receive(frame) {
    this.onmessage({ data: JSON.stringify(frame) });
  }
}
globalThis.WebSocket = FakeSocket;
const { Chorus } = await import(new URL("../../static/chorus.js", import.meta.url));

const settle = () => new Promise((resolve) => setImmediate(resolve));

/** A client welcomed on a fresh socket, subscribed to `room` at e1/10. */
async function subscribed(room) {
  const seen = { messages: [], resets: [], gaps: [] };
  const chorus = new Chorus("ws://test/ws", {
    onReset: (r) => seen.resets.push(r),
    onGap: (r, missed) => seen.gaps.push([r, missed]),
  });
  await settle(); // the socket opens once the token is known (it may come from a provider)
  const ws = FakeSocket.all.at(-1);
  ws.receive({ op: "welcome", session: "s", node: "n", version: "0" });
  const done = chorus.subscribe(room, (m) => seen.messages.push(m.offset));
  await settle();
  ws.receive({ op: "ok", id: ws.sent.at(-1).id, offset: 10, epoch: "e1" });
  await done;
  return { chorus, ws, seen };
}

test("offsets that go back within an epoch are new messages and a reset, not duplicates", async () => {
  const { chorus, ws, seen } = await subscribed("r");
  ws.receive({ op: "message", room: "r", data: 1, offset: 11, epoch: "e1" });
  ws.receive({ op: "message", room: "r", data: 2, offset: 6, epoch: "e1" });
  ws.receive({ op: "message", room: "r", data: 3, offset: 7, epoch: "e1" });
  assert.deepEqual(seen.messages, [11, 6, 7]);
  assert.deepEqual(seen.resets, ["r"]);
  assert.deepEqual(seen.gaps, []);
  chorus.close();
});

test("on Kafka, prev tells a gap apart from other rooms' offsets", async () => {
  const { chorus, ws, seen } = await subscribed("r");
  ws.receive({ op: "message", room: "r", data: 1, offset: 15, epoch: "e1", prev: 10 });
  ws.receive({ op: "message", room: "r", data: 2, offset: 19, epoch: "e1", prev: 15 });
  assert.deepEqual(seen.gaps, []);
  ws.receive({ op: "message", room: "r", data: 3, offset: 30, epoch: "e1", prev: 25 });
  assert.deepEqual(seen.gaps, [["r", null]]);
  assert.deepEqual(seen.messages, [15, 19, 30]);
  assert.deepEqual(seen.resets, []);
  chorus.close();
});

test("on Kafka, after a recovered replay the room is complete up to the ok's offset", async () => {
  const { chorus, ws, seen } = await subscribed("r");
  ws.receive({ op: "message", room: "r", data: 1, offset: 12, epoch: "e1", prev: 10 });
  ws.onclose();
  await new Promise((resolve) => setTimeout(resolve, 1200)); // the reconnect's backoff
  const again = FakeSocket.all.at(-1);
  again.receive({ op: "welcome", session: "s2", node: "n", version: "0" });
  await settle();
  const sub = again.sent.find((f) => f.op === "subscribe");
  assert.deepEqual(sub.since, { epoch: "e1", offset: 12 });
  again.receive({ op: "ok", id: sub.id, offset: 30, epoch: "e1", recovered: true, missed: 1 });
  await settle();
  again.receive({ op: "message", room: "r", data: 2, offset: 20, epoch: "e1", prev: 12 });
  // Live: its room's previous record is before 30, where the replay ended.
  again.receive({ op: "message", room: "r", data: 3, offset: 35, epoch: "e1", prev: 30 });
  assert.deepEqual(seen.messages, [12, 20, 35]);
  assert.deepEqual(seen.gaps, []);
  assert.deepEqual(seen.resets, []);
  chorus.close();
});

test("a gap frame is a reset, and the next message follows it", async () => {
  const { chorus, ws, seen } = await subscribed("r");
  ws.receive({ op: "gap", room: "r", epoch: "e1", offset: 40, code: "history_gone" });
  ws.receive({ op: "message", room: "r", data: 1, offset: 41, epoch: "e1" });
  assert.deepEqual(seen.resets, ["r"]);
  assert.deepEqual(seen.gaps, []);
  assert.deepEqual(seen.messages, [41]);
  chorus.close();
});

test("a publish whose answer never comes rejects with outcome_unknown", async () => {
  const { chorus, ws } = await subscribed("r");
  const published = chorus.publish("r", { text: "hi" }, { key: "k-1" });
  await settle();
  assert.equal(ws.sent.at(-1).key, "k-1");
  chorus.close();
  ws.onclose();
  await assert.rejects(published, (e) => e.code === "outcome_unknown");
});

test("a re-subscription answered unavailable is sent again on the same connection", async () => {
  const { chorus, ws } = await subscribed("r");
  ws.receive({ op: "message", room: "r", data: 1, offset: 11, epoch: "e1" });
  // After a reconnect the client re-subscribes with `since`; the node's
  // broker is failing over and answers unavailable.
  chorus.resubscribe("r");
  await settle();
  const first = ws.sent.at(-1);
  assert.deepEqual([first.op, first.since], ["subscribe", { epoch: "e1", offset: 11 }]);
  ws.receive({ op: "error", id: first.id, code: "unavailable", message: "retry" });
  await new Promise((resolve) => setTimeout(resolve, 400));
  const again = ws.sent.at(-1);
  assert.notEqual(again.id, first.id, "sent again");
  assert.deepEqual([again.op, again.since], ["subscribe", { epoch: "e1", offset: 11 }]);
  chorus.close();
});
