// A page with the browser node's script tag, in a real headless Chromium, against a real
// domain. Driven over stdin/stdout by crates/cli/tests/browser.rs:
//
//   node web/tests/contrib.mjs DOMAIN_URL SCREENSHOT_DIR
//
// Serves an embedding page from its own loopback origin (so every call to the domain is
// cross-origin, as on a real site), loads `DOMAIN/contrib.js` with a script tag, calls
// `Stardust.contribute`, and prints `READY NODE_ID`. On the stdin line `PAUSE` it pauses the
// node and hides the tab (prints `PAUSED {stats}`); on `RESUME` it resumes, then shows the
// tab (prints `RESUMED {hidden, visible}`, the stats after each step). On `ACTIVE` it moves
// the mouse (prints `ACTIVE_DONE {during, after}`). On `JANK` it keeps the
// page's main thread busy for 3 s (prints `JANKED {states, now}`). On `FINISH` it prints
// `FINAL {json}`: the node's stats, every task event, the longest main-thread stall, frame
// rate, the widget's credits for the browser's id, and timings; then exits.
// Chromium: $CHROMIUM or /usr/bin/chromium (Debian's), never a downloaded one.
import { createServer } from "node:http";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [domain, shots, gateway] = process.argv.slice(2);
if (!domain || !shots) {
  console.error("usage: contrib.mjs DOMAIN_URL SCREENSHOT_DIR [GATEWAY_URL]");
  process.exit(2);
}

const page_html = `<!doctype html>
<html><head><meta charset="utf-8"><title>An article with a Stardust contributor</title></head>
<body>
<h1>Reading, while this tab contributes</h1>
<p id="state">starting</p><p>Tasks: <span id="tasks">0</span>, credits: <span id="credits">0</span></p>
<script src="${domain}/contrib.js"></script>
<script>
  window.events = []; window.errorsSeen = []; window.states = [];
  window.maxGap = 0; let last = performance.now();
  setInterval(() => { const now = performance.now(); window.maxGap = Math.max(window.maxGap, now - last); last = now; }, 20);
  // The lowest frame rate over any whole second of the session.
  window.minFps = Infinity; let frames = 0, second = performance.now();
  const frame = (now) => {
    frames++;
    if (now - second >= 1000) { window.minFps = Math.min(window.minFps, frames * 1000 / (now - second)); frames = 0; second = now; }
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  window.scriptLoadedAt = performance.now();
  window.ready = Stardust.contribute({
    domain: ${JSON.stringify(domain)}, gateway: ${JSON.stringify(gateway || null)}, cpuLimit: 1, pauseWhenActive: true, activeMs: 1000,
    onTask: (e) => { events.push(Object.assign({ at: performance.now() }, e)); document.getElementById("tasks").textContent = events.length; },
    onCredit: (c) => { document.getElementById("credits").textContent = (c / 1e6).toFixed(6); },
    onState: (st) => states.push(Object.assign({ at: performance.now() }, st)),
    onError: (e) => { errorsSeen.push(String(e.message)); console.warn("stardust: " + e.message); },
  }).then((n) => { window.node = n; document.getElementById("state").textContent = "contributing as " + n.id; return n.id; });
</script>
</body></html>`;

const server = createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
  res.end(page_html);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const origin = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 500 } });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => console.error("page: " + m.text()));
  await page.goto(origin + "/", { waitUntil: "load" });
  const id = await page.evaluate(() => window.ready);
  console.log("READY " + id);

  const lines = createInterface({ input: process.stdin });
  const setVisibility = (state) => page.evaluate((state) => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
    document.dispatchEvent(new Event("visibilitychange"));
  }, state);
  for await (const line of lines) {
    if (line.trim() === "PAUSE") {
      // The owner pauses, and the tab goes to the background.
      await page.evaluate(() => window.node.pause());
      await setVisibility("hidden");
      console.log("PAUSED " + JSON.stringify(await page.evaluate(() => window.node.stats())));
      continue;
    }
    if (line.trim() === "RESUME") {
      await page.evaluate(() => window.node.resume());
      const hidden = await page.evaluate(() => window.node.stats());
      await setVisibility("visible");
      const visible = await page.evaluate(() => window.node.stats());
      console.log("RESUMED " + JSON.stringify({ hidden, visible }));
      continue;
    }
    if (line.trim() === "ACTIVE") {
      // The visitor moves the mouse: the node pauses, and resumes a second after the input.
      for (let i = 0; i < 5; i++) await page.mouse.move(100 + i * 20, 100 + i * 10);
      const during = await page.evaluate(() => window.node.stats());
      await new Promise((r) => setTimeout(r, 2000));
      const after = await page.evaluate(() => window.node.stats());
      console.log("ACTIVE_DONE " + JSON.stringify({ during, after }));
      continue;
    }
    if (line.trim() === "JANK") {
      // The page's own work hogs the main thread for 3 s (150 ms of every 170 ms): the node
      // must step back while frames are slow, and come back after.
      const seen = await page.evaluate(async () => {
        const from = window.states.length;
        const kept = [window.maxGap, window.minFps]; // the test's own stall is not the node's
        const jank = setInterval(() => { const end = performance.now() + 150; while (performance.now() < end); }, 170);
        await new Promise((r) => setTimeout(r, 3000));
        clearInterval(jank);
        await new Promise((r) => setTimeout(r, 2500));
        [window.maxGap, window.minFps] = kept;
        return { states: window.states.slice(from), now: window.node.stats() };
      });
      console.log("JANKED " + JSON.stringify(seen));
      continue;
    }
    if (line.trim() !== "FINISH") continue;
    const final = await page.evaluate(async () => {
      const stats = await window.node.refresh();
      return { stats, events: window.events, errors: window.errorsSeen, max_gap_ms: window.maxGap, min_fps: window.minFps,
        script_loaded_ms: window.scriptLoadedAt };
    });
    await page.screenshot({ path: shots + "/contrib-page.png" });
    const widget = await browser.newPage({ viewport: { width: 360, height: 240 } });
    await widget.goto(`${domain}/widget/${id}`);
    await widget.waitForSelector("body[data-loaded='1']", { timeout: 20000 });
    final.widget_credits = Number((await widget.$eval("#credits", (e) => e.textContent)).replace(/,/g, ""));
    await widget.screenshot({ path: shots + "/contrib-widget.png" });
    await page.evaluate(() => window.node.disconnect());
    final.page_errors = errors;
    console.log("FINAL " + JSON.stringify(final));
    break;
  }
} finally {
  await browser.close();
  server.close();
  // stdin may still be open: end here rather than wait for it.
  process.exit(process.exitCode || 0);
}
