"""`gemmascope steer`: a completion with and without steering, same seed and sampling settings, the
shift in next-token log-probabilities, and with `--watch` the measured effect on chosen next tokens,
its cost on held-out text and a sweep of strengths. Option parsing and printing over
`opening.open_run`, `steer.generate_pair`, `steer.logprob_shift` and `effects.measure_and_sweep`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gemmascope.cli.options import add_model, number, parse_list, prompt_set
from gemmascope.errors import ConfigError, StoreError


def args_steer(p: argparse.ArgumentParser) -> None:
    from gemmascope.steer import MODES

    class InOrder(argparse.Action):
        """Record --sae/--feature/--strength in the order given, so each pairs with its neighbours."""

        def __call__(
            self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: object, opt: object = None
        ) -> None:
            ns.steps = [*ns.steps, (self.dest, value)]

    p.description = (
        "Generate a completion of PROMPT with and without steering, same seed and sampling settings, and "
        "print both and the shift in next-token log-probabilities. Each --feature uses the --sae given "
        "before it (or the only --sae); each --strength belongs to the --feature before it. Without "
        "--strength, the latent's max activation from the run's feature index is used."
    )
    p.add_argument("prompt", help="the text to complete")
    p.add_argument(
        "--sae", action=InOrder, required=True, metavar="SAE",
        help="an SAE folder, an SAE id of --run (e.g. resid_post.6.w4096.l0_52, or resid_post.6 where no "
        "other id starts so) or an official RELEASE/ID; "
        "repeatable",
    )  # fmt: skip
    p.add_argument(
        "--feature",
        action=InOrder,
        type=int,
        required=True,
        metavar="N",
        help="latent index to steer; repeatable",
    )
    p.add_argument(
        "--strength", action=InOrder, type=number, metavar="S",
        help="steering strength (add) or value (clamp) for the --feature before it",
    )  # fmt: skip
    p.add_argument(
        "--mode", choices=MODES, default="add",
        help="add: add S x the decoder direction; clamp: set the latent to S; ablate: set it to 0",
    )  # fmt: skip
    p.add_argument("--normalize", action="store_true", help="add the unit-norm decoder direction")
    p.add_argument(
        "--positions",
        default=None,
        help="edit at these token positions only (comma-separated, 0 = BOS; generated tokens count on "
        "from the prompt's length); default every position",
    )
    p.add_argument(
        "--run", dest="run_dir", metavar="RUN_DIR", help="run folder holding the SAEs and features.sqlite"
    )
    p.add_argument("--index", help="feature index (features.sqlite) for default strengths")
    add_model(p, None, "model name or path (default: the run's, else the one the SAEs' metadata names)")
    _sampling_args(p)
    _measure_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_steer, steps=[])


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from gemmascope.steer import SamplingSettings

    defaults = SamplingSettings()
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--temperature", type=number, default=defaults.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=number, default=defaults.top_p)
    p.add_argument("--freq-penalty", type=number, default=defaults.freq_penalty)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--top-k", type=int, default=10, help="tokens to show whose log-prob rose / fell (0: none)"
    )


def _measure_args(p: argparse.ArgumentParser) -> None:
    from gemmascope.effects import DEFAULT_SIDE_EFFECT_TOKENS

    p.add_argument(
        "--watch", action="append", default=[], metavar="TOKEN",
        help="a next token to watch (repeat; mind the leading space: ' he'): its probability after each "
        "prompt without and with the intervention, the tokens that gained and lost most probability, "
        "and the cost on held-out text",
    )  # fmt: skip
    p.add_argument("--prompts-file", help="with --watch: more prompts to measure on, one per line")
    p.add_argument(
        "--side-effects", type=int, default=DEFAULT_SIDE_EFFECT_TOKENS, metavar="TOKENS",
        help=f"with --watch: held-out tokens for the cost (ΔLM loss, KL); 0 skips it (default {DEFAULT_SIDE_EFFECT_TOKENS})",
    )  # fmt: skip
    p.add_argument(
        "--sweep", default=None, metavar="S1,S2,...", help="with --watch: measure at each of these strengths"
    )


def _pairs(steps: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Pair each --feature with its --sae and --strength, in the order given."""
    sae_specs = [value for kind, value in steps if kind == "sae"]
    current: str | None = sae_specs[0] if len(sae_specs) == 1 else None
    wanted: list[dict[str, Any]] = []
    for kind, value in steps:
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
    return wanted


