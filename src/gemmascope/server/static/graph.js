// gemmascope graph page: draw an attribution graph (/v1/graph/generate), show it as SVG (token
// positions across, layers up, output logits at the right), hover a node for what it is, click to
// open its feature page, select feature nodes and intervene (/v1/graph/{slug}/intervene).
"use strict";

GS.header("graph");
const SVGNS = "http://www.w3.org/2000/svg";
const MAX_EDGES = 1500;
const $ = (id) => document.getElementById(id);
const state = {slug: null, data: null, selected: new Set(), featureCache: new Map()};

function svg(tag, attrs) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function slugFromPath() {
  const m = window.location.pathname.match(/^\/graph\/([a-z0-9-]+)$/);
  return m ? m[1] : null;
}

async function listGraphs() {
  const info = await GS.api("/v1/graph/list");
  const box = $("graphs");
  box.innerHTML = "";
  if (!info.available) {
    box.append(GS.el("div", {class: "error"}, info.why_not || "this run has no transcoder set"));
    $("draw").disabled = true;
  } else if (info.dictionary) {
    box.append(GS.el("div", {class: "muted"}, `New graphs are drawn over ${info.dictionary}.`));
  }
  const seen = new Set(), twice = new Set(); // a prompt drawn under two names: each shows its name
  for (const g of info.graphs) (seen.has(g.prompt) ? twice : seen).add(g.prompt);
  if (info.graphs.length) {
    box.append(GS.el("div", {class: "muted"}, "Graphs of this run: "),
      ...info.graphs.map((g) => GS.el("a", {href: `/graph/${g.slug}`, style: "margin-right: 12px",
        title: g.damaged || (g.stale ? "drawn over another transcoder set: open it to draw it again" : g.slug)},
        g.damaged ? `${g.slug} (damaged)` : (twice.has(g.prompt) ? `${g.prompt} (${g.slug})` : g.prompt) + (g.stale ? " (old)" : ""))));
  }
  return info;
}

async function draw() {
  const prompt = $("prompt").value;
  $("status").textContent = "drawing the graph (seconds for a short prompt, minutes for a long one on a CPU)…";
  const out = await GS.busy($("draw"), $("error"), () => GS.api("/v1/graph/generate", {prompt}));
  $("status").textContent = "";
  if (out) window.location.href = `/graph/${out.slug}`;
}

// What a node is drawn as: a feature circle, an error or token square, an output circle.
function kindOf(n) {
  if (n.feature_type === "logit") return "logit";
  if (n.feature_type === "embedding") return "token";
  if (n.feature_type === "mlp reconstruction error") return "error";
  return "feature";
}

const ERROR_SLOT = 10; // an error square sits at the left of its cell, beside the cell's features
const COL_W = 92, COL_MIN = 56, NODE_GAP = 18; // px: the outputs' offset; a position's least width; between features
const MIN_GAP = 8, CELL_PAD = 14 + 2 * ERROR_SLOT; // px: features at the closest; a cell's margins and error slot
const LOGIT_ROOM = 210; // right of the positions: the output tokens and their labels

