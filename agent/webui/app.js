// ferry console: one page over the agent's /api/events stream (server-sent events) and
// /api/actions/* (with the operator token). No build step, no library: the DOM and inline SVG.
"use strict";

const state = { agent: null, peers: [], vms: new Map(), migrations: new Map(), actions: false };
let token = sessionStorage.getItem("ferry-token") || "";

const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const LIVE = new Set(["setup", "active", "device"]);

function bytes(n) {
  n = Number(n) || 0;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}
const ms = (n) => (Number(n) || 0).toLocaleString("en") + " ms";

// -- the event stream ------------------------------------------------------------------------------
function connect() {
  const es = new EventSource("/api/events");  // reconnects by itself (the stream says retry: 1000)
  es.onopen = () => setConn(true);
  es.onerror = () => setConn(false);
  const on = (name, fn) => es.addEventListener(name, (e) => { fn(JSON.parse(e.data)); render(); });
  on("state", (s) => {
    state.agent = s.agent; state.peers = s.peers || []; state.actions = !!s.actions;
    state.vms = new Map((s.vms || []).map((v) => [v.name, v]));
    state.migrations = new Map((s.migrations || []).map((m) => [m.vm, m]));
  });
  on("agent", (a) => { state.agent = a; });
  on("peers", (p) => { state.peers = p; });
  on("vm", (v) => { state.vms.set(v.name, v); });
  on("vm-removed", (v) => { state.vms.delete(v.name); });
  on("migration", (m) => { state.migrations.set(m.vm, m); });
  on("migration-removed", (m) => { state.migrations.delete(m.vm); });
}

function setConn(up) {
  const el = $("#conn");
  el.textContent = up ? "live" : "reconnecting…";
  el.className = "badge " + (up ? "on" : "off");
  el.dataset.state = up ? "live" : "reconnecting";
}

// -- rendering -------------------------------------------------------------------------------------
function render() {
  document.body.classList.toggle("readonly", !state.actions);
  const a = state.agent;
  $("#agent-name").textContent = a ? `${a.name} (${a.version})` : "";
  renderHosts();
  renderVMs();
  renderMigrations();
}

function renderHosts() {
  const rows = [];
  const a = state.agent;
  if (a) rows.push(hostRow(a, "this agent"));
  for (const p of state.peers) rows.push(hostRow(p, p.via ? `peer (${p.via})` : "peer"));
  $("#hosts tbody").innerHTML = rows.join("");
  $("#peer-addresses").innerHTML = state.peers.filter((p) => p.address)
    .map((p) => `<option value="${esc(p.address)}">${esc(p.name)}</option>`).join("");
}

function hostRow(h, role) {
  const mem = h["max-mem"] ? `${bytes(h["free-mem"])} / ${bytes(h["max-mem"])}` : "";
  return `<tr data-host="${esc(h.name)}"><td>${esc(h.name)}</td><td>${esc(role)}</td><td>${esc(h.control ?? h.address ?? "")}</td>` +
    `<td>${esc(h.migration ?? "")}</td><td>${esc(h.version ?? "")}</td><td class="num">${esc(h.vms ?? "")}</td>` +
    `<td class="num">${mem}</td></tr>`;
}

function renderVMs() {
  const vms = [...state.vms.values()].sort((x, y) => x.name.localeCompare(y.name));
  $("#vms tbody").innerHTML = vms.length ? vms.map(vmRow).join("")
    : `<tr><td colspan="8" class="muted">no VMs on this agent</td></tr>`;
  const sel = $("#migrate-vm");
  const keep = sel.value;
  sel.innerHTML = vms.filter((v) => v.state === "running" || v.state === "paused")
    .map((v) => `<option>${esc(v.name)}</option>`).join("");
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
}

function vmRow(v) {
  const nic = (v.nics || []).map((n) => `${n.mac ?? ""} ${n.bridge ? "on " + n.bridge : ""}`).join(", ");
  const disk = (v.disks || []).map((d) => `${d.path ?? ""}${d.size ? " (" + bytes(d.size) + ")" : ""}`).join(", ");
  let act = "";
  if (v.state === "running") act = `<button class="act" data-action="pause" data-vm="${esc(v.name)}">pause</button>`;
  if (v.state === "paused") act = `<button class="act" data-action="resume" data-vm="${esc(v.name)}">resume</button>`;
  return `<tr data-vm="${esc(v.name)}" data-state="${esc(v.state)}"><td>${esc(v.name)}</td>` +
    `<td class="state-${esc(v.state)}">${esc(v.state)}</td><td class="num">${bytes(v.mem)}</td>` +
    `<td>${esc(v.program)}</td><td>${esc(v["dirty-tracker"])}</td><td>${esc(nic) || "—"}</td>` +
    `<td>${esc(disk) || "—"}</td><td>${act}</td></tr>`;
}

