// Microscope page: a prompt's topics (its features pooled), its tokens shaded by their first feature,
// per-token top features; meaning first (the server's features.rank) unless the order is "raw".
"use strict";

GS.header("microscope");

const $ = (id) => document.getElementById(id);
let state = null; // {saeId, order, tokens, results, topics, explanations, pinned}

const meaning = () => state.order === "meaning";

// What a feature is ordered and shaded by: its meaning score, or its activation in the raw order.
const key = (f) => (meaning() && f.score !== null && f.score !== undefined ? f.score : f.value);

function first(r) {
  return r.top_features.length ? Math.max(0, key(r.top_features[0])) : 0;
}

// The numbers shown beside a feature: score and activation (meaning first), or the activation.
function shownValue(f) {
  if (!meaning() || f.score === null || f.score === undefined) return GS.el("span", {class: "val"}, GS.fmt(f.value, 2));
  return GS.el("span", {class: "val", title: "meaning score (how far above its typical value, times how specific) · activation"},
    GS.fmt(f.score, 2), GS.el("span", {class: "act"}, ` · ${GS.fmt(f.value, 1)}`));
}

function featRow(f, note) {
  return GS.el("div", {class: "feat", "data-index": f.index,
    onclick: () => { window.location.href = GS.featureUrl(state.saeId, f.index); }},
    GS.el("a", {class: "id", href: GS.featureUrl(state.saeId, f.index)}, `#${f.index}`),
    GS.el("span", {class: "expl", title: state.explanations[f.index] || note || ""}, state.explanations[f.index] || note || ""),
    shownValue(f));
}

// Every feature seen on the prompt's tokens, with its best key and where it is.
function featureTable(results) {
  const byIndex = new Map();
  for (const r of results) {
    for (const f of r.top_features) {
      const cur = byIndex.get(f.index);
      if (!cur || key(f) > key(cur.best)) byIndex.set(f.index, {index: f.index, best: f, at: r.position});
    }
  }
  return [...byIndex.values()].sort((a, b) => key(b.best) - key(a.best));
}

function showTopics() {
  const box = $("topics");
  box.innerHTML = "";
  $("topics-title").textContent = meaning() ? "Topics of the text (meaning first)" : "Features of the whole text (by activation)";
  $("topics-hint").textContent = (state.note ? state.note + ". " : "") + (meaning()
    ? "Its features pooled over every token: each token's meaning score (how far above its typical value a feature fires, times how specific it is) summed over the text."
    : "Its features max-pooled over every token, strongest first.");
  if (!state.topics.length) box.append(GS.el("div", {class: "muted"}, "No topic: no feature fires above its typical value here."));
  for (const t of state.topics) {
    box.append(featRow(t, ""));
    box.lastChild.querySelector(".expl").append(GS.el("span", {class: "small"},
      ` — on ${t.count} token${t.count === 1 ? "" : "s"}, max at ${JSON.stringify(state.tokens[t.position])}`));
  }
}

function showFeatures(position) {
  const box = $("features");
  box.innerHTML = "";
  let rows;
  if (position === null || position === undefined) {
    rows = featureTable(state.results).slice(0, 40).map((f) => ({...f.best, note: `on ${JSON.stringify(state.tokens[f.at])}`}));
    $("features-title").textContent = `Features on the prompt (${meaning() ? "meaning first" : "strongest first"})`;
  } else {
    const r = state.results.find((x) => x.position === position);
    rows = r ? r.top_features : [];
    $("features-title").textContent = `Top features on token ${position}: ${JSON.stringify(state.tokens[position])}`;
  }
  if (!rows.length) box.append(GS.el("div", {class: "muted"}, "No feature fires here (dense features hidden)."));
  for (const f of rows) box.append(featRow(f, f.note));
}

function render() {
  const values = state.tokens.map(() => 0);
  for (const r of state.results) values[r.position] = first(r);
  const box = $("tokens");
  box.innerHTML = "";
  $("tokens-title").textContent = `Tokens, shaded by their first feature's ${meaning() ? "meaning score" : "activation"}`;
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
  showTopics();
  showFeatures(null);
}

// One document per line: each one's topics (meaning first), top features (max- and mean-pooled),
// their shared and topic-against-the-others features.
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
    GS.el("div", {class: "grid4"},
      GS.el("div", {class: "doc-topics"}, GS.el("div", {class: "small muted"}, "topics (meaning first)"), list(d.topics)),
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
  const body = {prompt: $("prompt").value, sae_id: saeId, order: $("order").value};  // k, topics: the server's defaults
  if ($("show-dense").checked) body.hide_dense = 1.0;  // else the server's default share
  $("status").textContent = "running the model…";
  const data = await GS.busy($("run"), $("error"), () => GS.api("/v1/activation/topk-by-token", body));
  $("status").textContent = "";
  if (!data) return;
  state = {saeId: data.sae_id, order: data.order, note: data.order_note, tokens: data.tokens, results: data.results,
    topics: data.topics || [], explanations: data.explanations || {}, pinned: null};
  const url = new URL(window.location.href);
  url.searchParams.set("sae_id", data.sae_id);
  url.searchParams.set("prompt", body.prompt);
  if (body.order === "raw") url.searchParams.set("order", "raw"); else url.searchParams.delete("order");
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
  if (q.get("order") === "raw") $("order").value = "raw";
  if (q.get("prompt")) { $("prompt").value = q.get("prompt"); run(); }
  $("run").addEventListener("click", run);
  $("why").addEventListener("click", why);
  $("order").addEventListener("change", () => { if (state && $("prompt").value.trim()) run(); });
  $("bounds").addEventListener("change", () => { if (state) render(); });
  GS.api("/v1/graph/list").then((info) => { $("why").hidden = !info.available; }).catch(() => {});
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
})();
