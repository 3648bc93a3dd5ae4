"""How faithful are the graphs? (issue "Circuits you can trust"): on a fixed set of prompts the model
answers correctly (`examples/faithfulness.tsv`: capitals, plurals, opposites, sequences, arithmetic
and facts), per prompt and per dictionary (a run's transcoder per layer, a run's cross-layer
transcoder):
- the graph's replacement and completeness scores (`attribution.scores`, all features as nodes up to
  the default cap, as `gemmascope attribute` draws it);
- the answer's lead over the graph's second output (its demeaned logit where the graph has one
  output) after switching off the top N nodes that the graph says hold that lead up
  (`gemmascope attribute --ablate-top N --against SECOND`), predicted through the graph and measured
  in the model, and measured / predicted.

    python benchmarks/faithfulness.py --transcoders RUN [--clt RUN2] [--top 10] [--limit K]

A prompt whose top next token is not its answer is reported and left out (the set is checked on
Gemma 3 270M). Prints one Markdown table per dictionary and a summary (medians; the share of prompts
whose ratio is within 0.7-1.3), writes benchmarks/results/faithfulness.json and
benchmarks/results/faithfulness.png (scores and ratios per prompt, both dictionaries).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.attribution import attribute, predict, prune, scores, strongest, transcoder_set
from gemmascope.attribution.dictionary import Replacing, run_clt
from gemmascope.attribution.intervene import measure
from gemmascope.models import LanguageModel, load_model

HERE = Path(__file__).resolve().parent
PROMPTS = HERE.parent / "examples" / "faithfulness.tsv"
RESULTS = HERE / "results"
WITHIN = (0.7, 1.3)  # the issue's band for measured / predicted


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """`(prompt, answer)` pairs of a tab-separated file; `#` lines are comments."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1]:
                raise SystemExit(f"{path}:{number}: expected PROMPT<TAB>ANSWER, got {line!r}")
            pairs.append((parts[0], parts[1]))
    return pairs


def answered(model: LanguageModel, prompt: str, answer: str) -> tuple[bool, str]:
    """Whether the model's top next token after `prompt` is `answer`, and that token."""
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        top = int(model.hf(input_ids=ids, use_cache=False).logits[0, -1].argmax())
    said = model.tokenizer.decode([top])
    return said == answer, said


def one_prompt(model: LanguageModel, dictionary: Replacing, prompt: str, top: int) -> dict[str, Any]:
    """The graph's scores and the measured / predicted change of the answer's lead after its top
    `top` nodes (by predicted effect on the lead, among the pruned graph's nodes) are switched off."""
    graph = attribute(model, dictionary, prompt, progress=False)
    replacement, completeness = scores(graph)
    pruned = prune(graph)
    kept = torch.nonzero(pruned.nodes[: graph.n_features]).squeeze(1).tolist()
    against = 1 if len(graph.logit_tokens) > 1 else None
    nodes = strongest(graph, top, against, kept)
    row: dict[str, Any] = {
        "prompt": prompt,
        "tokens": int(graph.n_pos),
        "features": graph.n_features,
        "kept": len(kept),
        "seconds": round(graph.seconds, 1),
        "replacement": replacement,
        "completeness": completeness,
        "answer_p": float(graph.logit_probs[0]),
        "against": graph.logit_tokens[against] if against is not None else None,
        "nodes_off": len(nodes),
    }
    if not nodes:
        return {**row, "predicted": 0.0, "measured": 0.0, "ratio": None}
    predicted = predict(graph, nodes)["total"]
    measured = measure(model, dictionary, graph, nodes)["delta"]

    def lead(change: Tensor) -> float:
        return float(change[0] - (change[against] if against is not None else 0.0))

    p, m = lead(predicted), lead(measured)
    return {**row, "predicted": p, "measured": m, "ratio": m / p if abs(p) > 1e-6 else None}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    within = sum(WITHIN[0] <= r <= WITHIN[1] for r in ratios)
    return {
        "prompts": len(rows),
        "median_replacement": statistics.median(r["replacement"] for r in rows),
        "median_completeness": statistics.median(r["completeness"] for r in rows),
        "median_ratio": statistics.median(ratios) if ratios else None,
        "ratio_within": within,
        "ratio_within_share": within / len(rows),
        "median_seconds": statistics.median(r["seconds"] for r in rows),
    }


