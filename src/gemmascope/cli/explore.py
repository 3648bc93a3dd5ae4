"""The subcommands that look inside the model through SAEs: `inspect` (a text's top features per
token, search), `contrast` (the latents separating two prompt sets), `steer` (generation with and
without an intervention) and `serve` (the web UI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmascope.cli.options import add_model, add_sae_choice, add_serving, number, parse_list, read_lines
from gemmascope.errors import ConfigError, StoreError
from gemmascope.features.prompt import HIDE_DENSE
from gemmascope.runs import FEATURES_DB, find_index, lock, locked_run, open_sae, run_of, sae_id

if TYPE_CHECKING:
    from gemmascope.sae import SAE


def args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text to look at (not needed with --find)")
    add_sae_choice(p)
    add_model(p, None, "model to run (default: the model named in the SAE's metadata)")
    p.add_argument("-k", type=int, default=5, help="features per token (default 5)")
    p.add_argument(
        "--dense",
        type=number,
        default=HIDE_DENSE,
        help=f"hide features firing on more than this share ({HIDE_DENSE})",
    )
    p.add_argument("--show-dense", action="store_true", help="do not hide dense features")
    p.add_argument("--search", action="store_true", help="list the features firing most on the text instead")
    p.add_argument("--token", help="with --search: only at this token of the text")
    p.add_argument("--find", metavar="QUERY", help="search the index's explanations instead")
    p.add_argument(
        "--documents",
        metavar="FILE",
        help="document-level analysis of FILE (one document per line): each one's top features, max- and "
        "mean-pooled, the features they share and each one's topic features",
    )
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from gemmascope.features import FeatureIndex

    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.sae is None and run_dir is None:
        raise ConfigError(
            "inspect needs --sae SAE_FOLDER, or --run RUN_DIR (with --sae SAE_ID if it has several)"
        )
    for flag, value in (("-k", args.k), ("--limit", args.limit)):  # every mode's, before anything loads
        if value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")
    if not 0 < args.dense <= 1:
        raise ConfigError(f"--dense {args.dense} is out of range: expected a share in (0, 1]")
    key, folder, sae = "", None, None
    try:
        key, folder, sae = open_sae(args.sae, run_dir)
    except StoreError:
        if not (args.sae is None and args.find):  # --find searches every SAE when none is named
            raise
    if run_dir is None and folder is not None:
        run_dir = run_of(folder)
    db = Path(args.db) if args.db else (run_dir / FEATURES_DB if run_dir else None)
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
    if args.documents:
        assert sae is not None
        _inspect_documents(args, key, sae, index)
        return 0
    if not args.text:
        raise ConfigError("inspect needs a text (or --find QUERY, or --documents FILE)")
    assert sae is not None  # open_sae found it: only --find goes on without
    _inspect_text(args, key, sae, index)
    return 0


def _inspect_documents(args: argparse.Namespace, key: str, sae: SAE, index: Any) -> None:
    from gemmascope.features.documents import documents
    from gemmascope.models import BUNDLED_MODEL, load_model

    texts = _prompt_set([], args.documents, "--documents")
    densities = (
        index.densities(key).float()
        if index is not None and key in {s["sae_id"] for s in index.saes()}
        else None
    )
    model = load_model(args.model or sae.cfg.model_name or BUNDLED_MODEL)
    out = documents(model, sae, texts, top=args.k, densities=densities, dense=args.dense)
    names: dict[int, str] = {}

    def name(i: int) -> str:
        if i not in names:
            found = index.explanations(key, i) if index is not None and densities is not None else []
            names[i] = found[0]["text"] if found else ""
        return names[i]

    def show(rows: list[dict[str, Any]]) -> str:
        return "; ".join(
            f"#{r['index']} {r['value']:.1f}{' (dense)' if r.get('dense') else ''} {name(r['index'])}".rstrip()
            for r in rows
        )

    for d, doc in enumerate(out["documents"], 1):
        print(f"document {d}: {doc['text'][:80]!r}")
        print(f"  max-pooled:  {show(doc['max'])}")
        print(f"  mean-pooled: {show(doc['mean'])}")
        if doc["topic"]:
            print(f"  its topic (strong here, weak in the others): {show(doc['topic'])}")
    if len(out["documents"]) > 1:
        shared = "; ".join(
            f"#{r['index']} in {r['n_documents']}{' (dense)' if r['dense'] else ''} {name(r['index'])}".rstrip()
            for r in out["shared"][: args.limit]
        )
        print(f"shared by at least half the documents: {shared or 'none'}")


def _inspect_text(args: argparse.Namespace, key: str, sae: SAE, index: Any) -> None:
    from gemmascope.features import search_text, top_features
    from gemmascope.models import load_model

    model_name = args.model or sae.cfg.model_name
    if not model_name:
        raise ConfigError(f"SAE {key!r} names no model in its metadata: pass --model NAME")
    indexed = index is not None and key in {s["sae_id"] for s in index.saes()}
    densities = None
    if indexed:
        index.check_sae(key, sae)
        densities = index.densities(key).float()
    model = load_model(model_name)
    hide = None if args.show_dense else args.dense

    def explanation(i: int) -> str:
        found = index.explanations(key, i) if indexed else []
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
        return
    rows = top_features(model, sae, args.text, k=args.k, hide_dense=hide, densities=densities)
    colour = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    print(_shaded(rows) if colour else "".join(r["token"] for r in rows))
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
    if indexed and seen:
        print("\nexplanations:")
        for i in sorted(seen, key=lambda i: -seen[i])[:15]:
            print(f"  #{i:<6} {explanation(i)}")


def _shaded(rows: list[dict[str, Any]]) -> str:
    """The text with each token's background shaded by its strongest feature (white to orange)."""
    peak = max((r["features"][0]["value"] for r in rows if r["features"]), default=0.0)
    shades = (231, 230, 223, 216, 209, 202)
    line = []
    for r in rows:
        top = r["features"][0]["value"] if r["features"] else 0.0
        shade = shades[min(len(shades) - 1, int(len(shades) * top / peak))] if peak > 0 and top > 0 else None
        line.append(r["token"] if shade is None else f"\033[48;5;{shade}m\033[30m{r['token']}\033[0m")
    return "".join(line)