function phase(m) {
  const rounds = (m.rounds || []).length;
  if (m.status === "setup") return "setup";
  if (m.status === "active") return `pre-copy, round ${rounds + 1}`;
  if (m.status === "device") return "stop-and-copy (VM paused)";
  return `${m.status} after ${rounds} round${rounds === 1 ? "" : "s"}`;
}

function renderMigrations() {
  const list = [...state.migrations.values()].sort((x, y) =>
    (LIVE.has(y.status) - LIVE.has(x.status)) || x.vm.localeCompare(y.vm));
  $("#migrations").innerHTML = list.length ? list.map(migrationCard).join("") : `<p class="muted">none yet</p>`;
}

function migrationCard(m) {
  const ram = m.ram || {};
  const live = LIVE.has(m.status);
  const total = ram.total || 0;
  // Of the work known so far (sent, plus known dirty and not sent): pages resent count again.
  const known = (ram.transferred || 0) + (ram.remaining || 0);
  const done = m.status === "completed" ? 1 : known ? (ram.transferred || 0) / known : 0;
  const dirtyRate = (ram["dirty-pages-rate"] || 0) * (ram["page-size"] || 4096);
  const dir = m.direction === "out" ? `→ ${m.peer}` : `← ${m.peer}`;
  const figures = [
    ["phase", phase(m)],
    ["rounds done", String((m.rounds || []).length)],
    ["transferred / guest RAM", `${bytes(ram.transferred)} / ${bytes(total)}` +
      ((ram.transferred || 0) > total ? " (resent pages count again)" : "")],
    ["remaining", bytes(ram.remaining)],
    ["dirty rate", `${bytes(dirtyRate)}/s (${(ram["dirty-pages-rate"] || 0).toLocaleString("en")} pages/s)`],
    ["bandwidth", `${bytes((ram.mbps || 0) * 1e6 / 8)}/s`],
    ["expected downtime", ms(m["expected-downtime"])],
    ["total time", ms(m["total-time"])],
  ];
  if (!live) figures.push(["downtime", ms(m.downtime)]);
  if (m["cpu-throttle-percentage"]) figures.push(["vCPU throttle", m["cpu-throttle-percentage"] + " %"]);
  const cancel = live && m.direction === "out"
    ? `<button class="act" data-action="cancel" data-vm="${esc(m.vm)}">cancel</button>` : "";
  return `<div class="card migration" data-vm="${esc(m.vm)}" data-status="${esc(m.status)}" data-rounds="${(m.rounds || []).length}">` +
    `<h3><span>${esc(m.vm)}</span><span class="muted">${esc(m.direction)} ${esc(dir)}</span>` +
    `<span class="status st-${esc(m.status)}">${esc(m.status)}</span>${cancel}</h3>` +
    `<progress max="1" value="${done.toFixed(4)}"></progress>` +
    `<div class="figures">${figures.map(([k, v]) => `<div><span>${esc(k)}</span><b>${esc(v)}</b></div>`).join("")}</div>` +
    (m.summary ? `<p class="summary">${esc(m.summary)}</p>` : "") +
    (m["error-desc"] ? `<p class="error">${esc(m["error-desc"])}</p>` : "") +
    roundsChart(m.rounds || []) + breakdown(m) + `</div>`;
}