function layout(data) {
  const meta = data.metadata;
  const tokens = meta.prompt_tokens;
  const logits = data.nodes.filter((n) => kindOf(n) === "logit");
  const nLayers = logits.length ? Number(logits[0].layer) - 1 : 1;
  const rowH = 34, left = 56, top = 24;
  const height = Math.max(top + rowH * (nLayers + 2) + 70, top + 26 * logits.length + 24);
  const yOf = (layer) => layer === "E" ? top + rowH * (nLayers + 1) : top + rowH * (nLayers - Number(layer));
  const cells = new Map();
  for (const n of data.nodes) {
    if (kindOf(n) === "logit") continue;
    const key = `${n.ctx_idx}|${n.layer}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  // each position gets what its most crowded cell needs, and the page's width left over by the
  // square root of that cell's features (a long or crowded graph scrolls, ending at the answer):
  // the last position, where the answer is computed, and the content words hold most; "<bos>" few
  const crowd = tokens.map(() => 0);
  for (const [key, list] of cells) {
    const i = Number(key.split("|")[0]);
    crowd[i] = Math.max(crowd[i], list.filter((n) => kindOf(n) !== "error").length);
  }
  const wrap = document.querySelector(".graph-wrap");
  const avail = Math.max(COL_MIN * tokens.length, (wrap ? wrap.clientWidth : 1000) - left - LOGIT_ROOM - 2);
  // what a position needs: its most crowded cell's features in three rows, MIN_GAP apart
  const need = crowd.map((c) => Math.max(COL_MIN, CELL_PAD + Math.ceil(c / 3) * MIN_GAP));
  const spare = Math.max(0, avail - need.reduce((a, b) => a + b, 0));
  const share = crowd.map((c) => Math.sqrt(Math.max(c, 4)));
  const total = share.reduce((a, b) => a + b, 0);
  const colWs = need.map((w, i) => w + (spare * share[i]) / total);
  const colX = [left];
  colWs.forEach((w) => colX.push(colX[colX.length - 1] + w));
  const right = colX[tokens.length];
  const width = right + LOGIT_ROOM;
  const pos = new Map();
  for (const [key, list] of cells) {
    const i = Number(key.split("|")[0]);
    const cellLeft = colX[i], colW = colWs[i];
    const errors = list.filter((n) => kindOf(n) === "error");
    const rest = list.filter((n) => kindOf(n) !== "error");
    errors.forEach((n) => pos.set(n.node_id, [cellLeft + ERROR_SLOT, yOf(n.layer)]));
    rest.sort((a, b) => (a.influence || 0) - (b.influence || 0));
    const shift = errors.length ? ERROR_SLOT : 0; // the features' centre, moved off the error's slot
    // a crowded cell takes up to three rows, and its circles shrink below their spacing, so no
    // circle covers another's centre (where a hover or click lands)
    const room = colW - 14 - 2 * shift;
    const rows = [1, 2, 3].find((r) => Math.ceil(rest.length / r) * NODE_GAP <= room) || 3;
    const perRow = Math.ceil(rest.length / rows);
    const spread = Math.min(NODE_GAP, room / Math.max(perRow, 1));
    const rMax = Math.max(1.5, Math.min([13, 8, 4.8][rows - 1], 0.9 * spread));
    rest.forEach((n, k) => {
      const j = Math.floor(k / rows), dy = [[0], [-8.5, 8.5], [-10, 0, 10]][rows - 1][k % rows];
      pos.set(n.node_id, [cellLeft + colW / 2 + shift + (j - (perRow - 1) / 2) * spread, yOf(n.layer) + dy, rMax]);
    });
  }
  logits.sort((a, b) => b.token_prob - a.token_prob);
  logits.forEach((n, k) => pos.set(n.node_id, [right + COL_W * 0.7, top + 10 + k * 26]));
  return {tokens, nLayers, width, height, pos, colX, colWs, right, rowH, left, top, yOf};
}

// A token as a label: newlines and tabs shown, and a token of blanks as "␣" (one a blank), not nothing.
function visible(t) {
  const text = GS.tokenText(t, true);
  return text.trim() ? text : text.replace(/ /g, "␣") || "∅";
}

function radius(n) {
  if (kindOf(n) === "logit") return 5 + 14 * Math.sqrt(n.token_prob);
  const importance = 1 - Math.min(1, n.influence === undefined || n.influence === null ? 1 : n.influence);
  const r = 3.5 + 9 * importance;
  return kindOf(n) === "error" ? Math.min(r, 7) : r;
}

function axes(box, L) {
  const names = $("graph-axis"); // beside the scrolling drawing, not in it
  names.innerHTML = "";
  names.setAttribute("width", L.left - 6);
  names.setAttribute("height", L.height);
  names.append(svg("rect", {x: 0, y: 0, width: L.left - 6, height: L.height, fill: "#fcfcfd"}));
  for (let layer = 0; layer < L.nLayers; layer++) {
    const y = L.yOf(String(layer));
    box.append(svg("line", {x1: L.left, x2: L.right, y1: y, y2: y, class: "faint"}));
    const label = svg("text", {x: 8, y: y + 4, class: "axis"});
    label.textContent = `L${layer}`;
    names.append(label);
  }
  const emb = svg("text", {x: 8, y: L.yOf("E") + 4, class: "axis"});
  emb.textContent = "emb";
  names.append(emb);
  L.tokens.forEach((t, i) => {
    const text = svg("text", {x: L.colX[i] + L.colWs[i] / 2, y: L.height - 30, class: "axis", "text-anchor": "middle"});
    text.textContent = visible(t).slice(0, Math.max(3, Math.floor(L.colWs[i] / 7.5))); // 12px mono
    box.append(text);
  });
}

function edgeLayer(data, L) {
  // The strongest MAX_EDGES edges are drawn (a weak transcoder set leaves hundreds of thousands).
  const shown = [...data.links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES).reverse();
  const maxW = Math.max(1e-9, ...shown.map((l) => Math.abs(l.weight)));
  const edges = svg("g", {class: "edges"});
  for (const link of shown) {
    const a = L.pos.get(link.source), b = L.pos.get(link.target);
    if (!a || !b) continue;
    const w = Math.abs(link.weight) / maxW;
    edges.append(svg("line", {
      x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "edge",
      stroke: link.weight > 0 ? "#2b6cb0" : "#c53030", "stroke-opacity": (0.12 + 0.6 * w).toFixed(3),
      "stroke-width": (0.4 + 4 * w).toFixed(2), "data-source": link.source, "data-target": link.target,
    }));
  }
  return edges;
}

function nodeShape(n, x, y, rMax) {
  const r = Math.min(radius(n), rMax || Infinity), kind = kindOf(n);
  let shape;
  if (kind === "error" || kind === "token") {
    shape = svg("rect", {x: x - r, y: y - r, width: 2 * r, height: 2 * r, rx: 2,
      fill: kind === "token" ? "#4a5568" : "#cbd5e0", stroke: "#4a5568"});
  } else if (kind === "logit") {
    shape = svg("circle", {cx: x, cy: y, r, fill: "#2f855a"});
  } else {
    shape = svg("circle", {cx: x, cy: y, r, fill: "#f6ad55", stroke: "#9c4221"});
  }
  shape.classList.add("node");
  shape.dataset.kind = kind; // not a class: the page's .error style would hide an error square
  shape.dataset.id = n.node_id;
  shape.addEventListener("mouseenter", (ev) => showTip(n, ev));
  shape.addEventListener("mouseleave", hideTip);
  shape.addEventListener("click", (ev) => clickNode(n, ev, shape));
  return shape;
}

// Drawn bottom to top: edges, then error and token squares, then features, then the outputs and
// their labels, so no square ever covers a feature a click is meant for.
function render(data) {
  const box = $("graph");
  box.innerHTML = "";
  const L = layout(data);
  box.setAttribute("width", L.width);
  box.setAttribute("height", L.height);
  axes(box, L);
  box.append(edgeLayer(data, L));
  const layers = {error: svg("g", {class: "squares"}), feature: svg("g", {class: "features"}), logit: svg("g", {class: "outputs"})};
  layers.token = layers.error;
  // the least influential first, so the most influential are drawn on top of any they touch
  const order = [...data.nodes].sort((a, b) => (b.influence ?? 1) - (a.influence ?? 1));
  for (const n of order) {
    const [x, y, rMax] = L.pos.get(n.node_id);
    layers[kindOf(n)].append(nodeShape(n, x, y, rMax));
    if (kindOf(n) === "logit") {
      const label = svg("text", {x: x + radius(n) + 6, y: y + 4, class: "axis output-label"});
      label.textContent = `${visible(n.clerp.replace(/^Output "/, "").replace(/" \(p=.*$/, ""))} ${GS.fmt(n.token_prob, 2)}`;
      layers.logit.append(label);
    }
  }
  box.append(layers.error, layers.feature, layers.logit);
  fitLabels(box, L);
  const wrap = box.parentElement;
  wrap.scrollLeft = wrap.scrollWidth; // a long prompt: its last position and the outputs in view
}

// Widen the drawing to its longest output label, so none is cut off at the right edge.
function fitLabels(box, L) {
  let right = L.width;
  for (const label of box.querySelectorAll("text.output-label")) {
    const x = Number(label.getAttribute("x"));
    const measured = label.getBBox ? label.getBBox().width : 0;
    right = Math.max(right, x + Math.max(measured, 7.5 * label.textContent.length) + 10);
  }
  box.setAttribute("width", Math.ceil(right));
}

function saeOf(n) {
  return state.data.metadata.transcoder_list[Number(n.layer)];
}

async function showTip(n, ev) {
  const tip = $("tip");
  const wrap = tip.parentElement.getBoundingClientRect();
  tip.style.left = `${Math.min(ev.clientX - wrap.left + 14, wrap.width - 370)}px`;
  const below = ev.clientY - wrap.top < wrap.height / 2; // else above the pointer: the box clips it
  tip.style.top = below ? `${ev.clientY - wrap.top + 14}px` : "auto";
  tip.style.bottom = below ? "auto" : `${wrap.bottom - ev.clientY + 14}px`;
  tip.hidden = false;
  tip.innerHTML = "";
  const tokens = state.data.metadata.prompt_tokens;
  if (n.feature_type === "cross layer transcoder") {
    const latent = n.node_id.split("_")[1];
    tip.append(GS.el("div", {}, GS.el("b", {}, `layer ${n.layer}, latent ${latent}`), ` at ${JSON.stringify(tokens[n.ctx_idx])}, activation ${GS.fmt(n.activation, 2)}`));
    if (n.clerp) tip.append(GS.el("div", {class: "muted"}, n.clerp));
    const toLogits = state.data.links.filter((l) => l.source === n.node_id && l.target.endsWith(`_${tokens.length - 1}`) && l.target.startsWith(`${Number(state.data.nodes.find((x) => x.feature_type === "logit").layer)}_`));
    if (toLogits.length) {
      tip.append(GS.el("div", {class: "small"}, "direct effect on outputs: " + toLogits.map((l) => {
        const out = state.data.nodes.find((x) => x.node_id === l.target);
        return `${out.clerp.replace(/^Output /, "").replace(/ \(p=.*$/, "")} ${l.weight > 0 ? "+" : ""}${GS.fmt(l.weight, 2)}`;
      }).join(", ")));
    }
    const key = `${saeOf(n)}/${latent}`;
    if (!state.featureCache.has(key)) {
      state.featureCache.set(key, GS.api(`/v1/feature/${encodeURIComponent(saeOf(n))}/${latent}`).catch(() => null));
    }
    const f = await state.featureCache.get(key);
    if (f && !tip.hidden) {
      for (const ex of (f.top_examples || []).slice(0, 3)) {
        const text = ex.tokens.map((t, i) => (i === ex.focus ? `[${t}]` : t)).join("");
        tip.append(GS.el("div", {class: "ex"}, `${GS.fmt(ex.value, 1)}  ${GS.tokenText(text, true).slice(0, 70)}`));
      }
      const promoted = (f.logit_lens && f.logit_lens.promoted || []).slice(0, 5).map((p) => JSON.stringify(p.token)).join(" ");
      if (promoted) tip.append(GS.el("div", {class: "small muted"}, `promotes ${promoted}`));
    }
  } else if (n.feature_type === "mlp reconstruction error") {
    tip.append(GS.el("div", {}, `error of layer ${n.layer}'s transcoder at ${JSON.stringify(tokens[n.ctx_idx])}: what it misses of the MLP`));
  } else if (n.feature_type === "embedding") {
    tip.append(GS.el("div", {}, `token ${JSON.stringify(tokens[n.ctx_idx])} (position ${n.ctx_idx})`));
  } else {
    tip.append(GS.el("div", {}, n.clerp));
  }
}

function hideTip() { $("tip").hidden = true; }

function clickNode(n, ev, shape) {
  if (kindOf(n) !== "feature") return;
  if (ev.shiftKey || $("select-mode").checked) {
    if (state.selected.has(n.node_id)) state.selected.delete(n.node_id);
    else state.selected.add(n.node_id);
    shape.classList.toggle("selected", state.selected.has(n.node_id));
    showSelected();
    return;
  }
  window.open(GS.featureUrl(saeOf(n), n.node_id.split("_")[1]), "_blank");
}

function showSelected() {
  const box = $("selected");
  box.innerHTML = "";
  const tokens = state.data.metadata.prompt_tokens;
  if (!state.selected.size) {
    box.textContent = "No node selected: select feature nodes in the graph.";
  } else {
    box.append(`${state.selected.size} node(s): `, ...[...state.selected].map((id) => {
      const [layer, latent, pos] = id.split("_");
      return GS.el("span", {class: "tag mono"}, `L${layer}/${latent} at ${JSON.stringify(tokens[Number(pos)])}`);
    }));
  }
  $("intervene").disabled = !state.selected.size;
}

async function intervene() {
  $("istatus").textContent = "running the model…";
  const body = {nodes: [...state.selected], value: Number($("value").value)};
  const out = await GS.busy($("intervene"), $("ierror"), () => GS.api(`/v1/graph/${state.slug}/intervene`, body));
  $("istatus").textContent = "";
  if (!out) return;
  const rows = out.logits.map((r) => GS.el("tr", {},
    GS.el("td", {class: "mono"}, JSON.stringify(r.token)),
    GS.el("td", {class: "num"}, GS.fmt(r.predicted, 3)),
    GS.el("td", {class: "num"}, GS.fmt(r.predicted_direct, 3)),
    GS.el("td", {class: "num"}, GS.fmt(r.measured, 3)),
    GS.el("td", {class: "num"}, GS.fmt(r.prob_before, 3)),
    GS.el("td", {class: "num"}, GS.fmt(r.prob_after, 3))));
  $("result").innerHTML = "";
  $("result").append(
    GS.el("table", {id: "result-table"},
      GS.el("tr", {}, GS.el("th", {}, "output"), GS.el("th", {class: "num"}, "predicted Δlogit"),
        GS.el("th", {class: "num"}, "(direct edges)"), GS.el("th", {class: "num"}, "measured Δlogit"),
        GS.el("th", {class: "num"}, "p before"), GS.el("th", {class: "num"}, "p after")),
      rows),
    GS.el("div", {class: "small", id: "now-says"}, `The model now says ${JSON.stringify(out.top_token)} (p = ${GS.fmt(out.top_prob, 2)}). Logits are minus the mean logit; predicted: through the graph with attention and norms frozen.`));
}

async function main() {
  $("draw").addEventListener("click", draw);
  $("intervene").addEventListener("click", intervene);
  const info = await listGraphs().catch((e) => { $("error").textContent = e.message; return null; });
  state.slug = slugFromPath();
  if (!state.slug) return;
  try {
    state.data = await GS.api(`/v1/graph/${state.slug}`);
  } catch (e) {
    $("error").textContent = e.message;
    // a graph drawn from another transcoder set: its prompt in the box, so "draw it again" redraws it
    const listed = info && info.graphs.find((g) => g.slug === state.slug && g.prompt);
    if (listed) $("prompt").value = listed.prompt;
    return;
  }
  const meta = state.data.metadata, ours = meta.gemmascope || {};
  $("prompt").value = meta.prompt;
  $("graph-title").textContent = `${JSON.stringify(meta.prompt)} → ${state.data.nodes.filter((n) => n.feature_type === "logit").sort((a, b) => b.token_prob - a.token_prob).map((n) => n.clerp.replace(/^Output /, "")).slice(0, 3).join(", ")}`;
  $("graph-stats").textContent = `${ours.n_features} active features; ${ours.n_pruned_nodes} nodes and ${ours.n_links} edges after pruning (the ${MAX_EDGES} strongest drawn); replacement score ${GS.fmt(ours.replacement_score, 3)}, completeness ${GS.fmt(ours.completeness_score, 3)}. Circles: transcoder features (larger = more influence on the output); grey squares: errors; dark squares: tokens; blue edges excite, red inhibit.`;
  $("graph-card").hidden = false;
  $("intervene-card").hidden = !info || !info.available;
  render(state.data);
}

main();
