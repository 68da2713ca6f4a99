// A Socket.IO 4 node with @socket.io/redis-adapter, for chorus-bench.
// What a typical deployment of the peer looks like: WebSocket transport
// only, no compression, one Socket.IO room per chat room, broadcasts across
// nodes through Redis Pub/Sub.
//
//   PORT=8000 REDIS_URL=redis://127.0.0.1:6379 node server.js
//
// Client events: "join" (room, ack) joins a room; "publish" (room, data,
// ack) broadcasts `message` (data) to the room on every node and acks.
"use strict";
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

async function main() {
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const server = http.createServer();
  const io = new Server(server, {
    adapter: createAdapter(pub, sub),
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
  });
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      socket.join(room);
      if (typeof ack === "function") ack("ok");
    });
    socket.on("publish", (room, data, ack) => {
      io.to(room).emit("message", data);
      if (typeof ack === "function") ack("ok");
    });
  });
  server.listen(Number(process.env.PORT), "127.0.0.1", () => {
    console.log(`listening on ${process.env.PORT}`);
  });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
