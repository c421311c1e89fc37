// The POPEX edge dashboard: polls the JSON API, draws plain canvases. No libraries, no build step.
"use strict";

const POLL_MS = 2000;
const MAX_POINTS = 300;
const TABLE_EVERY_N_POLLS = 5;  // the strategy table is ~170 kB: every 10 s is enough
const linkSeries = [];  // {t_s, uplink_mbps, rtt_ms}: the history the status gives, then one point per poll

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function fmt(value, digits) {
  return (typeof value === "number" && isFinite(value)) ? value.toFixed(digits) : "–";
}

function addLinkPoints(uplink) {
  const history = Array.isArray(uplink.history) ? uplink.history : [];
  if (linkSeries.length === 0) {
    for (const sample of history) {
      const t = sample.time_s !== undefined ? sample.time_s : sample.t_s;
      if (typeof t === "number" && typeof sample.uplink_mbps === "number") {
        linkSeries.push({t_s: t, uplink_mbps: sample.uplink_mbps,
                         rtt_ms: typeof sample.rtt_ms === "number" ? sample.rtt_ms : uplink.rtt_ms});
      }
    }
  }
  linkSeries.push({t_s: Date.now() / 1000, uplink_mbps: uplink.uplink_mbps, rtt_ms: uplink.rtt_ms});
  while (linkSeries.length > MAX_POINTS) linkSeries.shift();
}

function drawLines(canvas, series, colors, labels) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 30;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px sans-serif";
  series.forEach((points, k) => {
    if (points.length === 0) return;
    const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y1 = Math.max(...ys, 1e-9) * 1.1;
    ctx.strokeStyle = colors[k];
    ctx.beginPath();
    points.forEach((p, i) => {
      const x = pad + (x1 > x0 ? (p[0] - x0) / (x1 - x0) : 1) * (w - 2 * pad);
      const y = h - pad - (p[1] / y1) * (h - 2 * pad);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = colors[k];
    ctx.fillText(`${labels[k]} (max ${y1 / 1.1 >= 100 ? (y1 / 1.1).toFixed(0) : (y1 / 1.1).toFixed(2)})`,
                 pad + k * 220, 14);
  });
}

function drawRequests(canvas, requests) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 30;
  ctx.clearRect(0, 0, w, h);
  if (requests.length === 0) return;
  const top = Math.max(...requests.map(r => Math.max(r.total_ms, r.deadline_ms)), 1e-9) * 1.1;
  const x = i => pad + (requests.length > 1 ? i / (requests.length - 1) : 1) * (w - 2 * pad);
  const y = v => h - pad - (v / top) * (h - 2 * pad);
  ctx.strokeStyle = "#888";
  ctx.beginPath();
  requests.forEach((r, i) => { if (i === 0) ctx.moveTo(x(i), y(r.deadline_ms)); else ctx.lineTo(x(i), y(r.deadline_ms)); });
  ctx.stroke();
  requests.forEach((r, i) => {
    ctx.fillStyle = r.fallback ? "#d60" : (r.total_ms > r.deadline_ms ? "#b00" : (r.where === "cloud" ? "#06c" : "#090"));
    ctx.fillRect(x(i) - 2, y(r.total_ms) - 2, 4, 4);
  });
  ctx.fillStyle = "#222";
  ctx.font = "12px sans-serif";
  ctx.fillText(`max ${(top / 1.1).toFixed(1)} ms · green edge · blue cloud · orange fallback · red late`, pad, 14);
}

