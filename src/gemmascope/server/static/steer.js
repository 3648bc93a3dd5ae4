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

function numberOr(id, fallback) {
  const v = $(id).value;
  return v === "" ? fallback : Number(v);
}

async function steer() {
  const features = [...document.querySelectorAll(".feature-row")].map((row) => {
    const s = row.querySelector(".strength").value;
    return {sae_id: row.querySelector(".sae").value, index: Number(row.querySelector(".index").value),
      strength: s === "" ? null : Number(s), mode: row.querySelector(".mode").value};
  });
  const body = {prompt: $("prompt").value, features, temperature: numberOr("temperature", 0.5),
    seed: numberOr("seed", 0), max_new_tokens: numberOr("max-new", 40), freq_penalty: numberOr("freq", 1)};
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

(async function init() {
  const q = GS.query();
  try {
    const run = await GS.run();
    await addFeature(q.get("sae_id") || run.saes[0].id, q.get("index") || 0, q.get("strength"));
  } catch (e) { $("error").textContent = e.message; }
  if (q.get("prompt")) $("prompt").value = q.get("prompt");
  $("add-feature").addEventListener("click", () => addFeature());
  $("steer").addEventListener("click", steer);
})();
