// Steer page: default and steered completions side by side, same seed and sampling settings.
"use strict";

GS.header("steer");

const $ = (id) => document.getElementById(id);

async function addFeature(saeId, index, strength) {
  const select = GS.el("select", {class: "sae"});
  await GS.fillSaeSelect(select, saeId);
  const idx = GS.el("input", {type: "number", class: "index", min: 0, value: index === undefined ? 0 : index});
  const str = GS.el("input", {type: "number", class: "strength", step: "any", placeholder: "max act", style: "width: 160px",
    value: strength === undefined || strength === null ? null : strength});
  const mode = GS.el("select", {class: "mode"}, ["add", "clamp", "ablate"].map((m) => GS.el("option", {value: m}, m)));
  const link = GS.el("a", {class: "small", target: "_blank"}, "page");
  // Show the default strength (the feature's max activation) and its explanation as a hint.
  const hint = GS.el("span", {class: "small muted expl-hint"});
  let asked = 0;
  const update = async () => {
    link.href = GS.featureUrl(select.value, idx.value || 0);
    const mine = ++asked;
    try {
      const f = await GS.api(`/v1/feature/${encodeURIComponent(select.value)}/${Number(idx.value || 0)}`);
      if (mine !== asked) return;
      str.placeholder = `max act ${GS.fmt(f.max_act, 2)}`;
      hint.textContent = f.explanation || "";
    } catch (e) {
      if (mine !== asked) return;
      str.placeholder = "strength";
      hint.textContent = e.message;
    }
  };
  select.addEventListener("change", update); idx.addEventListener("input", update); update();
  const row = GS.el("div", {class: "steer-row feature-row"},
    GS.el("label", {}, "SAE ", select), GS.el("label", {}, "feature # ", idx),
    GS.el("label", {}, "strength ", str), GS.el("label", {}, "mode ", mode), link,
    GS.el("button", {class: "plain", type: "button", onclick: () => row.remove()}, "remove"), hint);
  $("features").append(row);
}

