// The dashboard: one socket (streamplex.js), one panel per channel, forms built from the channels' JSON Schemas (GET /channels).
import { AuthenticationError, Client } from "/client/streamplex.js";

const KEY_STORAGE = "streamplex.apiKey";
const LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"];
const SAMPLE_TEXT = "Streamplex multiplexes many streams over one socket. Each chunk arrives in order. The dashboard shows them live.";

// Values the forms start with, so that every panel does something useful at once; the user edits them freely.
const PRESETS = {
  text: { text: SAMPLE_TEXT, unit: "words", chunk_size: 2, interval_ms: 50 },
  data: { records: [{ id: 1, city: "Paris", temp: 11.5 }, { id: 2, city: "Lagos", temp: 29.1 }, { id: 3, city: "Oslo", temp: -3.2 }], format: "ndjson", chunk_size: 1 },
  logs: { lines: 50, level: "INFO" },
  metrics: { interval_ms: 1000 },
  chat: { message: "What is the capital of France?", max_tokens: 48 },
  audio: { source: "speech.wav", format: "f32le", sample_rate: 22050 },
  video: { source: "counter.mp4", width: 320, fps: 10 },
  transcription: { source: "speech.wav" },
  translation: { text: "The cat is black. I like apples.", source_lang: "en", target_lang: "es" },
  analysis: { content: "Barack Obama visited Paris on Monday. He loved the city and praised its museums." },
};
const LONG_TEXT = new Set(["text", "content", "message", "system"]);

const $ = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
};

// ---- schema-driven forms --------------------------------------------------------------------

function resolve(schema, root) {
  if (schema?.$ref) return resolve(root.$defs?.[schema.$ref.split("/").pop()] ?? {}, root);
  if (schema?.anyOf) {
    const branches = schema.anyOf.filter((b) => b.type !== "null");
    if (branches.length === 1) return { ...resolve(branches[0], root), nullable: true, description: schema.description, default: schema.default };
  }
  return schema ?? {};
}

function field(name, raw, root, preset) {
  const schema = resolve(raw, root);
  const initial = preset !== undefined ? preset : schema.default;
  const id = `f-${Math.random().toString(36).slice(2)}`;
  let input;
  let read;
  const items = schema.items ? resolve(schema.items, root) : null;
  if (schema.enum) {
    input = $("select", { id, name });
    if (schema.nullable || initial === undefined || initial === null) input.append($("option", { value: "", text: "(default)" }));
    for (const value of schema.enum) input.append($("option", { value: JSON.stringify(value), text: String(value) }));
    if (initial !== undefined && initial !== null) input.value = JSON.stringify(initial);
    read = () => (input.value === "" ? undefined : JSON.parse(input.value));
  } else if (schema.type === "boolean") {
    input = $("input", { id, name, type: "checkbox" });
    input.checked = Boolean(initial);
    read = () => input.checked;
  } else if (schema.type === "integer" || schema.type === "number") {
    input = $("input", { id, name, type: "number", step: schema.type === "integer" ? "1" : "any" });
    if (schema.minimum !== undefined) input.min = schema.minimum;
    if (schema.maximum !== undefined) input.max = schema.maximum;
    if (initial !== undefined && initial !== null) input.value = initial;
    read = () => (input.value === "" ? undefined : Number(input.value));
  } else if (schema.type === "array" && items?.enum) {
    input = $("select", { id, name, multiple: "" });
    for (const value of items.enum) input.append($("option", { value: JSON.stringify(value), text: String(value) }));
    read = () => {
      const chosen = [...input.selectedOptions].map((o) => JSON.parse(o.value));
      return chosen.length ? chosen : undefined;
    };
  } else if (schema.type === "string") {
    const long = LONG_TEXT.has(name) || (schema.maxLength ?? 0) > 1000;
    input = long ? $("textarea", { id, name, rows: "3" }) : $("input", { id, name, type: "text" });
    if (initial !== undefined && initial !== null) input.value = initial;
    read = () => (input.value === "" ? undefined : input.value);
  } else {
    input = $("textarea", { id, name, rows: "3", placeholder: "JSON" });
    if (initial !== undefined && initial !== null) input.value = JSON.stringify(initial);
    read = () => (input.value.trim() === "" ? undefined : JSON.parse(input.value));
  }
  input.title = schema.description ?? raw.description ?? "";
  return { name, label: $("label", { for: id, text: name, title: input.title }), input, read };
}

