// The Stardust dashboard: renders /v1/events snapshots (server-sent events, one a second).
// No framework, no external assets: plain DOM and hand-drawn SVG.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const NS = "http://www.w3.org/2000/svg";
  const short = (id) => String(id).slice(0, 10);
  const credits = (micro) => (Number(micro) / 1e6).toLocaleString(undefined, { maximumFractionDigits: 2 });
  const bytes = (n) => (n >= 1 << 30 ? (n / (1 << 30)).toFixed(1) + " GiB" : (n / (1 << 20)).toFixed(0) + " MiB");
  const duration = (ms) => {
    const s = Math.floor(ms / 1000);
    if (s < 120) return s + " s";
    if (s < 7200) return Math.floor(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  };

  function svg(el, children) {
    el.replaceChildren(...children);
  }
  function node(tag, attrs, text) {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c && c.num) td.className = "num";
      if (c && c.el) td.appendChild(c.el);
      else td.textContent = c && c.text !== undefined ? c.text : c;
      if (c && c.cls) td.classList.add(c.cls);
      tr.appendChild(td);
    }
    return tr;
  }
  function bar(fraction) {
    const outer = document.createElement("div");
    outer.className = "bar";
    const inner = document.createElement("div");
    inner.style.width = Math.round(Math.max(0, Math.min(1, fraction)) * 100) + "%";
    outer.appendChild(inner);
    return outer;
  }

  // A line chart of up to two series over time, each on its own scale.
  function lineChart(el, points, series) {
    const W = 480, H = 200, L = 40, R = 40, T = 10, B = 24;
    const parts = [node("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#ccd" })];
    if (points.length < 2) {
      parts.push(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#889" }, "collecting samples…"));
      return svg(el, parts);
    }
    const t0 = points[0].t_ms, t1 = points[points.length - 1].t_ms;
    const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
    series.forEach((s, i) => {
      const max = Math.max(1, ...points.map((p) => p[s.key]));
      const y = (v) => H - B - (v / max) * (H - T - B);
      const d = points.map((p, j) => (j ? "L" : "M") + x(p.t_ms).toFixed(1) + " " + y(p[s.key]).toFixed(1)).join(" ");
      parts.push(node("path", { d, fill: "none", stroke: s.color, "stroke-width": 2 }));
      parts.push(node("text", { x: i ? W - R + 4 : 4, y: T + 10, fill: s.color, "font-size": 11 }, max.toFixed(max < 10 ? 1 : 0)));
      parts.push(node("text", { x: L + 6 + i * 120, y: H - 6, fill: s.color, "font-size": 12 }, s.label));
    });
    svg(el, parts);
  }

  function curveChart(el, ledger) {
    const W = 480, H = 200, L = 36, R = 12, T = 10, B = 30;
    const D = ledger.d_cpu_hours || 1e6;
    const lo = 0, hi = 7; // log10 CPU-hours from 1 to 10^7
    const xs = (h) => L + ((Math.log10(Math.max(1, h)) - lo) / (hi - lo)) * (W - L - R);
    const ys = (r) => H - B - ((r - 1) / 9) * (H - T - B);
    const parts = [
      node("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#ccd" }),
      node("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#ccd" }),
    ];
    let d = "";
    for (let i = 0; i <= 140; i++) {
      const h = Math.pow(10, lo + ((hi - lo) * i) / 140);
      d += (i ? "L" : "M") + xs(h).toFixed(1) + " " + ys(1 + 9 * Math.exp(-h / D)).toFixed(1) + " ";
    }
    parts.push(node("path", { d, fill: "none", stroke: "#4f46e5", "stroke-width": 2 }));
    for (let e = lo; e <= hi; e++) {
      parts.push(node("text", { x: xs(Math.pow(10, e)), y: H - 12, "font-size": 10, "text-anchor": "middle", fill: "#889" }, "1e" + e));
    }
    for (const r of [1, 5, 10]) {
      parts.push(node("text", { x: L - 4, y: ys(r) + 4, "font-size": 10, "text-anchor": "end", fill: "#889" }, r + "×"));
    }
    const cx = xs(ledger.cpu_hours), cy = ys(ledger.multiplier);
    parts.push(node("circle", { cx, cy, r: 5, fill: "#dc2626", id: "curve-now" }));
    parts.push(node("text", { x: cx + 8, y: cy + 14, "font-size": 12, fill: "#dc2626" }, "now: " + ledger.multiplier.toFixed(4) + "×"));
    svg(el, parts);
  }

  function sweepChart(el, sweep) {
    const W = 960, H = 260, L = 50, R = 20, T = 14, B = 34;
    const pts = sweep.points;
    const parts = [node("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#ccd" }), node("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#ccd" })];
    if (!pts.length) {
      parts.push(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#889" }, "no verified results yet"));
      return svg(el, parts);
    }
    const numeric = pts.every((p) => typeof p.x === "number" && p.x > 0);
    const cats = [...new Set(pts.map((p) => JSON.stringify(p.x)))].sort((a, b) => (numeric ? JSON.parse(a) - JSON.parse(b) : a < b ? -1 : 1));
    const xs = (v) => L + ((cats.indexOf(JSON.stringify(v)) + 0.5) / cats.length) * (W - L - R);
    const ymin = Math.min(...pts.map((p) => p.y)), ymax = Math.max(...pts.map((p) => p.y));
    const span = ymax - ymin || 1;
    const ys = (v) => H - B - ((v - ymin) / span) * (H - T - B);
    cats.forEach((c) => parts.push(node("text", { x: xs(JSON.parse(c)), y: H - 14, "font-size": 11, "text-anchor": "middle", fill: "#556" }, JSON.parse(c))));
    for (const v of [ymin, (ymin + ymax) / 2, ymax]) parts.push(node("text", { x: L - 6, y: ys(v) + 4, "font-size": 10, "text-anchor": "end", fill: "#889" }, v.toFixed(3)));
    const best = pts.reduce((a, b) => (b.y > a.y ? b : a));
    pts.forEach((p, i) => {
      const jitter = ((i * 37) % 21) - 10;
      const c = node("circle", { cx: xs(p.x) + jitter, cy: ys(p.y), r: p === best ? 6 : 4, fill: p === best ? "#dc2626" : "#4f46e5", "fill-opacity": 0.7 });
      c.appendChild(node("title", {}, JSON.stringify(p.params) + " → " + p.y));
      parts.push(c);
    });
    parts.push(node("text", { x: W / 2, y: H - 1, "font-size": 12, "text-anchor": "middle", fill: "#334" }, sweep.x));
    parts.push(node("text", { x: L + 4, y: T, "font-size": 12, fill: "#334" }, sweep.metric + " (best " + best.y + ")"));
    svg(el, parts);
  }

  function render(s) {
    $("domain").textContent = short(s.domain);
    $("connected").textContent = s.connected;
    const last = s.series.length ? s.series[s.series.length - 1] : { tasks_per_s: 0, queue: 0 };
    $("rate").textContent = last.tasks_per_s.toFixed(1);
    $("queue").textContent = last.queue;
    $("multiplier").textContent = s.ledger.multiplier.toFixed(4);
    $("cpu-hours").textContent = s.ledger.cpu_hours.toPrecision(3);

    const nodes = $("nodes").tBodies[0];
    nodes.replaceChildren(...s.nodes.map((n) => {
      const tr = row([
        short(n.id), { text: n.state, cls: "state-" + n.state }, n.tier, { text: n.cores, num: true }, { text: bytes(n.memory_bytes), num: true },
        { text: n.running, num: true }, { text: n.agreed, num: true }, { text: n.reputation.toFixed(3), num: true },
        { text: credits(n.credits), num: true }, { text: duration(n.uptime_ms), num: true },
      ]);
      tr.dataset.node = n.id;
      return tr;
    }));

    const more = $("nodes-more");
    more.hidden = !(s.nodes_total > s.nodes.length);
    more.textContent = "Showing " + s.nodes.length + " of " + s.nodes_total + " nodes, connected and busiest first; every node: GET /v1/nodes.";

    const jobs = $("jobs").tBodies[0];
    $("jobs-hidden").hidden = s.jobs_visible;
    jobs.replaceChildren(...(s.jobs || []).map((j) => {
      const pct = Math.round(j.progress * 100);
      const cell = document.createElement("span");
      cell.appendChild(bar(j.progress));
      const label = document.createElement("span");
      label.className = "pct";
      label.textContent = " " + pct + "%";
      const wrap = document.createElement("div");
      wrap.style.display = "flex";
      wrap.style.alignItems = "center";
      wrap.style.gap = ".4rem";
      wrap.append(cell, label);
      const tr = row([j.job_id, j.name, j.state, { el: wrap }, { text: j.tasks_verified + "/" + j.tasks_total, num: true }]);
      tr.dataset.job = j.job_id;
      tr.dataset.progress = pct;
      return tr;
    }));

    lineChart($("throughput"), s.series, [
      { key: "tasks_per_s", color: "#4f46e5", label: "tasks/s" },
      { key: "queue", color: "#d97706", label: "queue depth" },
    ]);

    $("leaderboard").tBodies[0].replaceChildren(...s.leaderboard.map((l, i) => row([i + 1, short(l.id), { text: credits(l.credits), num: true }])));
    curveChart($("curve"), s.ledger);

    if (s.sweep) {
      $("sweep-section").hidden = false;
      $("sweep-title").textContent = "Sweep results: job " + s.sweep.job_id + " (" + s.sweep.name + ")";
      sweepChart($("sweep"), s.sweep);
    }
  }

  function connect() {
    const es = new EventSource("/v1/events");
    es.addEventListener("snapshot", (e) => {
      $("status").className = "live";
      $("status").textContent = "live";
      try { render(JSON.parse(e.data)); } catch (err) { console.error(err); }
    });
    es.onerror = () => {
      $("status").className = "down";
      $("status").textContent = "reconnecting…";
    };
  }
  connect();
})();