function renderStrategies(models) {
  const body = document.querySelector("#strategies tbody");
  body.replaceChildren();
  for (const model of models) {
    const s = model.strategy || {};
    const row = document.createElement("tr");
    row.dataset.model = model.model_id;
    row.dataset.split = String(s.split);
    const thresholds = Array.isArray(s.thresholds) ? s.thresholds.map(t => t === null ? "off" : String(t)).join(", ") : "–";
    const cells = [`${model.name} (${model.model_id.slice(0, 12)})`, model.state, String(s.split), `[${thresholds}]`,
                   fmt(s.predicted_latency_ms, 2), fmt(s.accuracy, 4), fmt(s.offload_prob, 3),
                   s.feasible ? "yes" : "no"];
    cells.forEach((value, k) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (k === 2) cell.className = "split";
      if (k === 7 && !s.feasible) cell.className = "bad";
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
}

function renderStatus(status) {
  const uplink = status.uplink;
  const mbps = document.getElementById("uplink-mbps");
  mbps.textContent = fmt(uplink.uplink_mbps, 3);
  mbps.dataset.value = String(uplink.uplink_mbps);
  const rtt = document.getElementById("rtt-ms");
  rtt.textContent = fmt(uplink.rtt_ms, 2);
  rtt.dataset.value = String(uplink.rtt_ms);
  text("uplink-source", `source: ${uplink.source}`);
  text("cloud-health", status.cloud.healthy ? "healthy" : "unreachable");
  document.getElementById("cloud-health").className = status.cloud.healthy ? "" : "bad";
  text("cloud-url", status.cloud.url);
  const counts = status.requests || {};
  text("request-counts", `${counts.n_requests || 0} (${counts.n_fallback || 0} fallbacks)`);
  text("default-deadline", fmt(status.default_deadline_ms, 1));
  text("objective", status.objective);
  renderStrategies(status.models || []);
  addLinkPoints(uplink);
  drawLines(document.getElementById("link-chart"),
            [linkSeries.map(p => [p.t_s, p.uplink_mbps]), linkSeries.map(p => [p.t_s, p.rtt_ms])],
            ["#06c", "#c60"], ["uplink Mbit/s", "RTT ms"]);
}

function renderRequests(body) {
  const requests = body.requests || [];
  drawRequests(document.getElementById("requests-chart"), requests);
  const late = requests.filter(r => r.total_ms > r.deadline_ms).length;
  text("requests-summary", `${requests.length} recent requests, ${late} over their requirement`);
}

let nPolls = 0;

function paretoFront(rows) {
  // Rows no other row beats on both expected latency (lower) and accuracy (higher), by latency.
  const sorted = rows.slice().sort((a, b) => a.expected_latency_ms - b.expected_latency_ms || b.accuracy - a.accuracy);
  const front = [];
  let best = -Infinity;
  for (const row of sorted) {
    if (row.accuracy > best) { front.push(row); best = row.accuracy; }
  }
  return front;
}

function drawPareto(canvas, table, deadlineMs) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 34;
  ctx.clearRect(0, 0, w, h);
  const rows = table.rows || [];
  if (rows.length === 0) return [];
  const lat = rows.map(r => r.expected_latency_ms), acc = rows.map(r => r.accuracy);
  const x1 = Math.max(...lat, deadlineMs) * 1.05, y0 = Math.min(...acc), y1 = Math.max(...acc);
  const x = v => pad + (v / x1) * (w - 2 * pad);
  const y = v => h - pad - (y1 > y0 ? (v - y0) / (y1 - y0) : 0.5) * (h - 2 * pad);
  ctx.fillStyle = "#bbb";
  rows.forEach(r => ctx.fillRect(x(r.expected_latency_ms) - 1, y(r.accuracy) - 1, 2, 2));
  const front = paretoFront(rows);
  ctx.strokeStyle = "#06c";
  ctx.beginPath();
  front.forEach((r, i) => { if (i === 0) ctx.moveTo(x(r.expected_latency_ms), y(r.accuracy)); else ctx.lineTo(x(r.expected_latency_ms), y(r.accuracy)); });
  ctx.stroke();
  ctx.strokeStyle = "#888";
  ctx.beginPath(); ctx.moveTo(x(deadlineMs), pad / 2); ctx.lineTo(x(deadlineMs), h - pad); ctx.stroke();
  const chosen = table.chosen;
  if (chosen) {
    ctx.fillStyle = "#b00";
    ctx.beginPath(); ctx.arc(x(chosen.predicted_latency_ms), y(chosen.accuracy), 4, 0, 2 * Math.PI); ctx.fill();
  }
  ctx.fillStyle = "#222";
  ctx.font = "12px sans-serif";
  ctx.fillText(`latency 0–${x1.toFixed(1)} ms · accuracy ${(100 * y0).toFixed(2)}–${(100 * y1).toFixed(2)} % · ` +
               "grey rows · blue Pareto front · red chosen · line requirement", pad, 14);
  return front;
}

async function pollTable(status) {
  const models = status.models || [];
  const model = models.find(m => m.state === "ready") || models[0];
  if (!model) return;
  const r = await fetch(`/api/v1/models/${encodeURIComponent(model.model_id)}/strategies?limit=10000`);
  if (!r.ok) return;
  const table = await r.json();
  const front = drawPareto(document.getElementById("pareto-chart"), table, status.default_deadline_ms);
  text("pareto-model", `${model.name} (${model.model_id.slice(0, 12)})`);
  text("pareto-summary", `${table.n_rows} rows, ${front.length} on the Pareto front; chosen: split ${table.chosen.split}, ` +
       `${fmt(table.chosen.predicted_latency_ms, 2)} ms, accuracy ${fmt(table.chosen.accuracy, 4)}`);
}

async function poll() {
  try {
    const [status, recent] = await Promise.all(
      ["/api/v1/status", "/api/v1/requests"].map(url => fetch(url).then(r => {
        if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
        return r.json();
      })));
    renderStatus(status);
    renderRequests(recent);
    if (nPolls++ % TABLE_EVERY_N_POLLS === 0) await pollTable(status);
    text("updated", `updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.loaded = "true";
  } catch (err) {
    text("updated", `update failed: ${err.message}`);
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", poll);
