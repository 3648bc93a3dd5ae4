"""The subcommands that measure SAEs and describe their features: `eval` (eval.json per SAE and the
run's report) and `index` (the feature index, LLM explanations, Neuronpedia export)."""

from __future__ import annotations

import argparse
import json
import os
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from gemmascope.cli.options import add_corpus, add_model, add_model_dtype, parse_list, parse_ranges
from gemmascope.errors import ConfigError
from gemmascope.opening import OpenRun, open_run
from gemmascope.runs import (
    FEATURES_DB,
    SAES,
    lock,
    model_for,
    resolve_saes,
    run_of,
    sae_id,
    stored_path,
)


def args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="SAE_DIR",
        help="SAE folders or files (native, SAELens, Gemma Scope params.npz / params.safetensors), "
        "or run folders (every SAE under RUN/saes)",
    )
    add_model(p, None, "model to evaluate on (default: the one each SAE's cfg names)")
    p.add_argument("--device", default="cpu", help="torch device for the model and SAEs (cpu, cuda, ...)")
    p.add_argument("--n-tokens", type=int, default=8192, help="held-out tokens to evaluate on (default 8192)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="rows per forward pass (each holds rows x ctx x vocab logits)",
    )
    add_corpus(p, split="heldout")
    p.add_argument(
        "--min-tokens", type=int, default=1024, help="refuse to evaluate on fewer tokens than this"
    )
    p.add_argument("--no-probe", action="store_true", help="skip sparse probing on the corpus's topic labels")
    p.add_argument(
        "--probe-per-class", type=int, default=50, help="articles per topic for probing (default 50)"
    )
    p.add_argument("--probe-k", default="1,2,5", help="numbers of latents the sparse probes may use")
    p.add_argument(
        "--report",
        default=None,
        help="run folder whose report/ gets evals.json and the plots (default: the run the SAEs are in)",
    )
    p.add_argument("--no-write", action="store_true", help="write no eval.json and no report")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.set_defaults(run=run_eval)


def _eval_targets(specs: list[str]) -> tuple[list[Path], list[Path]]:
    """The SAE folders / files to evaluate and the run folders they are in."""
    folders: list[Path] = []
    runs: list[Path] = []
    for spec in specs:
        run, found = resolve_saes(spec) if (Path(spec) / SAES).is_dir() else (run_of(spec), [Path(spec)])
        folders += found
        runs += [run] if run is not None else []
    return folders, runs


