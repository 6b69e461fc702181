// lenspipe explorer: the page's three views over the JSON routes of pipeline/view/app.py.
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

function drawTrajectory() {
  const traj = state.traj;
  if (!traj) return;
  const stat = $("#stat").value;
  const grids = Object.values(traj.lenses);
  const scale = scaler(stat, grids);
  const panels = $("#heatmaps");
  panels.innerHTML = "";
  for (const [name, grid] of Object.entries(traj.lenses)) {
    panels.append(heatmap(name, grid, traj.rows, traj.inputs, stat, scale, (c) =>
      positionCurve("position-curve", traj, c, stat, `after ${JSON.stringify(traj.inputs[c])}`)));
  }
  positionCurve("position-curve", traj, traj.inputs.length - 1, stat, `after ${JSON.stringify(traj.inputs.at(-1))}`);
}

async function runPrompt(event) {
  if (event) event.preventDefault();
  setStatus("running the model…");
  try {
    state.traj = await api("/api/trajectory", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.run.model, corpus: state.run.corpus, prompt: $("#prompt").value }),
    });
    drawTrajectory();
    const cut = state.traj.truncated ? " (the prompt was cut at this length)" : "";
    setStatus(`${state.traj.inputs.length} tokens${cut} · ${Object.keys(state.traj.lenses).length} lenses`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// ------------------------------------------------------------------ cache browser

async function loadTokens() {
  const form = $("#token-filters");
  const params = new URLSearchParams();
  for (const el of form.elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") params.set(el.name, el.checked ? "true" : "false");
    else if (el.value !== "") params.set(el.name, el.value);
  }
  params.set("offset", state.offset);
  params.set("limit", state.limit);
  setStatus("reading the token table…");
  try {
    const page = await api(`/api/tokens?${runParams()}&${params}`);
    fillOptions(form.elements.category, page.categories);
    fillOptions(form.elements.document, page.documents);
    const body = $("#token-rows");
    body.innerHTML = "";
    for (const row of page.rows) {
      const tr = body.insertRow();
      tr.dataset.index = row.index;
      const cells = [row.index, row.document, `${show(row.token)} → ${show(row.next)}`, row.category,
        fmt(row.kl_logit, 3), fmt(row.kl_tuned, 3), row.depth_logit, row.depth_tuned,
        fmt(row.disagree, 2), row.model_rank < 0 ? "n/a" : row.model_rank];
      for (const value of cells) tr.insertCell().textContent = value;
      tr.addEventListener("click", () => openToken(row.index));
    }
    state.total = page.total;
    const last = Math.min(page.total, page.offset + page.rows.length);
    $("#page-info").textContent = page.total ? `tokens ${page.offset + 1}–${last} of ${page.total.toLocaleString()}` : "no token matches";
    setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  }
}

// A filter's choices from the run's table, keeping the current choice (the first option is "any").
function fillOptions(select, values) {
  const chosen = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const v of values) select.add(new Option(v, v));
  select.value = values.includes(chosen) ? chosen : "";
}

async function openToken(index) {
  setStatus(`reading token ${index} from the store…`);
  try {
    const t = await api(`/api/token?${runParams()}&index=${index}`);
    state.stored = t;
    drawStored();
    setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  }
}

// A stored token: its context, then a column per lens (rows = layers) and the curve.
function drawStored() {
  const t = state.stored;
  const out = $("#token-trajectory");
  out.innerHTML = "";
  const ctx = document.createElement("p");
  ctx.className = "context";
  t.context.tokens.forEach((text, i) => {
    const span = document.createElement("span");
    span.textContent = text;
    if (t.context.start + i === t.index) span.className = "here";
    ctx.append(span);
  });
  const title = document.createElement("h3");
  title.textContent = `token ${t.index}: ${JSON.stringify(t.token)} → ${t.next === null ? "(end of sequence)" : JSON.stringify(t.next)}`;
  const stat = $("#stat").value;
  const names = Object.keys(t.lenses);
  const short = names.map((n) => n.replace(/^tuned \((.*)\)$/, "$1").replace("logit lens", "logit"));
  // one grid whose columns are the lenses: grid[stat][row][lens]
  const merged = {};
  for (const key of ["prob", "entropy", "kl", "rank", "top"]) {
    merged[key] = t.rows.map((_, r) => names.map((n) => (t.lenses[n][key][r] ? t.lenses[n][key][r][0] : null)));
  }
  const scale = scaler(stat, [merged]);
  const panel = heatmap("every lens at this token", merged, t.rows, short, stat, scale, null);
  const curve = document.createElement("div");
  curve.id = "stored-curve";
  curve.className = "plot";
  out.append(title, ctx, panel, curve);
  positionCurve("stored-curve", t, 0, stat, `token ${t.index}`);
  out.scrollIntoView({ behavior: "smooth" });
}

