// Browser test of the touchledger dashboard (issue 5): headless Debian Chromium driven by
// playwright-core. Run by tests/browser/run.sh, which starts nats-server, `touchledger serve`
// and the demo traffic first.
//
// Checks: the overview loads with data and its tiles show the numbers of the API (the same
// ReadModels as `touchledger query`); the at-risk table links to a customer page with the
// timeline and the three read models; publishing a touchpoint for that customer makes it appear
// live (SSE) without a reload; at 390 px wide nothing overflows horizontally. A screenshot of
// each page is kept in the artefact directory.
//
// Usage: node dashboard.mjs BASE_URL NATS_URL ARTEFACT_DIR TOUCHLEDGER_BIN

import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";

const [base, natsUrl, artefacts, bin] = process.argv.slice(2);
if (!base || !natsUrl || !artefacts || !bin) {
  console.error("usage: node dashboard.mjs BASE_URL NATS_URL ARTEFACT_DIR TOUCHLEDGER_BIN");
  process.exit(2);
}
mkdirSync(artefacts, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let failed = false;
try {
  // --- overview, 1280 px
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); failed = true; });
  await page.goto(base + "/");
  await page.waitForSelector("#tiles [data-tile=active] .value");
  await page.waitForSelector("#atrisk tr[data-customer]");
  const api = await (await fetch(base + "/api/v1/overview")).json();
  const tile = async (name) => (await page.textContent(`#tiles [data-tile=${name}] .value`)).trim();
  assert.equal(await tile("active"), String(api.active), "active customers tile");
  assert.equal(await tile("nps"), api.nps == null ? "–" : api.nps.toFixed(0), "NPS tile");
  assert.equal(await tile("csat"), api.csat_pct == null ? "–" : api.csat_pct.toFixed(1), "CSAT tile");
  assert.ok(api.customers > 0 && api.active > 0, "demo data present");
  await page.waitForSelector("#live.on", { timeout: 10000 });
  await page.screenshot({ path: join(artefacts, "overview-1280.png"), fullPage: true });

  // --- customer page from the at-risk table
  const first = await page.getAttribute("#atrisk tr[data-customer]", "data-customer");
  await page.click(`#atrisk tr[data-customer="${first}"] a`);
  await page.waitForSelector("#customer-title");
  await page.waitForSelector("#timeline li");
  const before = await page.locator("#timeline li").count();
  assert.ok(before > 0, "timeline has entries");
  assert.match(await page.textContent("#customer-title"), new RegExp(first));
  await page.screenshot({ path: join(artefacts, "customer-1280.png"), fullPage: true });

  // --- live: publish a complaint for this customer; it appears without a reload
  const id = `browser-live-${Date.now()}`;
  const file = join(artefacts, "live-event.jsonl");
  writeFileSync(file, JSON.stringify({
    event_id: id,
    customer_id: first,
    occurred_at: new Date().toISOString(),
    source: "browser-test",
    schema_version: 1,
    complaint: { complaint_id: id, category: "delivery", severity: 3, text: "parcel lost" },
  }) + "\n");
  execFileSync(bin, ["publish", "--nats-url", natsUrl, "--file", file, "--sync"], { stdio: "inherit" });
  await page.waitForSelector(`#timeline li[data-event="${id}"]`, { timeout: 15000 });
  assert.equal(page.url().includes("#/customer/"), true, "still on the customer page (no reload)");
  await page.screenshot({ path: join(artefacts, "customer-live-1280.png"), fullPage: true });

  // --- 390 px: overview and customer page fit the width
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  phone.on("pageerror", (e) => { console.error("page error:", e.message); failed = true; });
  await phone.goto(base + "/");
  await phone.waitForSelector("#atrisk tr[data-customer]");
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(overflow <= 391, `overview overflows at 390 px (${overflow})`);
  await phone.screenshot({ path: join(artefacts, "overview-390.png"), fullPage: true });
  await phone.goto(base + "/#/customer/" + encodeURIComponent(first));
  await phone.waitForSelector("#timeline li");
  const overflow2 = await phone.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(overflow2 <= 391, `customer page overflows at 390 px (${overflow2})`);
  await phone.screenshot({ path: join(artefacts, "customer-390.png"), fullPage: true });
  console.log(`browser tests passed; screenshots in ${artefacts}`);
} catch (e) {
  console.error(e);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
