// cpn operator dashboard: polls /v1/dashboard (admin key) and draws the network. No libraries, no
// network access beyond this gateway: the province outlines come from /dashboard/provinces.json.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const TIER_COLOURS = { hub: "#1f5fa8", regional: "#2e9e5b", edge: "#d9822b" };
let key = "";
let proj = null;
let timer = null;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fmtAgo(at, now) {
  const s = Math.max(0, Math.round(now - at));
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

// ---------------------------------------------------------------- key

function readKey() {
  const m = /(?:^#|&)key=([^&]+)/.exec(location.hash);
  if (m) {
    key = decodeURIComponent(m[1]);
    try { localStorage.setItem("cpn-admin-key", key); } catch (e) { /* private mode: keep it in memory */ }
    history.replaceState(null, "", location.pathname);  // the key leaves the address bar
  } else {
    try { key = localStorage.getItem("cpn-admin-key") || ""; } catch (e) { key = ""; }
  }
}

function askKey(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("summary").textContent = message || "an admin key is needed";
  if (timer) { clearTimeout(timer); timer = null; }
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  key = $("key").value.trim();
  try { localStorage.setItem("cpn-admin-key", key); } catch (e) { /* ignore */ }
  $("login").hidden = true;
  start();
});

// ---------------------------------------------------------------- map

function projection(provinces) {
  let x0 = 180, x1 = -180, y0 = 90, y1 = -90;
  for (const p of provinces) for (const ring of p.rings) for (const [x, y] of ring) {
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  const k = Math.cos(((y0 + y1) / 2) * Math.PI / 180);
  const scale = 10;  // SVG units per degree of latitude
  return {
    x: (lon) => (lon - x0 + 1) * k * scale,
    y: (lat) => (y1 + 1 - lat) * scale,
    kmToUnits: (km) => km / 111.2 * scale,
    width: (x1 - x0 + 2) * k * scale,
    height: (y1 - y0 + 2) * scale,
  };
}

async function drawProvinces() {
  const resp = await fetch("/dashboard/provinces.json");
  const doc = await resp.json();
  proj = projection(doc.provinces);
  const map = $("map");
  map.setAttribute("viewBox", `0 0 ${proj.width.toFixed(1)} ${proj.height.toFixed(1)}`);
  const g = el("g", { id: "provinces" });
  for (const p of doc.provinces) {
    for (const ring of p.rings) {
      const d = "M" + ring.map(([x, y]) => proj.x(x).toFixed(1) + "," + proj.y(y).toFixed(1)).join("L") + "Z";
      const path = el("path", { d, class: "province" });
      path.appendChild(el("title", {}, p.name + (p.name_local ? " " + p.name_local : "")));
      g.appendChild(path);
    }
  }
  map.appendChild(g);
  // Reach: every circle opaque inside a translucent group, so overlaps read as one region.
  map.appendChild(el("g", { id: "map-reach10", class: "reach10", opacity: "0.55" }));
  map.appendChild(el("g", { id: "map-reach5", class: "reach5", opacity: "0.45" }));
  map.appendChild(el("g", { id: "map-origins" }));
  map.appendChild(el("g", { id: "map-sites" }));
  map.appendChild(el("g", { id: "map-labels" }));
}

function shape(site, r) {
  const x = proj.x(site.lon), y = proj.y(site.lat);
  if (site.tier === "hub") return el("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, class: "shape" });
  if (site.tier === "regional") {
    return el("polygon", { points: `${x},${y - r * 1.2} ${x + r * 1.2},${y} ${x},${y + r * 1.2} ${x - r * 1.2},${y}`, class: "shape" });
  }
  return el("circle", { cx: x, cy: y, r, class: "shape" });
}

function drawMap(data) {
  const r5 = proj.kmToUnits(data.reach_km["5"] || 0), r10 = proj.kmToUnits(data.reach_km["10"] || 0);
  const reach5 = $("map-reach5"), reach10 = $("map-reach10"), sites = $("map-sites"), labels = $("map-labels"), origins = $("map-origins");
  for (const g of [reach5, reach10, sites, labels, origins]) g.replaceChildren();
  const maxW = Math.max(1, ...data.origins.map((o) => o.weight));
  for (const o of data.origins) {
    origins.appendChild(el("circle", { cx: proj.x(o.lon), cy: proj.y(o.lat), r: 0.6 + 1.4 * o.weight / maxW, class: "origin" }));
  }
  const placed = data.sites.filter((s) => s.lat !== null && s.lon !== null);
  for (const s of placed) {
    if (s.tier !== "edge" || s.state !== "up") continue;  // reach comes from live edge pools only
    reach10.appendChild(el("circle", { cx: proj.x(s.lon), cy: proj.y(s.lat), r: r10 }));
    reach5.appendChild(el("circle", { cx: proj.x(s.lon), cy: proj.y(s.lat), r: r5 }));
  }
  const order = { edge: 0, regional: 1, hub: 2 };
  placed.sort((a, b) => order[a.tier] - order[b.tier]);
  for (const s of placed) {
    const r = 1.5 + Math.sqrt(s.cards || 1) / 32;
    const g = el("g", { class: "site", "data-site": s.id, "data-state": s.state, "data-tier": s.tier });
    g.appendChild(el("circle", { cx: proj.x(s.lon), cy: proj.y(s.lat), r: r + 3, class: "halo" }));
    g.appendChild(shape(s, r));
    const models = Object.entries(s.models || {}).map(([m, v]) => `${m} ${v.state}`).join(", ");
    g.appendChild(el("title", {}, `${s.name} (${s.id})\n${s.tier}, ${s.state}\ncards ${s.cards}` + (models ? `\nreplicas: ${models}` : "")));
    sites.appendChild(g);
    if (s.tier === "hub" || s.state === "lost") {
      const cls = "label" + (s.tier === "hub" ? " hub" : "") + (s.state === "lost" ? " lost" : "");
      // A hub with another hub just east of it at about its latitude takes its label on the left.
      const crowded = placed.some((o) => o !== s && o.tier === "hub" && o.lon > s.lon && o.lon - s.lon < 7 && Math.abs(o.lat - s.lat) < 1.5);
      const left = s.tier === "hub" && crowded;
      labels.appendChild(el("text", { x: proj.x(s.lon) + (left ? -(r + 1.5) : r + 1.5), y: proj.y(s.lat) + 2.2, class: cls,
        "text-anchor": left ? "end" : "start" },
        s.state === "lost" ? `${s.id} LOST` : s.name.split(" (")[0].replace(" ten-thousand-card hub", " hub")));
    }
  }
}

// ---------------------------------------------------------------- panels

function drawSummary(data) {
  const c = data.counts || {};
  const s = $("summary");
  s.replaceChildren();
  const item = (label, value, cls) => {
    const span = document.createElement("span");
    span.innerHTML = "";
    span.append(label + " ");
    const b = document.createElement("b");
    b.textContent = value;
    if (cls) b.className = cls;
    span.appendChild(b);
    s.appendChild(span);
  };
  item("sites up", String(c.up || 0), "good");
  item("lost", String(c.lost || 0), c.lost ? "bad" : "");
  item("draining", String(c.draining || 0), "");
  item("NATS", data.nats, data.nats === "connected" ? "good" : "bad");
  item("ready", data.ready ? "yes" : "no", data.ready ? "good" : "bad");
  item("jobs queued", String(data.jobs.filter((j) => j.state === "queued").length), "");
}

function drawSites(data) {
  const body = $("sites").tBodies[0];
  body.replaceChildren();
  const rank = { lost: 0, draining: 1, unknown: 2, up: 3 };
  const rows = [...data.sites].sort((a, b) => (rank[a.state] ?? 4) - (rank[b.state] ?? 4) || a.id.localeCompare(b.id));
  for (const s of rows) {
    const tr = document.createElement("tr");
    tr.className = s.state;
    tr.dataset.site = s.id;
    tr.dataset.state = s.state;
    cell(tr, s.id);
    cell(tr, s.tier);
    cell(tr, s.state + (s.draining && s.state === "up" ? " (draining)" : ""), "state " + s.state);
    const free = Object.values(s.free_cards || {}).reduce((a, b) => a + b, 0);
    cell(tr, s.state === "up" ? `${Math.round(free)} / ${s.cards}` : `— / ${s.cards}`);
    cell(tr, s.state === "up" ? `${s.inflight || 0} in flight, ${s.queue_depth || 0} queued` : "");
    cell(tr, Object.entries(s.models || {}).map(([m, v]) => `${m} (${v.state})`).join(", "));
    body.appendChild(tr);
  }
}

function drawDeployments(data) {
  const body = $("deployments").tBodies[0];
  body.replaceChildren();
  if (!data.deployments.length) {
    const tr = document.createElement("tr");
    cell(tr, "no deployments", "muted").colSpan = 5;
    body.appendChild(tr);
  }
  for (const d of data.deployments) {
    const tr = document.createElement("tr");
    cell(tr, d.id);
    cell(tr, d.tenant);
    cell(tr, d.model);
    cell(tr, d.state, "state " + d.state);
    cell(tr, d.replicas.map((r) => `${r.site}: ${r.state}`).join(", "));
    body.appendChild(tr);
  }
}

function why(job) {
  const p = job.placement;
  if (p && p.explanation) {
    const others = (p.explanation.others || []).slice(0, 3)
      .map((o) => `${o.pool}: ${o.reason || (o.total_cny != null ? o.total_cny.toFixed(1) + " CNY" : "")}`).join("; ");
    return [p.explanation.chosen || "", others ? "not " + others : ""];
  }
  return [job.reason || "", ""];
}

function drawJobs(data) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  if (!data.jobs.length) {
    const tr = document.createElement("tr");
    cell(tr, "no training jobs", "muted").colSpan = 6;
    body.appendChild(tr);
  }
  for (const j of data.jobs) {
    const tr = document.createElement("tr");
    cell(tr, j.name ? `${j.id} (${j.name})` : j.id);
    cell(tr, j.tenant);
    cell(tr, j.state + (j.progress ? ` ${(100 * j.progress).toFixed(0)}%` : ""), "state " + j.state);
    cell(tr, String(j.cards));
    cell(tr, j.pool ? `${j.pool} ${j.accelerator}` : "");
    const [chosen, others] = why(j);
    const td = cell(tr, "", "why");
    const b = document.createElement("b");
    b.textContent = chosen;
    td.appendChild(b);
    if (others) td.append(" — " + others);
    body.appendChild(tr);
  }
}

function drawFaults(data) {
  const ul = $("faults");
  ul.replaceChildren();
  if (!data.faults.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "none since this hub started";
    ul.appendChild(li);
  }
  for (const f of data.faults) {
    const li = document.createElement("li");
    const b = document.createElement("span");
    b.className = f.kind;
    b.textContent = { lost: "lost", back: "back", left: "stopped" }[f.kind] || f.kind;
    li.append(b, ` ${f.site}, ${fmtAgo(f.at, data.now)}`);
    ul.appendChild(li);
  }
}

function drawUtilisation(data) {
  const svg = $("util");
  svg.replaceChildren();
  const legend = $("util-legend");
  legend.replaceChildren();
  const pts = data.utilisation;
  const w = 400, h = 120;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const frac of [0.25, 0.5, 0.75]) svg.appendChild(el("line", { x1: 0, x2: w, y1: h * (1 - frac), y2: h * (1 - frac), stroke: "#e3e7ec" }));
  if (pts.length < 1) { legend.textContent = "no samples yet"; return; }
  const t0 = pts[0].at, t1 = Math.max(pts[pts.length - 1].at, t0 + 1);
  for (const tier of ["hub", "regional", "edge"]) {
    const line = pts.filter((p) => tier in p.busy_share)
      .map((p) => `${((p.at - t0) / (t1 - t0) * w).toFixed(1)},${(h - p.busy_share[tier] * h).toFixed(1)}`);
    if (!line.length) continue;
    if (line.length === 1) line.push(`${w},${line[0].split(",")[1]}`);
    svg.appendChild(el("polyline", { points: line.join(" "), fill: "none", stroke: TIER_COLOURS[tier], "stroke-width": 2,
      "vector-effect": "non-scaling-stroke" }));
    const last = pts[pts.length - 1].busy_share[tier];
    const span = document.createElement("span");
    span.style.color = TIER_COLOURS[tier];
    span.textContent = `${tier} ${(100 * (last || 0)).toFixed(1)}% busy`;
    legend.appendChild(span);
  }
  const span = document.createElement("span");
  span.className = "muted";
  span.textContent = `over ${Math.round((t1 - t0) / 60)} min`;
  legend.appendChild(span);
}

// ---------------------------------------------------------------- loop

async function poll() {
  timer = null;
  try {
    const resp = await fetch("/v1/dashboard", { headers: { Authorization: "Bearer " + key } });
    if (resp.status === 401 || resp.status === 403) { askKey("that key is not an admin key"); return; }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    $("main").hidden = false;
    drawSummary(data);
    drawMap(data);
    drawSites(data);
    drawDeployments(data);
    drawJobs(data);
    drawFaults(data);
    drawUtilisation(data);
    $("status").textContent = `hub ${data.hub}, updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
    document.body.dataset.loaded = "yes";
  } catch (err) {
    $("status").textContent = "cannot reach the hub: " + err.message + " (retrying)";
  }
  timer = setTimeout(poll, POLL_MS);
}

async function start() {
  if (!proj) await drawProvinces();
  poll();
}

readKey();
if (key) start(); else askKey();
