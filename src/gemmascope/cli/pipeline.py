"""The subcommands that write into a run folder: `harvest`, `train`, `suite`, `demo` and `convert`.
Each holds the run folder's writer lock (runs.lock) while it writes."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemmascope.cli.options import (
    MODEL_DTYPE_HELP,
    add_corpus,
    add_fields,
    add_model,
    add_model_dtype,
    add_serving,
    check_corpus,
    given,
    number,
    parse_list,
)
from gemmascope.errors import ConfigError
from gemmascope.models import MODEL_DTYPES
from gemmascope.runs import REPORT, check_name, lock, run_of


def args_harvest(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder (created, or resumed / extended if it exists)")
    add_model(p)
    p.add_argument(
        "--sites",
        required=True,
        help="sites, comma-separated: resid_post.6,attn_out.6 or blocks.6.hook_mlp_out",
    )
    p.add_argument("--tokens", type=int, required=True, help="tokens to harvest (rounded up to whole rows)")
    add_corpus(p, split="train")
    p.add_argument("--dtype", default="float32", help="the store's dtype: float32, float16 or bfloat16")
    add_model_dtype(p)
    p.add_argument(
        "--shard-rows", type=int, default=None, help="rows per shard (default: 32,768 tokens' worth)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu, cuda (under torchrun: this rank's GPU), cuda:N",
    )
    p.set_defaults(run=run_harvest)


def run_harvest(args: argparse.Namespace) -> int:
    from gemmascope.activations import check_request, harvest
    from gemmascope.models import load_model, reading_dtype

    sites = parse_list(args.sites, "--sites")
    check_request(sites, args.tokens, args.dtype, args.split, args.context_len)  # before the model loads
    device = args.device
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # under torchrun: one GPU per rank
    with lock(args.run_dir, "harvest"):
        try:
            model = load_model(args.model, device=device, dtype=reading_dtype(args.model_dtype, device))
        except (RuntimeError, AssertionError) as err:
            raise ConfigError(f"--device {args.device!r} cannot run the model here: {err}") from None
        store = harvest(
            model, sites, args.run_dir, args.tokens, corpus=args.corpus, context_len=args.context_len,
            dtype=args.dtype, split=args.split, shard_rows=args.shard_rows,
        )  # fmt: skip
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports for all
    for site in store.sites:
        m = store.manifest(site)
        print(f"{site}: {m['n_tokens']} tokens, d_in {m['d_in']}, {m['dtype']}, scale C {m['scale']:.4g}")
    return 0


def args_train(p: argparse.ArgumentParser) -> None:
    from gemmascope.sae import architecture_names
    from gemmascope.train import TrainConfig, TrainSpec

    p.add_argument("run_dir", help="run folder holding harvested activations (see `gemmascope harvest`)")
    p.add_argument("--sites", default=None, help="sites, comma-separated (default: every site of the store)")
    p.add_argument("--widths", default="4096", help="SAE widths, comma-separated")
    spec_fields = add_fields(
        p,
        TrainSpec,
        ["architecture", "matryoshka"],
        helps=_SPEC_HELP,
        flags={"architecture": "--arch"},
        choices={"architecture": architecture_names()},
    )
    sparsity = p.add_mutually_exclusive_group()
    for knob, (flag, _, _, what) in _KNOB_FLAGS.items():
        sparsity.add_argument(flag, dest=f"{knob}s", default=None, help=what)
    p.add_argument("--tokens", type=int, default=None, help="training tokens per SAE (default: one epoch)")
    p.add_argument(
        "--restart", action="store_true", help="discard an unfinished checkpoint of another config"
    )
    p.set_defaults(run=run_train, spec_fields=spec_fields, config_fields=add_fields(p, TrainConfig))


_SPEC_HELP = {
    "architecture": "the SAEs' architecture (ReLU: ReLU + L1)",
    "matryoshka": "Matryoshka: the reconstruction loss averaged over nested prefixes (width/16 .. width)",
}
# The sparsity flags, by the spec field each sets (an architecture's `knobs`): flag, type, example, help.
_KNOB_FLAGS: dict[str, tuple[str, Callable[[str], Any], str, str]] = {
    "l0_coeff": ("--l0-coeffs", number, "1e-3", "fixed lambdas (L0 penalty; L1 for relu)"),
    "target_l0": ("--target-l0", number, "45", "target L0s (Gemma Scope 2 quadratic penalty)"),
    "k": ("--k", int, "32", "active latents per token for topk / batchtopk"),
}


def _sparsities(args: argparse.Namespace, arch_name: str) -> list[dict[str, float | int]]:
    """The sparsity settings the flags ask for, one dict of TrainSpec fields each: the knob given,
    which the architecture must take (`Architecture.knobs`)."""
    from gemmascope.sae import architecture, architecture_names

    arch = architecture(arch_name)
    for knob, (flag, kind, _, _) in _KNOB_FLAGS.items():
        spec = getattr(args, f"{knob}s")
        if spec is None:
            continue
        if knob not in arch.knobs:
            takers = [n for n in architecture_names() if knob in architecture(n).knobs]
            raise ConfigError(f"{flag} is for {' / '.join(takers)}, not {arch_name}")
        values = parse_list(spec, flag, kind)
        if values:
            return [{knob: v} for v in values]
    needs = " or ".join(_KNOB_FLAGS[k][0] for k in arch.knobs)
    flag, _, example, _ = _KNOB_FLAGS[arch.knobs[0]]
    raise ConfigError(f"--arch {arch_name} needs {needs} (its sparsity), e.g. {flag} {example}")


def run_train(args: argparse.Namespace) -> int:
    from gemmascope.activations import ActivationStore
    from gemmascope.formats import load_sae
    from gemmascope.train import TrainConfig, TrainSpec, train_saes
    from gemmascope.train.config import checked_config

    config = TrainConfig(**given(args, args.config_fields))
    check_name(config.name)  # named by its flag; then every other setting, before the lock and the store
    checked_config(config)
    kind = given(args, args.spec_fields)
    widths = parse_list(args.widths, "--widths", int)
    how: list[dict[str, Any]] = _sparsities(args, TrainSpec("", 1, **kind).architecture)
    with lock(args.run_dir, "train"):
        store = ActivationStore(args.run_dir)
        sites = parse_list(args.sites, "--sites") or [str(s) for s in store.sites]
        specs = [TrainSpec(site, width, **kind, **h) for site in sites for width in widths for h in how]
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
    print(
        f"log: {Path(args.run_dir) / REPORT / (config.name + '_log.jsonl')} (plot: {config.name}_curves.png)"
    )
    return 0


def args_suite(p: argparse.ArgumentParser) -> None:
    from gemmascope.sae import architecture_names
    from gemmascope.suite import SUITE_KINDS, SuitePlan

    default = SuitePlan()
    p.add_argument("run_dir", help="run folder (created, or resumed if it exists)")
    add_model(p)
    p.add_argument(
        "--sites",
        default=None,
        help=f"SAE site kinds, comma-separated (default {','.join(SUITE_KINDS)}; with --transcoders: none)",
    )
    p.add_argument(
        "--transcoders",
        nargs="?",
        const="skip",
        default="",
        help="also (or, without --sites, only) train transcoders MLP input -> output per layer: 'skip' "
        "(with the affine skip connection; the default of a bare --transcoders), 'plain' or 'plain,skip'; "
        "'clt': one cross-layer transcoder over every layer",
    )
    p.add_argument(
        "--clt",
        action="store_true",
        help="also (or, without --sites, only) train a cross-layer transcoder over every layer from the same "
        "harvest (as --transcoders clt): its replacement model in report/clt.json",
    )
    p.add_argument(
        "--clt-penalty",
        default=None,
        help="the CLTs' sparsity penalty, comma-separated (one CLT each): l0 (Gemma Scope 2's quadratic "
        "target-L0 penalty, the default) or tanh (Anthropic's tanh(c·‖W_dec‖·a), λ steered to the target)",
    )
    p.add_argument("--layers", default="all", help="'all', '6', '2,6,10' or '0-17'")
    p.add_argument(
        "--widths",
        default=None,
        help=f"SAE widths, comma-separated (default {','.join(map(str, default.widths))})",
    )
    p.add_argument(
        "--l0",
        default=None,
        help=f"target L0s: small,medium,big or numbers (default {','.join(f'{t:g}' for t in default.target_l0s)})",
    )
    p.add_argument("--l0-coeffs", default="", help="fixed lambdas instead of target L0s, comma-separated")
    fields = add_fields(
        p,
        SuitePlan,
        list(_SUITE_HELP),
        helps=_SUITE_HELP,
        flags={"architecture": "--arch"},
        choices={"architecture": architecture_names(), "model_dtype": list(MODEL_DTYPES)},
    )
    add_corpus(p)
    p.add_argument("--max-minutes", type=number, default=None, help="start no new stage after this long")
    p.add_argument(
        "--drop-activations", action="store_true", help="delete a layer's activations once trained"
    )
    p.add_argument(
        "--extend",
        action="store_true",
        help="add this command's sites, layers, widths and L0s to the run folder's plan (otherwise a "
        "plan other than the recorded one is refused)",
    )
    p.set_defaults(run=run_suite, plan_fields=fields)


# The suite's flags generated from SuitePlan's fields (their defaults are the plan's): help texts.
_SUITE_HELP = {
    "architecture": "the SAEs' architecture (a target L0 is TopK's and BatchTopK's k)",
    "tokens": "activations harvested per site",
    "train_tokens": "training tokens per SAE (default: --tokens)",
    "finetune_tokens": "end-to-end fine-tune of each SAE on this many tokens (0: none)",
    "eval_tokens": "held-out tokens each SAE is evaluated on",
    "index_tokens": "held-out tokens the feature index reads",
    "dtype": "activation store dtype: float32, float16, bfloat16",
    "model_dtype": MODEL_DTYPE_HELP,
    "seed": "seed of the training (and of the index's samples)",
}


def run_suite(args: argparse.Namespace) -> int:
    from gemmascope.evals import format_table
    from gemmascope.suite import SuitePlan, parse_l0s, parse_layers, run_suite

    plan_args = given(args, args.plan_fields)
    coeffs = parse_list(args.l0_coeffs, "--l0-coeffs", number)
    if coeffs:
        plan_args.update(target_l0s=[], l0_coeffs=coeffs)
    elif args.l0 is not None:
        plan_args["target_l0s"] = parse_l0s(args.l0)
    if args.widths is not None:
        plan_args["widths"] = parse_list(args.widths, "--widths", int)
    transcoders = parse_list(args.transcoders, "--transcoders") if args.transcoders else []
    if args.clt and "clt" not in transcoders:
        transcoders.append("clt")
    if args.clt_penalty is not None:
        plan_args["clt_penalties"] = parse_list(args.clt_penalty, "--clt-penalty")
    if args.sites is not None or transcoders:
        plan_args["kinds"] = parse_list(args.sites, "--sites")
    check_corpus(args.corpus)
    plan = SuitePlan(
        model=args.model,
        transcoders=transcoders,
        layers=parse_layers(args.layers),
        context_len=args.context_len,
        corpus=args.corpus,
        keep_activations=not args.drop_activations,
        **plan_args,
    )
    out = run_suite(args.run_dir, plan, max_minutes=args.max_minutes, extend=args.extend)
    if not out["complete"]:
        return 0
    if out["results"]:
        print(format_table(out["results"]))
        print(f"report: {out['report']} (heatmap.png, frontier plots, evals.json)")
    if "clt" in plan.transcoders:
        print(f"cross-layer transcoders: {Path(args.run_dir) / 'report' / 'clt.json'}")
    return 0


def args_demo(p: argparse.ArgumentParser) -> None:
    from gemmascope.demo import GraphPlan

    p.add_argument(
        "--run-dir", default="runs/demo", help="run folder (default runs/demo; resumed if it exists)"
    )
    add_model(p)
    p.add_argument(
        "--layer",
        type=int,
        default=12,
        help="layer of the resid_post site (default 12 of 18: the middle layers hold the concepts, BENCHMARKS.md)",
    )
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--l0", default="medium", help="target L0: small, medium, big or a number")
    p.add_argument("--tokens", type=int, default=300_000, help="training activations harvested")
    p.add_argument(
        "--train-tokens", type=int, default=300_000, help="training steps x batch (epochs over --tokens)"
    )
    p.add_argument(
        "--finetune-tokens",
        type=int,
        default=0,
        help="end-to-end fine-tune of the trained SAE on this many tokens (8192: about 2 min; default 0: none)",
    )
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument(
        "--index-tokens", type=int, default=99_712, help="default: the whole held-out split (779 rows of 128)"
    )
    add_model_dtype(p)
    add_corpus(p, context=False)
    p.add_argument(
        "--graphs",
        action="store_true",
        help="also train a small cross-layer transcoder over every layer and draw the graphs of "
        "'The capital of France is' and a comparison question on the graph page",
    )
    graph = GraphPlan()
    p.add_argument(
        "--graph-tokens", type=int, default=None, help=f"with --graphs: tokens of every MLP site the CLT "
        f"trains on (default {graph.tokens})"
    )  # fmt: skip
    p.add_argument(
        "--graph-width",
        type=int,
        default=None,
        help=f"with --graphs: the CLT's latents per layer (default {graph.width})",
    )
    p.add_argument("--no-serve", action="store_true", help="stop after printing (for scripts and CI)")
    add_serving(p)
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from gemmascope.demo import GraphPlan, run_demo
    from gemmascope.suite import SuitePlan, parse_l0s

    check_corpus(args.corpus)
    plan = SuitePlan(
        model=args.model,
        kinds=["resid_post"],
        layers=[args.layer],
        widths=[args.width],
        target_l0s=parse_l0s(args.l0)[:1],
        tokens=args.tokens,
        train_tokens=args.train_tokens,
        finetune_tokens=args.finetune_tokens,
        eval_tokens=args.eval_tokens,
        index_tokens=args.index_tokens,
        model_dtype=args.model_dtype,
        corpus=args.corpus,
    )
    graphs = None
    asked = {k: v for k, v in (("tokens", args.graph_tokens), ("width", args.graph_width)) if v is not None}
    if args.graphs:
        graphs = GraphPlan(**asked, target_l0=plan.target_l0s[0])
    elif asked:
        raise ConfigError(f"--graph-{' and --graph-'.join(asked)} need --graphs")
    run_demo(
        args.run_dir, plan, serve=not args.no_serve, host=args.host, port=args.port, run_line=args.run_line,
        graphs=graphs,
    )  # fmt: skip
    return 0


def args_convert(p: argparse.ArgumentParser) -> None:
    from gemmascope.formats import CONVERT_FORMATS

    p.add_argument(
        "src", help="an SAE: our / SAELens folder, Gemma Scope params.npz, Gemma Scope 2 params.safetensors"
    )
    p.add_argument("dest", help="output folder (native) or file / folder (npz, safetensors)")
    p.add_argument(
        "--to",
        choices=CONVERT_FORMATS,
        default="native",
        help="native: SAELens-compatible folder; npz: Gemma Scope params.npz; "
        "safetensors: Gemma Scope 2 params.safetensors",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE folder or file")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from gemmascope.formats import convert

    run_dir = run_of(args.dest)  # writing into a run folder takes its lock
    with lock(run_dir, "convert") if run_dir is not None else nullcontext():
        sae, out = convert(args.src, args.dest, args.to, overwrite=args.overwrite)
    site = sae.cfg.site or "site unknown"
    print(f"{sae.cfg.architecture} SAE d_in {sae.d_in} d_sae {sae.d_sae} ({site}) -> {out}")
    return 0


def args_finetune(p: argparse.ArgumentParser) -> None:
    from gemmascope.train.finetune import BETA, LR, TOKENS

    p.add_argument("sae_dir", help="a trained SAE or transcoder folder")
    add_model(p, None, "model to fine-tune with (default: the one the SAE's cfg names)")
    p.add_argument("--tokens", type=int, default=TOKENS, help=f"training tokens (default {TOKENS})")
    p.add_argument("--lr", type=number, default=LR, help=f"Adam lr of the weights (default {LR:g})")
    p.add_argument("--beta", type=number, default=BETA, help=f"weight of the KL term (default {BETA:g})")
    p.add_argument(
        "--eval-tokens", type=int, default=4096, help="held-out tokens to measure before/after (0: skip)"
    )
    p.add_argument("--out", default=None, help="folder to write (default: SAE_DIR_finetuned beside it)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard an unfinished fine-tune of this SAE with other settings (a killed one of the "
        "same settings resumes without it)",
    )
    p.set_defaults(run=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from gemmascope.evals import MIN_EVAL_TOKENS, evaluate, summary
    from gemmascope.formats import load_sae
    from gemmascope.models import load_model
    from gemmascope.train.finetune import check_settings, finetune_folder, finetuned_path

    # every argument checked before anything is loaded
    folder = Path(args.sae_dir)
    if not folder.is_dir():
        raise ConfigError(f"SAE_DIR {args.sae_dir!r} is not a folder: give a trained SAE folder")
    if args.eval_tokens != 0 and args.eval_tokens < MIN_EVAL_TOKENS:
        raise ConfigError(f"--eval-tokens {args.eval_tokens} must be 0 (skip) or at least {MIN_EVAL_TOKENS}")
    settings = {"tokens": args.tokens, "lr": args.lr, "beta": args.beta}
    try:
        check_settings(**settings)
    except ConfigError as err:
        raise ConfigError(f"--{err}") from None
    finetuned_path(folder, args.out)
    sae = load_sae(folder)
    model = load_model(args.model or sae.cfg.model_name)
    with lock(run_of(folder) or folder.parent, "finetune"):
        out, info = finetune_folder(model, folder, args.out, restart=args.restart, **settings)
    print(f"fine-tuned {info['steps']} steps on {info['tokens']} tokens in {info['seconds']:.0f} s: {out}")
    if args.eval_tokens:
        results = evaluate(model, {"before": sae, "after": load_sae(out)}, n_tokens=args.eval_tokens)
        print(f"{'':<8} {'L0':>7} {'FVU':>7} {'ΔLM loss':>9} {'KL':>7}")
        for name, r in zip(("before", "after"), map(summary, results), strict=True):
            print(
                f"{name:<8} {r['l0']:>7.1f} {r['fvu']:>7.4f} {r['delta_lm_loss']:>9.3f} {r['kl_div_with_sae']:>7.3f}"
            )
    return 0
