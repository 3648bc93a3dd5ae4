// SAEs page: the run's SAEs with their eval numbers, and the plots of the eval report.
"use strict";

GS.header("saes");

const $ = (id) => document.getElementById(id);
// Eval columns: the flat summary names of evals.report.summary, as written in report/evals.json.
// Dead: never fired on the N held-out eval tokens (the "eval tokens" column); dense: over 10% of them.
const COLUMNS = [
  ["L0", "l0"], ["FVU", "fvu"], ["ΔLM loss", "delta_lm_loss"], ["CE recovered", "ce_loss_score"],
  ["KL", "kl_div_with_sae"], ["dead (eval)", "frac_dead"], ["dense", "frac_dense"],
  [">50% latents", "n_over_50_percent"], ["L0 share >10%", "l0_share_over_10_percent"], ["eval tokens", "n_tokens"],
];
const TITLES = {
  frac_dead: "latents that never fired on the held-out eval tokens (the one 'dead' of this page; the training curves count latents silent in the last training window, another thing)",
  frac_dense: "latents firing on over 10% of the held-out eval tokens",
  n_over_50_percent: "latents firing on over 50% of the held-out eval tokens (always-on)",
  l0_share_over_10_percent: "share of L0 carried by latents over 10% density",
  n_tokens: "held-out tokens the numbers are measured on",
};

// Training curves plot a running count during training, not the eval's "dead" of the table.
const CURVES_NOTE = "Training curves. Their fourth panel counts latents silent over the last training window while " +
  "training ran, not the dead of the table above (latents that never fired on the held-out eval tokens).";

function cell(name, v) {
  if (name.startsWith("frac_") || name.startsWith("l0_share_")) return GS.pct(v);
  if (name.startsWith("n_")) return v === null || v === undefined ? "–" : String(v);
  return GS.fmt(v, 4);
}

(async function init() {
  let run;
  try { run = await GS.run(); } catch (e) { $("error").textContent = e.message; return; }
  const table = $("saes");
  table.append(GS.el("tr", {}, GS.el("th", {}, "SAE"), GS.el("th", {}, "site"), GS.el("th", {class: "num"}, "layer"),
    GS.el("th", {class: "num"}, "width"), GS.el("th", {}, "architecture"),
    COLUMNS.map(([label, name]) => GS.el("th", {class: "num", title: TITLES[name]}, label))));
  for (const s of run.saes) {
    table.append(GS.el("tr", {class: "sae"},
      GS.el("td", {}, GS.el("a", {href: GS.featureUrl(s.id, 0), class: "mono"}, s.id)),
      GS.el("td", {class: "mono"}, s.site), GS.el("td", {class: "num"}, s.layer), GS.el("td", {class: "num"}, s.width),
      GS.el("td", {}, s.architecture),
      COLUMNS.map(([, name]) => GS.el("td", {class: "num"}, cell(name, s.eval ? s.eval[name] : null)))));
    const warning = s.eval ? s.eval.health_warning : null;
    if (warning) {
      table.append(GS.el("tr", {class: "health-warning"},
        GS.el("td", {colspan: 5 + COLUMNS.length, class: "error small"}, "⚠ " + warning)));
    }
  }
  const plots = $("plots");
  if (!run.plots.length) plots.append(GS.el("div", {class: "muted"}, "No plots yet: run 'gemmascope eval' on this run."));
  for (const src of run.plots) {
    const name = src.split("/").pop();
    plots.append(GS.el("figure", {}, GS.el("img", {src, alt: name}), GS.el("figcaption", {class: "small muted"}, name,
      name.endsWith("_curves.png") ? GS.el("div", {class: "curves-note"}, CURVES_NOTE) : null)));
  }
})();
