// Drives the bundled browser client (server/static/chorus.js) against a
// node with client auth on, for server/tests/tokens.rs. Prints one JSON line.
//
//   node tokens.mjs refresh|backoff <ws url> <http base url> <jwt secret>
import { createHmac } from "node:crypto";
import { Chorus } from "../../static/chorus.js";

const [mode, url, base, secret] = process.argv.slice(2);

function jwt(claims) {
  const part = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const signed = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}
const now = () => Math.floor(Date.now() / 1000);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const done = (result) => {
  console.log(JSON.stringify(result));
  process.exit(0);
};
setTimeout(() => done({ error: "timed out" }), 20000);

if (mode === "refresh") {
  // Every token lives 4 s: the client hands the node a fresh one before
  // each expires, and keeps its connection and its room past the first.
  let issued = 0;
  let firstExp;
  const sessions = [];
  const got = [];
  const chorus = new Chorus(url, {
    token: async () => {
      issued += 1;
      const exp = now() + 4;
      firstExp ??= exp;
      return jwt({ sub: "u", exp });
    },
    onStatus: (s) => s.connected && sessions.push(s.session),
  });
  await chorus.subscribe("r", (m) => got.push(m.data));
  while (Date.now() / 1000 < firstExp + 1) await sleep(50);
  await fetch(`${base}/api/v1/rooms/r/messages`, {
    method: "POST",
    body: JSON.stringify({ data: "after the first token expired" }),
  });
  while (got.length === 0) await sleep(20);
  done({ sessions, issued, got });
} else if (mode === "backoff") {
  // A token that expired a second ago, every time: each attempt is refused,
  // and the client must wait longer and longer.
  const seen = [];
  new Chorus(url, {
    token: jwt({ sub: "u", exp: now() - 1 }),
    onStatus: (s) => {
      seen.push(s.connected ? "connected" : s.retryInMs);
      if (seen.length === 4) done({ seen });
    },
  });
} else {
  done({ error: `unknown mode ${mode}` });
}