def run_steer(args: argparse.Namespace) -> int:
    from gemmascope.opening import open_run
    from gemmascope.runs import sae_order
    from gemmascope.steer import Intervention, fill_strengths, generate_pair, logprob_shift

    wanted = _pairs(args.steps)
    opened = open_run(args.run_dir, [w["sae"] for w in wanted], model=args.model, index=args.index)
    positions = tuple(parse_list(args.positions, "--positions", int)) if args.positions else None
    interventions = [
        Intervention(
            opened.saes[opened.named[w["sae"]]], w["latent"], args.mode, w["value"], normalize=args.normalize,
            positions=positions,
        )
        for w in wanted
    ]  # fmt: skip
    ids = {id(sae): key for key, sae in opened.saes.items()}
    for iv in interventions:  # before the model loads
        if not 0 <= iv.latent < iv.sae.d_sae:
            raise ConfigError(
                f"latent {iv.latent} is out of range for SAE {ids[id(iv.sae)]}: expected --feature in "
                f"0..{iv.sae.d_sae - 1}"
            )
    defaults: list[str] = []
    if any(iv.value is None for iv in interventions) and opened.index() is not None:

        def max_activation(iv: Intervention) -> float | None:
            key = ids[id(iv.sae)]
            column = opened.column(key, "max_act")
            if column is None:
                raise StoreError(f"no default strength for {key}#{iv.latent}: {opened.not_indexed(key)}")
            defaults.append(f"{key}#{iv.latent}: {float(column[iv.latent]):g}")
            return float(column[iv.latent])

        interventions = fill_strengths(interventions, max_activation)
    _check_strengths(opened, interventions, ids)
    measuring = _measure_request(args)
    model = opened.model
    pair = generate_pair(
        model, args.prompt, interventions, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed, freq_penalty=args.freq_penalty, top_p=args.top_p,
    )  # fmt: skip
    shift = logprob_shift(model, args.prompt, interventions, k=args.top_k) if args.top_k else None
    measured = _measured(model, interventions, measuring) if measuring else None
    if args.json:
        found = {"model": opened.model_name, **pair.to_dict(), "logprob_shift": shift, **(measured or {})}
        print(json.dumps(found, indent=2))
        return 0
    print(f"model {opened.model_name}; SAEs {', '.join(sorted(opened.saes, key=sae_order))}")
    if defaults:
        print(f"default strengths (max activation from {opened.index_path}): {', '.join(defaults)}")
    _print_pair(pair, shift)
    if measured is not None:
        _print_measured(measured)
    return 0


def _check_strengths(opened: Any, interventions: list[Any], ids: dict[int, str]) -> None:
    """A ConfigError for a strength beyond the server's bound (`limits.strength_limit` of the
    latent's max activation in the index)."""
    from gemmascope.limits import STRENGTH_FACTOR, strength_limit

    for iv in interventions:
        if iv.value is None:
            continue
        key = ids[id(iv.sae)]
        column = opened.column(key, "max_act") if opened.index() is not None else None
        top = float(column[iv.latent]) if column is not None else 0.0
        limit = strength_limit(top)
        if abs(iv.value) > limit:
            why = (
                f"{STRENGTH_FACTOR:g} x its max activation {top:g}"
                if top > 0
                else "its max activation is unknown"
            )
            raise ConfigError(
                f"--strength {iv.value:g} for {key}#{iv.latent} is out of range: expected within ±{limit:g} ({why})"
            )


