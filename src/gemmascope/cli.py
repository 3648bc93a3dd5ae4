"""The `gemmascope` command. Owns argument parsing and printing for `demo`, `suite`, `harvest`,
`train`, `eval`, `index`, `serve`, `inspect`, `steer` and `convert`; each subcommand calls the
public functions of one pipeline module. A `GemmaScopeError` is printed as one line (no traceback)
and exits with status 2.

Knows nothing of internals beyond those public functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gemmascope.errors import GemmaScopeError

if TYPE_CHECKING:
    from gemmascope.suite import SuitePlan

# Each subcommand is a pair of functions: `_args_NAME(parser)` adds its arguments and
# `_run_NAME(args) -> exit status` runs it. SUBCOMMANDS lists them in help order.


def _not_built(args: argparse.Namespace) -> int:
    raise GemmaScopeError(f"'gemmascope {args.command}' is not built yet")


def _args_harvest(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (created, or resumed / extended if it exists)")
    p.add_argument("--model", default="gemma-3-270m", help="model name, local folder or hub id")
    p.add_argument(
        "--sites",
        required=True,
        help="sites, comma-separated: resid_post.6,attn_out.6 or blocks.6.hook_mlp_out",
    )
    p.add_argument("--tokens", type=int, required=True, help="tokens to harvest (rounded up to whole rows)")
    p.add_argument(
        "--corpus", default="wiki", help="'wiki' (bundled), a .txt/.jsonl/.parquet file or hf:NAME"
    )
    p.add_argument("--split", default="train", help="train, heldout or all")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.set_defaults(run=_run_harvest)


def _run_harvest(args: argparse.Namespace) -> int:
    from gemmascope.activations import harvest
    from gemmascope.models import load_model, parse_site

    model = load_model(args.model)
    sites = [parse_site(s, model.n_layers) for s in args.sites.split(",") if s.strip()]
    store = harvest(
        model, sites, args.run_dir, args.tokens, corpus=args.corpus, context_len=args.context_len,
        dtype=args.dtype, split=args.split,
    )  # fmt: skip
    for site in store.sites:
        m = store.manifest(site)
        print(f"{site}: {m['n_tokens']} tokens, d_in {m['d_in']}, {m['dtype']}, scale C {m['scale']:.4g}")
    return 0


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder holding harvested activations (see `gemmascope harvest`)")
    p.add_argument("--sites", default=None, help="sites, comma-separated (default: every site of the store)")
    p.add_argument("--widths", default="4096", help="SAE widths, comma-separated")
    p.add_argument(
        "--arch", default="jumprelu", help="jumprelu (default), topk, batchtopk or relu (ReLU + L1)"
    )
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--l0-coeffs", default=None, help="fixed lambdas (L0 penalty; L1 for relu)")
    sparsity.add_argument("--target-l0", default=None, help="target L0s (Gemma Scope 2 quadratic penalty)")
    sparsity.add_argument("--k", default=None, help="active latents per token for topk / batchtopk")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=None, help="activations per step")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (published: 7e-5)")
    p.add_argument("--lr-warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--l0-warmup-steps", type=int, default=None, help="default: 20%% of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="train", help="name of this training run's checkpoint and log")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument(
        "--restart", action="store_true", help="discard an unfinished checkpoint of another config"
    )
    p.add_argument("--fast", action="store_true", help="sparse JumpReLU step (gemmascope.sparse_step)")
    p.add_argument(
        "--parallel",
        choices=("data", "sae"),
        default="data",
        help="under torchrun: data (each process reads its slice of the store, gradients averaged; "
        "the batch size is the global one) or sae (the SAEs are spread over the processes)",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda (under torchrun: one GPU a process)"
    )
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from gemmascope.activations import ActivationStore
    from gemmascope.errors import ConfigError
    from gemmascope.formats import load_sae
    from gemmascope.train import TrainConfig, TrainSpec, train_saes

    def numbers(spec: str | None, flag: str, kind: type) -> list:
        try:
            return [kind(part) for part in (spec or "").split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {spec!r}: expected comma-separated {kind.__name__}s") from None

    store = ActivationStore(args.run_dir)
    sites = (
        [s.strip() for s in args.sites.split(",") if s.strip()]
        if args.sites
        else [str(s) for s in store.sites]
    )
    widths = numbers(args.widths, "--widths", int)
    if args.arch in ("topk", "batchtopk"):
        how = [{"k": k} for k in numbers(args.k, "--k", int)]
        if not how:
            raise ConfigError(f"--arch {args.arch} needs --k, e.g. --k 32")
    elif args.k is not None:
        raise ConfigError(f"--k is for topk / batchtopk, not {args.arch}")
    elif args.target_l0 is not None:
        how = [{"target_l0": t} for t in numbers(args.target_l0, "--target-l0", float)]
    else:
        how = [{"l0_coeff": c} for c in numbers(args.l0_coeffs, "--l0-coeffs", float)]
        if not how:
            raise ConfigError("give the sparsity: --l0-coeffs, --target-l0 (jumprelu) or --k (topk)")
    specs = [
        TrainSpec(site=site, width=width, architecture=args.arch, **h)
        for site in sites
        for width in widths
        for h in how
    ]
    config = TrainConfig(
        seed=args.seed, name=args.name, fast=args.fast, checkpoint_every=args.checkpoint_every
    )
    config.parallel, config.device = args.parallel, args.device
    for flag in ("batch_size", "lr", "lr_warmup_steps", "l0_warmup_steps"):
        if getattr(args, flag) is not None:
            setattr(config, flag, getattr(args, flag))
    if args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every} must be at least 1")
    tokens = args.tokens
    if tokens is None:
        tokens = min(int(store.manifest(spec.site)["n_tokens_non_special"]) for spec in specs)
    folders = train_saes(Path(args.run_dir), specs, tokens, config, restart=args.restart)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 prints for all
        return 0
    print(f"{'site':<14} {'width':>6} {'arch':<9} {'sparsity':<14} {'L0':>7} {'FVU':>7} {'dead':>6}  folder")
    for spec, folder in zip(specs, folders, strict=True):
        extra = load_sae(folder).cfg.extra
        how_text = spec.name.rsplit("/", 1)[-1]
        print(
            f"{spec.site:<14} {spec.width:>6} {spec.architecture:<9} {how_text:<14} {extra['l0']:>7.1f} "
            f"{extra['fvu']:>7.4f} {extra['dead_fraction']:>6.1%}  {folder}"
        )
    print(f"log: {Path(args.run_dir) / 'report' / (args.name + '_log.jsonl')} (plot: {args.name}_curves.png)")
    return 0


def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sae_dirs",
        nargs="+",
        metavar="SAE_DIR",
        help="SAE folders or files (native, SAELens, Gemma Scope params.npz / params.safetensors), "
        "or run folders (every SAE under RUN/saes)",
    )
    p.add_argument(
        "--model", default=None, help="model to evaluate on (default: the one each SAE's cfg names)"
    )
    p.add_argument("--device", default="cpu", help="torch device for the model and SAEs (cpu, cuda, ...)")
    p.add_argument("--n-tokens", type=int, default=8192, help="held-out tokens to evaluate on (default 8192)")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="rows per forward pass (each holds rows x ctx x vocab logits)",
    )
    p.add_argument("--corpus", default="wiki", help="text source (default: the bundled Wikipedia summaries)")
    p.add_argument(
        "--split", default="heldout", help="split of the corpus (default: heldout, never trained on)"
    )
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
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path
    from typing import Any

    from gemmascope import evals
    from gemmascope.errors import ConfigError
    from gemmascope.formats import find_saes, load_sae, sae_id
    from gemmascope.models import load_model
    from gemmascope.sae import SAE

    folders: list[Path] = []
    runs: list[Path] = []
    for spec in args.sae_dirs:
        path = Path(spec)
        if (path / "saes").is_dir():
            found = find_saes(path)
            if not found:
                raise ConfigError(f"run folder {spec!r} holds no finished SAEs under saes/")
            folders += found
            runs.append(path)
        else:
            folders.append(path)
            run = next((p.parent for p in path.resolve().parents if p.name == "saes"), None)
            if run is not None:
                runs.append(run)
    try:
        ks = [int(k) for k in args.probe_k.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--probe-k {args.probe_k!r}: expected comma-separated integers") from None

    # SAEs by the model they belong to: one model load and one clean pass per model
    groups: dict[str, dict[str, tuple[Path, SAE]]] = {}
    for folder in folders:
        sae = load_sae(folder, device=args.device).eval()
        model_name = args.model or sae.cfg.model_name
        if not model_name:
            raise ConfigError(f"SAE {str(folder)!r} does not name its model; pass --model")
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
            model,
            saes,
            n_tokens=args.n_tokens,
            corpus=args.corpus,
            split=args.split,
            context_len=args.context_len,
            batch_size=args.batch_size,
            min_tokens=args.min_tokens,
        )
        if not args.no_probe:
            probing = evals.sparse_probing(
                model,
                saes,
                corpus=args.corpus,
                split=args.split,
                n_per_class=args.probe_per_class,
                ks=ks,
                context_len=args.context_len,
            )
            evals.attach_probing(group_results, probing)
            probings[model_name] = probing
        for result in group_results:
            folder = members[result["sae_id"]][0]
            result["path"] = str(folder)
            if not args.no_write and folder.is_dir():
                evals.write_eval(folder, result)
        results += group_results

    report = None
    report_run = (
        Path(args.report) if args.report else (runs[0] if len({r.resolve() for r in runs}) == 1 else None)
    )
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


def _args_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder (index every SAE under saes/) or one SAE folder")
    p.add_argument("--db", help="index file (default: RUN/features.sqlite, or SAE_DIR/features.sqlite)")
    p.add_argument(
        "--tokens", type=int, default=20_000, help="token positions of the corpus slice (default 20000)"
    )
    p.add_argument("--corpus", default="wiki", help="text source (default: the bundled Wikipedia summaries)")
    p.add_argument(
        "--split", default="heldout", help="corpus split: heldout (default, unseen in training), train, all"
    )
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--batch-rows", type=int, default=8, help="rows per forward pass (memory vs speed)")
    p.add_argument("--model", help="model to run (default: the model named in the SAEs' metadata)")
    p.add_argument("--site", help="site the SAE reads, when its metadata lacks one (e.g. resid_post.6)")
    p.add_argument(
        "--no-build", action="store_true", help="use the existing index (for --llm-url / --export)"
    )
    p.add_argument(
        "--llm-url", help="an OpenAI-compatible endpoint to write explanations, e.g. http://127.0.0.1:8080/v1"
    )
    p.add_argument("--llm-model", help="the model name to ask the endpoint for")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    p.add_argument("--llm-latents", help="latents to explain, e.g. '0-99,512' (default: 20 random live ones)")
    p.add_argument("--export", metavar="DIR", help="also export each SAE in Neuronpedia's format under DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    import os
    import random
    from pathlib import Path

    from gemmascope.errors import ConfigError, StoreError
    from gemmascope.features import (
        ChatEndpoint,
        FeatureIndex,
        build_index,
        explain_with_llm,
        export_neuronpedia,
    )
    from gemmascope.formats import find_saes, load_sae, sae_id
    from gemmascope.models import load_model

    path = Path(args.path)
    if (path / "saes").is_dir():
        run_dir: Path | None = path
        folders = find_saes(path)
        if not folders:
            raise StoreError(f"run folder {str(path)!r} has no finished SAEs under saes/")
    elif path.is_dir():
        folders = [path]
        run_dir = next((p for p in path.resolve().parents if p.name == "saes"), None)
        run_dir = run_dir.parent if run_dir is not None else None
    else:
        raise StoreError(f"no run folder or SAE folder at {str(path)!r}")
    db = Path(args.db) if args.db else (run_dir or path) / "features.sqlite"
    saes = {sae_id(folder): load_sae(folder) for folder in folders}
    if args.site:
        for sae in saes.values():
            sae.cfg.site = args.site

    if not args.no_build:
        names = {sae.cfg.model_name for sae in saes.values()}
        model_name = args.model or (names.pop() if len(names) == 1 else None)
        if not model_name:
            where = str(folders[0]) if len(folders) == 1 else str(path)
            raise ConfigError(
                f"the SAEs at {where!r} name no single model in their metadata (cfg.json 'metadata.model_name'"
                f"{': found ' + ', '.join(sorted(n or repr(n) for n in names)) if names else ''}): pass --model NAME"
            )
        model = load_model(model_name)
        build_index(
            model,
            saes,
            db,
            n_tokens=args.tokens,
            corpus=args.corpus,
            split=args.split,
            context_len=args.context_len,
            batch_rows=args.batch_rows,
            folders={key: str(folder) for key, folder in zip(saes, folders, strict=True)},
            progress=not args.quiet,
        )
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
        if not args.llm_model:
            raise ConfigError("--llm-url needs --llm-model, the model name the endpoint serves")
        endpoint = ChatEndpoint(args.llm_url, args.llm_model, api_key=os.environ.get(args.llm_key_env))
        for key in saes:
            live = index.densities(key).nonzero().squeeze(1).tolist()
            if args.llm_latents:
                latents = []
                for part in args.llm_latents.split(","):
                    lo, _, hi = part.strip().partition("-")
                    try:
                        latents += list(range(int(lo), int(hi or lo) + 1))
                    except ValueError:
                        raise ConfigError(
                            f"--llm-latents {args.llm_latents!r}: expected e.g. '0-99,512'"
                        ) from None
            else:
                latents = sorted(random.Random(0).sample(live, min(20, len(live))))
            results = explain_with_llm(index, key, latents, endpoint, progress=not args.quiet)
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
    print(f"feature index: {db}")
    return 0


def _args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text to look at (not needed with --find)")
    p.add_argument("--sae", help="an SAE folder, or an SAE id of the run given with --run")
    p.add_argument("--run", dest="run_dir", help="a run folder (its SAEs and its features.sqlite)")
    p.add_argument("--db", help="feature index (default: the run's features.sqlite)")
    p.add_argument("--model", help="model to run (default: the model named in the SAE's metadata)")
    p.add_argument("-k", type=int, default=5, help="features per token (default 5)")
    p.add_argument(
        "--dense", type=float, default=0.01, help="hide features firing on more than this share (0.01)"
    )
    p.add_argument("--show-dense", action="store_true", help="do not hide dense features")
    p.add_argument("--search", action="store_true", help="list the features firing most on the text instead")
    p.add_argument("--token", help="with --search: only at this token of the text")
    p.add_argument("--find", metavar="QUERY", help="search the index's explanations instead")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from gemmascope.errors import ConfigError, StoreError
    from gemmascope.features import FeatureIndex, search_text, top_features
    from gemmascope.formats import find_saes, load_sae, sae_id
    from gemmascope.models import load_model

    run_dir = Path(args.run_dir) if args.run_dir else None
    folder: Path | None = None
    if args.sae and Path(args.sae).is_dir():
        folder = Path(args.sae)
        key = sae_id(folder)
        if run_dir is None:
            found = next((p for p in folder.resolve().parents if p.name == "saes"), None)
            run_dir = found.parent if found is not None else None
    elif run_dir is not None:
        found_saes = {sae_id(f): f for f in find_saes(run_dir)}
        if args.sae is None and len(found_saes) == 1:
            key, folder = next(iter(found_saes.items()))
        elif args.sae in found_saes:
            key, folder = args.sae, found_saes[args.sae]
        elif args.sae is None and args.find:
            key, folder = "", None
        else:
            raise StoreError(
                f"no SAE {args.sae!r} in {str(run_dir)!r}: expected --sae with one of "
                f"{', '.join(sorted(found_saes)) or 'none'}"
            )
    else:
        raise ConfigError(
            "inspect needs --sae SAE_FOLDER, or --run RUN_DIR (with --sae SAE_ID if it has several)"
        )
    db = Path(args.db) if args.db else (run_dir / "features.sqlite" if run_dir else None)
    index = FeatureIndex(db) if db is not None and db.is_file() else None

    if args.find:
        if index is None:
            raise StoreError(
                "--find searches a feature index: build one with 'gemmascope index' or pass --db"
            )
        for hit in index.search_explanations(key or None, args.find, limit=args.limit):
            score = "" if hit["score"] is None else f"  (score {hit['score']:.2f})"
            print(f"{hit['sae_id']}#{hit['index']}: {hit['explanation']}{score}")
        return 0
    if not args.text:
        raise ConfigError("inspect needs a text (or --find QUERY)")
    assert folder is not None
    sae = load_sae(folder)
    model_name = args.model or sae.cfg.model_name
    if not model_name:
        raise ConfigError(f"SAE folder {str(folder)!r} names no model in its metadata: pass --model NAME")
    model = load_model(model_name)
    densities = None
    indexed = index is not None and key in {s["sae_id"] for s in index.saes()}
    if index is not None and indexed:
        index.check_sae(key, sae)
        densities = index.densities(key).float()
    hide = None if args.show_dense else args.dense
    colour = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )

    def explanation(i: int) -> str:
        if index is None or not indexed:
            return ""
        found = index.explanations(key, i)
        return found[0]["text"] if found else ""

    if args.search:
        hits = search_text(
            model, sae, args.text, token=args.token, limit=args.limit, densities=densities, hide_dense=hide
        )
        where = f" at token {args.token!r}" if args.token else ""
        print(f"features of {key} firing most on the text{where}:")
        for h in hits:
            print(
                f"  #{h['index']:<6} {h['value']:8.2f}  at {h['token']!r} (position {h['position']})  {explanation(h['index'])}"
            )
        return 0

    rows = top_features(model, sae, args.text, k=args.k, hide_dense=hide, densities=densities)
    peak = max((r["features"][0]["value"] for r in rows if r["features"]), default=0.0)
    shades = (231, 230, 223, 216, 209, 202)  # white to orange, by the token's strongest feature
    line = []
    for r in rows:
        if not colour:
            line.append(r["token"])
            continue
        top = r["features"][0]["value"] if r["features"] else 0.0
        shade = shades[min(len(shades) - 1, int(len(shades) * top / peak))] if peak > 0 and top > 0 else None
        line.append(r["token"] if shade is None else f"\033[48;5;{shade}m\033[30m{r['token']}\033[0m")
    print("".join(line))
    print()
    note = (
        ""
        if hide is None or densities is not None
        else " (no feature index for this SAE: dense features shown)"
    )
    print(f"top {args.k} features of {key} per token{note}:")
    seen: dict[int, float] = {}
    for r in rows:
        feats = "  ".join(f"#{f['index']} {f['value']:.2f}" for f in r["features"]) or "-"
        print(f"  {r['position']:4d}  {r['token']!r:<16} {feats}")
        for f in r["features"]:
            seen[f["index"]] = max(seen.get(f["index"], 0.0), f["value"])
    if index is not None and indexed and seen:
        print("\nexplanations:")
        for i in sorted(seen, key=lambda i: -seen[i])[:15]:
            print(f"  #{i:<6} {explanation(i)}")
    return 0


def _args_steer(p: argparse.ArgumentParser) -> None:
    from gemmascope.steer import (
        DEFAULT_FREQ_PENALTY,
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_SEED,
        DEFAULT_TEMPERATURE,
        MODES,
    )

    class InOrder(argparse.Action):
        """Record --sae/--feature/--strength in the order given, so each pairs with its neighbours."""

        def __call__(
            self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: object, opt: object = None
        ):
            ns.steps = [*ns.steps, (self.dest, value)]

    p.description = (
        "Generate a completion of PROMPT with and without steering, same seed and sampling settings, and "
        "print both and the shift in next-token log-probabilities. Each --feature uses the --sae given "
        "before it (or the only --sae); each --strength belongs to the --feature before it. Without "
        "--strength, the latent's max activation from the run's feature index is used."
    )
    p.add_argument("prompt", help="the text to complete")
    p.add_argument(
        "--sae",
        action=InOrder,
        required=True,
        metavar="SAE",
        help="an SAE folder, or an SAE id of --run (e.g. resid_post.6.w4096.l0_52); repeatable",
    )
    p.add_argument(
        "--feature",
        action=InOrder,
        type=int,
        required=True,
        metavar="N",
        help="latent index to steer; repeatable",
    )
    p.add_argument(
        "--strength",
        action=InOrder,
        type=float,
        metavar="S",
        help="steering strength (add) or value (clamp) for the --feature before it",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="add",
        help="add: add S x the decoder direction; clamp: set the latent to S; ablate: set it to 0",
    )
    p.add_argument("--normalize", action="store_true", help="add the unit-norm decoder direction")
    p.add_argument(
        "--run", dest="run_dir", metavar="RUN_DIR", help="run folder holding the SAEs and features.sqlite"
    )
    p.add_argument("--index", help="feature index (features.sqlite) for default strengths")
    p.add_argument("--model", help="model name or path (default: the SAE's model, else gemma-3-270m)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--freq-penalty", type=float, default=DEFAULT_FREQ_PENALTY)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument(
        "--top-k", type=int, default=10, help="tokens to show whose log-prob rose / fell (0: none)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_steer, steps=[])


def _run_steer(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from gemmascope.errors import ConfigError, StoreError
    from gemmascope.formats import find_saes, load_sae, sae_id
    from gemmascope.models import BUNDLED_MODEL, load_model
    from gemmascope.sae import SAE
    from gemmascope.steer import Intervention, fill_strengths, generate_pair, logprob_shift

    run_dir = Path(args.run_dir) if args.run_dir else None

    def sae_folder(spec: str) -> Path:
        if Path(spec).is_dir():
            return Path(spec)
        if run_dir is None:
            raise ConfigError(f"--sae {spec!r} is not a folder; give an SAE folder, or --run with an SAE id")
        found = {sae_id(folder): folder for folder in find_saes(run_dir)}
        if spec not in found:
            raise StoreError(
                f"no SAE {spec!r} in {run_dir}: expected one of {', '.join(sorted(found)) or 'none'}"
            )
        return found[spec]

    # Pair each --feature with its --sae and --strength, in the order given.
    sae_specs = [value for kind, value in args.steps if kind == "sae"]
    current: str | None = sae_specs[0] if len(sae_specs) == 1 else None
    wanted: list[dict] = []
    for kind, value in args.steps:
        if kind == "sae":
            current = value
        elif kind == "feature":
            if current is None:
                raise ConfigError(
                    f"--feature {value} comes before any --sae; with several SAEs put each first"
                )
            wanted.append({"sae": current, "latent": value, "value": None})
        elif not wanted or wanted[-1]["value"] is not None:
            raise ConfigError(f"--strength {value} must follow the --feature it is for")
        else:
            wanted[-1]["value"] = value

    folders = {spec: sae_folder(spec) for spec in dict.fromkeys(w["sae"] for w in wanted)}
    saes: dict[str, SAE] = {spec: load_sae(folder) for spec, folder in folders.items()}
    ids = {id(saes[spec]): sae_id(folder) for spec, folder in folders.items()}
    mode = args.mode
    interventions = [
        Intervention(saes[w["sae"]], w["latent"], mode, w["value"], normalize=args.normalize) for w in wanted
    ]

    index_path = Path(args.index) if args.index else None
    if index_path is None:
        places = [run_dir] if run_dir else []
        places += [p for folder in folders.values() for p in folder.resolve().parents]
        index_path = next((p / "features.sqlite" for p in places if (p / "features.sqlite").is_file()), None)
    defaults: list[str] = []
    if index_path is not None and any(iv.value is None for iv in interventions):
        from gemmascope.features import FeatureIndex

        index = FeatureIndex(index_path)

        indexed = {info["sae_id"] for info in index.saes()}

        def max_activation(iv: Intervention) -> float | None:
            sid = ids[id(iv.sae)]
            if sid not in indexed:
                return None
            index.check_sae(sid, iv.sae)  # a StoreError if the index was built from another SAE
            max_act = index.feature(sid, iv.latent).get("max_act")
            if max_act is None:
                return None
            defaults.append(f"{sid}#{iv.latent}: {float(max_act):g}")
            return float(max_act)

        interventions = fill_strengths(interventions, max_activation)

    model_name = args.model or next(
        (s.cfg.model_name for s in saes.values() if s.cfg.model_name), BUNDLED_MODEL
    )
    model = load_model(model_name)
    pair = generate_pair(
        model,
        args.prompt,
        interventions,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        freq_penalty=args.freq_penalty,
        top_p=args.top_p,
    )
    shift = logprob_shift(model, args.prompt, interventions, k=args.top_k) if args.top_k else None
    if args.json:
        print(json.dumps({"model": model_name, **pair.to_dict(), "logprob_shift": shift}, indent=2))
        return 0

    s = pair.settings
    print(f"model {model_name}; SAEs {', '.join(sorted(set(ids.values())))}")
    if defaults:
        print(f"default strengths (max activation from {index_path}): {', '.join(defaults)}")
    print(f"steering: {'; '.join(pair.interventions)}")
    print(
        f"seed {s.seed}, temperature {s.temperature:g}, top-p {s.top_p:g}, freq penalty {s.freq_penalty:g}, "
        f"up to {s.max_new_tokens} new tokens\n"
    )
    print(f"--- default ---\n{pair.prompt}{pair.default}\n")
    print(f"--- steered ---\n{pair.prompt}{pair.steered}\n")
    if shift is not None:

        def fmt(rows: list[dict]) -> str:
            return ", ".join(f"{r['token']!r} {r['delta']:+.2f}" for r in rows)

        print(
            f"next-token log-prob shift after the prompt (KL {shift['kl']:.3f} nats; "
            f"top token {shift['top_clean']['token']!r} -> {shift['top_steered']['token']!r}):"
        )
        print(f"  rose: {fmt(shift['rose'])}")
        print(f"  fell: {fmt(shift['fell'])}")
    return 0


def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (saes/, features.sqlite, report/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from gemmascope.errors import ConfigError
    from gemmascope.server import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is out of range: expected 1..65535")
    serve(args.run_dir, host=args.host, port=args.port)
    return 0


def _args_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="an SAE: our / SAELens folder, Gemma Scope params.npz, Gemma Scope 2 params.safetensors"
    )
    p.add_argument("dest", help="output folder (native) or file / folder (npz, safetensors)")
    p.add_argument(
        "--to",
        choices=("native", "npz", "safetensors"),
        default="native",
        help="native: SAELens-compatible folder; npz: Gemma Scope params.npz; "
        "safetensors: Gemma Scope 2 params.safetensors",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing native folder")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gemmascope.formats import (
        load_log10_density,
        load_sae,
        save_params_npz,
        save_params_safetensors,
        save_sae,
    )

    sae = load_sae(args.src)
    if args.to == "native":
        density = load_log10_density(args.src) if Path(args.src).is_dir() else None
        out = save_sae(sae, args.dest, log10_density=density, overwrite=args.overwrite)
    elif args.to == "npz":
        out = save_params_npz(sae, args.dest)
    else:
        out = save_params_safetensors(sae, args.dest)
    site = sae.cfg.site or "site unknown"
    print(f"{sae.cfg.architecture} SAE d_in {sae.d_in} d_sae {sae.d_sae} ({site}) -> {out}")
    return 0


def _args_suite(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (created, or resumed if it exists)")
    p.add_argument("--model", default="gemma-3-270m", help="model name, local folder or hub id")
    p.add_argument("--sites", default="resid_post,attn_out,mlp_out", help="site kinds, comma-separated")
    p.add_argument("--layers", default="all", help="'all', '6', '2,6,10' or '0-17'")
    p.add_argument("--widths", default="4096", help="SAE widths, comma-separated")
    p.add_argument("--l0", default="medium", help="target L0s: small,medium,big or numbers")
    p.add_argument("--l0-coeffs", default="", help="fixed lambdas instead of target L0s, comma-separated")
    p.add_argument("--tokens", type=int, default=200_000, help="activations harvested per site")
    p.add_argument(
        "--train-tokens", type=int, default=None, help="training tokens per SAE (default: --tokens)"
    )
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--index-tokens", type=int, default=16384)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="activation store dtype: float32, float16, bfloat16")
    p.add_argument(
        "--corpus", default="wiki", help="'wiki' (bundled), a .txt/.jsonl/.parquet file or hf:NAME"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="start no new stage after this long")
    p.add_argument(
        "--drop-activations", action="store_true", help="delete a layer's activations once trained"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_suite)


def _suite_plan(args: argparse.Namespace) -> SuitePlan:
    from gemmascope.suite import SuitePlan, parse_l0s, parse_layers

    coeffs = [float(c) for c in args.l0_coeffs.split(",") if c.strip()] if args.l0_coeffs else []
    return SuitePlan(
        model=args.model,
        kinds=[k.strip() for k in args.sites.split(",") if k.strip()],
        layers=parse_layers(args.layers),
        widths=_ints(args.widths, "--widths"),
        target_l0s=[] if coeffs else parse_l0s(args.l0),
        l0_coeffs=coeffs,
        tokens=args.tokens,
        train_tokens=args.train_tokens,
        eval_tokens=args.eval_tokens,
        index_tokens=args.index_tokens,
        context_len=args.context_len,
        corpus=args.corpus,
        dtype=args.dtype,
        seed=args.seed,
        keep_activations=not args.drop_activations,
    )


def _ints(spec: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise GemmaScopeError(f"{flag} {spec!r}: expected comma-separated integers") from None


def _run_suite(args: argparse.Namespace) -> int:
    from gemmascope.evals import format_table
    from gemmascope.suite import run_suite

    out = run_suite(args.run_dir, _suite_plan(args), max_minutes=args.max_minutes)
    if not out["complete"]:
        return 0
    print(format_table(out["results"]))
    print(f"report: {out['report']} (heatmap.png, frontier plots, evals.json)")
    return 0


def _args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run-dir", default="runs/demo", help="run folder (default runs/demo; resumed if it exists)"
    )
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layer", type=int, default=6, help="layer of the resid_post site (default 6, mid-model)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--l0", default="medium", help="target L0: small, medium, big or a number")
    p.add_argument("--tokens", type=int, default=150_000, help="training activations harvested")
    p.add_argument(
        "--train-tokens", type=int, default=300_000, help="training steps x batch (epochs over --tokens)"
    )
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--index-tokens", type=int, default=24_576)
    p.add_argument("--no-serve", action="store_true", help="stop after printing (for scripts and CI)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from gemmascope.suite import SuitePlan, parse_l0s, run_demo

    plan = SuitePlan(
        model=args.model,
        kinds=["resid_post"],
        layers=[args.layer],
        widths=[args.width],
        target_l0s=parse_l0s(args.l0)[:1],
        tokens=args.tokens,
        train_tokens=args.train_tokens,
        eval_tokens=args.eval_tokens,
        index_tokens=args.index_tokens,
    )
    run_demo(args.run_dir, plan, serve=not args.no_serve, host=args.host, port=args.port)
    return 0


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (
        "the whole loop on the bundled model and corpus: harvest, train, eval, index, serve",
        _args_demo,
    ),
    "suite": ("train a suite of SAEs over many layers and sites, resumably", _args_suite),
    "harvest": ("capture activations at sites into a run folder", _args_harvest),
    "train": ("train SAEs on a run folder's activations with the Gemma Scope recipe", _args_train),
    "eval": ("measure SAEs: L0, FVU, delta LM loss, CE recovered, KL, density, probing", _args_eval),
    "index": ("build the feature index (features.sqlite) of SAEs", _args_index),
    "inspect": ("print the top features of each token of a text", _args_inspect),
    "steer": ("generate with and without steering, side by side", _args_steer),
    "serve": ("serve the local web UI over a run folder", _args_serve),
    "convert": ("convert SAEs between formats (native, Gemma Scope npz / safetensors)", _args_convert),
}


def build_parser() -> argparse.ArgumentParser:
    from gemmascope import __version__

    parser = argparse.ArgumentParser(
        prog="gemmascope",
        description="An open, trainable, local Gemma Scope: train, measure, explore and steer SAEs.",
    )
    parser.add_argument("--version", action="version", version=f"gemmascope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gemmascope` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except GemmaScopeError as err:
        print(f"gemmascope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"gemmascope {args.command}: interrupted; finished work is kept, re-run to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