function buildForm(channel) {
  const root = channel.params;
  const preset = PRESETS[channel.name] ?? {};
  const fields = Object.entries(root.properties ?? {}).map(([name, raw]) => field(name, raw, root, preset[name]));
  const form = $("form", { class: "params-form" });
  for (const f of fields) form.append(f.label, f.input);
  const read = () => {
    const params = {};
    for (const f of fields) {
      const value = f.read();
      if (value !== undefined) params[f.name] = value;
    }
    return params;
  };
  return { form, read };
}

// ---- renderers: what a panel does with its stream's chunks ----------------------------------------

function lineChart(title) {
  const canvas = $("canvas", { width: "300", height: "90" });
  const caption = $("figcaption", { text: title });
  const values = [];
  const draw = (value, unit = "") => {
    values.push(value);
    if (values.length > 60) values.shift();
    const ctx = canvas.getContext("2d");
    const max = Math.max(1, ...values);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#2a6fdb";
    ctx.lineWidth = 2;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / 59) * canvas.width;
      const y = canvas.height - (v / max) * (canvas.height - 6) - 3;
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
    caption.textContent = `${title}: ${value.toFixed(1)}${unit}`;
  };
  return { node: $("figure", {}, canvas, caption), draw };
}

const RENDERERS = {
  metrics(out) {
    const cpu = lineChart("CPU");
    const mem = lineChart("memory");
    const net = lineChart("network in+out");
    const frames = lineChart("frames out");
    const gpu = lineChart("GPU");
    const charts = $("div", { class: "charts" }, cpu.node, mem.node, net.node, frames.node);
    const counters = $("div", { class: "status" });
    out.replaceChildren(charts, counters);
    return (chunk) => {
      const m = chunk.data;
      if (m.cpu) cpu.draw(m.cpu.percent, " %");
      if (m.memory) mem.draw(m.memory.percent, " %");
      if (m.network) net.draw((m.network.recv_bytes_per_s + m.network.sent_bytes_per_s) / 1024, " KiB/s");
      if (m.server) frames.draw(m.server.frames_out_per_s, "/s");
      const devices = m.gpu?.devices ?? [];
      if (devices.length) {
        if (!gpu.node.isConnected) charts.append(gpu.node);
        gpu.draw(devices[0].utilization_percent ?? 0, " %");
      }
      if (m.server) counters.textContent = `connections ${m.server.connections} · streams ${JSON.stringify(m.server.streams)} · errors ${m.server.errors_total}`;
    };
  },
  logs(out, panel) {
    const filter = $("select", { class: "level-filter", title: "show records at or above" });
    for (const level of LEVELS) filter.append($("option", { value: level, text: level }));
    filter.value = "INFO";
    const rows = $("div");
    const apply = () => {
      const floor = LEVELS.indexOf(filter.value);
      for (const row of rows.children) row.hidden = LEVELS.indexOf(row.dataset.level) < floor;
    };
    filter.addEventListener("change", apply);
    panel.querySelector(".controls").append($("label", { text: "show " }, filter));
    out.replaceChildren(rows);
    return (chunk) => {
      const r = chunk.data;
      const row = $("div", { class: `log-row ${r.level}`, text: `${String(r.time).slice(11, 23)} ${r.level} ${r.logger}: ${r.message}` });
      row.dataset.level = r.level;
      row.hidden = LEVELS.indexOf(r.level) < LEVELS.indexOf(filter.value);
      rows.append(row);
      while (rows.children.length > 500) rows.firstChild.remove();
      out.scrollTop = out.scrollHeight;
    };
  },
  chat(out) {
    out.replaceChildren($("div", { class: "reply" }));
    return (chunk) => {
      const d = chunk.data;
      const reply = [...out.querySelectorAll(".reply")].at(-1); // a pushed turn opens a new reply
      if (d.queued !== undefined) reply.dataset.queued = d.queued;
      if (d.delta) reply.append(d.delta);
      if (d.finish_reason) out.append($("div", { class: "status", text: `[${d.finish_reason}, ${d.usage?.completion_tokens ?? "?"} tokens]` }));
    };
  },
  text(out) {
    out.textContent = "";
    return (chunk) => { out.append(chunk.data); };
  },
  data(out, panel, params) {
    if ((params.format ?? "ndjson") !== "ndjson") {
      out.textContent = "";
      return (chunk) => { out.append(chunk.data); };
    }
    const table = $("table");
    const head = $("tr");
    table.append($("thead", {}, head), $("tbody"));
    const columns = [];
    let carry = "";
    out.replaceChildren(table);
    return (chunk) => {
      const lines = (carry + chunk.data).split("\n");
      carry = lines.pop();
      for (const line of lines.filter(Boolean)) {
        const record = JSON.parse(line);
        const row = $("tr");
        if (record && typeof record === "object" && !Array.isArray(record)) {
          for (const key of Object.keys(record)) if (!columns.includes(key)) { columns.push(key); head.append($("th", { text: key })); }
          for (const key of columns) row.append($("td", { text: record[key] === undefined ? "" : typeof record[key] === "object" ? JSON.stringify(record[key]) : String(record[key]) }));
        } else {
          row.append($("td", { text: JSON.stringify(record) }));
        }
        table.tBodies[0].append(row);
      }
    };
  },
  audio(out, panel, params) {
    const status = $("div", { class: "status", text: "waiting for audio" });
    out.replaceChildren(status);
    let info = null;
    let context = null;
    let at = 0;
    let played = 0;
    let skipHeader = params.format === "wav";
    return (chunk) => {
      if (!chunk.binary) {
        if (chunk.data.sample_rate) {
          info = chunk.data;
          context = new AudioContext({ sampleRate: info.sample_rate });
          at = context.currentTime + 0.1;
        }
        return;
      }
      if (skipHeader) { skipHeader = false; return; }
      if (!context) return;
      const bytes = chunk.data;
      const channels = info.channels;
      const float = info.sample_format === "f32le";
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const width = float ? 4 : 2;
      const frames = bytes.byteLength / width / channels;
      const buffer = context.createBuffer(channels, frames, info.sample_rate);
      for (let c = 0; c < channels; c++) {
        const data = buffer.getChannelData(c);
        for (let i = 0; i < frames; i++) {
          const offset = (i * channels + c) * width;
          data[i] = float ? view.getFloat32(offset, true) : view.getInt16(offset, true) / 32768;
        }
      }
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(context.destination);
      at = Math.max(at, context.currentTime);
      source.start(at);
      at += buffer.duration;
      played += buffer.duration;
      status.textContent = `playing: ${played.toFixed(1)} s of ${info.channels}-channel audio at ${info.sample_rate} Hz`;
      status.dataset.seconds = played.toFixed(2);
    };
  },
  video(out) {
    const canvas = $("canvas", { class: "video", width: "320", height: "240" });
    const status = $("div", { class: "status" });
    out.replaceChildren(canvas, status);
    let frames = 0;
    return async (chunk) => {
      if (!chunk.binary) {
        if (chunk.data.width) { canvas.width = chunk.data.width; canvas.height = chunk.data.height; }
        return;
      }
      const bitmap = await createImageBitmap(new Blob([chunk.data], { type: "image/jpeg" }));
      canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
      bitmap.close();
      frames += 1;
      status.textContent = `${frames} frames`;
      status.dataset.frames = frames;
    };
  },
  transcription(out) {
    const finals = $("span", { class: "final" });
    const partial = $("span", { class: "partial" });
    const meta = $("div", { class: "status" });
    out.replaceChildren($("div", {}, finals, partial), meta);
    return (chunk) => {
      const d = chunk.data;
      if (d.type === "final") { finals.append(d.text); partial.textContent = ""; }
      else if (d.type === "partial") partial.textContent = d.text;
      else if (d.type === "language") meta.textContent = `language: ${d.language}`;
      else if (d.type === "transcript") { finals.textContent = d.text; partial.textContent = ""; meta.textContent = `transcript (${d.language}, ${d.duration_s} s)`; }
    };
  },
  translation(out) {
    const text = $("div");
    const meta = $("div", { class: "status" });
    out.replaceChildren(text, meta);
    return (chunk) => {
      const d = chunk.data;
      if (d.delta !== undefined) text.append(d.delta);
      if (d.finish_reason) meta.textContent = `${d.backend} ${d.pair}: ${d.sentences} sentence(s) in ${d.duration_ms} ms`;
    };
  },
  analysis(out) {
    out.textContent = "";
    return (chunk) => {
      const d = chunk.data;
      if (d.section === "sentence") {
        const label = d.sentiment?.label;
        const entities = (d.entities ?? []).map((e) => `${e.text} (${e.label})`).join(", ");
        out.append($("div", { class: label ? `sentiment-${label}` : "", text: `#${d.index} ${label ?? ""} ${d.text}${entities ? "  · " + entities : ""}` }));
      } else if (d.section === "topics") {
        out.append($("div", { text: `topics: ${d.topics.slice(0, 3).map((t) => `${t.label} ${t.score.toFixed(2)}`).join(", ")}` }));
      } else if (d.section === "summary") {
        out.append($("div", { text: `summary: ${d.summary}` }));
      } else if (d.section === "aggregate") {
        out.append($("div", { class: "status", text: `overall: ${d.sentiment?.label ?? ""} · ${JSON.stringify(d.entities ?? {})}` }));
      } else {
        out.append($("div", { text: JSON.stringify(d) }));
      }
    };
  },
};

