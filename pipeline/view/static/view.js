// lenspipe explorer: navigation and start; the views are in common.js, trajectory.js, cache.js, findings.js
"use strict";

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
