// Drives the dashboard and the contributor widget in a real headless Chromium.
//
//   node web/tests/dashboard.mjs URL NODE_ID JOB_ID SCREENSHOT_DIR
//
// Asserts: the dashboard lists every node, shows the job at 100 %, draws the throughput
// chart, the contribution curve with its marker and the sweep chart; the widget renders the
// node's credits. Writes dashboard.png and widget.png into SCREENSHOT_DIR. Exits non-zero
// with a message on the first failed check. Chromium: $CHROMIUM or /usr/bin/chromium
// (Debian's), never a downloaded one.
import { chromium } from "playwright-core";

const [url, nodeId, jobId, shots] = process.argv.slice(2);
if (!url || !nodeId || !jobId || !shots) {
  console.error("usage: dashboard.mjs URL NODE_ID JOB_ID SCREENSHOT_DIR");
  process.exit(2);
}

function check(ok, what) {
  if (!ok) throw new Error("check failed: " + what);
  console.log("ok: " + what);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url + "/", { waitUntil: "domcontentloaded" });
  await page.waitForSelector("#status.live", { timeout: 20000 });
  check(true, "the page receives live snapshots");
  await page.waitForSelector(`#nodes tr[data-node="${nodeId}"]`, { timeout: 20000 });
  const nodes = await page.$$eval("#nodes tbody tr", (rows) => rows.length);
  check(nodes >= 2, `the nodes table lists the nodes (${nodes})`);
  const online = await page.$$eval("#nodes tbody td.state-online", (c) => c.length);
  check(online >= 2, `nodes are shown online (${online})`);
  await page.waitForSelector(`#jobs tr[data-job="${jobId}"][data-progress="100"]`, { timeout: 60000 });
  const pct = await page.$eval(`#jobs tr[data-job="${jobId}"] .pct`, (e) => e.textContent.trim());
  check(pct === "100%", "the job is shown at 100 %");
  await page.waitForFunction(() => document.querySelectorAll("#throughput path").length >= 2, null, { timeout: 20000 });
  check(true, "the throughput and queue chart is drawn");
  check(await page.$("#curve-now") !== null, "the contribution curve marks the current multiplier");
  const multiplier = Number(await page.$eval("#multiplier", (e) => e.textContent));
  check(multiplier > 1 && multiplier <= 10, `the multiplier is shown (${multiplier})`);
  const lead = await page.$$eval("#leaderboard tbody tr", (r) => r.length);
  check(lead >= 1, `the credits leaderboard has entries (${lead})`);
  await page.waitForFunction(() => document.querySelectorAll("#sweep circle").length > 0, null, { timeout: 20000 });
  const points = await page.$$eval("#sweep circle", (c) => c.length);
  check(points > 0, `the sweep chart shows the job's results (${points} points)`);
  check(errors.length === 0, "no script errors: " + errors.join("; "));
  await page.screenshot({ path: shots + "/dashboard.png", fullPage: true });

  const widget = await browser.newPage({ viewport: { width: 360, height: 240 } });
  await widget.goto(url + "/widget/" + nodeId);
  await widget.waitForSelector("body[data-loaded='1']", { timeout: 20000 });
  const credits = await widget.$eval("#credits", (e) => e.textContent);
  check(Number(credits.replace(/,/g, "")) > 0, `the widget shows the node's credits (${credits})`);
  const rank = await widget.$eval("#rank", (e) => e.textContent);
  check(/^\d+ of \d+$/.test(rank), `the widget shows a rank (${rank})`);
  await widget.screenshot({ path: shots + "/widget.png" });
  console.log("dashboard and widget OK");
} catch (e) {
  console.error(String(e.stack || e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
