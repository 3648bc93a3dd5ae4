// Search page: features that fire most on a text, whose explanation matches, or by id.
"use strict";

GS.header("search");

const $ = (id) => document.getElementById(id);
const HINTS = {
  text: "Features with the strongest activation anywhere in the text; give a token to search only where it occurs.",
  explanation: "Words to look for in the features' explanations.",
  promotes: "A word (one token of the model's vocabulary): the features whose decoder raises its logit most, in standard deviations of their logit lens over the vocabulary, dense ones hidden. Handles to steer towards it.",
  id: "SAE_ID#INDEX, or a feature index (looked up in the chosen SAE, or every SAE).",
};

const mode = () => document.querySelector("input[name=mode]:checked").value;

async function search() {
  const body = {query: $("query").value, mode: mode(), sae_id: $("sae").value || null};  // k: the server's default
  if (mode() === "text" && $("token").value.trim()) body.token = $("token").value;
  if (["text", "promotes"].includes(mode()) && $("show-dense").checked) body.hide_dense = 1.0;  // else the server's default
  $("status").textContent = body.mode === "text" ? "running the model…" : "";
  const data = await GS.busy($("search"), $("error"), () => GS.api("/v1/search/text", body));
  $("status").textContent = "";
  if (!data) return;
  const table = $("results");
  table.innerHTML = "";
  const showAct = data.mode === "text" || data.mode === "promotes";
  const valueHead = data.mode === "promotes" ? "z (lens)" : "activation";
  const tokenHead = data.mode === "promotes" ? "promotes" : "on token";
  table.append(GS.el("tr", {}, GS.el("th", {}, "feature"), GS.el("th", {}, "SAE"), GS.el("th", {}, "explanation"),
    showAct ? GS.el("th", {class: "num"}, valueHead) : null, showAct ? GS.el("th", {}, tokenHead) : null));
  for (const r of data.results) {
    table.append(GS.el("tr", {class: "result"},
      GS.el("td", {}, GS.el("a", {href: GS.featureUrl(r.sae_id, r.index), class: "mono"}, `#${r.index}`)),
      GS.el("td", {class: "mono small"}, r.sae_id),
      GS.el("td", {}, r.explanation || ""),
      showAct ? GS.el("td", {class: "num"}, GS.fmt(data.mode === "promotes" ? r.z : r.value, 3)) : null,
      showAct ? GS.el("td", {class: "mono small nowrap"}, r.token === undefined ? "" : JSON.stringify(r.token)) : null));
  }
  $("results-title").textContent = `${data.results.length} result${data.results.length === 1 ? "" : "s"}`;
  if (!data.results.length && data.mode === "text" && !$("show-dense").checked) {
    table.append(GS.el("tr", {}, GS.el("td", {colspan: 5, class: "small", id: "dense-hint"},
      `No feature left after hiding dense ones (firing on more than ${GS.pct((await GS.run()).limits.dense)} of tokens). `,
      GS.el("button", {class: "plain", type: "button", onclick: () => { $("show-dense").checked = true; search(); }}, "show dense features too"))));
  }
  $("results-card").hidden = false;
}

async function runContrast() {
  const lines = (id) => $(id).value.split("\n").filter((l) => l.trim() !== "");
  const body = {a: lines("set-a"), b: lines("set-b"), pool: $("pool").value};  // top: the server's default
  if ($("contrast-dense").checked) body.hide_dense = 1.0;  // else the server's default share
  $("c-status").textContent = "running the model over both sets…";
  const data = await GS.busy($("contrast"), $("c-error"), () => GS.api("/v1/search/contrast", body));
  $("c-status").textContent = "";
  if (!data) return;
  const table = $("contrast-results");
  table.innerHTML = "";
  table.append(GS.el("tr", {}, GS.el("th", {}, "feature"), GS.el("th", {}, "SAE"), GS.el("th", {class: "num"}, "effect"),
    GS.el("th", {class: "num"}, "mean A"), GS.el("th", {class: "num"}, "mean B"), GS.el("th", {class: "num"}, "fired A"),
    GS.el("th", {class: "num"}, "fired B"), GS.el("th", {class: "num"}, "density"), GS.el("th", {}, "explanation")));
  for (const r of data.results) {
    table.append(GS.el("tr", {class: "contrast-row"},
      GS.el("td", {}, GS.el("a", {href: GS.featureUrl(r.sae_id, r.index), class: "mono"}, `#${r.index}`)),
      GS.el("td", {class: "mono small"}, r.sae_id),
      GS.el("td", {class: "num"}, GS.fmt(r.effect, 2)),
      GS.el("td", {class: "num"}, GS.fmt(r.mean_a, 2)), GS.el("td", {class: "num"}, GS.fmt(r.mean_b, 2)),
      GS.el("td", {class: "num"}, `${r.fired_a}/${data.n_a}`), GS.el("td", {class: "num"}, `${r.fired_b}/${data.n_b}`),
      GS.el("td", {class: "num"}, r.density === null || r.density === undefined ? "–" : GS.pct(r.density)),
      GS.el("td", {class: "small"}, r.explanation || "")));
  }
  const dense = GS.pct((await GS.run()).limits.dense);
  $("contrast-note").textContent = (data.results.length ? "" : "No latent fires more on A than on B. ") +
    (data.hidden_dense ? `${data.hidden_dense} latents denser than ${dense} were hidden (tick "dense latents too" to see them).` : "");
}

function onMode() {
  $("hint").textContent = HINTS[mode()];
  $("token-label").hidden = mode() !== "text";
  $("dense-label").hidden = !["text", "promotes"].includes(mode());
  const all = $("sae").querySelector("option[value='']");
  if (all) all.disabled = mode() === "text";
  if (mode() === "text" && !$("sae").value) $("sae").selectedIndex = 1;
}

(async function init() {
  const q = GS.query();
  try { await GS.fillSaeSelect($("sae"), q.get("sae_id"), true); await GS.showLimits(); }
  catch (e) { $("error").textContent = e.message; return; }
  if (q.get("mode")) document.querySelector(`input[name=mode][value=${CSS.escape(q.get("mode"))}]`).checked = true;
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", onMode));
  onMode();
  $("search").addEventListener("click", search);
  $("contrast").addEventListener("click", runContrast);
  $("query").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
  if (q.get("q")) { $("query").value = q.get("q"); search(); }
})();
