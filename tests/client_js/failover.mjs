// streamplex.js under Node through nginx in front of several nodes: it prints the node it is on, reads a text and a data
// stream while the test kills that node, and prints one JSON report of what it received once both streams ended.
// Usage: node failover.mjs WS_URL[,WS_URL...] API_KEY TEXT_PARAMS_JSON DATA_PARAMS_JSON (several URLs: tried in turn)
import WebSocket from "ws";
import { Client } from "../../client_js/streamplex.js";

const [url, apiKey, textParams, dataParams] = process.argv.slice(2);
// A backoff longer than the test: the first attempt after the node's death must not wait it.
const client = new Client(url.includes(",") ? url.split(",") : url, { apiKey, WebSocketImpl: WebSocket, backoff: [90000, 90000], maxRetries: 20 });
const ready = await client.connect();
console.log(JSON.stringify({ node: ready.node }));

const collect = async (sub) => {
  const out = [];
  for await (const chunk of sub) out.push(chunk);
  return out;
};
const text = client.subscribe("text", JSON.parse(textParams), { id: "t" });
const data = client.subscribe("data", JSON.parse(dataParams), { id: "d" });
const [t, d] = await Promise.all([collect(text), collect(data)]);
const seqsInOrder = (chunks) => chunks.every((c, i) => c.seq === i);
console.log(JSON.stringify({
  text: t.map((c) => c.data).join(""),
  data: d.map((c) => c.data).join(""),
  seqs_in_order: seqsInOrder(t) && seqsInOrder(d),
  reasons: [text.reason ?? null, data.reason ?? null],
  resumes: client.resumes,
  restarts: text.restarts + data.restarts,
  node: client.ready?.node ?? null,
}));
client.close();
