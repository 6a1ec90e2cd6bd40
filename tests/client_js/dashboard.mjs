// Drives the dashboard in headless Debian chromium (playwright-core): every available channel's panel must show
// real output. Usage: node dashboard.mjs BASE_URL API_KEY OUT_DIR MIC_WAV. Prints one JSON report on stdout.
import { chromium } from "playwright-core";

const [base, apiKey, outDir, micWav] = process.argv.slice(2);
const TIMEOUT = 240_000;

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", `--use-file-for-fake-audio-capture=${micWav}%noloop`,
  ],
});
const report = { panels: {}, console: [] };
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") report.console.push(msg.text()); });
  page.on("pageerror", (err) => report.console.push(String(err)));
  await page.goto(base + "/");
  await page.fill("#api-key", apiKey);
  await page.click("#key-form button[type=submit]");
  await page.waitForSelector("body[data-ready=true]", { timeout: 30_000 });
  report.stored_key = await page.evaluate(() => sessionStorage.getItem("streamplex.apiKey") !== null);

  const panels = await page.$$eval(".panel", (nodes) => nodes.map((n) => ({ name: n.dataset.channel, status: n.dataset.status })));
  const available = panels.filter((p) => p.status === "available").map((p) => p.name);
  report.unavailable = panels.filter((p) => p.status !== "available").map((p) => p.name);

  // Finite streams: click Start; live ones (metrics, logs) start by themselves.
  for (const name of available) {
    if (!["metrics", "logs"].includes(name)) await page.click(`#panel-${name} button.start`);
  }
  // Wait until every finite stream has ended and the live ones have shown a few chunks (or the time is up:
  // the report then says which panel is stuck, with its screenshot).
  const settled = () => page.$$eval(".panel[data-status=available]", (nodes) => nodes.every((panel) => {
    const chunks = Number(panel.querySelector(".output").dataset.chunks);
    return ["done", "error"].includes(panel.dataset.state) || (["metrics", "logs"].includes(panel.dataset.channel) && chunks >= 3);
  }));
  const deadline = Date.now() + TIMEOUT;
  while (!(await settled()) && Date.now() < deadline) await page.waitForTimeout(500);
  report.settled = await settled();

  // The microphone: the fake capture device plays the WAV once (then silence); once the whole clip has been sent,
  // Stop ends the input and the final transcript follows.
  if (available.includes("transcription")) {
    report.file_transcript = await page.textContent("#panel-transcription .output");
    await page.click("#panel-transcription button.mic");
    await page.waitForFunction(() => document.getElementById("panel-transcription").dataset.state === "running", null, { timeout: 30_000 });
    const sentSeconds = () => page.evaluate(() => Number((document.querySelector("#panel-transcription .controls .status").textContent.match(/([\d.]+) s sent/) ?? [0, 0])[1]));
    const clipDeadline = Date.now() + 60_000;
    while ((await sentSeconds()) < 8.5 && Date.now() < clipDeadline) await page.waitForTimeout(250);
    report.mic_seconds_before_stop = await sentSeconds();
    await page.click("#panel-transcription button.stop");
    const micDeadline = Date.now() + TIMEOUT;
    const micDone = () => page.evaluate(() => ["done", "error"].includes(document.getElementById("panel-transcription").dataset.state));
    while (!(await micDone()) && Date.now() < micDeadline) await page.waitForTimeout(500);
  }

  // A chat conversation: with keep_open, a second turn is pushed to the running stream.
  if (available.includes("chat")) {
    await page.check("#panel-chat input[name=keep_open]");
    await page.fill("#panel-chat textarea[name=message]", "What is the capital of France?");
    await page.click("#panel-chat button.start");
    await page.waitForFunction(() => document.querySelectorAll("#panel-chat .output .status").length >= 1, null, { timeout: TIMEOUT });
    await page.fill("#panel-chat input.turn", "And of Italy?");
    await page.click("#panel-chat button.send");
    await page.waitForFunction(() => [...document.querySelectorAll("#panel-chat .output .status")].filter((n) => n.textContent.startsWith("[")).length >= 2, null, { timeout: TIMEOUT });
    report.chat_turns = await page.$$eval("#panel-chat .output .reply", (nodes) => nodes.map((n) => n.textContent));
    await page.click("#panel-chat button.stop");
    await page.waitForFunction(() => document.getElementById("panel-chat").dataset.state === "stopped", null, { timeout: 30_000 });
  }

  // The logs level filter hides records below the chosen level.
  if (available.includes("logs")) {
    await page.selectOption("#panel-logs .level-filter", "WARNING");
    report.logs_filter = await page.$$eval("#panel-logs .log-row", (rows) => rows.filter((r) => !r.hidden).every((r) => ["WARNING", "ERROR", "CRITICAL"].includes(r.dataset.level)));
  }

  for (const name of panels.map((p) => p.name)) {
    const panel = await page.$(`#panel-${name}`);
    report.panels[name] = await panel.evaluate((node) => ({
      status: node.dataset.status,
      state: node.dataset.state,
      chunks: Number(node.querySelector(".output")?.dataset.chunks ?? 0),
      text: (node.querySelector(".output")?.innerText ?? "").slice(0, 2000),
      message: node.querySelector(".controls .status")?.textContent ?? "",
      seconds: Number(node.querySelector(".output .status")?.dataset.seconds ?? 0),
      frames: Number(node.querySelector(".output .status")?.dataset.frames ?? 0),
      rows: node.querySelectorAll("tbody tr").length,
      charts: node.querySelectorAll(".charts canvas").length,
    }));
    await panel.screenshot({ path: `${outDir}/panel-${name}.png` });
  }
  await page.screenshot({ path: `${outDir}/dashboard.png`, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
