// streamplex.js under Node (the `ws` package stands in for the browser's WebSocket) against the live server.
// Usage: node client.mjs WS_URL API_KEY. Prints one JSON report on stdout.
import WebSocket from "ws";
import { AuthenticationError, Client, decodeBinary, encodePush, StreamplexError } from "../../client_js/streamplex.js";

const [url, apiKey] = process.argv.slice(2);
const report = {};
const TEXT = "One socket, many streams. Chunks keep their order.";

const client = new Client(url, { apiKey, WebSocketImpl: WebSocket, heartbeatMs: 500, heartbeatTimeoutMs: 5000 });
const ready = await client.connect();
report.ready = ready.op;

const collect = async (sub) => { const out = []; for await (const chunk of sub) out.push(chunk); return out; };
const [words, chars] = await Promise.all([
  collect(client.subscribe("text", { text: TEXT, unit: "words", chunk_size: 2 })),
  collect(client.subscribe("text", { text: TEXT, unit: "chars", chunk_size: 7 })),
]);
report.words = words.map((c) => c.data).join("");
report.chars = chars.map((c) => c.data).join("");
report.seqs_in_order = chars.every((c, i) => c.seq === i);

try {
  await collect(client.subscribe("text", { text: "x", unit: "lines" }));
} catch (error) {
  report.invalid = { isTyped: error instanceof StreamplexError, code: error.code, field: error.details?.[0]?.field };
}

const audio = await collect(client.subscribe("audio", { source: "speech.wav", sample_rate: 16000, realtime: false }));
report.audio = { info: audio[0].data.sample_rate, binaryBytes: audio.filter((c) => c.binary).reduce((n, c) => n + c.data.byteLength, 0), last: audio.at(-1).data };

let seen = 0;
for await (const chunk of client.subscribe("metrics", { interval_ms: 100 })) {
  seen += chunk.data.cpu ? 1 : 0;
  if (seen === 2) break; // leaving the loop unsubscribes
}
report.metrics_seen = seen;

const pushErrors = [];
const sub = client.subscribe("metrics", { interval_ms: 1000 }, { onChunk: () => {}, onError: (error) => pushErrors.push(error.code) });
await sub.opened;
sub.push(new Uint8Array([1, 2, 3]));
sub.push({ hello: 1 });
await new Promise((resolve) => setTimeout(resolve, 1000));
sub.cancel();
report.push_errors = pushErrors;

const frame = encodePush("s1", new Uint8Array([0x00, 0x01, 0xff, 0xfe]));
report.encoded = Buffer.from(frame).toString("hex");
const server = new Uint8Array([2, 0x61, 0x31, 0, 0, 0, 5, 0xff, 0xd8]);
const decoded = decodeBinary(server.buffer);
report.decoded = { id: decoded.id, seq: decoded.seq, payload: Buffer.from(decoded.payload).toString("hex") };

// A dropped socket (1006): the client reconnects with backoff and resumes its session: the text goes on with
// nothing lost or repeated.
const wordList = Array.from({ length: 60 }, (_, i) => `w${i}`).join(" ");
const story = client.subscribe("text", { text: wordList, unit: "words", chunk_size: 1, interval_ms: 20 });
const got = [];
for await (const chunk of story) {
  got.push(chunk);
  if (got.length === 10) client._ws.terminate();
}
report.reconnect = {
  intact: got.map((c) => c.data).join("") === wordList && got.every((c, i) => c.seq === i),
  restarts: story.restarts, reconnects: client.reconnects, resumes: client.resumes, state: client.state,
};

report.ping_ms = await client.ping();
await new Promise((resolve) => setTimeout(resolve, 1200)); // heartbeats keep flowing
report.state_after_heartbeats = client.state;
client.close();

try {
  await new Client(url, { apiKey: "wrong", WebSocketImpl: WebSocket }).connect();
} catch (error) {
  report.wrong_key = { isAuth: error instanceof AuthenticationError, closeCode: error.closeCode };
}
console.log(JSON.stringify(report));
