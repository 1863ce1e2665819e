// Drives the admin dashboard in Debian's headless Chromium and checks what a person would
// see: every backend listed with live numbers, a drawn traffic chart, policies and recent
// decisions, and a refresh clock that moves. Saves OUTDIR/dashboard.png (1366×768), prints
// a JSON summary on stdout, and exits non-zero when any check fails.
//
// usage: node tests/browser/dashboard.mjs URL OUTDIR
//   env: DASHBOARD_EXPECT_TRAFFIC=a,b  backends that must show a non-zero share (default:
//        every backend listed); DASHBOARD_EXPECT_STATUS=name=badge,... badges that must
//        show; DASHBOARD_EXPECT_REJECTED=policy,... policies whose last reload was refused
//        (shown with a reason); DASHBOARD_SETTLE_MS (default 10000) how long the page has
//        been open before the screenshot, so the chart has history; DASHBOARD_TIMEOUT_MS
//        (default 30000).

import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, outdir] = process.argv.slice(2);
if (!url || !outdir) {
  console.error("usage: node dashboard.mjs URL OUTDIR");
  process.exit(2);
}
const timeoutMs = Number(process.env.DASHBOARD_TIMEOUT_MS || 30000);
const list = (name) => (process.env[name] || "").split(",").map((s) => s.trim()).filter(Boolean);
const expectTraffic = list("DASHBOARD_EXPECT_TRAFFIC");
const expectStatus = list("DASHBOARD_EXPECT_STATUS").map((s) => s.split("="));
const expectRejected = list("DASHBOARD_EXPECT_REJECTED");
const settleMs = Number(process.env.DASHBOARD_SETTLE_MS || 10000);

const checks = [];
function check(name, ok, detail) {
  checks.push({ name, ok: Boolean(ok), detail });
  if (!ok) console.error(`FAIL ${name}: ${JSON.stringify(detail)}`);
}

/** Polls `fn` until its result has `ok: true` or `ms` pass; returns the last result. */
async function until(fn, ms) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last && last.ok) return last;
    await new Promise((r) => setTimeout(r, 250));
  }
  return last;
}

mkdirSync(outdir, { recursive: true });
const profile = mkdtempSync(join(tmpdir(), "switchyard-chromium-"));
// A persistent context is how playwright takes a fresh --user-data-dir (the profile).
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1366, height: 768 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

