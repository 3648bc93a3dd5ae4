// Feature page: what one SAE latent does: density, histogram, logit lens, measured output effects,
// examples, neighbours.
"use strict";

GS.header("feature");

const $ = (id) => document.getElementById(id);
const parts = window.location.pathname.split("/").filter(Boolean); // ["feature", saeId, index]
const saeId = decodeURIComponent(parts[1] || "");
const index = Number(parts[2]);

function stat(k, v) {
  return GS.el("div", {class: "stat"}, GS.el("div", {class: "v"}, v), GS.el("div", {class: "k"}, k));
}

// 50-bin histogram of non-zero activations, drawn on a canvas.
function drawHistogram(canvas, hist) {
  const ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio; canvas.height = h * ratio;
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, w, h);
  const counts = hist.counts, edges = hist.edges;
  const padL = 34, padB = 20, padT = 6;
  const maxC = Math.max(1, ...counts);
  const bw = (w - padL - 4) / counts.length;
  ctx.fillStyle = "#f97316";
  counts.forEach((c, i) => {
    const bh = (h - padB - padT) * (c / maxC);
    ctx.fillRect(padL + i * bw + 0.5, h - padB - bh, Math.max(1, bw - 1), bh);
  });
  ctx.strokeStyle = "#9ca3af";
  ctx.beginPath(); ctx.moveTo(padL, h - padB); ctx.lineTo(w - 2, h - padB); ctx.moveTo(padL, padT); ctx.lineTo(padL, h - padB); ctx.stroke();
  ctx.fillStyle = "#4b5563"; ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "left"; ctx.fillText(GS.fmt(edges[0], 2), padL, h - 5);
  ctx.textAlign = "right"; ctx.fillText(GS.fmt(edges[edges.length - 1], 2), w - 2, h - 5);
  ctx.fillText(String(maxC), padL - 4, padT + 9);
  ctx.fillText("0", padL - 4, h - padB);
}

function lensTable(table, rows, cls) {
  table.innerHTML = "";
  table.append(GS.el("tr", {}, GS.el("th", {}, "token"), GS.el("th", {class: "num"}, "logit")));
  for (const r of rows || []) {
    table.append(GS.el("tr", {}, GS.el("td", {class: "tokcell"}, JSON.stringify(r.token)),
      GS.el("td", {class: "num " + cls}, GS.fmt(r.value, 3))));
  }
}

// Measured output effects: each token's mean next-token probability without and with the feature
// turned up over the neutral prompts, and the ratio the rows are ranked by.
function outputTable(table, rows, cls) {
  table.innerHTML = "";
  table.className = "effects";
  const p = (x) => (x < 1e-3 ? x.toExponential(0) : x.toFixed(3));
  table.append(GS.el("tr", {}, GS.el("th", {}, "token"), GS.el("th", {class: "num"}, "p → turned up"),
    GS.el("th", {class: "num"}, "ratio")));
  for (const r of rows || []) {
    table.append(GS.el("tr", {}, GS.el("td", {class: "tokcell"}, JSON.stringify(r.token)),
      GS.el("td", {class: "num small", title: `${r.p_clean} → ${r.p_steered}`}, `${p(r.p_clean)} → ${p(r.p_steered)}`),
      GS.el("td", {class: "num " + cls}, "×" + GS.fmt(Math.exp(r.log_ratio), 2))));
  }
}

async function loadOutputs() {
  const note = $("outputs-note");
  note.textContent = "Measuring: the neutral prompts run with this feature turned up (a second or two)…";
  let o;
  try { o = await GS.api(`/v1/feature/${encodeURIComponent(saeId)}/${index}/outputs`); }
  catch (e) { note.textContent = ""; $("outputs-error").textContent = e.message; return; }
  outputTable($("out-pos"), o.rose, "pos");
  outputTable($("out-neg"), o.fell, "neg");
  note.textContent = o.note || `Its decoder direction added at its site at strength ${GS.fmt(o.strength, 2)} (its max ` +
    `activation), after each of ${o.prompts.length} neutral prompts; tokens ranked by the ratio of their mean ` +
    `next-token probability turned up to without (mean KL ${GS.fmt(o.kl, 3)} nats). The logit lens above reads the ` +
    `weights alone; this is what the model does.${o.cached ? " (Measured earlier, kept in the run folder.)" : ""}`;
  note.title = "prompts: " + o.prompts.map((p) => JSON.stringify(p)).join(", ");
  $("output-effects").dataset.loaded = "1";
}

// One text window: its activation at the focus token, then the tokens shaded by activation.
function exampleRow(ex, max) {
  return GS.el("div", {class: "example"}, GS.el("span", {class: "act"}, GS.fmt(ex.value, 2)),
    GS.renderTokens(ex.tokens, ex.acts, {max, hot: ex.focus, inline: true}));
}

const FEW_EXAMPLES = 10; // fewer indexed activations than this and a feature page says so