def args_steer(p: argparse.ArgumentParser) -> None:
    from gemmascope.steer import (
        DEFAULT_FREQ_PENALTY,
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_SEED,
        DEFAULT_TEMPERATURE,
        DEFAULT_TOP_P,
        MODES,
    )

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
        help="an SAE folder, an SAE id of --run (e.g. resid_post.6.w4096.l0_52) or an official RELEASE/ID; "
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
    add_model(p, None, "model name or path (default: the SAE's model, else gemma-3-270m)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=number, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    p.add_argument("--top-p", type=number, default=DEFAULT_TOP_P)
    p.add_argument("--freq-penalty", type=number, default=DEFAULT_FREQ_PENALTY)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument(
        "--top-k", type=int, default=10, help="tokens to show whose log-prob rose / fell (0: none)"
    )
    p.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="TOKEN",
        help="a next token to watch (repeat; mind the leading space: ' he'): its probability after each "
        "prompt without and with the intervention, the tokens that gained and lost most probability, "
        "and the cost on held-out text",
    )
    p.add_argument("--prompts-file", help="with --watch: more prompts to measure on, one per line")
    p.add_argument(
        "--side-effects",
        type=int,
        default=2048,
        metavar="TOKENS",
        help="with --watch: held-out tokens for the cost (ΔLM loss, KL); 0 skips it (default 2048)",
    )
    p.add_argument(
        "--sweep", default=None, metavar="S1,S2,...", help="with --watch: measure at each of these strengths"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_steer, steps=[])


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
    from gemmascope.features import FeatureIndex
    from gemmascope.models import BUNDLED_MODEL, load_model
    from gemmascope.steer import Intervention, fill_strengths, generate_pair, logprob_shift

    run_dir = Path(args.run_dir) if args.run_dir else None
    wanted = _pairs(args.steps)
    opened = {spec: open_sae(spec, run_dir) for spec in dict.fromkeys(w["sae"] for w in wanted)}
    folders = {spec: folder for spec, (_, folder, _) in opened.items()}
    saes = {spec: sae for spec, (_, _, sae) in opened.items()}
    ids = {id(sae): key for key, _, sae in opened.values()}
    positions = tuple(parse_list(args.positions, "--positions", int)) if args.positions else None
    interventions = [
        Intervention(
            saes[w["sae"]], w["latent"], args.mode, w["value"], normalize=args.normalize, positions=positions
        )
        for w in wanted
    ]
    for iv in interventions:  # before the model loads
        if not 0 <= iv.latent < iv.sae.d_sae:
            raise ConfigError(
                f"latent {iv.latent} is out of range for SAE {ids[id(iv.sae)]}: expected --feature in "
                f"0..{iv.sae.d_sae - 1}"
            )
    places = [run_dir] if run_dir else []
    places += [p for folder in folders.values() for p in folder.resolve().parents]
    index_path = Path(args.index) if args.index else find_index(places)
    defaults: list[str] = []
    if index_path is not None and any(iv.value is None for iv in interventions):
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
    measuring = _measure_request(args)
    model_name = args.model or next(
        (s.cfg.model_name for s in saes.values() if s.cfg.model_name), BUNDLED_MODEL
    )
    model = load_model(model_name)
    pair = generate_pair(
        model, args.prompt, interventions, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed, freq_penalty=args.freq_penalty, top_p=args.top_p,
    )  # fmt: skip
    shift = logprob_shift(model, args.prompt, interventions, k=args.top_k) if args.top_k else None
    measured = _measured(model, interventions, measuring) if measuring else None
    if args.json:
        print(
            json.dumps(
                {"model": model_name, **pair.to_dict(), "logprob_shift": shift, **(measured or {})}, indent=2
            )
        )
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

        def fmt(rows: list[dict[str, Any]]) -> str:
            return ", ".join(f"{r['token']!r} {r['delta']:+.2f}" for r in rows)

        print(
            f"next-token log-prob shift after the prompt (KL {shift['kl']:.3f} nats; "
            f"top token {shift['top_clean']['token']!r} -> {shift['top_steered']['token']!r}):"
        )
        print(f"  rose: {fmt(shift['rose'])}")
        print(f"  fell: {fmt(shift['fell'])}")
    if measured is not None:
        _print_measured(measured)
    return 0


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
    prompts = list(dict.fromkeys([args.prompt] + _prompt_set([], args.prompts_file, "--prompts-file")))
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
    from dataclasses import replace

    from gemmascope.effects import measure, sweep

    out: dict[str, Any] = {
        "measured": measure(
            model, interventions, req["prompts"], req["watch"], side_effect_tokens=req["side_effects"]
        )
    }
    if req["strengths"]:
        out["sweep"] = sweep(
            model, lambda s: [replace(iv, value=s) for iv in interventions],
            req["strengths"], req["prompts"], req["watch"], side_effect_tokens=req["side_effects"] or 2048,
        )  # fmt: skip
    return out


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


