// gemmascope local UI: helpers every page uses (API calls, the page header, token highlighting).
// Plain JavaScript, no framework, nothing fetched from outside this server.
"use strict";

const GS = {};

// Build an element: el("a", {href: "/x", class: "y"}, "text", child, ...)
GS.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
};

// Call the JSON API; throws an Error carrying the server's message on a non-2xx answer.
GS.api = async function (path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const msg = data && data.error ? data.error : `${resp.status} ${resp.statusText}`;
    throw new Error(msg);
  }
  return data;
};

GS.fmt = function (x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  const d = digits === undefined ? 3 : digits;
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return Number(x.toFixed(d)).toString();
};

GS.pct = function (x) {
  if (x === null || x === undefined) return "–";
  const p = 100 * x;
  if (p === 0) return "0%";
  if (p < 0.01) return p.toExponential(1) + "%";
  return (p < 1 ? Number(p.toPrecision(2)).toString() : p.toFixed(1)) + "%";
};

GS.featureUrl = (saeId, index) => `/feature/${encodeURIComponent(saeId)}/${index}`;

// Visible form of a token: newlines and tabs shown, leading/trailing spaces kept.
GS.tokenText = function (t, inline) {
  return String(t).replace(/\n/g, inline ? "↵" : "↵\n").replace(/\t/g, "→");
};

// Background colour for an activation, scaled by the largest one shown.
GS.shade = function (value, max) {
  if (!value || value <= 0 || !max || max <= 0) return "";
  const a = Math.min(1, value / max);
  return `rgba(249, 115, 22, ${(0.1 + 0.8 * a).toFixed(3)})`;
};

// Render tokens with their activations as highlighted spans; returns the container.
// opts: {max, hot (index to outline), skipFirst (hide BOS), inline (newlines as ↵ only),
//        onhover(i), onclick(i), title(i)}
GS.renderTokens = function (tokens, values, opts) {
  opts = opts || {};
  const box = GS.el("span", {class: "tokens"});
  const max = opts.max || Math.max(0, ...(values || []).filter((v, i) => !(opts.skipFirst && i === 0)));
  tokens.forEach((t, i) => {
    if (opts.skipFirst && i === 0) return;
    const v = values ? values[i] : 0;
    // "" is a byte token whose character is shown on the last of its bytes: a sliver keeps it visible.
    const cls = "tok" + (t === "" ? " part" : "") + (i === opts.hot ? " hot" : "");
    const span = GS.el("span", {class: cls, "data-i": i}, GS.tokenText(t, opts.inline));
    const bg = GS.shade(v, max);
    if (bg) span.style.background = bg;
    span.title = opts.title ? opts.title(i) : `${JSON.stringify(t)}: ${GS.fmt(v)}`;
    if (opts.onhover) {
      span.addEventListener("mouseenter", () => opts.onhover(i));
      span.addEventListener("mouseleave", () => opts.onhover(null));
    }
    if (opts.onclick) span.addEventListener("click", () => opts.onclick(i));
    box.append(span);
  });
  return box;
};

// The page header with navigation; `here` names the current page.
GS.header = function (here) {
  const links = [["/", "Microscope", "microscope"], ["/steer", "Steer", "steer"], ["/search", "Search", "search"], ["/saes", "SAEs", "saes"], ["/graph", "Graph", "graph"]];
  const model = GS.el("span", {class: "model", id: "model-name"});
  const head = GS.el("header", {class: "top"},
    GS.el("a", {class: "brand", href: "/"}, "gemma", GS.el("span", {}, "scope")),
    GS.el("nav", {}, links.map(([href, label, key]) => GS.el("a", {href, class: key === here ? "here" : null}, label))),
    model);
  document.body.prepend(head);
  GS.run().then((run) => {
    model.textContent = `${run.model} · ${run.run}`;
    if (!run.saes.length && here !== "graph") {  // a run of a cross-layer transcoder alone
      head.after(GS.el("p", {class: "warn", id: "no-saes", style: "margin: 10px 24px"}, "This run holds no SAEs, only a cross-layer transcoder: ",
        GS.el("a", {href: "/graph"}, "its Graph page"), " draws attribution graphs over it. Train SAEs (gemmascope train RUN --sites ...) for this page."));
    }
  }).catch(() => {});
};

// The run's SAEs (fetched once per page).
let runPromise = null;
GS.run = function () {
  if (!runPromise) runPromise = GS.api("/v1/saes");
  return runPromise;
};

// The limits and defaults the server serves (GET /v1/saes `limits`, `defaults`), never restated here:
// every element with data-limit="NAME" shows that limit (data-format="pct": as a percentage), and
// an input with data-default="NAME" (a dotted path into `defaults`) starts at that default, unless
// the user already typed something; data-max-limit / data-min-limit set its bounds.
GS.showLimits = async function () {
  const run = await GS.run();
  const pick = (obj, path) => path.split(".").reduce((o, k) => (o === undefined || o === null ? o : o[k]), obj);
  document.querySelectorAll("[data-limit]").forEach((el) => {
    const v = run.limits[el.dataset.limit];
    el.textContent = el.dataset.format === "pct" ? GS.pct(v) : String(v);
  });
  document.querySelectorAll("[data-default]").forEach((el) => {
    const v = pick(run.defaults, el.dataset.default);
    if (el.value === "" && v !== undefined && v !== null) el.value = v;
  });
  document.querySelectorAll("[data-max-limit]").forEach((el) => { el.max = run.limits[el.dataset.maxLimit]; });
  document.querySelectorAll("[data-min-limit]").forEach((el) => {
    const name = el.dataset.minLimit;
    el.min = name.startsWith("-") ? -run.limits[name.slice(1)] : run.limits[name];
  });
  return run;
};

// Fill a <select> with the run's SAEs; `all` adds an "every SAE" choice.
GS.fillSaeSelect = async function (select, selected, all) {
  const run = await GS.run();
  select.innerHTML = "";
  if (all) select.append(GS.el("option", {value: ""}, "every SAE"));
  for (const s of run.saes) {
    select.append(GS.el("option", {value: s.id, selected: s.id === selected}, `${s.id}  (${s.site}, ${s.width} latents)`));
  }
  return run;
};

// Run an async action with a button disabled and errors shown in `errBox`.
GS.busy = async function (button, errBox, fn) {
  if (errBox) errBox.textContent = "";
  if (button) button.disabled = true;
  try { return await fn(); }
  catch (e) { if (errBox) errBox.textContent = e.message; return null; }
  finally { if (button) button.disabled = false; }
};

GS.query = () => new URLSearchParams(window.location.search);