function render(f) {
  document.title = `gemmascope · ${f.sae_id} #${f.index}`;
  $("title").textContent = `${f.sae_id} · feature #${f.index}`;
  const exp = $("explanation");
  if (f.explanation) {
    exp.textContent = f.explanation;
    exp.className = "explanation";
    const by = f.explanations && f.explanations[0];
    if (by) exp.append(GS.el("span", {class: "small muted"}, `  (${by.explainer}${by.score !== null && by.score !== undefined ? `, detection score ${GS.fmt(by.score, 2)}` : ""})`));
  } else { exp.textContent = "No explanation yet."; exp.className = "explanation none"; }
  if (f.n_fired > 0 && f.n_fired < FEW_EXAMPLES) {
    exp.append(GS.el("div", {class: "small warn", id: "few-examples"},
      `Only ${f.n_fired} indexed example${f.n_fired === 1 ? "" : "s"}: the explanation, density and histogram rest on few tokens (index more text for a firmer picture).`));
  }
  const st = $("stats");
  st.innerHTML = "";
  st.append(stat("site", f.sae.site), stat("layer", String(f.sae.layer)), stat("width", String(f.sae.width)),
    stat("density", GS.pct(f.density)), stat("max activation", GS.fmt(f.max_act, 3)),
    stat("tokens fired on", `${f.n_fired} of ${f.stats && f.stats.n_tokens ? f.stats.n_tokens : "?"}`));
  if (f.histogram && f.histogram.counts && f.histogram.counts.length) {
    drawHistogram($("hist"), f.histogram);
    $("hist-note").textContent = `${f.n_fired} non-zero activations, from ${GS.fmt(f.histogram.edges[0], 3)} to ${GS.fmt(f.max_act, 3)}`;
  } else {
    $("hist").hidden = true;
    $("hist-note").textContent = "This feature never fired on the indexed text.";
  }
  lensTable($("lens-pos"), f.logit_lens.promoted, "pos");
  lensTable($("lens-neg"), f.logit_lens.suppressed, "neg");
  // how much the promoted tokens agree (features.lens.lens_agreement); labels leave out a lens under 0.15
  const agree = f.logit_lens.agreement;
  $("lens-agree").textContent = agree === undefined ? "" :
    `Its top tokens agree ${GS.fmt(agree, 2)} (mean cosine of their embeddings; a random direction's: 0.08)` +
    (agree < 0.15 ? ": too little to name in the label." : ".");

  const max = f.max_act || Math.max(0, ...f.top_examples.map((e) => e.value));
  const top = $("top-examples");
  top.innerHTML = "";
  if (!f.top_examples.length) top.append(GS.el("div", {class: "muted"}, "No examples: the feature did not fire on the indexed text."));
  f.top_examples.forEach((ex) => top.append(exampleRow(ex, max)));

  const iv = $("intervals");
  iv.innerHTML = "";
  if (!f.intervals.length) iv.append(GS.el("div", {class: "muted"}, "No interval examples."));
  for (const g of [...f.intervals].reverse()) {
    const group = GS.el("div", {class: "group"},
      GS.el("h3", {}, `activation ${GS.fmt(g.lo, 2)} – ${GS.fmt(g.hi, 2)}`,
        GS.el("span", {class: "muted"}, ` · ${g.count} tokens (${GS.pct(g.share)})`)));
    if (!g.examples.length) group.append(GS.el("div", {class: "small muted"}, "none"));
    g.examples.forEach((ex) => group.append(exampleRow(ex, max)));
    iv.append(group);
  }

  const nb = $("neighbours");
  nb.innerHTML = "";
  nb.append(GS.el("tr", {}, GS.el("th", {}, "feature"), GS.el("th", {class: "num"}, "cosine")));
  for (const n of f.neighbours) {
    nb.append(GS.el("tr", {}, GS.el("td", {}, GS.el("a", {href: GS.featureUrl(f.sae_id, n.index), class: "mono"}, `#${n.index}`)),
      GS.el("td", {class: "num"}, GS.fmt(n.cosine, 3))));
  }
  const flow = $("flow");
  flow.innerHTML = "";
  if (f.flow && f.flow.length) {
    flow.append(GS.el("tr", {}, GS.el("th", {}, "feature"), GS.el("th", {class: "num"}, "layer"), GS.el("th", {class: "num"}, "correlation")));
    for (const n of f.flow) {
      flow.append(GS.el("tr", {}, GS.el("td", {}, GS.el("a", {href: GS.featureUrl(n.sae_id, n.index), class: "mono"}, `${n.sae_id} #${n.index}`)),
        GS.el("td", {class: "num"}, n.layer), GS.el("td", {class: "num"}, GS.fmt(n.corr, 3))));
    }
    $("flow-card").hidden = false;
  }
  $("page").hidden = false;
}

async function tryText() {
  const prompt = $("own-text").value;
  const data = await GS.busy($("own-run"), $("own-error"),
    () => GS.api("/v1/activation/single", {prompt, sae_id: saeId, index}));
  if (!data) return;
  const box = $("own-result");
  box.innerHTML = "";
  const a = data.activation;
  $("own-max").textContent = `max ${GS.fmt(a.max_value, 3)} on ${JSON.stringify(data.tokens[a.max_value_index])}`;
  box.append(GS.renderTokens(data.tokens, a.values, {skipFirst: true, max: Math.max(a.max_value, 1e-9)}));
}

(async function init() {
  $("steer-with").href = `/steer?sae_id=${encodeURIComponent(saeId)}&index=${index}`;
  $("prev").href = GS.featureUrl(saeId, Math.max(0, index - 1));
  $("next").href = GS.featureUrl(saeId, index + 1);
  $("own-run").addEventListener("click", tryText);
  try {
    const f = await GS.api(`/v1/feature/${encodeURIComponent(saeId)}/${index}`);
    if (f.index + 1 >= f.width) $("next").hidden = true;
    if (f.index === 0) $("prev").hidden = true;
    render(f);
    loadOutputs();
  } catch (e) {
    $("error").textContent = e.message;
  }
})();
