// Microscope page: a prompt's tokens shaded by their strongest feature, per-token top features.
"use strict";

GS.header("microscope");

const $ = (id) => document.getElementById(id);
let state = null; // {saeId, tokens, results, pinned}

function strongest(r) {
  return r.top_features.length ? r.top_features[0].value : 0;
}

// Every feature seen on the prompt, with its strongest activation and the tokens it fires on.
function featureTable(results) {
  const byIndex = new Map();
  for (const r of results) {
    for (const f of r.top_features) {
      const cur = byIndex.get(f.index) || {index: f.index, max: 0, at: r.position, positions: []};
      cur.positions.push(r.position);
      if (f.value > cur.max) { cur.max = f.value; cur.at = r.position; }
      byIndex.set(f.index, cur);
    }
  }
  return [...byIndex.values()].sort((a, b) => b.max - a.max);
}

function showFeatures(position) {
  const box = $("features");
  box.innerHTML = "";
  let rows;
  if (position === null || position === undefined) {
    rows = featureTable(state.results).slice(0, 40).map((f) => ({index: f.index, value: f.max,
      note: `max on ${JSON.stringify(state.tokens[f.at])}`}));
    $("features-title").textContent = "Features on the prompt (strongest first)";
  } else {
    const r = state.results.find((x) => x.position === position);
    rows = r ? r.top_features : [];
    $("features-title").textContent = `Top features on token ${position}: ${JSON.stringify(state.tokens[position])}`;
  }
  if (!rows.length) box.append(GS.el("div", {class: "muted"}, "No feature fires here (dense features hidden)."));
  for (const f of rows) {
    box.append(GS.el("div", {class: "feat", "data-index": f.index,
      onclick: () => { window.location.href = GS.featureUrl(state.saeId, f.index); }},
      GS.el("a", {class: "id", href: GS.featureUrl(state.saeId, f.index)}, `#${f.index}`),
      GS.el("span", {class: "expl"}, state.explanations[f.index] || f.note || ""),
      GS.el("span", {class: "val"}, GS.fmt(f.value, 2))));
  }
}

function render() {
  const values = state.tokens.map(() => 0);
  for (const r of state.results) values[r.position] = strongest(r);
  const box = $("tokens");
  box.innerHTML = "";
  const tokensEl = GS.renderTokens(state.tokens, values, {
    skipFirst: true,
    title: (i) => {
      const r = state.results.find((x) => x.position === i);
      const top = r && r.top_features.length ? r.top_features.map((f) => `#${f.index} ${GS.fmt(f.value, 2)}`).join(", ") : "no feature";
      return `${JSON.stringify(state.tokens[i])}: ${top}`;
    },
    onhover: (i) => { if (state.pinned === null) showFeatures(i); },
    onclick: (i) => {
      state.pinned = state.pinned === i ? null : i;
      box.querySelectorAll(".tok").forEach((s) => s.classList.toggle("sel", Number(s.dataset.i) === state.pinned));
      showFeatures(state.pinned);
    },
  });
  tokensEl.classList.toggle("bounded", $("bounds").checked);
  box.append(tokensEl);
  $("token-count").textContent = `${state.tokens.length - 1} tokens after BOS`;
  $("result").hidden = false;
  showFeatures(null);
}

// One document per line: each one's top features (max- and mean-pooled), their shared and topic features.
async function runDocuments() {
  const docs = $("prompt").value.split("\n").filter((l) => l.trim() !== "");
  $("status").textContent = "running the model over each document…";
  const data = await GS.busy($("run"), $("error"), () => GS.api("/v1/activation/documents", {documents: docs, sae_id: $("sae").value}));
  $("status").textContent = "";
  if (!data) return;
  const name = (i) => data.explanations[i] || "";
  const list = (rows) => GS.el("div", {class: "doc-feats"}, rows.length ? rows.map((r) =>
    GS.el("div", {class: "feat" + (r.dense ? " dense" : "")},
      GS.el("a", {class: "id", href: GS.featureUrl(data.sae_id, r.index)}, `#${r.index}`),
      GS.el("span", {class: "expl"}, (r.dense ? "(dense) " : "") + name(r.index)),
      GS.el("span", {class: "val"}, GS.fmt(r.value, 2)))) : GS.el("div", {class: "muted small"}, "none"));
  const box = $("docs-result");
  box.innerHTML = "";
  data.documents.forEach((d, k) => box.append(GS.el("div", {class: "card doc-card"},
    GS.el("h2", {}, `Document ${k + 1}: ${d.text.slice(0, 90)}`),
    GS.el("div", {class: "grid3"},
      GS.el("div", {}, GS.el("div", {class: "small muted"}, "max-pooled"), list(d.max)),
      GS.el("div", {}, GS.el("div", {class: "small muted"}, "mean-pooled"), list(d.mean)),
      GS.el("div", {}, GS.el("div", {class: "small muted"}, "its topic: strong here, weak in the others"), list(d.topic))))));
  if (data.documents.length > 1) {
    box.append(GS.el("div", {class: "card", id: "shared"}, GS.el("h2", {}, "Shared by at least half of the documents"),
      data.shared.length ? data.shared.map((r) => GS.el("div", {class: "feat"},
        GS.el("a", {class: "id", href: GS.featureUrl(data.sae_id, r.index)}, `#${r.index}`),
        GS.el("span", {class: "expl"}, (r.dense ? "(dense) " : "") + name(r.index)),
        GS.el("span", {class: "val"}, `${r.n_documents} documents`))) : GS.el("div", {class: "muted"}, "none")));
  }
  box.hidden = false;
  $("result").hidden = true;
}

async function run() {
  if ($("docs-mode").checked) { $("docs-result").hidden = true; return runDocuments(); }
  $("docs-result").hidden = true;
  const saeId = $("sae").value;
  const body = {prompt: $("prompt").value, sae_id: saeId};  // k: the server's default
  if ($("show-dense").checked) body.hide_dense = 1.0;  // else the server's default share
  $("status").textContent = "running the model…";
  const data = await GS.busy($("run"), $("error"), () => GS.api("/v1/activation/topk-by-token", body));
  $("status").textContent = "";
  if (!data) return;
  state = {saeId: data.sae_id, tokens: data.tokens, results: data.results, explanations: data.explanations || {}, pinned: null};
  const url = new URL(window.location.href);
  url.searchParams.set("sae_id", data.sae_id);
  url.searchParams.set("prompt", body.prompt);
  window.history.replaceState(null, "", url);
  render();
}

// "Why this next token?": draw the prompt's attribution graph and open it.
async function why() {
  $("status").textContent = "drawing the attribution graph (seconds to a minute on a CPU)…";
  const out = await GS.busy($("why"), $("error"), () => GS.api("/v1/graph/generate", {prompt: $("prompt").value}));
  $("status").textContent = "";
  if (out) window.location.href = `/graph/${out.slug}`;
}

(async function init() {
  const q = GS.query();
  try { await GS.fillSaeSelect($("sae"), q.get("sae_id")); await GS.showLimits(); }
  catch (e) { $("error").textContent = e.message; return; }
  if (q.get("prompt")) { $("prompt").value = q.get("prompt"); run(); }
  $("run").addEventListener("click", run);
  $("why").addEventListener("click", why);
  $("bounds").addEventListener("change", () => { if (state) render(); });
  GS.api("/v1/graph/list").then((info) => { $("why").hidden = !info.available; }).catch(() => {});
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
})();
