// Runs metered modules in a real headless Chromium through the browser node's WASI host
// (`Stardust.run` of web/contrib/contrib.js, in a Web Worker) and prints what it reported,
// for crates/cli/tests/browser.rs to compare with the native sandbox.
//
//   node web/tests/parity.mjs MANIFEST.json
//
// MANIFEST: { "contrib": PATH, "noble": PATH, "hash_lengths": [N...],
//             "cases": [{ "name", "module": PATH, "input": PATH|null, "args", "seed", "limits" }] }
// Prints one line `PARITY {json}`: { reports: [RunReport...], hashes: ["b3:..."...],
// noble_matches_webcrypto, max_gap_ms (longest main-thread stall while tasks ran) }.
// Chromium: $CHROMIUM or /usr/bin/chromium (Debian's), never a downloaded one.
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { chromium } from "playwright-core";

const manifest = JSON.parse(readFileSync(process.argv[2], "utf8"));
const files = {
  "/contrib.js": [manifest.contrib, "text/javascript"],
  "/contrib/noble-ed25519.js": [manifest.noble, "text/javascript"],
};
manifest.cases.forEach((c, i) => {
  files[`/case/${i}/module`] = [c.module, "application/wasm"];
  if (c.input) files[`/case/${i}/input`] = [c.input, "application/octet-stream"];
});
const server = createServer((req, res) => {
  if (req.url === "/") {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end('<!doctype html><title>parity</title><script src="/contrib.js"></script>');
  }
  const f = files[req.url];
  if (!f) { res.writeHead(404); return res.end(); }
  res.writeHead(200, { "content-type": f[1] });
  res.end(readFileSync(f[0]));
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const base = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/");
  // A main-thread heartbeat: the longest gap between ticks while the workers run.
  await page.evaluate(() => {
    window.maxGap = 0; let last = performance.now();
    setInterval(() => { const now = performance.now(); window.maxGap = Math.max(window.maxGap, now - last); last = now; }, 20);
  });
  const reports = [];
  for (let i = 0; i < manifest.cases.length; i++) {
    const c = manifest.cases[i];
    const report = await page.evaluate(async ({ i, c }) => {
      const module = await (await fetch(`/case/${i}/module`)).arrayBuffer();
      const input = c.input ? new Uint8Array(await (await fetch(`/case/${i}/input`)).arrayBuffer()) : [];
      const r = await Stardust.run(module, { input, args: c.args, seed: c.seed, limits: c.limits });
      return r.report;
    }, { i, c });
    reports.push(report);
    console.error(`${c.name}: ${JSON.stringify(report)}`);
  }
  const hashes = await page.evaluate((lens) => lens.map((n) => {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = i % 251;
    return Stardust.contentId(b);
  }), manifest.hash_lengths);
  // The vendored fallback signs exactly as WebCrypto does (Ed25519 is deterministic).
  const noble = await page.evaluate(async () => {
    const k = await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
    const pkcs8 = new Uint8Array(await crypto.subtle.exportKey("pkcs8", k.privateKey));
    const seed = pkcs8.slice(pkcs8.length - 32);
    const msg = new TextEncoder().encode("stardust/v1/hello test message");
    const ed = await import("/contrib/noble-ed25519.js");
    const a = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, k.privateKey, msg));
    const b = await ed.signAsync(msg, seed);
    const pubA = new Uint8Array(await crypto.subtle.exportKey("raw", k.publicKey));
    const pubB = await ed.getPublicKeyAsync(seed);
    const same = (x, y) => x.length === y.length && x.every((v, i) => v === y[i]);
    return same(a, b) && same(pubA, pubB) && await ed.verifyAsync(a, msg, pubA);
  });
  // Bad options are refused with a message naming the option.
  const refusals = await page.evaluate(async () => {
    const out = [];
    for (const o of [{}, { domain: "ftp://x" }, { domain: "http://127.0.0.1:1", cpuLimit: 0 }]) {
      try { await Stardust.contribute(o); out.push("accepted"); } catch (e) { out.push(e.message); }
    }
    return out;
  });
  const maxGap = await page.evaluate(() => window.maxGap);
  if (errors.length) throw new Error("script errors: " + errors.join("; "));
  console.log("PARITY " + JSON.stringify({ reports, hashes, noble_matches_webcrypto: noble, max_gap_ms: maxGap, refusals }));
} finally {
  await browser.close();
  server.close();
}
