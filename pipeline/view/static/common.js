// lenspipe explorer: what the views share (state, requests, the heatmap, its tooltip and a position's curve)
"use strict";

const state = { runs: [], run: null, traj: null, stored: null, offset: 0, limit: 50, total: 0 };
const $ = (sel, root = document) => root.querySelector(sel);
const STAT_NAMES = { prob: "top-1 probability", entropy: "entropy (nats)", kl: "KL to the output (nats)", rank: "rank of the next token" };

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function runParams() {
  return `model=${encodeURIComponent(state.run.model)}&corpus=${encodeURIComponent(state.run.corpus)}`;
}

// ------------------------------------------------------------------ heatmaps

// A cell's colour: its statistic scaled to 0..1 (probability as is; the others on a log
// scale up to the largest value in view), then white -> dark blue.
function scaler(stat, grids) {
  if (stat === "prob") return (v) => v;
  let max = 0;
  for (const grid of grids) for (const row of grid[stat]) if (row) for (const v of row) if (v !== null && v > max) max = v;
  const top = Math.log1p(Math.max(max, 1e-9));
  return (v) => (v === null || v < 0 ? null : Math.log1p(v) / top);
}

function colour(x) {
  if (x === null || Number.isNaN(x)) return "#eee";
  const t = Math.min(1, Math.max(0, x));
  const r = Math.round(247 - t * (247 - 8)), g = Math.round(251 - t * (251 - 48)), b = Math.round(255 - t * (255 - 107));
  return `rgb(${r},${g},${b})`;
}

const show = (text) => JSON.stringify(text).slice(1, -1);
const fmt = (v, digits) => (v === null || v === undefined ? "n/a" : v.toFixed(digits));

// One lens's grid as a table: rows from the output (top) down to layer 0, a column per
// position. Cells carry data-row / data-col for the tooltip and the click.
function heatmap(name, grid, rows, columns, stat, scale, onClick) {
  const panel = document.createElement("div");
  panel.className = "panel";
  const title = document.createElement("h3");
  title.textContent = name;
  panel.append(title);
  const table = document.createElement("table");
  table.className = "heatmap";
  table.dataset.lens = name;
  for (let r = rows.length - 1; r >= 0; r--) {
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.textContent = rows[r];
    tr.append(th);
    for (let c = 0; c < columns.length; c++) {
      const td = tr.insertCell();
      td.className = "cell";
      td.dataset.row = r;
      td.dataset.col = c;
      const top = grid.top[r] ? grid.top[r][c] : null;
      const value = grid[stat][r] ? grid[stat][r][c] : null;
      const x = value === null ? null : scale(value);
      td.style.background = colour(x);
      if (x !== null && x > 0.6) td.style.color = "white";
      td.textContent = top ? show(top[0][0]).slice(0, 8) : "";
      td.addEventListener("mouseenter", (e) => tooltip(e, name, grid, r, c, rows[r], columns[c]));
      td.addEventListener("mouseleave", () => ($("#tooltip").hidden = true));
      if (onClick) td.addEventListener("click", () => onClick(c));
    }
  }
  const foot = table.insertRow();
  foot.append(document.createElement("th"));
  for (const label of columns) {
    const th = document.createElement("th");
    th.className = "col-label";
    th.textContent = show(label).slice(0, 10);
    foot.append(th);
  }
  panel.append(table);
  return panel;
}

function tooltip(event, name, grid, r, c, rowName, column) {
  const tip = $("#tooltip");
  const top = grid.top[r] ? grid.top[r][c] : null;
  tip.innerHTML = "";
  const head = document.createElement("div");
  head.className = "tip-head";
  head.textContent = `${name} · layer ${rowName} · after ${JSON.stringify(column)}`;
  tip.append(head);
  if (!top) {
    tip.append("no translator at this position");
  } else {
    const list = document.createElement("ol");
    list.className = "top5";
    for (const [text, p] of top) {
      const li = document.createElement("li");
      li.textContent = `${JSON.stringify(text)}  ${(100 * p).toFixed(1)}%`;
      list.append(li);
    }
    tip.append(list);
    const stats = document.createElement("div");
    const rank = grid.rank[r][c];
    stats.textContent = `entropy ${fmt(grid.entropy[r][c], 2)} · KL ${fmt(grid.kl[r][c], 3)}` + (rank >= 0 ? ` · next-token rank ${rank}` : "");
    tip.append(stats);
  }
  tip.hidden = false;
  // beside the cell, on whichever side has room
  const box = event.target.getBoundingClientRect();
  const left = box.right + 8 + tip.offsetWidth < window.innerWidth ? box.right + 8 : box.left - 8 - tip.offsetWidth;
  tip.style.left = `${window.scrollX + Math.max(0, left)}px`;
  tip.style.top = `${window.scrollY + box.top}px`;
}

// The statistic at one position over the layers, a line per lens. Ranks are drawn as
// 1 + rank on the log axis (rank 0 is the top-1), unknown ranks (-1) not at all.
function positionCurve(target, traj, col, stat, label) {
  const value = (v) => (v === null || v === undefined || (stat === "rank" && v < 0) ? null : stat === "rank" ? v + 1 : v);
  const traces = Object.entries(traj.lenses).map(([name, grid]) => ({
    name,
    x: traj.rows,
    y: grid[stat].map((row) => (row ? value(row[col]) : null)),
    mode: "lines+markers",
  }));
  const axis = stat === "rank" ? "1 + rank of the next token" : STAT_NAMES[stat];
  Plotly.react(target, traces, {
    title: { text: `${STAT_NAMES[stat]} over the layers: ${label}` },
    xaxis: { title: { text: "layer" }, type: "category" },
    yaxis: { title: { text: axis }, type: stat === "prob" ? "linear" : "log" },
    margin: { t: 40 },
  }, { responsive: true });
}
