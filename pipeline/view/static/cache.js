// lenspipe explorer: the cache browser (the evaluated held-out tokens, a token's trajectory from the store)
"use strict";

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