def args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="a run folder (saes/, features.sqlite, report/)"
    )
    p.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="SAE",
        help="also serve this SAE: a folder, or an official RELEASE/ID (e.g. gemma-scope-2-270m-pt/"
        "resid_post/layer_6_width_16k_l0_small, from $GEMMASCOPE_RELEASES or the hub); repeat for more. "
        "Without RUN_DIR, only these",
    )
    add_serving(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from gemmascope.server import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is out of range: expected 1..65535")
    if args.run_dir is None and not args.sae:
        raise ConfigError("serve needs RUN_DIR, or --sae SAE (a folder or an official RELEASE/ID)")
    serve(args.run_dir, host=args.host, port=args.port, extra=args.sae)
    return 0


def _contrast_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder: every SAE under RUN/saes is searched at once")
    p.add_argument("--a", action="append", default=[], metavar="TEXT", help="a prompt of set A (repeat)")
    p.add_argument("--b", action="append", default=[], metavar="TEXT", help="a prompt of set B (repeat)")
    p.add_argument("--a-file", help="set A from a file, one prompt per line")
    p.add_argument("--b-file", help="set B from a file, one prompt per line")
    p.add_argument("--pool", choices=("max", "mean", "last"), default="max", help="over a prompt's tokens")
    p.add_argument(
        "--dense",
        type=number,
        default=HIDE_DENSE,
        help=f"hide latents firing on more than this share ({HIDE_DENSE})",
    )
    p.add_argument("--show-dense", action="store_true", help="do not hide dense latents")
    add_model(p, None, "model to run (default: the model named in the SAEs' metadata)")


def args_contrast(p: argparse.ArgumentParser) -> None:
    _contrast_args(p)
    p.add_argument("--top", type=int, default=20, help="latents to list (default 20)")
    p.set_defaults(run=run_contrast)


def _prompt_set(texts: list[str], path: str | None, flag: str) -> list[str]:
    return texts if path is None else texts + read_lines(path, flag)


class _RunSAEs:
    """What `contrast` and `bias` read from a run: its SAEs, the model, the index (explanations)
    and the densities of the indexed SAEs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from gemmascope.features import FeatureIndex
        from gemmascope.formats import load_sae
        from gemmascope.models import load_model
        from gemmascope.runs import resolve_saes

        if not 0 < args.dense <= 1:
            raise ConfigError(f"--dense {args.dense} is out of range: expected a share in (0, 1]")
        self.run_dir, folders = resolve_saes(args.run_dir)
        self.saes = {sae_id(folder): load_sae(folder) for folder in folders}
        names = {sae.cfg.model_name for sae in self.saes.values()}
        model_name = args.model or (names.pop() if len(names) == 1 else "")
        if not model_name:
            raise ConfigError("the SAEs name no single model in their metadata: pass --model NAME")
        db = (self.run_dir or Path(args.run_dir)) / FEATURES_DB
        self.index = FeatureIndex(db) if db.is_file() else None
        self.indexed = {s["sae_id"] for s in self.index.saes()} if self.index is not None else set()
        self.densities = (
            {key: self.index.densities(key).float() for key in self.saes if key in self.indexed}
            if self.index
            else None
        )
        self.hide = None if args.show_dense else args.dense
        self.model = load_model(model_name)

    def explanation(self, key: str, latent: int) -> str:
        found = self.index.explanations(key, latent) if self.index and key in self.indexed else []
        return str(found[0]["text"]) if found else ""


def _latent_table(
    rows: list[dict[str, Any]], loaded: _RunSAEs, n_a: int, n_b: int, side: bool = False
) -> None:
    width = max([28, *(len(h["sae_id"]) for h in rows)])
    print(
        f"{'sae':<{width}} {'latent':>7} {'effect':>7} {'mean A':>8} {'mean B':>8} {'fired A':>8} {'fired B':>8} "
        f"{'density':>9}{'  side' if side else ''}"
    )
    for h in rows:
        density = "-" if h["density"] is None else f"{h['density']:.2e}"
        print(
            f"{h['sae_id']:<{width}} {h['index']:>7} {h['effect']:>7.2f} {h['mean_a']:>8.2f} {h['mean_b']:>8.2f} "
            f"{h['fired_a']:>5}/{n_a:<2} {h['fired_b']:>5}/{n_b:<2} {density:>9}  "
            f"{h['side'] + '  ' if side else ''}{loaded.explanation(h['sae_id'], h['index'])}"
        )


def run_contrast(args: argparse.Namespace) -> int:
    from gemmascope.features.contrast import contrast

    prompts_a = _prompt_set(args.a, args.a_file, "--a-file")
    prompts_b = _prompt_set(args.b, args.b_file, "--b-file")
    loaded = _RunSAEs(args)
    out = contrast(
        loaded.model, loaded.saes, prompts_a, prompts_b, pool=args.pool, top=args.top,
        densities=loaded.densities, hide_dense=loaded.hide,
    )  # fmt: skip
    print(
        f"latents firing more on A ({out['n_a']} prompts) than on B ({out['n_b']}), {args.pool} over each prompt:"
    )
    _latent_table(out["results"], loaded, out["n_a"], out["n_b"])
    if not out["results"]:
        print("  none")
    if out["hidden_dense"]:
        print(f"({out['hidden_dense']} latents denser than {args.dense:g} hidden; --show-dense shows them)")
    if loaded.densities is None:
        print("(no feature index: dense latents were not hidden; build one with 'gemmascope index')")
    return 0


def args_bias(p: argparse.ArgumentParser) -> None:
    _contrast_args(p)
    p.add_argument(
        "--heldout-a", required=True, help="held-out prompts of kind A, one per line (measured on)"
    )
    p.add_argument("--heldout-b", required=True, help="held-out prompts of kind B, one per line")
    p.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="TOKEN",
        help="the two next tokens whose gap is the bias, e.g. --watch ' she' --watch ' he'",
    )
    p.add_argument(
        "--ablate", default="1,2,4,8", help="numbers of top latents to ablate, one measurement each (1,2,4,8)"
    )
    p.add_argument(
        "--side-effects",
        type=int,
        default=2048,
        metavar="TOKENS",
        help="held-out tokens the cost (ΔLM loss, KL) is measured on (default 2048; 0: not measured)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run_bias)


def run_bias(args: argparse.Namespace) -> int:
    from gemmascope.effects import MIN_SIDE_EFFECT_TOKENS, bias_experiment

    prompts_a = _prompt_set(args.a, args.a_file, "--a-file")
    prompts_b = _prompt_set(args.b, args.b_file, "--b-file")
    heldout_a = _prompt_set([], args.heldout_a, "--heldout-a")
    heldout_b = _prompt_set([], args.heldout_b, "--heldout-b")
    ablate = parse_list(args.ablate, "--ablate", int)
    if len(args.watch) != 2 or args.watch[0] == args.watch[1]:
        raise ConfigError(f"give two different --watch tokens (e.g. ' she' and ' he'), got {args.watch}")
    for flags, prompts in (("--a / --a-file", prompts_a), ("--b / --b-file", prompts_b)):
        if len(prompts) < 2:
            raise ConfigError(
                f"{flags} gives {len(prompts)} prompt(s): the contrast needs at least 2 per set"
            )
    for flag, prompts in (("--heldout-a", heldout_a), ("--heldout-b", heldout_b)):
        if not prompts:
            raise ConfigError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))!r} holds no prompt")
    if not ablate or any(k < 1 for k in ablate):
        raise ConfigError(
            f"--ablate {args.ablate!r}: expected counts of latents, each at least 1, e.g. 1,2,4,8"
        )
    if args.side_effects < 0 or 0 < args.side_effects < MIN_SIDE_EFFECT_TOKENS:
        raise ConfigError(
            f"--side-effects {args.side_effects}: expected 0 (no cost) or at least {MIN_SIDE_EFFECT_TOKENS} tokens"
        )
    with locked_run(args.run_dir, "bias"):  # it writes RUN/report/bias.json
        loaded = _RunSAEs(args)
        out = bias_experiment(
            loaded.model, loaded.saes, prompts_a, prompts_b, heldout_a, heldout_b, args.watch, ablate=ablate,
            pool=args.pool, densities=loaded.densities, hide_dense=loaded.hide,
            side_effect_tokens=args.side_effects,
        )  # fmt: skip
        if loaded.run_dir is not None:
            out["files"] = _write_bias(loaded.run_dir, out)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    first, second = (repr(w) for w in args.watch)
    print(
        f"latents picked by contrast of A ({len(prompts_a)} prompts) and B ({len(prompts_b)}), {args.pool}-pooled:"
    )
    _latent_table(out["picked"], loaded, len(prompts_a), len(prompts_b), side=True)
    print(
        f"\nbias = gap(A) - gap(B), gap = mean p({first}) - p({second}) over the held-out prompts "
        f"({len(heldout_a)} A, {len(heldout_b)} B); top latents ablated at every position:"
    )
    print(f"{'ablated':>8} {'gap A':>8} {'gap B':>8} {'bias':>8} {'removed':>8} {'ΔLM loss':>9} {'KL':>7}")
    for r in out["rows"]:
        removed = "-" if r["bias_removed"] is None else f"{r['bias_removed']:.0%}"
        dlm = "-" if r["delta_lm_loss"] is None else f"{r['delta_lm_loss']:+.4f}"
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        print(
            f"{r['n_latents']:>8} {r['gap_a']:>+8.4f} {r['gap_b']:>+8.4f} {r['bias']:>+8.4f} "
            f"{removed:>8} {dlm:>9} {kl:>7}"
        )
    if loaded.densities is None:
        print("(no feature index: dense latents were not hidden; build one with 'gemmascope index')")
    for path in out.get("files", []):
        print(f"wrote {path}")
    return 0


def _write_bias(run_dir: Path, out: dict[str, Any]) -> list[str]:
    """`RUN/report/bias.json` and `bias.png` (the bias and its cost against latents ablated); the
    SAEs page shows the plot."""
    from matplotlib.figure import Figure

    from gemmascope.runs import REPORT, save_atomic, write_atomic

    folder = run_dir / REPORT
    write_atomic(folder / "bias.json", json.dumps(out, indent=1))
    rows = out["rows"]
    k = [r["n_latents"] for r in rows]
    fig = Figure(figsize=(6.4, 3.8), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(k, [r["bias"] for r in rows], marker="o", label="bias: gap(A) - gap(B)")
    ax.plot(k, [r["gap_a"] for r in rows], ls="--", color="tab:purple", label="gap(A)")
    ax.plot(k, [r["gap_b"] for r in rows], ls=":", color="tab:green", label="gap(B)")
    ax.set_xlabel("top contrast latents ablated")
    first, second = out["watch"]
    ax.set_ylabel(f"p({first!r}) - p({second!r})")
    ax.axhline(0, color="grey", lw=0.5)
    if all(r["delta_lm_loss"] is not None for r in rows):
        cost = ax.twinx()
        cost.plot(k, [r["delta_lm_loss"] for r in rows], marker="s", color="tab:red", label="ΔLM loss (cost)")
        cost.set_ylabel("ΔLM loss on held-out text (nats)", color="tab:red")
    fig.legend(loc="upper center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    save_atomic(folder / "bias.png", lambda tmp: fig.savefig(tmp, format="png"))
    return [str(folder / "bias.json"), str(folder / "bias.png")]


def args_attribute(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", help="run folder holding a transcoder per layer (gemmascope suite RUN --transcoders)"
    )
    p.add_argument("prompt", help="the text whose next token to explain")
    p.add_argument(
        "--slug", default=None, help="graph name (default: from the prompt); files RUN/graphs/SLUG.json, .png"
    )
    p.add_argument(
        "--transcoders", default=None, metavar="SUBSTRING", help="pick the set when a layer has several"
    )
    p.add_argument(
        "--node-threshold", type=number, default=0.8, help="pruning: share of influence kept in nodes"
    )
    p.add_argument(
        "--edge-threshold", type=number, default=0.98, help="pruning: share of influence kept in edges"
    )
    p.add_argument(
        "--max-feature-nodes", type=int, default=None, help="cap the feature nodes (most influential)"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="longest prompt accepted (default 64)")
    p.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="LAYER/POS/LATENT",
        help="switch these feature nodes off (repeat); prints predicted vs measured logit changes",
    )
    p.add_argument(
        "--ablate-top",
        type=int,
        default=0,
        metavar="N",
        help="also switch off the N nodes the graph says hold the answer up most (each on its own)",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="TOKEN",
        help="with --ablate-top: pick the nodes holding the answer's lead over this output token, "
        "e.g. ' Kyoto' (one of the graph's outputs)",
    )
    p.add_argument(
        "--value", type=number, default=0.0, help="with --ablate: set the nodes to this instead of 0"
    )
    add_model(p, None, "model to run (default: the model named in the transcoders' metadata)")
    p.set_defaults(run=run_attribute)


def _node(spec: str) -> tuple[int, int, int]:
    try:
        layer, pos, latent = (int(v) for v in spec.replace(",", "/").split("/"))
    except ValueError:
        raise ConfigError(f"--ablate {spec!r}: expected LAYER/POSITION/LATENT, e.g. 12/5/1033") from None
    return layer, pos, latent


def run_attribute(args: argparse.Namespace) -> int:
    if not (Path(args.run_dir) / "saes").is_dir():
        raise ConfigError(f"{args.run_dir!r} is not a run folder with SAEs (expected {args.run_dir}/saes/)")
    with lock(args.run_dir, "attribute"):  # it writes RUN/graphs/SLUG.json and .png
        return _attribute(args)


def _attribute(args: argparse.Namespace) -> int:
    from gemmascope.attribution import MAX_FEATURE_NODES, MAX_PROMPT_TOKENS, attribute, prune, transcoder_set
    from gemmascope.attribution.files import (
        check_slug,
        graph_json,
        graph_slug,
        plot_graph,
        pruned_explanations,
        transcoder_digest,
        write_graph,
    )
    from gemmascope.attribution.intervene import measure, predict, strongest
    from gemmascope.features import FeatureIndex
    from gemmascope.models import MAX_PROMPT_TOKENS as MAX_INPUT_TOKENS
    from gemmascope.models import load_model
    from gemmascope.runs import GRAPHS, RUN_JSON, read_json

    run_dir = Path(args.run_dir)
    nodes = [_node(s) for s in args.ablate]
    if args.ablate_top and args.value != 0.0:
        raise ConfigError(
            f"--value {args.value:g} sets --ablate nodes; --ablate-top switches its nodes off: drop one of them"
        )
    if args.value != 0.0 and not nodes:
        raise ConfigError("--value sets the --ablate nodes: give at least one --ablate LAYER/POS/LATENT")
    if args.ablate_top < 0:
        raise ConfigError(f"--ablate-top {args.ablate_top}: expected a number of nodes, 1 or more")
    if args.against is not None and not args.ablate_top:
        raise ConfigError(f"--against {args.against!r} picks the --ablate-top nodes: give --ablate-top N too")
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be between 0 and 1")
    cap = MAX_FEATURE_NODES if args.max_feature_nodes is None else args.max_feature_nodes
    if cap < 1:
        raise ConfigError(f"--max-feature-nodes {cap} must be at least 1")
    slug = check_slug(args.slug or graph_slug(args.prompt))
    if args.max_tokens is not None and not 1 <= args.max_tokens <= MAX_INPUT_TOKENS:
        raise ConfigError(f"--max-tokens {args.max_tokens}: expected 1..{MAX_INPUT_TOKENS} prompt tokens")
    model_name = args.model
    if model_name is None and (run_dir / RUN_JSON).is_file():
        model_name = read_json(run_dir / RUN_JSON, "run description").get("model")
        if not isinstance(model_name, str | None):
            raise StoreError(
                f"run description {str(run_dir / RUN_JSON)!r} is damaged: its model {model_name!r}"
            )
    model = load_model(model_name or "gemma-3-270m")
    transcoders = transcoder_set(run_dir, model.n_layers, args.transcoders)
    graph = attribute(
        model,
        transcoders,
        args.prompt,
        max_feature_nodes=cap,
        max_tokens=args.max_tokens or MAX_PROMPT_TOKENS,
    )
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    db = run_dir / FEATURES_DB
    index = FeatureIndex(db) if db.is_file() else None
    indexed = {s["sae_id"] for s in index.saes()} if index is not None else set()

    def lookup(key: str, latents: list[int]) -> dict[int, str]:
        if index is None or key not in indexed:
            return {}
        found = {latent: index.explanations(key, latent) for latent in latents}
        return {latent: texts[0]["text"] for latent, texts in found.items() if texts}

    explanations = pruned_explanations(graph, pruned, lookup)
    digest = transcoder_digest(transcoders)
    data = graph_json(graph, slug, pruned, run=str(run_dir), digest=digest, explanations=explanations)
    out = write_graph(run_dir / GRAPHS / f"{slug}.json", data)
    png = plot_graph(data, out.with_suffix(".png"))
    ours = data["metadata"]["gemmascope"]
    print(
        f"{args.prompt!r} -> "
        + ", ".join(
            f"{t!r} {p:.2f}"
            for t, p in list(zip(graph.logit_tokens, graph.logit_probs.tolist(), strict=True))[:5]
        )
    )
    print(
        f"{graph.n_features} active features, {ours['n_pruned_nodes']} nodes and {ours['n_links']} edges after pruning; "
        f"replacement score {ours['replacement_score']:.3f}, completeness {ours['completeness_score']:.3f}; "
        f"{graph.seconds:.1f} s"
    )
    ranked = sorted(
        (j for j in range(graph.n_features) if pruned.nodes[j]), key=lambda j: float(pruned.cumulative[j])
    )
    print("most influential features (layer/position/latent, token, activation, explanation):")
    for j in ranked[:12]:
        layer, pos, latent = (int(v) for v in graph.features[j])
        print(
            f"  {layer:>2}/{pos}/{latent:<6} {graph.tokens[pos]!r:<14} {float(graph.activations[j]):>7.2f}  "
            f"{explanations.get((layer, latent), '')}"
        )
    print(f"graph: {out} (circuit-tracer / Neuronpedia JSON), {png}")
    against = None  # the output index of --against
    if args.ablate_top:
        if args.against is not None:
            if args.against not in graph.logit_tokens[1:]:
                raise ConfigError(
                    f"--against {args.against!r} is not one of the graph's other outputs: "
                    f"{graph.logit_tokens[1:]}"
                )
            against = graph.logit_tokens.index(args.against, 1)
        kept = [j for j in range(graph.n_features) if pruned.nodes[j]]
        picked = [n for n in strongest(graph, args.ablate_top, against, kept) if n not in nodes]
        lead = f"its lead over {args.against!r}" if args.against is not None else "its logit"
        if picked:
            print(
                f"the {len(picked)} nodes (besides --ablate) the graph says hold up {graph.logit_tokens[0]!r} "
                f"({lead}) most: " + " ".join(f"{a}/{b}/{c}" for a, b, c in picked)
            )
        else:
            print(f"no node of the pruned graph holds up {graph.logit_tokens[0]!r} ({lead}) on its own")
        nodes += picked
    if nodes:
        predicted = predict(graph, nodes, args.value)
        measured = measure(model, transcoders, graph, nodes, args.value)
        print(
            f"set {len(nodes)} node(s) to {args.value:g}: change of each output's logit (minus the mean logit)"
        )
        print(
            f"  {'token':<14} {'predicted':>9} {'(direct)':>9} {'measured':>9} {'p before':>9} {'p after':>8}"
        )
        for k, token in enumerate(graph.logit_tokens):
            print(
                f"  {token!r:<14} {float(predicted['total'][k]):>9.3f} {float(predicted['direct'][k]):>9.3f} "
                f"{float(measured['delta'][k]):>9.3f} {float(measured['clean_probs'][k]):>9.3f} "
                f"{float(measured['changed_probs'][k]):>8.3f}"
            )
        if against is not None:
            pm = float(predicted["total"][0] - predicted["total"][against])
            mm = float(measured["delta"][0] - measured["delta"][against])
            print(
                f"  lead of {graph.logit_tokens[0]!r} over {args.against!r}: predicted {pm:.3f}, measured {mm:.3f}"
            )
        print(f"  the model now says {measured['top_token']!r} (p={measured['top_prob']:.2f})")
    return 0
