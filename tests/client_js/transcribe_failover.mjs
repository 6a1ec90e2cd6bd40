// streamplex.js under Node, a live transcription through nginx while the test kills the node holding it: it prints the
// node it is on, pushes 16 kHz s16le PCM at twice real time, prints {"final":1} at the first final (the test kills the
// node then), and prints one JSON report of every chunk it received once the stream ended.
// Usage: node transcribe_failover.mjs WS_URL API_KEY PCM_FILE
import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { Client } from "../../client_js/streamplex.js";

const [url, apiKey, pcmPath] = process.argv.slice(2);
const pcm = new Uint8Array(readFileSync(pcmPath));
const client = new Client(url, { apiKey, WebSocketImpl: WebSocket, backoff: [100, 1000], maxRetries: 20, inputBuffer: 1 << 20 });
const ready = await client.connect();
console.log(JSON.stringify({ node: ready.node }));

const sub = client.subscribe("transcription", { language: "en" }, { id: "live" });
await sub.opened;
let maxHeld = 0;
const push = async () => {
  const frame = 6400; // 200 ms
  const started = performance.now();
  for (let i = 0; i < pcm.length; i += frame) {
    const due = started + (i / 2 / 16000 / 2) * 1000;
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, due - performance.now())));
    await sub.push(pcm.subarray(i, i + frame));
    maxHeld = Math.max(maxHeld, sub._input.length);
  }
  await sub.end();
};
const read = async () => {
  const out = [];
  for await (const chunk of sub) {
    out.push(chunk.data);
    if (chunk.data.type === "final" && out.filter((d) => d.type === "final").length === 1) console.log(JSON.stringify({ final: 1 }));
  }
  return out;
};
const [, chunks] = await Promise.all([push(), read()]);
console.log(JSON.stringify({ chunks, reason: sub.reason, resumes: client.resumes, restarts: sub.restarts, max_held: maxHeld, node: client.ready?.node ?? null }));
client.close();
