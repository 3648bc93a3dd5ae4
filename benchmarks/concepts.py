"""Concepts a researcher can find, read and steer: for a fixed set of concepts (examples/concepts/) and
each SAE of a run, how well the tool's own contrast search finds a latent for the concept, and what
that latent is worth.

    python benchmarks/concepts.py RUN_DIR [--sae ID ...] [--joint] [--concepts dog,cat] [--strengths 0.25,0.5,1,2]
        [--seeds 3] [--max-new-tokens 30] [--side-effect-tokens 1024] [--out benchmarks/results/concepts.json]
        [--plot docs/concepts.png] [--quick | --detection-only] [--bootstrap 200]

Per concept (files in examples/concepts/CONCEPT/: selection.txt, heldout.txt, words.txt) and SAE
(with --joint: per concept, one pick over all the SAEs at once, the search ranking every SAE's
latents by the same scale-free separation, as `gemmascope contrast RUN` does):
(a) detection: the top latent of `features.contrast` (max-pooled, dense latents hidden by the run's
    feature index) between the concept's selection sentences and every other concept's selection
    sentences plus examples/concepts/other_selection.txt; a threshold on its max-pooled activation
    chosen for the best F1 on those selection sentences; its F1 on the held-out sentences (the
    concept's heldout.txt against every other concept's and other_heldout.txt), which no selection uses.
(b) steering: that latent added (steer.Intervention, mode "add", every position) at each strength
    (multiples of its max activation in the run's feature index) into the 5 prompts of
    examples/concepts/neutral_prompts.txt: the ratio of the next-token probability of the concept's own
    words (their single-token forms) with and without it, averaged over the prompts; the share of
    `--seeds` seeded `--max-new-tokens`-token completions per prompt that mention the concept (a word of
    words.txt), against the ΔLM loss it costs on held-out text (`effects.side_effects`).
(c) reading: whether the latent's feature page names the concept: the share of its top 10 examples
    whose window holds a concept word, and whether its explanation does.
Beside (a), the oracle: the best held-out F1 of any single latent of the pick's SAEs, chosen on the
held-out labels themselves (a bound on what any search could find: it says whether the search or the
dictionary limits detection). `--detection-only` measures (a), (c) and the oracle, not (b): minutes,
for comparing dictionaries. With 24 selection sentences a concept, the pick and its threshold depend
on which sentences were written: `--bootstrap N` (default 200) redoes (a) on N resamples of them
(`bootstrap_detection`) and prints the detected count's mean and spread, so two dictionaries are
compared by more than one draw.

Prints one table, writes the JSON and a plot (F1 per concept; mention share against cost per strength).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detection import (  # noqa: E402  (benchmarks/detection.py, beside this script)
    B_PER_CONCEPT,
    F1_TARGET,
    best_threshold,
    bootstrap_detection,
    f1_score,
    oracle_f1,
)

from gemmascope.effects import side_effects  # noqa: E402
from gemmascope.features import FeatureIndex  # noqa: E402
from gemmascope.features.contrast import contrast  # noqa: E402
from gemmascope.features.encode import encode  # noqa: E402
from gemmascope.features.lens import word_token_ids  # noqa: E402
from gemmascope.models import LanguageModel, prompt_tokens  # noqa: E402
from gemmascope.opening import open_run  # noqa: E402
from gemmascope.sae import SAE  # noqa: E402
from gemmascope.steer import Intervention, SamplingSettings, sample, steering  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "concepts"
CONCEPTS = (
    "dog", "cat", "bird", "food", "music", "sport", "disease", "weather", "sea", "war", "religion",
    "computer", "female", "male",
)  # fmt: skip
STRENGTHS = (0.25, 0.5, 1.0, 2.0)  # x the latent's max activation in the feature index
MAX_COST = 0.5  # nats of held-out ΔLM loss a steer may cost (the target)
BOOTSTRAP = 200  # resamples of the selection sentences for the detected count's spread


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_sets(concepts: list[str]) -> dict[str, Any]:
    """Every sentence set: per concept selection, heldout, words; the extra negatives; the prompts."""
    sets: dict[str, Any] = {"concepts": {}}
    for name in CONCEPTS:
        folder = EXAMPLES / name
        sets["concepts"][name] = {
            "selection": read_lines(folder / "selection.txt"),
            "heldout": read_lines(folder / "heldout.txt"),
            "words": read_lines(folder / "words.txt"),
        }
    sets["other_selection"] = read_lines(EXAMPLES / "other_selection.txt")
    sets["other_heldout"] = read_lines(EXAMPLES / "other_heldout.txt")
    sets["prompts"] = read_lines(EXAMPLES / "neutral_prompts.txt")
    sets["measured"] = concepts
    return sets


def labelled(sets: dict[str, Any], part: str) -> tuple[list[str], list[str]]:
    """Every concept's `part` sentences ("selection" or "heldout") then the other ones, and each one's owner."""
    pairs = [(t, n) for n, c in sets["concepts"].items() for t in c[part]] + [
        (t, "other") for t in sets[f"other_{part}"]
    ]
    return [t for t, _ in pairs], [n for _, n in pairs]


def mentions(text: str, words: list[str]) -> bool:
    """Whether `text` holds one of `words` as a whole word (case-insensitive)."""
    low = text.lower()
    return any(re.search(rf"(?<![a-z]){re.escape(w.lower())}(?![a-z])", low) for w in words)


def mention_share(texts: list[str], words: list[str]) -> float:
    """The share of `texts` that mention one of `words` (0 for no texts)."""
    return sum(mentions(t, words) for t in texts) / max(len(texts), 1)


def concept_token_ids(model: LanguageModel, words: list[str]) -> list[int]:
    """The single-token forms of the concept's words (' dog', ' Dog', 'dog', ...) as token ids
    (`features.word_token_ids` of each)."""
    return sorted({i for w in words for i in word_token_ids(model, w)})


def next_token_ratio(
    model: LanguageModel, prompts: list[str], ivs: list[Intervention], ids: list[int]
) -> tuple[float, float]:
    """Mean over prompts of p(concept tokens) next, without and with the interventions."""
    if not ids:
        return float("nan"), float("nan")
    clean, steered = [], []
    with torch.no_grad():
        for prompt in prompts:
            x = prompt_tokens(model, prompt).to(model.device)
            clean.append(float(torch.softmax(model.hf(input_ids=x).logits[0, -1].float(), -1)[ids].sum()))
            with steering(model, ivs):
                p = torch.softmax(model.hf(input_ids=x).logits[0, -1].float(), -1)
            steered.append(float(p[ids].sum()))
    return sum(clean) / len(clean), sum(steered) / len(steered)


def completions(
    model: LanguageModel, prompts: list[str], ivs: list[Intervention], seeds: int, max_new_tokens: int
) -> list[str]:
    """`seeds` seeded completions of each prompt (the tool's default sampling), with the interventions."""
    out = []
    with steering(model, ivs):
        for prompt in prompts:
            ids = prompt_tokens(model, prompt).to(model.device)
            for seed in range(seeds):
                new = sample(model, ids, SamplingSettings(max_new_tokens=max_new_tokens, seed=seed))
                out.append(str(model.tokenizer.decode(new, skip_special_tokens=True)))
    return out


def page_names_concept(index: FeatureIndex | None, key: str, latent: int, words: list[str]) -> dict[str, Any]:
    """(c): the share of the feature page's top 10 windows holding a concept word; its explanation."""
    if index is None:
        return {"top_share": None, "explanation": None, "names": None}
    page = index.feature(key, latent)
    windows = ["".join(e["tokens"]) for e in page["top_examples"][:10]]
    share = sum(mentions(w, words) for w in windows) / max(len(windows), 1)
    explanation = page.get("explanation") or ""
    return {
        "top_share": share,
        "explanation": explanation,
        "explanation_names": mentions(explanation, words),
        "names": share >= 0.5 or mentions(explanation, words),
        "density": page["density"],
        "max_act": page["max_act"],
    }


def measure_sae(
    model: LanguageModel, saes: dict[str, SAE], index: FeatureIndex | None, sets: dict[str, Any], args: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of one pick: the contrast search over `saes` (one SAE, or with --joint every SAE of
    the run at once, as `gemmascope contrast RUN` searches), its top latent measured in its SAE; and
    the detection's spread over resamples of the selection sentences (`bootstrap_detection`)."""
    pick = "joint" if len(saes) > 1 else next(iter(saes))
    densities = {k: index.densities(k) for k in saes} if index is not None else None
    names = list(sets["concepts"])
    heldout_texts, heldout_owner = labelled(sets, "heldout")
    select_texts, select_owner = labelled(sets, "selection")
    pooled_held = encode(model, saes, heldout_texts, pool="max").pooled["max"]  # {id: [n, d_sae]}
    pooled_sel = encode(model, saes, select_texts, pool="max").pooled["max"]
    baseline = completions(model, sets["prompts"], [], args.seeds, args.max_new_tokens)
    is_pos_held_of = {n: torch.tensor([o == n for o in heldout_owner]) for n in names}
    spread = bootstrap_detection(
        pooled_sel, pooled_held, select_owner, heldout_owner, sets["measured"], densities, args.bootstrap
    )
    rows = []
    for name in sets["measured"]:
        concept = sets["concepts"][name]
        others = [t for n in names if n != name for t in sets["concepts"][n]["selection"][:B_PER_CONCEPT]]
        others += sets["other_selection"]
        found = contrast(model, saes, concept["selection"], others, pool="max", top=5, densities=densities)
        if not found["results"]:
            rows.append({"concept": name, "pick": pick, "sae_id": pick, "latent": None})
            continue
        top = found["results"][0]
        key, latent = str(top["sae_id"]), int(top["index"])
        if spread["picks"][name] != {"sae_id": key, "latent": latent}:  # before the minutes of steering
            raise SystemExit(f"{name}: the bootstrap's pick {spread['picks'][name]} is not the contrast's")
        sae = saes[key]
        is_pos_sel = torch.tensor([o == name for o in select_owner])
        is_pos_held = is_pos_held_of[name]
        oracle = max(
            ((k, *oracle_f1(pooled_held[k], is_pos_held)) for k in saes), key=lambda o: o[2]
        )  # (sae id, latent, F1)
        sel = pooled_sel[key][:, latent]
        threshold = best_threshold(sel[is_pos_sel], sel[~is_pos_sel])
        held = pooled_held[key][:, latent]
        f1 = f1_score(held[is_pos_held], held[~is_pos_held], threshold)
        page = page_names_concept(index, key, latent, concept["words"])
        unit = page.get("max_act") or float(top["mean_a"]) or 1.0
        token_ids = concept_token_ids(model, concept["words"])
        steer_rows = []
        for m in args.strengths:
            ivs = [Intervention(sae, latent=latent, mode="add", value=m * unit)]
            p0, p1 = next_token_ratio(model, sets["prompts"], ivs, token_ids)
            texts = completions(model, sets["prompts"], ivs, args.seeds, args.max_new_tokens)
            cost = side_effects(model, ivs, n_tokens=args.side_effect_tokens)
            steer_rows.append(
                {
                    "multiple": m,
                    "strength": m * unit,
                    "p_clean": p0,
                    "p_steered": p1,
                    "ratio": p1 / p0 if p0 > 0 else float("nan"),
                    "mention_share": mention_share(texts, concept["words"]),
                    "delta_lm_loss": cost["delta_lm_loss"],
                    "kl": cost["kl"],
                    "completions": texts,
                }
            )
        ok = [r for r in steer_rows if r["delta_lm_loss"] <= MAX_COST]
        best = max(ok, key=lambda r: (r["mention_share"], -r["delta_lm_loss"])) if ok else None
        row = {
            "concept": name,
            "pick": pick,
            "sae_id": key,
            "latent": latent,
            "contrast": top,
            "threshold": threshold,
            "f1_selection": f1_score(sel[is_pos_sel], sel[~is_pos_sel], threshold),
            "f1_heldout": f1,
            "f1_heldout_fires": f1_score(held[is_pos_held], held[~is_pos_held], 0.0),
            "oracle": {"sae_id": oracle[0], "latent": oracle[1], "f1_heldout": oracle[2]},
            "baseline_mention_share": mention_share(baseline, concept["words"]),
            "steering": steer_rows,
            "best": None if best is None else {k: v for k, v in best.items() if k != "completions"},
            "page": page,
        }
        rows.append(row)
        print(summary_line(row), flush=True)
    return rows, {"pick": pick, **spread}


def summary_line(row: dict[str, Any]) -> str:
    if row.get("latent") is None:
        return f"{row['concept']:<9} {row['sae_id']:<30} no latent"
    best = row["best"] or {}
    page = row["page"]
    return (
        f"{row['concept']:<9} {row['sae_id']:<30} {row['latent']:>6} {row['f1_heldout']:6.2f} "
        f"{row['oracle']['f1_heldout']:6.2f} "
        f"{best.get('multiple', float('nan')):5.2f} {best.get('mention_share', float('nan')):6.2f} "
        f"{row['baseline_mention_share']:5.2f} {best.get('ratio', float('nan')):7.2f} "
        f"{best.get('delta_lm_loss', float('nan')):6.3f} "
        f"{'' if page.get('names') is None else ('yes' if page['names'] else 'no'):>5}  "
        f"{(page.get('explanation') or '')[:50]}"
    )


HEADER = (
    f"{'concept':<9} {'sae':<30} {'latent':>6} {'F1':>6} {'oracle':>6} {'x max':>5} {'mention':>6} {'base':>5} "
    f"{'p ratio':>7} {'ΔLM':>6} {'page':>5}  explanation"
)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    rows = [r for r in rows if r.get("latent") is not None]
    keys = sorted({r["pick"] for r in rows})
    steered = any(r["steering"] for r in rows)  # not with --detection-only: the F1 panel alone
    fig, axes = plt.subplots(1, 2 if steered else 1, figsize=(14 if steered else 8, 5), squeeze=False)
    axes = axes[0]
    width = 0.8 / max(len(keys), 1)
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    for k, key in enumerate(keys):
        f1 = {r["concept"]: r["f1_heldout"] for r in rows if r["pick"] == key}
        xs = [i + k * width for i in range(len(concepts))]
        axes[0].bar(xs, [f1.get(c, 0) for c in concepts], width, label=key)
        oracle = {r["concept"]: r["oracle"]["f1_heldout"] for r in rows if r["pick"] == key and "oracle" in r}
        axes[0].scatter(
            xs, [oracle.get(c, float("nan")) for c in concepts], marker="_", s=120, color="black",
            label="oracle (best latent on the held-out labels)" if k == 0 else None,
        )  # fmt: skip
    axes[0].axhline(F1_TARGET, color="grey", linestyle="--", linewidth=1)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(concepts))], concepts, rotation=45, ha="right")
    axes[0].set_ylabel("held-out F1 of the contrast pick")
    axes[0].set_ylim(0, 1.02)  # an oracle of 1.0 stays in view
    axes[0].legend(fontsize=7, loc="lower left")
    if not steered:
        _save(fig, path)
        return
    for r in rows:
        xs = [s["delta_lm_loss"] for s in r["steering"]]
        ys = [s["mention_share"] for s in r["steering"]]
        axes[1].plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"{r['concept']}")
    axes[1].axvline(MAX_COST, color="grey", linestyle="--", linewidth=1)
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes[1].set_xscale("symlog", linthresh=0.05)
    axes[1].set_xlim(left=min([0.0] + [s["delta_lm_loss"] for r in rows for s in r["steering"]]))
    axes[1].set_xlabel("held-out ΔLM loss of the steer (nats)")
    axes[1].set_ylabel("share of completions mentioning the concept")
    axes[1].legend(fontsize=6, ncol=2)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sae", action="append", help="SAE ids of the run (default: every SAE)")
    parser.add_argument(
        "--joint", action="store_true", help="one pick per concept over all the SAEs at once, not one per SAE"
    )
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--strengths", default=",".join(map(str, STRENGTHS)))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--side-effect-tokens", type=int, default=1024)
    effort = parser.add_mutually_exclusive_group()
    effort.add_argument("--quick", action="store_true", help="strengths 0.5,1 and 1 seed: for sweeps")
    effort.add_argument(
        "--detection-only", action="store_true", help="detection, the oracle and the page; no steering"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=BOOTSTRAP,
        help="resamples of the selection sentences for the detected count's spread (0: none)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/concepts.json"))
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    args.strengths = [float(s) for s in args.strengths.split(",")]
    if args.quick:
        args.strengths, args.seeds = [0.5, 1.0], 1
    if args.detection_only:
        args.strengths, args.seeds = [], 0
    if args.bootstrap < 0:
        raise SystemExit(f"--bootstrap {args.bootstrap}: expected 0 (none) or more resamples")
    concepts = [c.strip() for c in args.concepts.split(",")]
    unknown = sorted(set(concepts) - set(CONCEPTS))
    if unknown:
        raise SystemExit(f"unknown concepts {unknown}: expected some of {', '.join(CONCEPTS)}")
    sets = load_sets(concepts)
    run = open_run(args.run_dir, args.sae)
    model, index = run.model, run.index()
    started = time.monotonic()
    print(HEADER)
    rows, spreads = [], []
    picks = [dict(run.saes)] if args.joint else [{key: sae} for key, sae in run.saes.items()]
    for saes in picks:
        measured, spread = measure_sae(model, saes, index, sets, args)
        rows += measured
        spreads.append(spread)
    seconds = time.monotonic() - started
    print_targets(rows, spreads)
    out = {"run": str(args.run_dir), "strengths": args.strengths, "seeds": args.seeds, "seconds": seconds,
           "max_new_tokens": args.max_new_tokens, "rows": rows, "bootstrap": spreads}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    if args.plot is not None:
        plot(rows, args.plot)
    print(f"wrote {args.out} ({seconds:.0f} s)")