def table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{name}:",
        "",
        "| prompt | answer p | features | replacement | completeness | nodes off | lead: predicted | measured | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['prompt']} → {r['answer']!r} | {r['answer_p']:.2f} | {r['features']:,} | {r['replacement']:.3f} | "
            f"{r['completeness']:.3f} | {r['nodes_off']} | {r['predicted']:.2f} | {r['measured']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, rows in results.items():
        x = range(len(rows))
        axes[0].plot(x, [r["replacement"] for r in rows], "o", label=name)
        axes[1].plot(x, [r["completeness"] for r in rows], "o", label=name)
        ratios = [r["ratio"] if r["ratio"] is not None else float("nan") for r in rows]
        axes[2].plot(x, [min(max(v, -0.5), 2.0) for v in ratios], "o", label=name)
    axes[0].set(title="replacement score per prompt", xlabel="prompt", ylim=(0, 1))
    axes[1].set(title="completeness score per prompt", xlabel="prompt", ylim=(0, 1))
    axes[0].axhline(0.8, color="grey", lw=0.8, ls="--")
    axes[1].axhline(0.95, color="grey", lw=0.8, ls="--")
    axes[2].axhspan(*WITHIN, color="grey", alpha=0.15)
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set(
        title="answer's lead after the top nodes are off:\nmeasured / predicted (clipped to -0.5..2)",
        xlabel="prompt", ylim=(-0.6, 2.1),
    )  # fmt: skip
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transcoders", metavar="RUN", help="a run with a transcoder per layer")
    ap.add_argument("--choose", default=None, help="with several sets in RUN: a substring of their ids")
    ap.add_argument("--clt", metavar="RUN", help="a run with a cross-layer transcoder")
    ap.add_argument("--clt-choose", default=None, help="with several CLTs in that run: a substring")
    ap.add_argument("--prompts", type=Path, default=PROMPTS)
    ap.add_argument("--top", type=int, default=10, help="nodes switched off per prompt")
    ap.add_argument("--limit", type=int, default=None, help="the first K prompts only")
    ap.add_argument("--out", type=Path, default=RESULTS / "faithfulness.json")
    args = ap.parse_args()
    if not (args.transcoders or args.clt):
        ap.error("give --transcoders RUN, --clt RUN or both")
    torch.set_num_threads(2)
    model = load_model("gemma-3-270m")
    pairs = read_prompts(args.prompts)[: args.limit]
    kept, wrong = [], []
    for prompt, answer in pairs:
        ok, said = answered(model, prompt, answer)
        (kept if ok else wrong).append((prompt, answer) if ok else (prompt, answer, said))
    for prompt, answer, said in wrong:
        print(f"left out: {prompt!r} -> {said!r}, not {answer!r}")
    if not kept:
        raise SystemExit(f"the model answers none of the {len(pairs)} prompts of {args.prompts} as written")
    dictionaries: dict[str, Replacing] = {}
    if args.transcoders:
        dictionaries["per-layer transcoders"] = transcoder_set(args.transcoders, model.n_layers, args.choose)
    if args.clt:
        dictionaries["cross-layer transcoder"] = run_clt(args.clt, args.clt_choose)
    results: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    for name, dictionary in dictionaries.items():
        rows = []
        for i, (prompt, answer) in enumerate(kept):
            row = {**one_prompt(model, dictionary, prompt, args.top), "answer": answer}
            rows.append(row)
            ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}"
            print(
                f"[{name} {i + 1}/{len(kept)}] {prompt!r}: replacement {row['replacement']:.3f}, completeness "
                f"{row['completeness']:.3f}, lead {row['predicted']:.2f} predicted, {row['measured']:.2f} "
                f"measured ({ratio}); {row['seconds']} s",
                flush=True,
            )
        results[name] = rows
    out = {
        "prompts_file": str(args.prompts),
        "top": args.top,
        "left_out": [{"prompt": p, "answer": a, "said": s} for p, a, s in wrong],
        "runs": {"transcoders": args.transcoders, "clt": args.clt},
        "seconds": time.monotonic() - started,
        "summary": {name: summary(rows) for name, rows in results.items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(results, args.out.with_suffix(".png"))
    for name, rows in results.items():
        print(table(name, rows))
        print()
    for name, s in out["summary"].items():
        print(
            f"{name}: median replacement {s['median_replacement']:.3f}, completeness {s['median_completeness']:.3f}; "
            f"measured/predicted within {WITHIN[0]}-{WITHIN[1]} for {s['ratio_within']} of {s['prompts']} "
            f"(median ratio {s['median_ratio']}); median {s['median_seconds']} s a graph"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