// Per round: payload bytes as bars (the final stop-and-copy pass in another colour) and the pages
// the guest dirtied meanwhile as a line, each on its own scale.
function roundsChart(rounds) {
  if (!rounds.length) return "";
  const W = 600, H = 150, L = 48, R = 64, T = 10, B = 22;
  const w = (W - L - R) / Math.max(rounds.length, 12);  // a few rounds: narrow bars, from the left
  const maxB = Math.max(1, ...rounds.map((r) => r.bytes));
  const maxD = Math.max(1, ...rounds.map((r) => r["dirty-pages"]));
  const y = (v, max) => T + (H - T - B) * (1 - v / max);
  let bars = "", pts = [], dots = "", labels = "";
  rounds.forEach((r, i) => {
    const x = L + i * w;
    const top = y(r.bytes, maxB);
    bars += `<rect class="bar ${r.final ? "final" : "bytes"}" x="${(x + w * 0.15).toFixed(1)}" y="${top.toFixed(1)}" ` +
      `width="${(w * 0.7).toFixed(1)}" height="${(H - B - top).toFixed(1)}"><title>round ${i + 1}${r.final ? " (stop-and-copy)" : ""}: ` +
      `${bytes(r.bytes)} in ${r.seconds}s, ${r["dirty-pages"]} pages dirtied</title></rect>`;
    const cx = x + w / 2, cy = y(r["dirty-pages"], maxD);
    pts.push(`${cx.toFixed(1)},${cy.toFixed(1)}`);
    dots += `<circle class="dot" cx="${cx.toFixed(1)}" cy="${cy.toFixed(1)}" r="2.5"></circle>`;
    if (rounds.length <= 30 || i % Math.ceil(rounds.length / 30) === 0)
      labels += `<text x="${cx.toFixed(1)}" y="${H - 8}" text-anchor="middle">${i + 1}</text>`;
  });
  return `<div class="chart"><svg viewBox="0 0 ${W} ${H}" role="img" aria-label="bytes and dirty pages per round">` +
    `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"></line>` +
    `<text x="${L - 4}" y="${T + 8}" text-anchor="end">${esc(bytes(maxB))}</text>` +
    `<text x="${W - R + 4}" y="${T + 8}">${maxD.toLocaleString("en")} pg</text>` +
    bars + `<polyline class="dirty" points="${pts.join(" ")}"></polyline>` + dots + labels + `</svg>` +
    `<div class="legend"><i class="k-bytes"></i>bytes sent per round<i class="k-final"></i>stop-and-copy` +
    `<i class="k-dirty"></i>pages dirtied during the round</div></div>`;
}

const PART_COLOURS = ["#2563eb", "#7c3aed", "#db2777", "#ea580c", "#16a34a", "#0891b2", "#4b5563", "#ca8a04"];

function breakdown(m) {
  const parts = Object.entries(m["downtime-breakdown"] || {}).filter(([, v]) => v > 0);
  if (LIVE.has(m.status) || !parts.length) return "";
  const sum = parts.reduce((s, [, v]) => s + v, 0);
  let x = 0, rects = "";
  parts.forEach(([k, v], i) => {
    const w = (600 * v) / sum;
    rects += `<rect x="${x.toFixed(1)}" y="0" width="${w.toFixed(1)}" height="22" fill="${PART_COLOURS[i % PART_COLOURS.length]}">` +
      `<title>${esc(k)}: ${v} ms</title></rect>` + (w > 60 ? `<text x="${(x + 4).toFixed(1)}" y="15">${esc(k)}</text>` : "");
    x += w;
  });
  const list = parts.map(([k, v]) => `${esc(k)} ${v.toFixed(1)} ms`).join(" · ");
  return `<div class="breakdown"><b>downtime ${ms(m.downtime)}</b> <span class="muted">${list}</span>` +
    `<svg viewBox="0 0 600 22" preserveAspectRatio="none">${rects}</svg></div>`;
}

// -- actions -----------------------------------------------------------------------------------------
function notice(text, ok) {
  const el = $("#notice");
  el.hidden = false;
  el.textContent = text;
  el.className = "notice" + (ok ? " ok" : "");
  el.dataset.status = ok ? "ok" : "error";
}

async function act(action, body) {
  let res;
  try {
    res = await fetch(`/api/actions/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Ferry-Token": token },
      body: JSON.stringify(body),
    });
  } catch (e) {
    notice(`${action} ${body.name}: the agent did not answer (${e})`, false);
    return;
  }
  const reply = await res.json().catch(() => ({}));
  if (res.ok) notice(action === "migrate" ? `migrate ${body.name}: the destination accepted; under way` : `${action} ${body.name}: done`, true);
  else notice(`${action} ${body.name} refused: ${res.status} ${reply.error ?? ""}: ${reply.message ?? res.statusText}`, false);
}

document.addEventListener("click", (e) => {
  const b = e.target.closest("button[data-action]");
  if (b) act(b.dataset.action, { name: b.dataset.vm });
});

$("#migrate-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("#migrate-vm").value, to = $("#migrate-to").value.trim();
  if (!name || !to) { notice("migrate: pick a VM and a destination HOST:PORT", false); return; }
  const params = {};
  const downtime = $("#migrate-downtime").value;
  if (downtime) params["max-downtime"] = Number(downtime);
  const cap = $("#migrate-bandwidth").value;
  if (cap) params.bandwidth = Math.round(Number(cap) * 1e6);
  act("migrate", { name, to, params });
});

$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("#token").value.trim();
  sessionStorage.setItem("ferry-token", token);
  $("#token").value = "";
  $("#token").placeholder = token ? "token set" : "read-only";
});

$("#token").placeholder = token ? "token set" : "read-only";
connect();
