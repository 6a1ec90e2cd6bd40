// streamplex.js retrying refused subscribes by itself, against a server whose key may send 2 ops/s (bursts of 1).
// Usage: node retry.mjs WS_URL API_KEY. Prints one JSON report on stdout.
import WebSocket from "ws";
import { Client, StreamplexError } from "../../client_js/streamplex.js";

const [url, apiKey] = process.argv.slice(2);
const TEXT = "Refused at first, sent again after retry_after, complete in the end.";
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const collect = async (sub) => { const out = []; for await (const chunk of sub) out.push(chunk.data); return out.join(""); };
const report = {};

let client = new Client(url, { apiKey, WebSocketImpl: WebSocket, heartbeatMs: 0 });
await client.connect();
const started = performance.now();
const subs = [0, 1, 2].map(() => client.subscribe("text", { text: TEXT, unit: "words", chunk_size: 4 }));
const texts = await Promise.all(subs.map(collect));
report.retried = { complete: texts.every((t) => t === TEXT), retries: subs.reduce((n, s) => n + s.retries, 0), ms: performance.now() - started };
client.close();

report.refused = [];
for (const retry of [false, { maxAttempts: 0 }, { maxWaitMs: 10 }]) {
  await sleep(1100); // the key's allowance refills between rounds
  client = new Client(url, { apiKey, WebSocketImpl: WebSocket, heartbeatMs: 0, retry });
  await client.connect();
  const first = client.subscribe("text", { text: TEXT, unit: "words" });
  const second = client.subscribe("text", { text: TEXT, unit: "words" });
  try {
    await second.opened;
    report.refused.push({ opened: true });
  } catch (error) {
    report.refused.push({ typed: error instanceof StreamplexError, code: error.code, retryAfter: error.retryAfter, retries: second.retries });
  }
  report.refused.at(-1).first = await collect(first);
  client.close();
}
console.log(JSON.stringify(report));