function generic(out) {
  out.textContent = "";
  return (chunk) => { out.append(chunk.binary ? `[${chunk.data.byteLength} bytes]\n` : JSON.stringify(chunk.data) + "\n"); };
}

// ---- the microphone: AudioWorklet -> 16 kHz s16le binary pushes -------------------------------------

async function startMicrophone(client, sub, setStatus) {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 } });
  let context;
  try {
    context = new AudioContext({ sampleRate: 16000 }); // the browser resamples the microphone itself where it can
    context.createMediaStreamSource(stream);
  } catch {
    context = new AudioContext(); // else the worklet resamples
  }
  await context.audioWorklet.addModule("/client/pcm-worklet.js");
  const source = context.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(context, "pcm-encoder");
  let sent = 0;
  node.port.onmessage = (event) => {
    if (sub.ended) return;
    // held until acknowledged (sent again after a resume on another node); a live microphone does not wait for room
    Promise.resolve(sub.push(event.data)).catch(() => {});
    sent += event.data.byteLength / 2;
    setStatus(`microphone: ${(sent / 16000).toFixed(1)} s sent (context at ${context.sampleRate} Hz)`);
  };
  source.connect(node);
  const [track] = stream.getAudioTracks();
  const stop = async () => {
    source.disconnect();
    node.port.onmessage = null;
    for (const t of stream.getTracks()) t.stop();
    await context.close();
    if (!sub.ended) sub.end();
  };
  track.addEventListener("ended", stop); // a fake capture file that plays once ends the track
  return stop;
}