def _measure_request(args: argparse.Namespace) -> dict[str, Any] | None:
    """What --watch, --prompts-file, --side-effects and --sweep ask for, checked before the model loads."""
    if not args.watch:
        if args.prompts_file or args.sweep:
            raise ConfigError(
                "--prompts-file and --sweep measure watched tokens: give at least one --watch TOKEN"
            )
        return None
    if args.side_effects < 0:
        raise ConfigError(f"--side-effects {args.side_effects} must be >= 0 (0 skips the cost)")
    prompts = list(dict.fromkeys([args.prompt] + prompt_set([], args.prompts_file, "--prompts-file")))
    strengths = parse_list(args.sweep, "--sweep", number) if args.sweep else None
    if args.sweep is not None and not strengths:
        raise ConfigError("--sweep needs strengths, e.g. --sweep 0,50,100,200")
    if strengths and args.mode == "ablate":
        raise ConfigError("--sweep varies the strength of --mode add or clamp; an ablation has none")
    return {
        "prompts": prompts,
        "watch": args.watch,
        "strengths": strengths,
        "side_effects": args.side_effects or None,
    }


def _measured(model: Any, interventions: list[Any], req: dict[str, Any]) -> dict[str, Any]:
    from gemmascope.effects import measure_and_sweep

    out = measure_and_sweep(
        model, interventions, req["prompts"], req["watch"], strengths=req["strengths"],
        side_effect_tokens=req["side_effects"],
    )  # fmt: skip
    rows = out.pop("sweep", None)
    return {"measured": out} if rows is None else {"measured": out, "sweep": rows}


def _print_pair(pair: Any, shift: dict[str, Any] | None) -> None:
    s = pair.settings
    print(f"steering: {'; '.join(pair.interventions)}")
    print(
        f"seed {s.seed}, temperature {s.temperature:g}, top-p {s.top_p:g}, freq penalty {s.freq_penalty:g}, "
        f"up to {s.max_new_tokens} new tokens\n"
    )
    print(f"--- default ---\n{pair.prompt}{pair.default}\n")
    print(f"--- steered ---\n{pair.prompt}{pair.steered}\n")
    if shift is not None:

        def fmt(rows: list[dict[str, Any]]) -> str:
            return ", ".join(f"{r['token']!r} {r['delta']:+.2f}" for r in rows)

        print(
            f"next-token log-prob shift after the prompt (KL {shift['kl']:.3f} nats; "
            f"top token {shift['top_clean']['token']!r} -> {shift['top_steered']['token']!r}):"
        )
        print(f"  rose: {fmt(shift['rose'])}")
        print(f"  fell: {fmt(shift['fell'])}")


def _print_measured(measured: dict[str, Any]) -> None:
    m = measured["measured"]
    print(f"\nwatched next tokens over {m['n_prompts']} prompt(s): p without -> with the intervention")
    for w in m["watch"]:
        print(f"  {w['token']!r:<12} {w['p_clean']:.4f} -> {w['p_intervened']:.4f}")
        if m["n_prompts"] > 1:
            for row in w["per_prompt"]:
                print(f"      {row['p_clean']:.4f} -> {row['p_intervened']:.4f}  {row['prompt'][:60]!r}")
    print(
        "  gained most probability: " + ", ".join(f"{r['token']!r} {r['delta']:+.4f}" for r in m["rose"][:6])
    )
    print(
        "  lost most probability:   " + ", ".join(f"{r['token']!r} {r['delta']:+.4f}" for r in m["fell"][:6])
    )
    cost = m.get("side_effects")
    if cost:
        print(
            f"  cost on {cost['n_predictions']} held-out predictions: LM loss {cost['lm_loss']:.3f} -> "
            f"{cost['lm_loss_intervened']:.3f} (ΔLM {cost['delta_lm_loss']:+.3f}), KL {cost['kl']:.3f}"
        )
    for row in measured.get("sweep", []):
        watched = ", ".join(f"{t!r} {p:.3f}" for t, p in row["watch"].items())
        print(
            f"  strength {row['strength']:>8g}: {watched}; ΔLM {row['delta_lm_loss']:+.3f}, KL {row['kl']:.3f}; {row['completion'][:60]!r}"
        )
