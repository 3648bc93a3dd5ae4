// SAEs page: the run's SAEs with their eval numbers, and the plots of the eval report.
"use strict";

GS.header("saes");

const $ = (id) => document.getElementById(id);
// Eval columns: the flat summary names of evals.py, as written in report/evals.json.
const COLUMNS = [
  ["L0", "l0"], ["FVU", "fvu"], ["ΔLM loss", "delta_lm_loss"], ["CE recovered", "ce_loss_score"],
  ["KL", "kl_div_with_sae"], ["dead", "frac_dead"], ["dense", "frac_dense"],
];

(async function init() {
  let run;
  try { run = await GS.run(); } catch (e) { $("error").textContent = e.message; return; }
  const table = $("saes");
  table.append(GS.el("tr", {}, GS.el("th", {}, "SAE"), GS.el("th", {}, "site"), GS.el("th", {class: "num"}, "layer"),
    GS.el("th", {class: "num"}, "width"), GS.el("th", {}, "architecture"),
    COLUMNS.map(([label]) => GS.el("th", {class: "num"}, label))));
  for (const s of run.saes) {
    table.append(GS.el("tr", {class: "sae"},
      GS.el("td", {}, GS.el("a", {href: GS.featureUrl(s.id, 0), class: "mono"}, s.id)),
      GS.el("td", {class: "mono"}, s.site), GS.el("td", {class: "num"}, s.layer), GS.el("td", {class: "num"}, s.width),
      GS.el("td", {}, s.architecture),
      COLUMNS.map(([label, name]) => {
        const v = s.eval ? s.eval[name] : null;
        return GS.el("td", {class: "num"}, name.startsWith("frac_") ? GS.pct(v) : GS.fmt(v, 4));
      })));
  }
  const plots = $("plots");
  if (!run.plots.length) plots.append(GS.el("div", {class: "muted"}, "No plots yet: run 'gemmascope eval' on this run."));
  for (const src of run.plots) {
    const name = src.split("/").pop();
    plots.append(GS.el("figure", {}, GS.el("img", {src, alt: name}), GS.el("figcaption", {class: "small muted"}, name)));
  }
})();