// ------------------------------------------------------------------ tables and findings

let metricRows = [];

async function loadFindings() {
  try {
    const [m, f] = await Promise.all([api("/api/metrics"), api("/api/findings")]);
    metricRows = m.rows;
    const metric = $("#metric"), corpus = $("#metric-corpus");
    if (!metric.options.length) for (const name of m.metrics) metric.add(new Option(name, name));
    const corpora = [...new Set(m.rows.map((r) => r.corpus))];
    corpus.innerHTML = "";
    for (const c of corpora) corpus.add(new Option(c, c));
    drawMetrics();
    drawMatrix();
    drawDepth();
    drawFindings(f);
    const missing = [...m.missing, ...f.missing];
    if (missing.length) setStatus(`not made yet: ${missing.join("; ")}`, true);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function seriesName(r) {
  return `${r.lens === "tuned" ? `tuned (${r.translator})` : r.lens}${r.position && r.position !== "block" ? ` @${r.position}` : ""}`;
}

function drawMetrics() {
  const metric = $("#metric").value, corpus = $("#metric-corpus").value;
  const rows = metricRows.filter((r) => r.corpus === corpus && r.lens !== "model");
  const groups = new Map();
  for (const r of rows) {
    const across = r.train_corpus && r.train_corpus !== r.corpus;  // the logit lens is trained on nothing
    const key = `${r.model} · ${seriesName(r)}${across ? ` (trained on ${r.train_corpus})` : ""}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  const traces = [];
  for (const [name, rs] of groups) {
    rs.sort((a, b) => a.layer - b.layer);
    const hasCi = rs.some((r) => r[`${metric}_lo`] != null);
    traces.push({
      name, mode: "lines+markers", x: rs.map((r) => r.layer), y: rs.map((r) => r[metric]),
      error_y: hasCi ? { type: "data", symmetric: false, array: rs.map((r) => r[`${metric}_hi`] - r[metric]), arrayminus: rs.map((r) => r[metric] - r[`${metric}_lo`]) } : undefined,
    });
  }
  Plotly.react("metrics-plot", traces, {
    title: { text: `${metric} per layer on ${corpus} (95% CI)` },
    xaxis: { title: { text: "layer" } }, yaxis: { title: { text: metric }, type: metric === "kl" ? "log" : "linear" },
    margin: { t: 40 },
  }, { responsive: true });
}

// Mean tuned-lens KL over the layers, per (trained on, evaluated on), of the kind that
// every cell has (the analyses' translator is evaluated on every corpus).
function drawMatrix() {
  const model = state.run ? state.run.model : null;
  const tuned = metricRows.filter((r) => r.lens === "tuned" && (r.position ?? "block") === "block" && (!model || r.model === model));
  const trains = [...new Set(tuned.map((r) => r.train_corpus))], evals = [...new Set(tuned.map((r) => r.corpus))];
  const cells = new Map();
  for (const r of tuned) {
    const key = `${r.train_corpus}|${r.corpus}`;
    if (!cells.has(key)) cells.set(key, new Set());
    cells.get(key).add(r.translator);
  }
  const kinds = [...new Set(tuned.map((r) => r.translator))];
  const kind = kinds.find((k) => [...cells.values()].every((set) => set.has(k))) ?? kinds[0];
  const z = trains.map((t) => evals.map((e) => {
    const rs = tuned.filter((r) => r.train_corpus === t && r.corpus === e && r.translator === kind);
    return rs.length ? rs.reduce((s, r) => s + r.kl, 0) / rs.length : null;
  }));
  Plotly.react("matrix-plot", [{ type: "heatmap", z, x: evals, y: trains, colorscale: "Blues",
    texttemplate: "%{z:.3f}", hovertemplate: "trained on %{y}<br>evaluated on %{x}<br>mean KL %{z:.3f}<extra></extra>" }], {
    title: { text: `lens × corpus: mean KL of the ${kind} lens of ${model}` }, xaxis: { title: { text: "evaluated on" } }, yaxis: { title: { text: "trained on" } },
    margin: { t: 40 },
  }, { responsive: true });
}

function drawDepth() {
  const own = metricRows.filter((r) => (r.train_corpus ?? r.corpus) === r.corpus && r.lens !== "model" && (r.position ?? "block") === "block");
  const groups = new Map();
  for (const r of own) {
    const key = `${r.model} · ${seriesName(r)} · ${r.corpus}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  const traces = [...groups].map(([name, rs]) => ({ name, mode: "lines", x: rs.map((r) => r.depth), y: rs.map((r) => r.kl) }));
  Plotly.react("depth-plot", traces, {
    title: { text: "models on the depth axis: KL vs layer / layers" },
    xaxis: { title: { text: "depth" } }, yaxis: { title: { text: "KL (nats)" }, type: "log" }, margin: { t: 40 },
  }, { responsive: true });
}

function drawFindings(f) {
  const root = $("#findings");
  root.innerHTML = "";
  for (const a of f.analyses) {
    const section = document.createElement("section");
    section.className = "analysis";
    const h = document.createElement("h3");
    h.textContent = a.title + (a.model ? ` · ${a.model} / ${a.corpus}` : "");
    section.append(h);
    const table = document.createElement("table");
    table.className = "data";
    table.innerHTML = "<thead><tr><th>question</th><th>estimate</th><th>95% CI</th><th>n</th><th>verdict</th></tr></thead>";
    const body = table.createTBody();
    for (const x of a.findings) {
      const tr = body.insertRow();
      const ci = x.lo === null ? "" : `[${x.lo.toPrecision(3)}, ${x.hi.toPrecision(3)}]`;
      for (const v of [x.question, x.estimate === null ? "" : x.estimate.toPrecision(3), ci, `${x.n} ${x.unit}`, x.verdict]) tr.insertCell().textContent = v;
      tr.lastChild.className = x.resolved === true ? "resolved" : x.resolved === false ? "unresolved" : "";
    }
    section.append(table);
    if (a.examples.length) section.append(exampleLinks(a));
    if (a.figure) {
      const img = document.createElement("img");
      img.src = a.figure;
      img.alt = a.title;
      img.loading = "lazy";
      section.append(img);
    }
    root.append(section);
  }
}

function exampleLinks(a) {
  const p = document.createElement("p");
  p.className = "examples";
  p.append("examples: ");
  for (const ex of a.examples.slice(0, 40)) {
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = ex.label;
    link.addEventListener("click", (e) => {
      e.preventDefault();
      selectRun(a.model, a.corpus);
      if (ex.prompt) {
        $("#prompt").value = ex.prompt;
        switchView("trajectory");
        runPrompt();
      } else {
        const form = $("#token-filters");
        for (const el of form.elements) if (el.name && el.type !== "checkbox" && el.name !== "sort") el.value = "";
        for (const [k, v] of Object.entries(ex.filter || {})) {
          if (![...form.elements[k].options].some((o) => o.value === v)) form.elements[k].add(new Option(v, v));
          form.elements[k].value = v;
        }
        form.elements.sort.value = ex.sort || "index";
        form.elements.desc.checked = !!ex.desc;
        state.offset = 0;
        switchView("cache");
      }
    });
    p.append(link, " ");
  }
  return p;
}

// ------------------------------------------------------------------ navigation

function selectRun(model, corpus) {
  const i = state.runs.findIndex((r) => r.model === model && r.corpus === corpus);
  if (i >= 0) {
    $("#run").value = i;
    state.run = state.runs[i];
  }
}

function switchView(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.view === name);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${name}`;
  if (name === "cache") loadTokens();
  if (name === "findings") loadFindings();
}

async function start() {
  try {
    const r = await api("/api/runs");
    state.runs = r.runs;
    const select = $("#run");
    r.runs.forEach((run, i) => select.add(new Option(`${run.model} / ${run.corpus} (${run.kinds.join(", ") || "no lens yet"})`, i)));
    state.run = r.runs[0];
    select.addEventListener("change", () => {
      state.run = state.runs[select.value];
      state.offset = 0;
      state.total = 0;
      $("#token-trajectory").innerHTML = "";
      const current = document.querySelector("nav button.active").dataset.view;
      if (current !== "trajectory") switchView(current);  // a prompt waits for its Run
    });
    if (!state.run) setStatus(`no run in the config under ${r.data_dir}`, true);
  } catch (e) {
    setStatus(e.message, true);
  }
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => switchView(b.dataset.view));
  $("#prompt-form").addEventListener("submit", runPrompt);
  $("#stat").addEventListener("change", () => { drawTrajectory(); if (state.stored) drawStored(); });
  $("#token-filters").addEventListener("submit", (e) => { e.preventDefault(); state.offset = 0; loadTokens(); });
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadTokens(); });
  $("#next").addEventListener("click", () => {
    if (state.offset + state.limit < state.total) { state.offset += state.limit; loadTokens(); }
  });
  $("#metric").addEventListener("change", drawMetrics);
  $("#metric-corpus").addEventListener("change", drawMetrics);
}

start();
