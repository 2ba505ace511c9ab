// A corral lb policy program in Node.js: "canary" routing over CLBP/1 (ZeroMQ).
//
// The lb starts this program with CORRAL_LB_POLICY_ENDPOINT (a ZeroMQ endpoint to connect a
// DEALER socket to) and CORRAL_LB_SERVICE in its environment. Every message is three frames:
// "CLBP1", a command, a JSON object. See docs/drivers/lb.md for the protocol.
//
// POLICY_MODE=pick (default): the lb asks PICK per connection and waits a few milliseconds;
//   we send 1 client in CANARY_EVERY (by client port) to a backend whose id contains
//   "canary", everyone else to the first other healthy backend (by id).
// POLICY_MODE=weights: we push a weights table whenever the backends change: canaries get
//   weight 1, the others CANARY_EVERY - 1. Both data planes (proxy and nft) apply it.
"use strict";

const zmq = require("zeromq");

const endpoint = process.env.CORRAL_LB_POLICY_ENDPOINT;
const mode = process.env.POLICY_MODE || "pick";
const every = Number(process.env.CANARY_EVERY || 10);

let backends = [];

function healthy() {
  return backends.filter((b) => b.state === "healthy").sort((a, b) => (a.id < b.id ? -1 : 1));
}

function choose(client) {
  const live = healthy();
  const canaries = live.filter((b) => b.id.includes("canary"));
  const stable = live.filter((b) => !b.id.includes("canary"));
  const port = Number(String(client).split(":").pop()) || 0;
  if (canaries.length && (port % every === 0 || !stable.length)) return canaries[0].id;
  return stable.length ? stable[0].id : null;
}

function weights() {
  const table = {};
  for (const b of backends) table[b.id] = b.id.includes("canary") ? 1 : every - 1;
  return table;
}

async function main() {
  if (!endpoint) throw new Error("CORRAL_LB_POLICY_ENDPOINT is not set: run me from corral lb");
  const sock = new zmq.Dealer({ linger: 0 });
  sock.connect(endpoint);
  const send = (command, body) => sock.send(["CLBP1", command, JSON.stringify(body)]);
  await send("HELLO", { mode, name: "canary.js" });
  for await (const [signature, command, raw] of sock) {
    if (signature.toString() !== "CLBP1") continue;
    const cmd = command.toString();
    const body = JSON.parse(raw.toString());
    if (cmd === "WELCOME" || cmd === "BACKENDS") {
      backends = body.backends;
      if (mode === "weights") await send("WEIGHTS", { weights: weights() });
    } else if (cmd === "PICK") {
      await send("PICKED", { seq: body.seq, backend: choose(body.client) });
    }
  }
}

process.on("SIGTERM", () => process.exit(0));
main().catch((err) => {
  console.error(`policy.js: ${err.message}`);
  process.exit(1);
});
