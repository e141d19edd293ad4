// Browser test at scale (issue 10): on a store of 100,000 demo customers, the dashboard's
// overview (tiles, charts, at-risk table) and a customer page each load within a second in
// headless Chromium. Run by tests/browser/run.sh after the store is grown and served.
//
// Each page is timed from navigation to its content being on screen; the first overview after
// start-up is timed too (it computes the memoised rank figures once).
//
// Usage: node scale.mjs BASE_URL ARTEFACT_DIR MIN_CUSTOMERS

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";

const [base, artefacts, minCustomers] = process.argv.slice(2);
if (!base || !artefacts || !minCustomers) {
  console.error("usage: node scale.mjs BASE_URL ARTEFACT_DIR MIN_CUSTOMERS");
  process.exit(2);
}
mkdirSync(artefacts, { recursive: true });
const LIMIT_MS = 1000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); failed = true; });
  const overview = async () => {
    const t0 = performance.now();
    await page.goto(base + "/");
    await page.waitForSelector("#tiles [data-tile=active] .value");
    await page.waitForSelector("#atrisk tr[data-customer]");
    return performance.now() - t0;
  };
  const times = [await overview(), await overview()];
  const api = await (await fetch(base + "/api/v1/overview")).json();
  assert.ok(api.customers >= Number(minCustomers), `store has ${api.customers} customers`);
  await page.screenshot({ path: join(artefacts, "scale-overview-1280.png"), fullPage: true });

  const first = await page.getAttribute("#atrisk tr[data-customer]", "data-customer");
  const t0 = performance.now();
  await page.click(`#atrisk tr[data-customer="${first}"] a`);
  await page.waitForSelector("#customer-title");
  await page.waitForSelector("#timeline li");
  const customerMs = performance.now() - t0;
  await page.screenshot({ path: join(artefacts, "scale-customer-1280.png"), fullPage: true });

  console.log(
    `scale: ${api.customers} customers; overview ${times.map((t) => t.toFixed(0)).join(" / ")} ms ` +
      `(first / again), customer page ${customerMs.toFixed(0)} ms`,
  );
  for (const t of times) assert.ok(t < LIMIT_MS, `overview took ${t.toFixed(0)} ms`);
  assert.ok(customerMs < LIMIT_MS, `customer page took ${customerMs.toFixed(0)} ms`);
} catch (e) {
  console.error(e);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
