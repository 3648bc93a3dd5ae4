"""`gemmascope contrast` (the latents that separate two prompt sets, over every SAE of a run) and
`gemmascope bias` (pick latents by their attributed effect on the bias or by contrast, ablate them,
measure the watched-token gap between two held-out sets and its cost; written to
`RUN/report/bias.json` and `bias.png`). Option parsing and printing over `opening.open_run`,
`features.contrast.contrast`, `bias.bias_experiment` and `evals.report.write_bias`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gemmascope.cli.options import add_dense, add_model, parse_list, prompt_set
from gemmascope.errors import ConfigError
from gemmascope.opening import OpenRun
from gemmascope.runs import locked_run


def _contrast_args(p: argparse.ArgumentParser) -> None:
    from gemmascope.features.encode import POOLS

    p.add_argument("run_dir", help="run folder: every SAE under RUN/saes is searched at once")
    p.add_argument("--a", action="append", default=[], metavar="TEXT", help="a prompt of set A (repeat)")
    p.add_argument("--b", action="append", default=[], metavar="TEXT", help="a prompt of set B (repeat)")
    p.add_argument("--a-file", help="set A from a file, one prompt per line")
    p.add_argument("--b-file", help="set B from a file, one prompt per line")
    p.add_argument(
        "--pool", choices=POOLS, default="max",
        help="over a prompt's tokens (BOS and massive positions left out; mean: over the positions kept)",
    )  # fmt: skip
    add_dense(p, "latents")
    add_model(p, None, "model to run (default: the run's, else the one the SAEs' metadata names)")


def args_contrast(p: argparse.ArgumentParser) -> None:
    _contrast_args(p)
    p.add_argument("--top", type=int, default=20, help="latents to list (default 20)")
    p.set_defaults(run=run_contrast)


def _open(args: argparse.Namespace) -> OpenRun:
    """The run's SAEs (not the model yet), after checking --dense; a damaged index is an error."""
    from gemmascope.features.encode import check_dense_limit
    from gemmascope.opening import open_run

    check_dense_limit(args.dense)
    opened = open_run(args.run_dir, model=args.model)
    opened.index()
    return opened


def _densities(opened: OpenRun) -> dict[str, Any] | None:
    """The densities of the SAEs the index describes; None when it describes none."""
    found = {key: d for key in opened.saes if (d := opened.densities(key)) is not None}
    return found or None


def _latent_table(
    rows: list[dict[str, Any]],
    opened: OpenRun,
    n_a: int,
    n_b: int,
    side: bool = False,
    effect: str = "effect",
    digits: int = 2,
) -> None:
    width = max([28, *(len(h["sae_id"]) for h in rows)])
    print(
        f"{'sae':<{width}} {'latent':>7} {effect:>7} {'mean A':>8} {'mean B':>8} {'fired A':>8} {'fired B':>8} "
        f"{'density':>9}{'  side' if side else ''}"
    )
    for h in rows:
        density = "-" if h["density"] is None else f"{h['density']:.2e}"
        print(
            f"{h['sae_id']:<{width}} {h['index']:>7} {h['effect']:>7.{digits}f} {h['mean_a']:>8.2f} {h['mean_b']:>8.2f} "
            f"{h['fired_a']:>5}/{n_a:<2} {h['fired_b']:>5}/{n_b:<2} {density:>9}  "
            f"{h['side'] + '  ' if side else ''}{opened.explanation(h['sae_id'], h['index'])}"
        )


def run_contrast(args: argparse.Namespace) -> int:
    from gemmascope.features.contrast import contrast

    prompts_a = prompt_set(args.a, args.a_file, "--a-file")
    prompts_b = prompt_set(args.b, args.b_file, "--b-file")
    opened = _open(args)
    densities = _densities(opened)
    out = contrast(
        opened.model, opened.saes, prompts_a, prompts_b, pool=args.pool, top=args.top,
        densities=densities, hide_dense=None if args.show_dense else args.dense,
    )  # fmt: skip
    print(
        f"latents firing more on A ({out['n_a']} prompts) than on B ({out['n_b']}), {args.pool} over each prompt:"
    )
    _latent_table(out["results"], opened, out["n_a"], out["n_b"])
    if not out["results"]:
        print("  none")
    if out["hidden_dense"]:
        print(f"({out['hidden_dense']} latents denser than {args.dense:g} hidden; --show-dense shows them)")
    if densities is None:
        print("(no feature index: dense latents were not hidden; build one with 'gemmascope index')")
    return 0


