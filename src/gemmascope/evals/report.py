"""Every table and plot of the project, in one style: the CLI eval table, the probing table, the
per-SAE `eval.json`, the run-level `report/evals.json`, the frontier, density, position-error and
suite heatmap plots, and a bias experiment's `report/bias.json` and plot. Plots are drawn on a bare matplotlib `Figure` (no pyplot, no global state).

Knows nothing of how the numbers are computed (core.py, probing.py), of models, of the server or
of training.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from gemmascope.errors import ConfigError, StoreError
from gemmascope.evals.metrics import DENSE_DENSITY
from gemmascope.runs import (
    EVAL_FILE,
    EVALS_JSON,
    REPLACEMENT_JSON,
    REPORT,
    SUMMARY_TXT,
    read_json,
    sae_order,
    save_atomic,
    write_atomic,
)
from gemmascope.sites import SITE_KINDS


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of one result, flat: the columns of the CLI table and the plots."""
    m = result["eval_result_metrics"]
    out = {
        "sae_id": result["sae_id"],
        "site": result["sae_cfg"]["site"],
        "architecture": result["sae_cfg"]["architecture"],
        "d_sae": result["sae_cfg"]["d_sae"],
        "l0": m["sparsity"]["l0"],
        "fvu": m["gemmascope"]["fvu"],
        "delta_lm_loss": m["gemmascope"]["delta_lm_loss"],
        "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
        "kl_div_with_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
        "frac_dead": m["gemmascope"]["frac_dead"],
        "frac_dense": m["gemmascope"]["frac_dense"],
        "n_tokens": m["gemmascope"]["n_tokens"],
        "n_massive_tokens_excluded": m["gemmascope"].get("n_massive_tokens_excluded", 0),
        **_health_columns(result.get("health")),
    }
    probing = result.get("sparse_probing")
    if probing:
        out.update({k: v for k, v in probing["sae"].items() if k.startswith("sae_top_")})
    return out


def _health_columns(health: Mapping[str, Any] | None) -> dict[str, Any]:
    """The health block's headline numbers, flat; None throughout for an `eval.json` written
    before the block existed."""
    h = health or {}
    keys = ("n_dead", "n_over_50_percent", "l0_share_over_50_percent", "n_over_10_percent")
    return {**{k: h.get(k) for k in (*keys, "l0_share_over_10_percent")}, "health_warning": h.get("warning")}


def to_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """A result without its tensors and with NaN / inf as None, ready for `json.dumps`."""

    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return clean({k: v for k, v in result.items() if not isinstance(v, Tensor)})