// ---- panels -----------------------------------------------------------------------------------

function buildPanel(client, channel) {
  const panel = $("section", { class: "panel", id: `panel-${channel.name}` });
  panel.dataset.channel = channel.name;
  panel.dataset.status = channel.status;
  panel.dataset.state = "idle";
  const badge = $("span", { class: `badge ${channel.status}`, text: channel.status });
  panel.append($("h2", {}, channel.name, badge), $("p", { class: "summary", text: channel.summary }));
  if (channel.status !== "available") {
    panel.append($("p", { class: "error", text: channel.reason ?? "" }));
    return panel;
  }
  const { form, read } = buildForm(channel);
  const details = $("details", { class: "params" }, $("summary", { text: "params" }), form);
  details.open = !["metrics", "logs"].includes(channel.name);
  const start = $("button", { type: "button", class: "start", text: "Start" });
  const stopButton = $("button", { type: "button", class: "stop", text: "Stop", disabled: "" });
  const status = $("span", { class: "status" });
  const controls = $("div", { class: "controls" }, start, stopButton, status);
  const out = $("div", { class: "output" });
  out.dataset.chunks = "0";
  panel.append(details, controls, out);
  let current = null;
  let stopMic = null;

  const setStatus = (text, error = false) => {
    status.textContent = text;
    status.classList.toggle("error", error);
  };

  const run = async (params, { mic = false } = {}) => {
    current?.cancel();
    let handle = (RENDERERS[channel.name] ?? generic)(out, panel, params);
    out.dataset.chunks = "0";
    panel.dataset.state = "running";
    start.disabled = true;
    stopButton.disabled = false;
    setStatus("subscribing");
    const sub = client.subscribe(channel.name, params, { resume: ["metrics", "logs"].includes(channel.name) });
    current = sub;
    try {
      await sub.opened;
      setStatus("streaming");
      if (mic) stopMic = await startMicrophone(client, sub, setStatus);
      for await (const chunk of sub) {
        await handle(chunk);
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
      }
      panel.dataset.state = sub.reason === "unsubscribed" ? "stopped" : "done";
      setStatus(`ended: ${sub.reason}`);
    } catch (error) {
      panel.dataset.state = "error";
      setStatus(error.message, true);
      handle = null;
    } finally {
      if (stopMic) { await stopMic(); stopMic = null; }
      if (current === sub) current = null;
      start.disabled = false;
      stopButton.disabled = true;
    }
  };

  start.addEventListener("click", () => {
    let params;
    try {
      params = read();
    } catch (error) {
      setStatus(`bad JSON in a field: ${error.message}`, true);
      return;
    }
    run(params);
  });
  stopButton.addEventListener("click", () => {
    if (stopMic) { const stop = stopMic; stopMic = null; stop(); return; } // end the input: the final transcript follows
    current?.cancel();
  });
  if (channel.name === "chat") {
    // With keep_open, the conversation goes on: each turn typed here is pushed to the running stream.
    const turn = $("input", { type: "text", class: "turn", placeholder: "next turn (keep_open)" });
    const send = $("button", { type: "button", class: "send", text: "Send" });
    send.addEventListener("click", () => {
      if (!current || !turn.value.trim()) return;
      current.push(turn.value.trim());
      out.append($("div", { class: "status", text: `> ${turn.value.trim()}` }), $("div", { class: "reply" }));
      turn.value = "";
    });
    controls.append(turn, send);
  }
  if (channel.name === "transcription") {
    const micButton = $("button", { type: "button", class: "mic", text: "Microphone" });
    micButton.addEventListener("click", () => {
      const params = read();
      delete params.source;
      delete params.audio_url;
      run(params, { mic: true });
    });
    controls.insertBefore(micButton, stopButton);
  }
  if (channel.name === "metrics" || channel.name === "logs") queueMicrotask(() => start.click());
  return panel;
}