def args_bias(p: argparse.ArgumentParser) -> None:
    from gemmascope.bias import PICKS
    from gemmascope.effects import DEFAULT_SIDE_EFFECT_TOKENS

    _contrast_args(p)
    p.add_argument(
        "--pick", choices=PICKS, default=PICKS[0],
        help="how latents are picked on --a/--b: attribution (default; proposed by activation times gradient of "
        "the log-odds, kept by the log-odds bias each removes there ablated alone) or contrast (those firing "
        "most differently on the two sets, --pool pooled)",
    )  # fmt: skip
    p.add_argument(
        "--heldout-a", required=True, help="held-out prompts of kind A, one per line (measured on)"
    )
    p.add_argument("--heldout-b", required=True, help="held-out prompts of kind B, one per line")
    p.add_argument(
        "--watch", action="append", default=[], metavar="TOKEN",
        help="the two next tokens whose gap is the bias, e.g. --watch ' she' --watch ' he'",
    )  # fmt: skip
    p.add_argument(
        "--ablate", default="1,2,4,8", help="numbers of top latents to ablate, one measurement each (1,2,4,8)"
    )
    p.add_argument(
        "--side-effects", type=int, default=DEFAULT_SIDE_EFFECT_TOKENS, metavar="TOKENS",
        help=f"held-out tokens the cost (ΔLM loss, KL) is measured on (default {DEFAULT_SIDE_EFFECT_TOKENS}; "
        "0: not measured)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_bias)


def _bias_request(args: argparse.Namespace) -> dict[str, Any]:
    """The prompt sets and counts `bias` asks for, checked before the model loads."""
    from gemmascope.limits import MIN_SIDE_EFFECT_TOKENS

    req: dict[str, list[Any]] = {
        "prompts_a": prompt_set(args.a, args.a_file, "--a-file"),
        "prompts_b": prompt_set(args.b, args.b_file, "--b-file"),
        "heldout_a": prompt_set([], args.heldout_a, "--heldout-a"),
        "heldout_b": prompt_set([], args.heldout_b, "--heldout-b"),
        "ablate": parse_list(args.ablate, "--ablate", int),
    }
    if len(args.watch) != 2 or args.watch[0] == args.watch[1]:
        raise ConfigError(f"give two different --watch tokens (e.g. ' she' and ' he'), got {args.watch}")
    for flags, name in (("--a / --a-file", "prompts_a"), ("--b / --b-file", "prompts_b")):
        if len(req[name]) < 2:
            raise ConfigError(
                f"{flags} gives {len(req[name])} prompt(s): the contrast needs at least 2 per set"
            )
    for flag, name in (("--heldout-a", "heldout_a"), ("--heldout-b", "heldout_b")):
        if not req[name]:
            raise ConfigError(f"{flag} {getattr(args, name)!r} holds no prompt")
    if not req["ablate"] or any(k < 1 for k in req["ablate"]):
        raise ConfigError(
            f"--ablate {args.ablate!r}: expected counts of latents, each at least 1, e.g. 1,2,4,8"
        )
    if args.side_effects < 0 or 0 < args.side_effects < MIN_SIDE_EFFECT_TOKENS:
        raise ConfigError(
            f"--side-effects {args.side_effects}: expected 0 (no cost) or at least {MIN_SIDE_EFFECT_TOKENS} tokens"
        )
    return req


def run_bias(args: argparse.Namespace) -> int:
    from gemmascope.bias import bias_experiment
    from gemmascope.evals.report import write_bias

    req = _bias_request(args)
    with locked_run(args.run_dir, "bias"):  # it writes RUN/report/bias.json: held from the start
        opened = _open(args)
        densities = _densities(opened)
        out = bias_experiment(
            opened.model, opened.saes, req["prompts_a"], req["prompts_b"], req["heldout_a"], req["heldout_b"],
            args.watch, ablate=req["ablate"], pick=args.pick, pool=args.pool, densities=densities,
            hide_dense=None if args.show_dense else args.dense, side_effect_tokens=args.side_effects,
        )  # fmt: skip
        if opened.run_dir is not None:
            out["files"] = [str(path) for path in write_bias(opened.run_dir, out)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    _print_bias(args, out, req, opened, densities is None)
    return 0


def _print_bias(
    args: argparse.Namespace, out: dict[str, Any], req: dict[str, Any], opened: OpenRun, no_index: bool
) -> None:
    n_a, n_b = len(req["prompts_a"]), len(req["prompts_b"])
    first, second = (repr(w) for w in args.watch)
    if args.pick == "contrast":
        print(f"latents picked by contrast of A ({n_a} prompts) and B ({n_b}), {args.pool}-pooled:")
        _latent_table(out["picked"], opened, n_a, n_b, side=True)
    else:
        print(
            f"latents picked by attribution on A ({n_a} prompts) and B ({n_b}): proposed by activation x gradient, "
            "'removes' the log-odds bias (nats) each removes there ablated alone, measured; means and firing "
            "max-pooled:"
        )
        _latent_table(out["picked"], opened, n_a, n_b, side=True, effect="removes", digits=3)
    print(
        f"\nbias = gap(A) - gap(B), gap = mean p({first}) - p({second}) over the held-out prompts "
        f"({len(req['heldout_a'])} A, {len(req['heldout_b'])} B); top latents ablated at every token after BOS:"
    )
    print(
        f"{'ablated':>8} {'gap A':>8} {'gap B':>8} {'bias':>8} {'removed':>8} {'log-odds':>9} {'removed':>8} "
        f"{'ΔLM loss':>9} {'KL':>7}"
    )

    def share(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    for r in out["rows"]:
        dlm = "-" if r["delta_lm_loss"] is None else f"{r['delta_lm_loss']:+.4f}"
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        print(
            f"{r['n_latents']:>8} {r['gap_a']:>+8.4f} {r['gap_b']:>+8.4f} {r['bias']:>+8.4f} "
            f"{share(r['bias_removed']):>8} {r['log_odds_bias']:>+9.3f} {share(r['log_odds_removed']):>8} "
            f"{dlm:>9} {kl:>7}"
        )
    print(
        f"(log-odds: the same bias as mean log p({first}) - log p({second}), in nats: ablations that only make "
        "both tokens rarer shrink the gaps, not the log-odds)"
    )
    for key, kept in out["direction"].items():
        carriers = ", ".join(f"#{c['index']}" for c in kept["carriers"][:3])
        print(
            f"{key}: along the difference of means of A and B at the last token, its reconstruction keeps "
            f"{kept['kept']:.0%} of the held-out separation, its error term the rest (ablating latents reaches only "
            f"the first); the latents carrying most of it: {carriers}"
        )
    if no_index:
        print("(no feature index: dense latents were not hidden; build one with 'gemmascope index')")
    for path in out.get("files", []):
        print(f"wrote {path}")