def _write_json(path: Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_eval(folder: str | Path, result: Mapping[str, Any]) -> Path:
    """Write one SAE's result as `eval.json` in its folder (atomically); tensors are left out."""
    return _write_json(Path(folder) / EVAL_FILE, to_json(result))


def write_report(
    run_dir: str | Path,
    results: Sequence[Mapping[str, Any]],
    probing: Mapping[str, Any] | None = None,
) -> Path:
    """Write `run_dir/report/`: `evals.json` (every result, a summary table and the probing
    results), `frontier_l0_delta_lm_loss.png`, `frontier_l0_fvu.png`, `density_histogram.png`,
    `fvu_by_position.png`, `heatmap.png` and `summary.txt` (the table, and the replacement model's
    loss when `replacement.json` is there). The report is the run's: results of SAEs not in
    `results` that an earlier report holds are kept, so evaluating some SAEs of a run merges them in
    (theirs replaced) and every file agrees. Returns the report folder."""
    report = Path(run_dir) / REPORT
    earlier = _earlier_report(report / EVALS_JSON)
    fresh = {r["sae_id"]: r for r in results}
    merged = [fresh.pop(r["sae_id"], r) for r in earlier.get("results", [])] + list(fresh.values())
    merged.sort(key=lambda r: sae_order(r["sae_id"]))  # the one order of SAE lists: layer 6 before 10
    probing = _merged_probing(earlier.get("sparse_probing"), probing)
    plots = {
        "frontier_l0_delta_lm_loss": plot_frontier(
            merged, "delta_lm_loss", report / "frontier_l0_delta_lm_loss.png"
        ),
        "frontier_l0_fvu": plot_frontier(merged, "fvu", report / "frontier_l0_fvu.png"),
        "density_histogram": plot_density(merged, report / "density_histogram.png"),
        "fvu_by_position": plot_position_error(merged, report / "fvu_by_position.png"),
        "heatmap": plot_heatmap(merged, report / "heatmap.png"),
    }
    data = {
        "summary": [summary(r) for r in merged],
        "results": [to_json(r) for r in merged],
        "sparse_probing": to_json(probing) if probing else None,
        "plots": {k: p.name for k, p in plots.items()},
    }
    _write_json(report / EVALS_JSON, data)
    write_atomic(report / SUMMARY_TXT, _summary_text(report, merged))
    return report


def _earlier_report(path: Path) -> dict[str, Any]:
    """The results and probing of the report already there; nothing when there is none, or when it
    is damaged (it is rewritten whole from `results`)."""
    try:
        data = read_json(path, "report") if path.is_file() else {}
    except StoreError:
        return {}
    rows = data.get("results")
    kept = (
        [r for r in rows if isinstance(r, dict) and isinstance(r.get("sae_id"), str)]
        if isinstance(rows, list)
        else []
    )
    probing = data.get("sparse_probing")
    return {"results": kept, "sparse_probing": probing if isinstance(probing, dict) else None}


def _merged_probing(
    earlier: Mapping[str, Any] | None, probing: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """This run's probing merged into the earlier report's: the earlier SAEs' and sites' entries
    kept where the new one has none."""
    if earlier is None or probing is None:
        return probing if probing is not None else earlier
    merged = {**earlier, **probing}
    for key in ("saes", "llm"):
        old, new = earlier.get(key), probing.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            merged[key] = {**old, **new}
    return merged


def _summary_text(report: Path, results: Sequence[Mapping[str, Any]]) -> str:
    """`summary.txt`: the table, and the replacement model's loss when the suite measured it."""
    lines = [format_table(results)]
    replacement = report / REPLACEMENT_JSON
    if replacement.is_file():
        r = read_json(replacement, "replacement model result")
        try:
            lines.append(
                f"replacement model (the MLPs of layers {r['layers'][0]}-{r['layers'][-1]} replaced by "
                f"transcoders at once): LM loss {r['ce_loss_without']:.4f} -> {r['ce_loss_with']:.4f}, "
                f"ΔLM {r['delta_lm_loss']:.4f}, KL {r['kl_div']:.4f} ({r['n_predictions']} predictions)"
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise StoreError(f"replacement model result {str(replacement)!r} is damaged ({err!r})") from None
    return "\n".join(lines) + "\n"


def _figure(width: float = 6.4, height: float = 4.4) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=110)


def save_png(fig: Any, path: str | Path) -> Path:
    """Lay out and write a matplotlib `Figure` as a PNG at `path` (its folder created).

    Drawing log-scale ticks runs matplotlib's mathtext parser, whose pyparsing exceptions are
    reference cycles holding their frames, and through each frame's `f_back` every caller's: a
    training run's SAEs, optimiser and batches stayed alive until Python's occasional full
    collection (the 18-layer transcoder suite grew ~1.5 GB a layer). Collected here, at once."""
    fig.tight_layout()
    saved = save_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    gc.collect()
    return saved


def _line_key(s: Mapping[str, Any]) -> str:
    return f"{s['site']} {s['architecture']} w{s['d_sae']}"


def plot_frontier(results: Sequence[Mapping[str, Any]], metric: str, path: str | Path) -> Path:
    """L0 (x, log scale) against `metric` ("delta_lm_loss" or "fvu"), one line per site,
    architecture and width, points sorted by L0. Writes a PNG."""
    labels = {"delta_lm_loss": "delta LM loss (nats)", "fvu": "FVU (1 - variance explained)"}
    if metric not in labels:
        raise ConfigError(f"unknown frontier metric {metric!r}: expected one of {sorted(labels)}")
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        s = summary(r)
        if _finite(s[metric]) and _finite(s["l0"]) and s["l0"] > 0:
            lines.setdefault(_line_key(s), []).append((s["l0"], s[metric]))
    fig = _figure()
    ax = fig.add_subplot()
    for key, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(labels[metric])
    ax.set_title(f"L0 vs {labels[metric]}")
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_density(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The log10 latent density histogram of each SAE (step lines); dead latents (never fired on
    the held-out tokens, their number given) in the legend. Writes a PNG."""
    fig = _figure()
    ax = fig.add_subplot()
    for r in results:
        h, n = r["density_histogram"], r["eval_result_metrics"]["gemmascope"]["n_tokens"]
        label = f"{r['sae_id']} (dead {h['n_dead']}: never fired on {n} tokens)"
        ax.stairs(h["counts"], h["log10_bin_edges"], label=label)
    ax.axvline(math.log10(DENSE_DENSITY), color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("log10 density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title("Latent density")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def plot_position_error(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Reconstruction error by token position (in units of the mean variance per token)."""
    fig = _figure()
    ax = fig.add_subplot()
    for r in results:
        curve = r["fvu_by_position"]
        xs = [i for i, v in enumerate(curve) if v is not None]
        ax.plot(xs, [curve[i] for i in xs], linewidth=1, label=r["sae_id"])
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("FVU at position")
    ax.set_title("Reconstruction error by position")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A compact text table of the headline numbers, one row per SAE, with the health columns
    (`>50%`: latents over 50% density; `L0>10%`: the share of L0 carried by latents over 10%),
    a footnote saying on how many tokens dead and density are counted, and a line per SAE whose
    health block carries a warning."""
    rows = [summary(r) for r in results]
    ks = sorted({k for s in rows for k in s if k.startswith("sae_top_")}, key=_k_of)
    header = ["sae", "L0", "FVU", "dLM loss", "CE rec", "KL", "dead", "dense", ">50%", "L0>10%"]
    lines = [header + [f"top{_k_of(k)}" for k in ks]]
    for s in rows:
        lines.append(
            [
                s["sae_id"],
                _fmt(s["l0"], 1),
                _fmt(s["fvu"], 4),
                _fmt(s["delta_lm_loss"], 4),
                _fmt(s["ce_loss_score"], 4),
                _fmt(s["kl_div_with_sae"], 4),
                _fmt(s["frac_dead"], 3),
                _fmt(s["frac_dense"], 3),
                "-" if s.get("n_over_50_percent") is None else str(s["n_over_50_percent"]),
                _fmt(s.get("l0_share_over_10_percent"), 3),
                *[_fmt(s.get(k), 3) for k in ks],
            ]
        )
    n = rows[0]["n_tokens"] if rows else 0
    massive = max((int(r.get("n_massive_tokens_excluded") or 0) for r in rows), default=0)
    left_out = f" and {massive} massive-activation tokens" if massive else ""
    notes = [
        f"({n} held-out tokens per SAE; dead = never fired on them, dense = fired on over 10%; "
        f"BOS/EOS/pad{left_out} excluded)",
        *[f"! {s['sae_id']}: {s['health_warning']}" for s in rows if s.get("health_warning")],
    ]
    return "\n".join([_align(lines), *notes])


def _align(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    )


def _fmt(value: Any, digits: int) -> str:
    """A number with `digits` decimals; "-" for a missing or non-finite one (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def _k_of(key: str) -> int:
    return int(key.split("_")[2])


def probing_table(probing: Mapping[str, Any]) -> str:
    """A compact text table: test accuracy at each k and with all features, per site and SAE."""
    ks = probing["eval_config"]["k_values"]
    header = ["probe on", *[f"top{k}" for k in ks], "all"]
    lines = [header]
    for site, acc in probing["llm"].items():
        lines.append(
            [
                f"{site} raw activations",
                *[f"{acc[f'llm_top_{k}_test_accuracy']:.3f}" for k in ks],
                f"{acc['llm_test_accuracy']:.3f}",
            ]
        )
    for sae_id, entry in probing["saes"].items():
        acc = entry["sae"]
        lines.append(
            [
                sae_id,
                *[f"{acc[f'sae_top_{k}_test_accuracy']:.3f}" for k in ks],
                f"{acc['sae_test_accuracy']:.3f}",
            ]
        )
    cfg = probing["eval_config"]
    return _align(lines) + (
        f"\n(sparse probing: {len(probing['classes'])} one-vs-rest topic tasks, {cfg['n_articles']} "
        f"{cfg['split']} articles, test accuracy averaged over topics)"
    )


def _cell_metrics(result: Mapping[str, Any]) -> tuple[str, int, dict[str, Any]]:
    row = summary(result)
    kind, layer = str(row["site"]).rsplit(".", 1)
    return kind, int(layer), row


def plot_heatmap(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A layers x sites heatmap of L0, FVU and delta LM loss. Where a cell has several SAEs it
    shows the widest, and of those the one with the median L0, so each cell is one real SAE."""
    import numpy as np

    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        kind, layer, row = _cell_metrics(result)
        cells.setdefault((kind, layer), []).append(row)
    kinds = [k for k in SITE_KINDS if any(c[0] == k for c in cells)]
    layers = sorted({c[1] for c in cells})
    metrics = [("l0", "L0"), ("fvu", "FVU"), ("delta_lm_loss", "ΔLM loss")]
    fig = _figure(4 + 1.2 * len(kinds) * 3, 1.5 + 0.35 * len(layers))
    axes = fig.subplots(1, 3, squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        grid = np.full((len(layers), len(kinds)), np.nan)
        for (kind, layer), rows in cells.items():
            widest = max(r.get("d_sae", 0) for r in rows)
            rows = sorted((r for r in rows if r.get("d_sae", 0) == widest), key=lambda r: r.get("l0", 0))
            value = rows[len(rows) // 2].get(key)
            grid[layers.index(layer), kinds.index(kind)] = value if _finite(value) else np.nan
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_ylabel("layer")
        ax.set_title(title)
        for i in range(len(layers)):
            for j in range(len(kinds)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return save_png(fig, path)


def plot_training_log(rows: Iterable[Mapping[str, Any]], png_path: str | Path) -> Path:
    """Loss, L0, FVU and dead fraction against tokens for every SAE of a training log, from its
    rows (`{"step", "tokens", NAME: {"loss", "l0", "fvu", "dead_fraction", ...}}`, as
    `train.checkpoint.read_training_log` yields them). Dead here is training's running count (silent for the
    dead window), not the held-out one of `eval.json`. Writes a PNG."""
    rows = list(rows)
    names = [k for k in (rows[0] if rows else {}) if k not in ("step", "tokens")]
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2)
    panels = [
        ("loss", "loss", "log"),
        ("l0", "L0", "log"),
        ("fvu", "FVU", "linear"),
        ("dead_fraction", "silent in the training window (not the eval's dead)", "linear"),
    ]
    for ax, (metric, label, yscale) in zip(axes.flat, panels, strict=True):
        for name in names:
            ax.plot([r["tokens"] for r in rows], [r[name][metric] for r in rows], label=name)
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.set_yscale(yscale)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return save_png(fig, png_path)


def write_bias(run_dir: str | Path, out: Mapping[str, Any]) -> list[Path]:
    """`run_dir/report/bias.json` (a bias experiment, `bias.bias_experiment`) and `bias.png`
    (`plot_bias`), which the SAEs page shows."""
    folder = Path(run_dir) / REPORT
    return [
        write_atomic(folder / "bias.json", json.dumps(out, indent=1)),
        plot_bias(out, folder / "bias.png"),
    ]


MIN_COST_SPAN = 0.05  # nats: the bias plot's cost axis reaches at least this high


def plot_bias(out: Mapping[str, Any], path: str | Path) -> Path:
    """The bias experiment against the number of latents ablated: the bias and gaps in probability
    (left), the bias in log-odds with the cost (ΔLM loss, right axis) when measured (right)."""
    rows = out["rows"]
    k = [r["n_latents"] for r in rows]
    first, second = out["watch"]
    fig = _figure(10.4, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(k, [r["bias"] for r in rows], marker="o", label="bias: gap(A) - gap(B)")
    ax.plot(k, [r["gap_a"] for r in rows], ls="--", color="tab:purple", label="gap(A)")
    ax.plot(k, [r["gap_b"] for r in rows], ls=":", color="tab:green", label="gap(B)")
    ax.set_ylabel(f"p({first!r}) - p({second!r})")
    odds = fig.add_subplot(1, 2, 2)
    odds.plot(k, [r["log_odds_bias"] for r in rows], marker="o", color="tab:orange", label="log-odds bias")
    odds.set_ylabel(f"log p({first!r}) - log p({second!r}): A - B (nats)")
    odds.set_ylim(bottom=0 if min(r["log_odds_bias"] for r in rows) >= 0 else None)
    for axis in (ax, odds):
        axis.set_xlabel(f"top latents ablated (picked by {out.get('pick', 'contrast')})")
        axis.axhline(0, color="grey", lw=0.5)
    if all(r["delta_lm_loss"] is not None for r in rows):
        cost = odds.twinx()
        costs = [r["delta_lm_loss"] for r in rows]
        cost.plot(k, costs, marker="s", color="tab:red", label="ΔLM loss (cost)")
        cost.set_ylabel("ΔLM loss on held-out text (nats)", color="tab:red")
        low, high = min(0.0, *costs), max(MIN_COST_SPAN, *costs)  # a cost of thousandths looks it
        cost.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    fig.legend(loc="upper center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return save_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
