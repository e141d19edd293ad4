// Browser test of the dashboard's Models page (issue 13): the CDNOW sample served by its own
// `touchledger serve`, the page opened for FHL's periods (calibration to 1997-09-30, holdout to
// 1998-06-30). Run by tests/browser/run.sh.
//
// Checks: the three fit plots and the warnings table render from GET /api/v1/models/evaluation
// (8 frequency bins × 2 series of bars, one tracking point per week for each series, the four
// thresholds, BG/NBD and Pareto/NBD side by side); the summary states the holdout's 1,882 actual repeat purchase-days (FHL's figure,
// recomputed from the raw log by tests/it/bgnbd.rs); a holdout end before the calibration end
// shows the API's message instead of plots; nothing overflows at 390 px; a customer page shows
// the CLV of the recorded fit as the API states it. Screenshots are kept.
//
// Usage: node models.mjs BASE_URL ARTEFACT_DIR

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";

const [base, artefacts] = process.argv.slice(2);
if (!base || !artefacts) {
  console.error("usage: node models.mjs BASE_URL ARTEFACT_DIR");
  process.exit(2);
}
mkdirSync(artefacts, { recursive: true });
const periods = "calibration_end=1997-09-30&holdout_end=1998-06-30";
const api = await (await fetch(`${base}/api/v1/models/evaluation?${periods}`)).json();
assert.equal(api.evaluation.holdout_actual, 1882, "the CDNOW sample's holdout");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); failed = true; });
  await page.goto(`${base}/#/models?${periods}`);
  await page.waitForSelector("#warnings tr[data-threshold]", { timeout: 30000 });
  const e = api.evaluation;
  assert.match(await page.textContent("[data-figure=holdout]"),
    new RegExp(`^${e.holdout_actual} actual / ${e.holdout_predicted.toFixed(1)} predicted$`));
  assert.equal(await page.locator("svg[data-chart=frequency] rect.bar").count(), 2 * e.frequency.length);
  assert.equal(e.frequency.length, 8, "bins 0 … 7+");
  assert.equal(await page.locator("svg[data-chart=tracking] polyline.series").count(), 2);
  const points = await page.getAttribute("svg[data-chart=tracking] polyline[data-series=actual]", "points");
  assert.equal(points.trim().split(/\s+/).length, e.tracking.length, "a point per week");
  assert.deepEqual(
    await page.locator("#warnings tr[data-threshold]").evaluateAll(rows => rows.map(r => r.dataset.threshold)),
    e.warnings.thresholds.map(t => t.at_least));
  assert.match(await page.textContent("#auc"), new RegExp(e.warnings.auc.rules_score.toFixed(3)));
  // BG/NBD and Pareto/NBD side by side, and Pareto/NBD's means as a third series of fig. 4.
  assert.deepEqual(
    await page.locator("#count-models tr[data-model]").evaluateAll(rows => rows.map(r => r.dataset.model)),
    ["BG/NBD", "Pareto/NBD"]);
  assert.equal(await page.locator("svg[data-chart=conditional] polyline.series").count(), 3);
  await page.screenshot({ path: join(artefacts, "models-1280.png"), fullPage: true });

  // The form: a holdout end before the calibration end gets the API's message, no plots.
  await page.fill("#models-form input[name=holdout_end]", "1997-01-01");
  await page.click("#models-form button[type=submit]");
  await page.waitForSelector("#models-error");
  assert.match(await page.textContent("#models-error"), /must be after/);
  assert.equal(await page.locator("svg[data-chart]").count(), 0);

  // Phone width: nothing overflows horizontally.
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await phone.goto(`${base}/#/models?${periods}`);
  await phone.waitForSelector("#warnings tr[data-threshold]", { timeout: 30000 });
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `horizontal overflow of ${overflow} px at 390 px`);
  await phone.screenshot({ path: join(artefacts, "models-390.png"), fullPage: true });
  // A customer's page: the CLV of the recorded fit (BG/NBD with Gamma-Gamma), as the API has it.
  const c1 = await (await fetch(`${base}/api/v1/customers/cdnow-1`)).json();
  const v = c1.loyalty.value;
  assert.ok(v && v.currency === "USD" && v.clv_minor > 0, JSON.stringify(c1.loyalty.value));
  await page.goto(`${base}/#/customer/cdnow-1`);
  await page.waitForSelector("#clv");
  const clv = await page.textContent("#clv");
  assert.ok(clv.includes(`over ${v.horizon_months} months`), clv);
  const amount = await page.evaluate((m) => (m / 100).toLocaleString(undefined, {maximumFractionDigits: 0}), v.clv_minor);
  assert.ok(clv.startsWith(`${amount} USD over`), `${clv} vs ${amount}`);
  console.log(`models page: CDNOW sample, holdout ${e.holdout_actual} actual / ${e.holdout_predicted.toFixed(1)} predicted, AUC ${e.warnings.auc.rules_score.toFixed(3)}`);
} catch (err) {
  console.error(err);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
