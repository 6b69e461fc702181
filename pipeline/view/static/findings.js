// lenspipe explorer: tables and findings (per-layer metrics, the lens x corpus matrix, depth axis, findings)
"use strict";

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
