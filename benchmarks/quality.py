"""Training quality against EleutherAI sparsify at the same budget (issue "SAEs worth reading").

    python benchmarks/quality.py                       # 300k training tokens at resid_post.6 and mlp_out.6
    python benchmarks/quality.py --budgets 300000,2000000 --sites resid_post.6

For each site and training budget, on identical tokens of Gemma 3 270M (the bundled Wikipedia corpus,
train split, harvested once into `--run-dir`):
- ours: JumpReLU with the default recipe (target L0 = `--l0`), the same with Matryoshka prefixes,
  TopK and BatchTopK (k = `--l0`) with their own settings (AuxK on dead latents), every one with the
  decoder refit that ends training;
- sparsify (PyPI `eai-sparsify`, a bench-only requirement): its own Trainer and defaults, TopK k =
  `--l0`, on the same harvested activations fed two ways (`--feedings`, benchmarks/sparsify_baseline.py):
  "shuffled", single tokens in our trainer's order; "sequences", as its users feed it, sequences of
  `--sequence-len` consecutive tokens (in document order, specials left out) in shuffled order, 4,096
  tokens a batch. Tables should take the stronger as the reference.
Every SAE is measured by our `evaluate` on `--eval-tokens` held-out tokens: L0, FVU, ΔLM loss, CE
recovered, KL, dead (never fired on them), latents over 50% / 10% density and their share of L0, and
the wall and CPU seconds of its training, per stage (ours: the steps, the decoder refit, the held-out
measurement, from the SAE's `stage_seconds`; sparsify: its Trainer). Writes
benchmarks/results/quality.json and quality.png (ΔLM loss against tokens and against seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gemmascope.activations import ActivationStore, harvest
from gemmascope.corpus import special_mask
from gemmascope.evals import evaluate, summary
from gemmascope.formats import load_sae
from gemmascope.models import load_model, reading_dtype
from gemmascope.runs import HELDOUT
from gemmascope.sae import SAE, SAEConfig, TopKSAE
from gemmascope.sites import parse_site
from gemmascope.train import TrainConfig, TrainSpec, train_saes

sys.path.insert(0, str(Path(__file__).parent))
from sparsify_baseline import train_sparsify_topk  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("l0", "fvu", "delta_lm_loss", "ce_loss_score", "kl_div_with_sae", "frac_dead")


def ints(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part]


def sparsify_tokens(store: ActivationStore, site: str, tokens: int, seed: int = 0) -> torch.Tensor:
    """`[tokens, d_in]` raw activations in the order our trainer reads them (`seed`, batch 4,096),
    epochs repeated as needed: sparsify sees exactly our training tokens."""
    per_epoch = int(store.manifest(site)["n_tokens_non_special"])
    batches = store.batches([site], 4096, seed=seed, epochs=math.ceil(tokens / per_epoch) + 1)
    parts, n = [], 0
    for batch in batches:
        parts.append(batch[parse_site(site)])
        n += len(parts[-1])
        if n >= tokens:
            break
    return torch.cat(parts)[:tokens]


ARCHS = ("jumprelu", "matryoshka", "topk", "batchtopk")
# also: "jumprelu-float32", the default JumpReLU with its step's encoder product in float32
# (`TrainConfig.step_dtype`; auto takes bfloat16 where the CPU computes it natively)


Trained = tuple[SAE, dict[str, dict[str, float]]]  # the SAE, {stage: {"wall", "cpu"}} with "total"


def timed(wall: float, cpu: float) -> dict[str, float]:
    """Seconds since `wall` (perf_counter) and `cpu` (process_time)."""
    return {"wall": round(time.perf_counter() - wall, 2), "cpu": round(time.process_time() - cpu, 2)}


def train_ours(
    run_dir: Path, site: str, budget: int, width: int, l0: int, archs: list[str], seed: int = 0, rep: int = 0
) -> dict[str, Trained]:
    """Our architectures (`archs`), each in its own pass (so each has its own times); `rep` > 0
    trains again under another run name (a finished run of the same name is returned untrained)."""
    specs = {
        "jumprelu": ("ours jumprelu", TrainSpec(site, width, target_l0=l0)),
        "jumprelu-float32": ("ours jumprelu, float32 step", TrainSpec(site, width, target_l0=l0)),
        "matryoshka": ("ours jumprelu matryoshka", TrainSpec(site, width, target_l0=l0, matryoshka=True)),
        "topk": ("ours topk", TrainSpec(site, width, "topk", k=l0)),
        "batchtopk": ("ours batchtopk", TrainSpec(site, width, "batchtopk", k=l0)),
    }
    out = {}
    for arch, (label, spec) in specs.items():
        if arch not in archs:
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        name = (
            f"quality_{budget}_{site}_{arch}"
            + (f"_seed{seed}" if seed else "")
            + (f"_rep{rep}" if rep else "")
        )
        step_dtype = "float32" if arch.endswith("-float32") else "auto"
        [folder] = train_saes(
            run_dir, [spec], budget, TrainConfig(name=name, seed=seed, step_dtype=step_dtype)
        )
        total = timed(wall, cpu)
        sae = load_sae(folder)
        # a finished run of the same name returns its SAE untrained: its stages are that run's
        recorded = sae.cfg.extra.get("stage_seconds", {})
        stages = {k: v for k, v in recorded.items() if isinstance(v, dict)}
        out[label] = (sae, {**stages, "total": total})
    return out


def document_tokens(store: ActivationStore, site: str, tokens: int) -> torch.Tensor:
    """`[tokens, d_in]` raw activations of the non-special tokens in harvest (document) order, the
    store read again from its start as needed."""
    parts, n = [], 0
    while n < tokens:
        for acts, ids in store.rows(site):
            keep = ~special_mask(ids, store.special_ids).reshape(-1)
            parts.append(acts.reshape(-1, acts.shape[-1])[keep])
            n += len(parts[-1])
            if n >= tokens:
                break
    return torch.cat(parts)[:tokens]


def train_theirs(
    store: ActivationStore,
    site: str,
    budget: int,
    width: int,
    l0: int,
    seed: int = 0,
    sequence_len: int = 1,
) -> tuple[SAE, dict[str, dict[str, float]], dict]:
    """sparsify's TopK on `budget` tokens: shuffled single tokens (`sequence_len` 1) or sequences of
    `sequence_len` consecutive tokens."""
    if sequence_len == 1:
        x = sparsify_tokens(store, site, budget, seed)
    else:
        x = document_tokens(store, site, budget)
    wall, cpu = time.perf_counter(), time.process_time()
    state, info = train_sparsify_topk(
        x, l0, width, seed=seed, sequence_len=sequence_len, overrides={"auxk_alpha": 1 / 32}
    )
    total = timed(wall, cpu)
    sae = TopKSAE(SAEConfig("topk", x.shape[1], width, k=l0, site=site, hook_name=parse_site(site).hook_name))
    sae.load_state_dict(state)
    info.pop("train_fvu", None)
    return sae, {"steps": total, "total": total}, info


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    """Per site, held-out ΔLM loss against training tokens (top) and against training seconds
    (bottom: time to quality, each SAE's budgets a curve)."""
    from matplotlib.figure import Figure

    sites = sorted({r["site"] for r in rows})
    fig = Figure(figsize=(5.5 * len(sites), 8.4), dpi=110)
    for i, site in enumerate(sites):
        for row, (key, xlabel) in enumerate(
            (("budget", "training tokens"), ("train_seconds", "training seconds"))
        ):
            ax = fig.add_subplot(2, len(sites), row * len(sites) + i + 1)
            for label in sorted({r["sae"] for r in rows}):
                pts = sorted(
                    (r[key], r["delta_lm_loss"]) for r in rows if r["site"] == site and r["sae"] == label
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ΔLM loss (nats)")
            ax.set_title(site)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| site | tokens | SAE | L0 | FVU | ΔLM loss | CE rec | KL | dead | >50% | >10% (L0 share) | train s |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['site']} | {r['budget']:,} | {r['sae']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{r['delta_lm_loss']:.3f} | {r['ce_loss_score']:.3f} | {r['kl_div_with_sae']:.3f} | "
            f"{r['frac_dead']:.3f} | {r['n_over_50_percent']} | {r['n_over_10_percent']} "
            f"({r['l0_share_over_10_percent']:.2f}) | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


STAGES = ("steps", "refit", "heldout", "total")


def stage_table(rows: list[dict[str, Any]]) -> str:
    """Wall / CPU seconds of each training stage (CPU: every thread of the process)."""
    lines = ["| site | tokens | SAE | " + " | ".join(f"{s} wall / CPU s" for s in STAGES) + " |"]
    lines.append("|" + "---|" * (3 + len(STAGES)))
    for r in rows:
        times = r.get("stages", {})
        cells = [f"{times[s]['wall']:.1f} / {times[s]['cpu']:.1f}" if s in times else "–" for s in STAGES]
        lines.append(f"| {r['site']} | {r['budget']:,} | {r['sae']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/bench_quality")
    parser.add_argument("--sites", default="resid_post.6,mlp_out.6")
    parser.add_argument("--budgets", default="300000")
    parser.add_argument(
        "--harvest-tokens",
        type=int,
        default=None,
        help="distinct tokens (default: the largest budget, at most the corpus)",
    )
    parser.add_argument("--archs", default=",".join(ARCHS), help="ours to train (sparsify always runs)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--l0", type=int, default=45)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model-dtype",
        default="auto",
        help="the harvest's model dtype (models.reading_dtype): auto, float32, bfloat16",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed of every SAE (ours and sparsify) and token order"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="train every SAE this many times (in a fresh RUN: a finished run of the same name comes back "
        "untrained); its seconds are the fastest",
    )
    parser.add_argument("--out", default="quality")
    parser.add_argument(
        "--feedings",
        default="shuffled,sequences",
        help="how sparsify is fed: shuffled tokens, sequences (empty: ours alone, beside --keep-rows)",
    )
    parser.add_argument("--sequence-len", type=int, default=128, help="tokens per sequence fed to sparsify")
    parser.add_argument(
        "--keep-rows", action="store_true", help="keep the rows of RESULTS/OUT.json this run does not redo"
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} must be at least 1")
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    sites, budgets = args.sites.split(","), ints(args.budgets)
    model = load_model("gemma-3-270m")
    started = time.monotonic()
    reader = model.cast(reading_dtype(args.model_dtype))  # the harvest's passes as the suite runs them
    harvest(reader, sites, run_dir, n_tokens=args.harvest_tokens or min(max(budgets), 930_000))
    harvest(reader, sites, run_dir / HELDOUT, n_tokens=args.eval_tokens, split="heldout")
    del reader
    harvest_s = time.monotonic() - started
    store = ActivationStore(run_dir)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    for budget in budgets:
        for site in sites:
            reps: list[dict[str, Trained]] = []
            for rep in range(args.repeat):  # ours and theirs in turn, so a slow spell hits both
                trained = train_ours(
                    run_dir, site, budget, args.width, args.l0, args.archs.split(","), args.seed, rep
                )
                for feeding in filter(None, args.feedings.split(",")):  # "": ours alone
                    length = {"shuffled": 1, "sequences": args.sequence_len}[feeding]
                    theirs, stages, info = train_theirs(
                        store, site, budget, args.width, args.l0, args.seed, length
                    )
                    label = "sparsify topk" + ("" if length == 1 else f" ({length}-token sequences)")
                    trained[label] = (theirs, stages)
                    extra[f"{label} {site} {budget}"] = info
                reps.append(trained)
            walls = {label: [r[label][1]["total"]["wall"] for r in reps] for label in trained}
            trained = {  # the last SAEs, with the stages of each one's fastest repeat
                label: (sae, min((r[label][1] for r in reps), key=lambda st: st["total"]["wall"]))
                for label, (sae, _) in trained.items()
            }
            results = evaluate(
                model, {label: sae for label, (sae, _) in trained.items()}, n_tokens=args.eval_tokens
            )
            for label, result in zip(trained, results, strict=True):
                s = summary(result)
                rows.append(
                    {
                        "site": site,
                        "budget": budget,
                        "sae": label,
                        "seed": args.seed,
                        "train_seconds": trained[label][1]["total"]["wall"],
                        "train_cpu_seconds": trained[label][1]["total"]["cpu"],
                        "stages": trained[label][1],
                        "train_seconds_each": walls[label],
                        **s,
                    }
                )
                print(json.dumps({k: rows[-1][k] for k in ("site", "budget", "sae", *COLUMNS)}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "command": "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "harvest_seconds": harvest_s,
        "harvest_model_dtype": store.manifest(store.sites[0]).get("model_dtype", "float32"),
        "rows": rows,
        "sparsify": extra,
    }
    previous = RESULTS / f"{args.out}.json"
    if args.keep_rows and previous.exists():  # other budgets or sites measured before, kept beside

        def key(r: dict[str, Any]) -> tuple[str, int, str, int]:
            return r["site"], r["budget"], r["sae"], r.get("seed", 0)

        new = {key(r) for r in rows}
        old = json.loads(previous.read_text())
        rows[:0] = [r for r in old["rows"] if key(r) not in new]
        out["earlier_commands"] = [*old.get("earlier_commands", []), old["command"]]
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1, default=str))
    plot(rows, RESULTS / f"{args.out}.png")
    print(table(rows))
    print(stage_table(rows))


if __name__ == "__main__":
    main()