def print_targets(rows: list[dict[str, Any]], spreads: list[dict[str, Any]]) -> None:
    for key in sorted({r["pick"] for r in rows}):
        mine = [r for r in rows if r["pick"] == key and r.get("latent") is not None]
        detected = [r["concept"] for r in mine if r["f1_heldout"] >= F1_TARGET]
        oracle = [r["concept"] for r in mine if r["oracle"]["f1_heldout"] >= F1_TARGET]
        steered = [r["concept"] for r in mine if r["best"] and r["best"]["mention_share"] >= 0.5]
        named = [r["concept"] for r in mine if r["page"].get("names")]
        steering = (
            f"steered (>= half mention at ΔLM <= {MAX_COST}): {len(steered)} {steered}"
            if any(r["steering"] for r in mine)
            else "steering not measured"
        )
        print(
            f"{key}: detection F1 >= {F1_TARGET}: {len(detected)}/{len(mine)} {detected} "
            f"(oracle {len(oracle)}); {steering}; page names it: {len(named)} {named}"
        )
        spread = next(s for s in spreads if s["pick"] == key)
        if spread["n"]:
            likely = {c: round(v, 2) for c, v in spread["detected_share"].items() if v > 0}
            print(
                f"  over {spread['n']} resamples of the selection sentences: detected "
                f"{spread['mean']:.1f} ± {spread['sd']:.1f} (from {min(spread['counts'])} to "
                f"{max(spread['counts'])}); each concept's share of resamples detecting it: {likely}"
            )


if __name__ == "__main__":
    main()