def _evaluate_groups(
    args: argparse.Namespace, folders: list[Path], ks: list[int]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Evaluate (and probe) SAEs grouped by the model they belong to: one model load and one clean
    pass per model; writes each SAE folder's eval.json unless --no-write."""
    from gemmascope import evals
    from gemmascope.formats import load_sae
    from gemmascope.models import load_model
    from gemmascope.sae import SAE

    groups: dict[str, dict[str, tuple[Path, SAE]]] = {}
    for folder in folders:
        sae = load_sae(folder, device=args.device).eval()
        model_name = model_for([sae], run_of(folder), args.model, what=f"SAE {str(folder)!r} and its run")
        key = sae_id(folder)
        if any(key in g for g in groups.values()):
            key = str(folder)
        groups.setdefault(model_name, {})[key] = (folder, sae)
    results: list[dict[str, Any]] = []
    probings: dict[str, dict[str, Any]] = {}
    for model_name, members in groups.items():
        model = load_model(model_name, device=args.device)
        saes = {key: sae for key, (_, sae) in members.items()}
        group_results = evals.evaluate(
            model, saes, n_tokens=args.n_tokens, corpus=args.corpus, split=args.split,
            context_len=args.context_len, batch_size=args.batch_size, min_tokens=args.min_tokens,
        )  # fmt: skip
        if not args.no_probe:
            probing = evals.sparse_probing(
                model, saes, corpus=args.corpus, split=args.split, n_per_class=args.probe_per_class, ks=ks,
                context_len=args.context_len,
            )  # fmt: skip
            evals.attach_probing(group_results, probing)
            probings[model_name] = probing
        for result in group_results:
            folder = members[result["sae_id"]][0]
            if not args.no_write and folder.is_dir():
                evals.write_eval(folder, result)
            result["path"] = str(folder)  # for --json; never stored (a copied run would name the original)
        results += group_results
    return results, probings


def run_eval(args: argparse.Namespace) -> int:
    from gemmascope import evals

    folders, runs = _eval_targets(args.sae_dirs)
    ks = parse_list(args.probe_k, "--probe-k", int)
    report = None
    report_run = (
        Path(args.report) if args.report else (runs[0] if len({r.resolve() for r in runs}) == 1 else None)
    )
    with ExitStack() as held:  # every run folder written to (eval.json, report/) is held from the start
        if not args.no_write:
            for run in dict.fromkeys(r.resolve() for r in [*runs, *([report_run] if report_run else [])]):
                held.enter_context(lock(run, "eval"))
        results, probings = _evaluate_groups(args, folders, ks)
        if report_run is not None and not args.no_write:
            probing_all = next(iter(probings.values())) if len(probings) == 1 else (probings or None)
            report = evals.write_report(report_run, results, probing_all)
    if args.json:
        out = {
            "summary": [evals.summary(r) for r in results],
            "results": [evals.to_json(r) for r in results],
            "sparse_probing": {name: evals.to_json(p) for name, p in probings.items()},
            "report": str(report) if report else None,
        }
        print(json.dumps(out, indent=2))
        return 0
    print(evals.format_table(results))
    for probing in probings.values():
        print()
        print(evals.probing_table(probing))
    if report is not None:
        print(
            f"\nreport: {report} (evals.json, frontier_l0_delta_lm_loss.png, frontier_l0_fvu.png, "
            "density_histogram.png, fvu_by_position.png)"
        )
    elif not args.no_write:
        print("\n(no report written: the SAEs are not in one run folder; pass --report RUN_DIR)")
    return 0


def args_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder (index every SAE under saes/) or one SAE folder")
    p.add_argument("--db", help=f"index file (default: RUN/{FEATURES_DB}, or SAE_DIR/{FEATURES_DB})")
    p.add_argument(
        "--tokens", type=int, default=20_000, help="token positions of the corpus slice (default 20000)"
    )
    add_corpus(p, split="heldout")
    p.add_argument("--batch-rows", type=int, default=8, help="rows per forward pass (memory vs speed)")
    add_model(p, None, "model to run (default: the model named in the SAEs' metadata)")
    add_model_dtype(p)
    p.add_argument("--site", help="site the SAE reads, when its metadata lacks one (e.g. resid_post.6)")
    p.add_argument(
        "--no-build", action="store_true", help="use the existing index (for --llm-url / --export)"
    )
    p.add_argument(
        "--relabel",
        action="store_true",
        help="write the existing index's logit lens, neighbours and labels again from the SAEs' weights "
        "(no pass over the corpus)",
    )
    p.add_argument(
        "--llm-url", help="an OpenAI-compatible endpoint to write explanations, e.g. http://127.0.0.1:8080/v1"
    )
    p.add_argument("--llm-model", help="the model name to ask the endpoint for")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    p.add_argument("--llm-latents", help="latents to explain, e.g. '0-99,512' (default: 20 random live ones)")
    p.add_argument("--export", metavar="DIR", help="also export each SAE in Neuronpedia's format under DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_index)


def run_index(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if args.llm_url and not args.llm_model:
        raise ConfigError("--llm-url needs --llm-model, the model name the endpoint serves")
    latents = parse_ranges(args.llm_latents, "--llm-latents") if args.llm_latents else None
    # the model: --model, the run's, or the one the SAEs name; a run's CLTs indexed layer by layer
    opened = open_run(path, model=args.model, clt_layers=True)
    run_dir = opened.run_dir
    db = Path(args.db) if args.db else (run_dir or path) / FEATURES_DB
    if args.relabel or args.no_build:  # CLT layers an older index never held are left as they are
        from gemmascope.features import FeatureIndex

        held = (
            {row["sae_id"] for row in FeatureIndex(db).saes(include_incomplete=True)}
            if db.is_file()
            else set()
        )
        for key in [k for k, sae in opened.saes.items() if "clt_layer" in sae.cfg.extra and k not in held]:
            del opened.saes[key]
    if args.site:
        for sae in opened.saes.values():
            if "clt_layer" not in sae.cfg.extra:  # a CLT layer's site is its layer's MLP input
                sae.cfg.site = args.site
    with lock(run_dir, "index") if run_dir is not None else nullcontext():
        if args.relabel:
            from gemmascope.features.build import relabel

            for key in opened.saes:
                print(f"{key}: {relabel(opened.model, db, key, opened.saes[key])} latents labelled again")
        elif not args.no_build:
            _build(args, opened, db)
        _report_index(args, opened.saes, db, latents)
    print(f"feature index: {db}")
    return 0


def _build(args: argparse.Namespace, opened: OpenRun, db: Path) -> None:
    from gemmascope.features import build_index
    from gemmascope.models import reading_dtype

    model = opened.model
    build_index(
        model, opened.saes, db, n_tokens=args.tokens, corpus=args.corpus, split=args.split,
        context_len=args.context_len, batch_rows=args.batch_rows,
        folders={key: stored_path(db.parent, f) for key, f in opened.folders.items()},
        reader=model.cast(reading_dtype(args.model_dtype, model.device)), progress=not args.quiet,
    )  # fmt: skip


def _report_index(
    args: argparse.Namespace, saes: dict[str, Any], db: Path, latents: list[int] | None
) -> None:
    import random

    from gemmascope.features import ChatEndpoint, FeatureIndex, explain_with_llm, export_neuronpedia

    index = FeatureIndex(db)
    for key, sae in saes.items():
        info = index.sae_info(key)
        index.check_sae(key, sae)
        density = index.densities(key)
        stats = info["stats"]
        print(
            f"{key}: {int((density > 0).sum())}/{info['width']} latents fired on {stats.get('n_tokens', 0):,} tokens "
            f"({stats.get('corpus')} {stats.get('split')}); built in {stats.get('seconds')} s "
            f"({stats.get('tokens_per_s')} tokens/s)"
        )
    if args.llm_url:
        endpoint = ChatEndpoint(args.llm_url, args.llm_model, api_key=os.environ.get(args.llm_key_env))
        for key in saes:
            live = index.densities(key).nonzero().squeeze(1).tolist()
            chosen = (
                latents if latents is not None else sorted(random.Random(0).sample(live, min(20, len(live))))
            )
            results = explain_with_llm(index, key, chosen, endpoint, progress=not args.quiet)
            scored = [r for r in results if r["score"] is not None]
            base = [r for r in results if r.get("baseline_score") is not None]
            summary = f"{key}: {len(results)} explanations by {args.llm_model}"
            if scored:
                summary += f", mean detection score {sum(r['score'] for r in scored) / len(scored):.3f}"
            if base:
                summary += f" (baseline {sum(r['baseline_score'] for r in base) / len(base):.3f})"
            print(summary)
            for r in results[:5]:
                print(f"  #{r['index']}: {r['explanation']}")
    if args.export:
        for key in saes:
            print(f"exported {key} to {export_neuronpedia(index, key, args.export)}")