const consoleErrors = [];
const summary = {};
try {
  const page = browser.pages()[0] || await browser.newPage();
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  // Nothing may come from anywhere but the admin listener: the page is self-contained.
  const origin = new URL(url).origin;
  const foreign = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) foreign.push(r.url());
  });

  const opened = Date.now();
  const response = await page.goto(url, { waitUntil: "load", timeout: timeoutMs });
  check("page loads", response && response.status() === 200, response && response.status());
  check("content type is html", /text\/html/.test(response.headers()["content-type"] || ""),
    response.headers()["content-type"]);

  // The backends table: each backend, its numbers, and its share once traffic is seen.
  const readBackends = () => page.evaluate(() =>
    [...document.querySelectorAll("#backends tbody tr[data-backend]")].map((tr) => {
      const f = {};
      for (const c of tr.querySelectorAll("[data-field]")) f[c.dataset.field] = c.textContent.trim();
      return { ...f, name: tr.dataset.backend, status: tr.dataset.status, status_text: f.status };
    }));
  const num = (s) => Number(String(s).replace(/,/g, "").split("/")[0]);
  const live = await until(async () => {
    const rows = await readBackends();
    const want = expectTraffic.length ? expectTraffic : rows.map((r) => r.name);
    const missing = want.filter((n) => !rows.some((r) => r.name === n));
    const idle = rows.filter((r) => want.includes(r.name) && !(num(r.share) > 0));
    const noLatency = rows.filter((r) => want.includes(r.name) && !(num(r.latency_ms) > 0));
    return { ok: rows.length > 0 && !missing.length && !idle.length && !noLatency.length,
      rows, missing, idle: idle.map((r) => r.name), noLatency: noLatency.map((r) => r.name) };
  }, timeoutMs);
  summary.backends = live.rows;
  check("every backend listed", live.rows.length > 0 && !live.missing.length, live.missing);
  check("backends with traffic show a share", !live.idle.length, live.idle);
  check("backends with traffic show a latency", !live.noLatency.length, live.noLatency);
  const fields = ["status", "inflight", "latency_ms", "ttft_ms", "tps", "error_rate", "rps", "share"];
  const lacking = live.rows.filter((r) => fields.some((f) => r[f] === undefined || r[f] === ""));
  check("every backend row has every field", !lacking.length, lacking.map((r) => r.name));
  const shareSum = live.rows.reduce((s, r) => s + (num(r.share) || 0), 0);
  for (const [name, badge] of expectStatus) {
    const row = live.rows.find((r) => r.name === name);
    check(`${name} shows ${badge}`, row && row.status === badge && row.status_text === badge, row);
  }
  check("shares add up to 100 %", Math.abs(shareSum - 100) < 1.5, shareSum);

  // The refresh clock moves.
  // It ticks every second; on a loaded machine a refresh may come late, so allow 10 s.
  const stamp1 = await page.textContent("#last-updated");
  const moved = await until(async () => {
    const now = await page.textContent("#last-updated");
    return { ok: now !== stamp1, now };
  }, 10000);
  const stamp2 = moved && moved.now;
  summary.last_updated = [stamp1, stamp2];
  check("#last-updated changes between two reads", stamp1 && stamp2 && stamp1 !== stamp2, [stamp1, stamp2]);

  // The chart: enough colored (not grey, not background) pixels that the areas are drawn.
  const canvas = await until(() => page.evaluate(() => {
    const c = document.getElementById("traffic-chart");
    if (!c || !c.width || !c.height) return { ok: false, why: "no canvas" };
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let painted = 0, colored = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 0) continue;
      painted++;
      const r = d[i], g = d[i + 1], b = d[i + 2];
      if (Math.max(r, g, b) - Math.min(r, g, b) > 40) colored++;
    }
    const total = d.length / 4;
    return { ok: colored > total * 0.01, width: c.width, height: c.height, painted, colored, total };
  }), 10000);
  summary.canvas = canvas;
  check("traffic chart is drawn", canvas.ok, canvas);

  // Policies and decisions.
  const policies = await page.evaluate(() =>
    [...document.querySelectorAll("#policies [data-policy]")].map((item) => ({
      name: item.dataset.policy,
      version: item.querySelector('[data-field="version"]')?.textContent.trim(),
      result: item.dataset.result,
      reason: item.querySelector('[data-field="reason"]')?.textContent.trim() || null,
    })));
  summary.policies = policies;
  check("policies render with versions", policies.length > 0 && policies.every((p) => p.name && p.version),
    policies.length);
  for (const name of expectRejected) {
    const p = policies.find((p) => p.name === name);
    check(`${name} shows its refused reload and why`, p && p.result === "rejected" && p.reason, p);
  }

  const decisions = await until(async () => {
    const rows = await page.evaluate(() =>
      [...document.querySelectorAll("#decisions tbody tr")].map((tr) => {
        const f = {};
        for (const c of tr.querySelectorAll("[data-field]")) f[c.dataset.field] = c.textContent.trim();
        return f;
      }));
    return { ok: rows.length > 0 && rows.every((r) => r.request_id && r.policy && r.status), rows };
  }, 10000);
  summary.decisions = { count: decisions.rows.length, newest: decisions.rows[0] };
  check("decisions render", decisions.ok, decisions.rows.slice(0, 3));

  // No raw markup from the server ever becomes elements (names are set as text).
  const injected = await page.evaluate(() => document.querySelectorAll("main script, main img, main iframe").length);
  check("no injected elements", injected === 0, injected);
  check("no requests leave the admin origin", !foreign.length, foreign);
  check("no console errors", !consoleErrors.length, consoleErrors);

  const wait = opened + settleMs - Date.now();
  if (wait > 0) await page.waitForTimeout(wait);
  const shot = join(outdir, "dashboard.png");
  await page.screenshot({ path: shot, fullPage: false });
  summary.screenshot = shot;
} catch (e) {
  check("script ran to the end", false, String(e && e.stack || e));
} finally {
  await browser.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}

const failed = checks.filter((c) => !c.ok);
console.log(JSON.stringify({ ok: !failed.length, url, checks, ...summary }, null, 2));
process.exit(failed.length ? 1 : 0);
