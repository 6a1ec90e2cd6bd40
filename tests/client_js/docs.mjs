// The /docs pages in headless Debian chromium (playwright-core): Swagger UI renders /openapi.json and the AsyncAPI
// viewer renders /asyncapi.json, with every request answered by the server itself (no CDN).
// Usage: node docs.mjs BASE_URL OUT_DIR. Prints one JSON report on stdout.
import { chromium } from "playwright-core";

const [base, outDir] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"],
});
const report = { foreign: [], console: [], failed: [] };
try {
  const page = await (await browser.newContext({ viewport: { width: 1400, height: 1000 } })).newPage();
  page.on("request", (req) => { if (!req.url().startsWith(base) && !req.url().startsWith("data:")) report.foreign.push(req.url()); });
  page.on("requestfailed", (req) => report.failed.push(req.url()));
  page.on("response", (resp) => { if (resp.status() >= 400) report.failed.push(`${resp.status()} ${resp.url()}`); });
  page.on("console", (msg) => { if (msg.type() === "error") report.console.push(msg.text()); });
  page.on("pageerror", (err) => report.console.push(String(err)));

  await page.goto(base + "/docs");
  await page.waitForSelector(".swagger-ui .opblock", { timeout: 30_000 });
  report.swagger = {
    title: (await page.textContent(".swagger-ui .info .title")).trim(),
    paths: await page.$$eval(".swagger-ui .opblock .opblock-summary-path", (nodes) => nodes.map((n) => n.textContent.trim())),
  };
  await page.screenshot({ path: `${outDir}/swagger.png` });

  await page.click("nav a[href='/docs/asyncapi']");
  await page.waitForURL(base + "/docs/asyncapi");
  const loaded = await page.evaluate(() => new Promise((resolve) => {
    const viewer = document.querySelector("asyncapi-viewer");
    const text = () => viewer.shadowRoot?.textContent ?? "";
    const done = (outcome) => resolve({ outcome, text: text() });
    viewer.addEventListener("asyncapi-error", (e) => done(`error: ${e.detail?.message ?? e.detail}`));
    const poll = () => (text().includes("client.subscribe_text") ? done("rendered") : setTimeout(poll, 200));
    poll();
    setTimeout(() => done("timeout"), 30_000);
  }));
  report.asyncapi = { outcome: loaded.outcome, hasTitle: loaded.text.includes("streamplex"), hasWs: loaded.text.includes("/ws"), length: loaded.text.length };
  await page.screenshot({ path: `${outDir}/asyncapi.png` });
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