// ---- start-up ---------------------------------------------------------------------------------

function askKey(message = "") {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-error").textContent = message;
  dialog.showModal();
  return new Promise((resolve) => {
    document.getElementById("key-form").addEventListener("submit", () => resolve(document.getElementById("api-key").value.trim()), { once: true });
  });
}

async function main() {
  const stateLabel = document.getElementById("conn-state");
  const info = document.getElementById("conn-info");
  let error = "";
  let client;
  while (true) {
    let key = sessionStorage.getItem(KEY_STORAGE);
    if (!key) key = await askKey(error);
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
    client = new Client(url, { apiKey: key });
    client.addEventListener("state", (event) => {
      stateLabel.dataset.state = event.detail;
      stateLabel.textContent = event.detail;
    });
    client.addEventListener("ready", (event) => { info.textContent = `session ${event.detail.session} on ${event.detail.node}`; });
    try {
      await client.connect();
      sessionStorage.setItem(KEY_STORAGE, key);
      break;
    } catch (failure) {
      sessionStorage.removeItem(KEY_STORAGE);
      error = failure instanceof AuthenticationError ? "That key was refused." : failure.message;
    }
  }
  const forget = document.getElementById("forget-key");
  forget.hidden = false;
  forget.addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); location.reload(); });
  const { channels } = await (await fetch("/channels")).json();
  const allowed = new Set(Object.keys(client.channels));
  const panels = document.getElementById("panels");
  for (const channel of channels.filter((c) => allowed.has(c.name))) panels.append(buildPanel(client, channel));
  document.body.dataset.ready = "true";
  window.streamplexClient = client;
}

main();