// An input's number, or undefined when left empty (the field is then left out: the server's default).
function numberOf(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

function chosenFeatures() {
  return [...document.querySelectorAll(".feature-row")].map((row) => {
    const s = row.querySelector(".strength").value;
    return {sae_id: row.querySelector(".sae").value, index: Number(row.querySelector(".index").value),
      strength: s === "" ? null : Number(s), mode: row.querySelector(".mode").value};
  });
}

async function steer() {
  const features = chosenFeatures();
  const body = {prompt: $("prompt").value, features, temperature: numberOf("temperature"),
    seed: numberOf("seed"), max_new_tokens: numberOf("max-new"), freq_penalty: numberOf("freq")};
  $("status").textContent = "generating both completions…";
  const data = await GS.busy($("steer"), $("error"), () => GS.api("/v1/steer/completion", body));
  $("status").textContent = "";
  if (!data) return;
  const show = (id, text) => {
    const box = $(id);
    box.innerHTML = "";
    box.append(GS.el("span", {class: "prompt"}, data.prompt), text);
  };
  show("default", data.default);
  show("steered", data.steered);
  $("steered-tag").textContent = data.features.map((f) =>
    f.mode === "ablate" ? `ablate #${f.index}` : `${f.mode} #${f.index} × ${GS.fmt(f.strength, 2)}`).join(", ");
  $("outputs").hidden = false;
}

// Measured interventions: watched tokens over a prompt set, mass shifts, the cost, a sweep.
function lines(id) {
  return $(id).value.split("\n").filter((l) => l.trim() !== "");
}

async function measureEffects() {
  const prompts = [$("prompt").value, ...lines("m-prompts")];
  const watch = lines("m-watch").map((w) => w.replace(/^"(.*)"$/, "$1"));
  const strengths = $("m-sweep").value.trim() ? $("m-sweep").value.split(",").map(Number) : null;
  const body = {prompts, watch, features: chosenFeatures(), side_effect_tokens: numberOf("m-cost"), strengths};
  $("m-status").textContent = "measuring (prompts, held-out text" + (strengths ? ", every strength" : "") + ")…";
  const data = await GS.busy($("measure"), $("m-error"), () => GS.api("/v1/steer/measure", body));
  $("m-status").textContent = "";
  if (!data) return;
  const box = $("m-result");
  box.innerHTML = "";
  box.append(GS.el("table", {id: "m-watch-table"},
    GS.el("tr", {}, GS.el("th", {}, "watched token"), GS.el("th", {class: "num"}, "p without"), GS.el("th", {class: "num"}, "p with"), GS.el("th", {}, "per prompt")),
    data.watch.map((w) => GS.el("tr", {},
      GS.el("td", {class: "mono"}, JSON.stringify(w.token)), GS.el("td", {class: "num"}, GS.fmt(w.p_clean, 4)),
      GS.el("td", {class: "num"}, GS.fmt(w.p_intervened, 4)),
      GS.el("td", {class: "small muted"}, w.per_prompt.map((r) => `${GS.fmt(r.p_clean, 3)}→${GS.fmt(r.p_intervened, 3)}`).join("  "))))));
  const fmtTokens = (rows) => rows.slice(0, 8).map((r) => `${JSON.stringify(r.token)} ${r.delta > 0 ? "+" : ""}${GS.fmt(r.delta, 4)}`).join(", ");
  box.append(GS.el("div", {class: "small"}, GS.el("b", {}, "gained most probability: "), fmtTokens(data.rose)),
    GS.el("div", {class: "small"}, GS.el("b", {}, "lost most probability: "), fmtTokens(data.fell)));
  if (data.side_effects) {
    const c = data.side_effects;
    box.append(GS.el("div", {class: "small", id: "m-cost-line"}, GS.el("b", {}, "cost on held-out text: "),
      `LM loss ${GS.fmt(c.lm_loss, 3)} → ${GS.fmt(c.lm_loss_intervened, 3)} (ΔLM ${GS.fmt(c.delta_lm_loss, 3)}), KL ${GS.fmt(c.kl, 3)} over ${c.n_predictions} predictions`));
  }
  if (data.sweep) box.append(sweepChart(data.sweep, watch), sweepTable(data.sweep, watch));
}

function sweepTable(rows, watch) {
  return GS.el("table", {id: "m-sweep-table"},
    GS.el("tr", {}, GS.el("th", {class: "num"}, "strength"), watch.map((w) => GS.el("th", {class: "num"}, `p ${JSON.stringify(w)}`)),
      GS.el("th", {class: "num"}, "ΔLM"), GS.el("th", {class: "num"}, "KL"), GS.el("th", {}, "greedy completion")),
    rows.map((r) => GS.el("tr", {}, GS.el("td", {class: "num"}, GS.fmt(r.strength, 2)),
      watch.map((w) => GS.el("td", {class: "num"}, GS.fmt(r.watch[w], 4))),
      GS.el("td", {class: "num"}, GS.fmt(r.delta_lm_loss, 3)), GS.el("td", {class: "num"}, GS.fmt(r.kl, 3)),
      GS.el("td", {class: "small"}, r.completion))));
}

// The sweep as a line chart: each watched token's probability (left axis) and ΔLM loss (dashed, right axis).
function sweepChart(rows, watch) {
  const W = 560, H = 220, L = 46, R = 46, T = 12, B = 30;
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text) n.textContent = text; return n; };
  const svg = el("svg", {width: W, height: H, id: "m-sweep-chart", class: "chart"});
  const xs = rows.map((r) => r.strength), lo = Math.min(...xs), hi = Math.max(...xs);
  const x = (v) => L + (hi === lo ? 0.5 : (v - lo) / (hi - lo)) * (W - L - R);
  const pMax = Math.max(1e-6, ...rows.flatMap((r) => watch.map((w) => r.watch[w])));
  const dMax = Math.max(1e-6, ...rows.map((r) => Math.abs(r.delta_lm_loss)));
  const yP = (v) => H - B - (v / pMax) * (H - T - B), yD = (v) => H - B - (Math.abs(v) / dMax) * (H - T - B);
  const colors = ["#c2410c", "#1d4ed8", "#15803d", "#7c3aed", "#b91c1c", "#0e7490", "#a16207", "#4b5563"];
  svg.append(el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9ca3af"}));
  watch.forEach((w, i) => {
    svg.append(el("polyline", {points: rows.map((r) => `${x(r.strength)},${yP(r.watch[w])}`).join(" "), fill: "none", stroke: colors[i % 8], "stroke-width": 2}));
    svg.append(el("text", {x: L + 4, y: T + 12 + 14 * i, fill: colors[i % 8], "font-size": 12}, `p ${JSON.stringify(w)}`));
  });
  svg.append(el("polyline", {points: rows.map((r) => `${x(r.strength)},${yD(r.delta_lm_loss)}`).join(" "), fill: "none", stroke: "#111827", "stroke-dasharray": "4 3", "stroke-width": 1.5}));
  svg.append(el("text", {x: W - R - 90, y: T + 12, "font-size": 12}, "ΔLM loss (dashed)"));
  rows.forEach((r) => svg.append(el("text", {x: x(r.strength), y: H - 10, "font-size": 11, "text-anchor": "middle"}, GS.fmt(r.strength, 2))));
  svg.append(el("text", {x: 4, y: T + 6, "font-size": 11}, GS.fmt(pMax, 3)));
  svg.append(el("text", {x: W - R + 4, y: T + 6, "font-size": 11}, GS.fmt(dMax, 3)));
  return svg;
}

(async function init() {
  const q = GS.query();
  try {
    const run = await GS.showLimits();  // the sampling inputs start at the server's defaults
    if (run.saes.length) await addFeature(q.get("sae_id") || run.saes[0].id, q.get("index") || 0, q.get("strength"));
  } catch (e) { $("error").textContent = e.message; }
  if (q.get("prompt")) $("prompt").value = q.get("prompt");
  $("add-feature").addEventListener("click", () => addFeature());
  $("steer").addEventListener("click", steer);
  $("measure").addEventListener("click", measureEffects);
})();
