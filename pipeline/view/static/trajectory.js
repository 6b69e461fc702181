// lenspipe explorer: prompt trajectories
"use strict";

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
