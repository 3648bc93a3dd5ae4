"""`gemmascope inspect`: a text's topics and its top features per token (shaded in the terminal),
meaning first unless `--order raw`, the features that fire most on it (`--search`), a search of the
index's explanations (`--find`), the document-level analysis of a file (`--documents`) and one
feature's page with its measured output effects (`--feature N`). Option parsing and printing over
`opening.open_run`, `features.text_features`, `features.search_text`, `features.documents` and
`outputs.latent_outputs`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from gemmascope.cli.options import add_dense, add_model, add_sae_choice, prompt_set
from gemmascope.errors import ConfigError, StoreError
from gemmascope.features.rank import DEFAULT_ORDER, ORDERS, RAW_NOTE
from gemmascope.opening import OpenRun, open_run


def args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text to look at (not needed with --find)")
    add_sae_choice(p)
    add_model(p, None, "model to run (default: the run's, else the one the SAE's metadata names)")
    p.add_argument("-k", type=int, default=5, help="features per token (default 5)")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default=DEFAULT_ORDER,
        help="meaning (default): by how unusual each activation is for its feature, from the feature "
        "index's statistics, so topical features lead and function-word or broad ones follow; raw: by "
        "activation value",
    )
    p.add_argument(
        "--topics", type=int, default=10, help="topics of the whole text listed first (default 10; 0: none)"
    )
    add_dense(p)
    p.add_argument("--search", action="store_true", help="list the features firing most on the text instead")
    p.add_argument("--token", help="with --search: only at this token of the text")
    p.add_argument("--find", metavar="QUERY", help="search the index's explanations instead")
    p.add_argument(
        "--documents",
        metavar="FILE",
        help="document-level analysis of FILE (one document per line): each one's top features, max- and "
        "mean-pooled, the features they share and each one's topic features",
    )
    p.add_argument(
        "--feature",
        type=int,
        metavar="N",
        help="one feature's page instead: its explanation, numbers, top examples, logit lens and what "
        "turning it up does to the next token (measured on neutral prompts, kept in the run folder)",
    )
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from gemmascope.features.encode import check_dense_limit

    if args.sae is None and args.run_dir is None:
        raise ConfigError(
            "inspect needs --sae SAE_FOLDER, or --run RUN_DIR (with --sae SAE_ID if it has several)"
        )
    for flag, value, low in (("-k", args.k, 1), ("--limit", args.limit, 1), ("--topics", args.topics, 0)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be at least {low}")
    check_dense_limit(args.dense)
    if args.find:  # every SAE of the index when none is named
        opened = open_run(args.run_dir, [args.sae] if args.sae else [], index=args.db)
        return _find(args, opened)
    if args.feature is not None:
        opened = open_run(args.run_dir, [args.sae], model=args.model, index=args.db)
        _feature(opened, next(iter(opened.saes)), args.feature)
        return 0
    if not args.text and not args.documents:
        raise ConfigError("inspect needs a text (or --feature N, --find QUERY, or --documents FILE)")
    texts = prompt_set([], args.documents, "--documents") if args.documents else None
    opened = open_run(args.run_dir, [args.sae], model=args.model, index=args.db)
    opened.index()  # a damaged index file is an error now, before the model runs
    key = next(iter(opened.saes))
    if texts is not None:
        _documents(args, opened, key, texts)
    elif args.search:
        _search(args, opened, key)
    else:
        _per_token(args, opened, key)
    return 0


def _find(args: argparse.Namespace, opened: OpenRun) -> int:
    index = opened.index()
    if index is None:
        raise StoreError("--find searches a feature index: build one with 'gemmascope index' or pass --db")
    key = next(iter(opened.saes), None)
    for hit in index.search_explanations(key, args.find, limit=args.limit):
        score = "" if hit["score"] is None else f"  (score {hit['score']:.2f})"
        print(f"{hit['sae_id']}#{hit['index']}: {hit['explanation']}{score}")
    return 0


def _documents(args: argparse.Namespace, opened: OpenRun, key: str, texts: list[str]) -> None:
    from gemmascope.features.documents import documents

    firing = opened.firing(key) if args.order == "meaning" else None
    out = documents(
        opened.model, opened.saes[key], texts, top=args.k, densities=opened.densities(key), dense=args.dense,
        firing=firing,
    )  # fmt: skip
    parts = ("topics", "max", "mean", "topic")
    seen = {r["index"] for d in out["documents"] for part in parts for r in d[part]}
    names = opened.explanations(key, seen | {r["index"] for r in out["shared"]})

    def show(rows: list[dict[str, Any]]) -> str:
        return "; ".join(
            f"#{r['index']} {r['value']:.1f}{' (dense)' if r.get('dense') else ''} {names.get(r['index'], '')}".rstrip()
            for r in rows
        )

    for d, doc in enumerate(out["documents"], 1):
        print(f"document {d}: {doc['text'][:80]!r}")
        if doc["topics"]:
            print(f"  topics (meaning first): {show(doc['topics'])}")
        elif d == 1 and args.order == "meaning":
            print(f"  ({RAW_NOTE}: no topics)")
        print(f"  max-pooled:  {show(doc['max'])}")
        print(f"  mean-pooled: {show(doc['mean'])}")
        if doc["topic"]:
            print(f"  its topic (strong here, weak in the others): {show(doc['topic'])}")
    if len(out["documents"]) > 1:
        shared = "; ".join(
            f"#{r['index']} in {r['n_documents']}{' (dense)' if r['dense'] else ''} {names.get(r['index'], '')}".rstrip()
            for r in out["shared"][: args.limit]
        )
        print(f"shared by at least half the documents: {shared or 'none'}")


def _search(args: argparse.Namespace, opened: OpenRun, key: str) -> None:
    from gemmascope.features import search_text

    hits = search_text(
        opened.model, opened.saes[key], args.text, token=args.token, limit=args.limit,
        densities=opened.densities(key), hide_dense=None if args.show_dense else args.dense,
    )  # fmt: skip
    names = opened.explanations(key, [h["index"] for h in hits])
    where = f" at token {args.token!r}" if args.token else ""
    print(f"features of {key} firing most on the text{where}:")
    for h in hits:
        print(
            f"  #{h['index']:<6} {h['value']:8.2f}  at {h['token']!r} (position {h['position']})  "
            f"{names.get(h['index'], '')}"
        )


def _per_token(args: argparse.Namespace, opened: OpenRun, key: str) -> None:
    from gemmascope.features import text_features

    densities = opened.densities(key)
    hide = None if args.show_dense else args.dense
    found = text_features(
        opened.model, opened.saes[key], args.text, k=args.k, topics=args.topics, hide_dense=hide,
        densities=densities, firing=opened.firing(key) if args.order == "meaning" else None, order=args.order,
    )  # fmt: skip
    rows, topics = found["tokens"], found["topics"]
    colour = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    print(_shaded(rows) if colour else "".join(r["token"] for r in rows))
    seen = [t["index"] for t in topics] + [f["index"] for r in rows for f in r["features"]]
    names = opened.explanations(key, seen)
    how = "meaning first" if found["order"] == "meaning" else "by activation"
    notes = [RAW_NOTE] if found["order"] != args.order else []
    if hide is not None and densities is None:
        notes.append("no feature index for this SAE: dense features shown")
    note = f" ({'; '.join(notes)})" if notes else ""
    if topics:
        print(f"\ntopics of the text, {how}{note}:")
        for t in topics:
            score = "" if t["score"] is None else f"score {t['score']:6.2f}  "
            print(
                f"  #{t['index']:<6} {score}on {t['count']} token{'s' * (t['count'] != 1)}, max "
                f"{t['value']:.2f} at {rows[t['position'] - 1]['token']!r}  {names.get(t['index'], '')}"
            )
    print(f"\ntop {args.k} features of {key} per token, {how}{note}:")
    for r in rows:
        feats = "  ".join(f"#{f['index']} {f['value']:.2f}" for f in r["features"]) or "-"
        print(f"  {r['position']:4d}  {r['token']!r:<16} {feats}")
    listed = list(dict.fromkeys(f["index"] for r in rows for f in r["features"]))  # each once, in order
    if opened.not_indexed(key) is None and listed:
        first = sorted(
            listed, key=lambda i: -max(_key(f) for r in rows for f in r["features"] if f["index"] == i)
        )
        print("\nexplanations:")
        for i in first[:15]:
            print(f"  #{i:<6} {names.get(i, '')}")


def _key(feature: dict[str, Any]) -> float:
    """What the listing is ordered by: the meaning score when known, else the activation."""
    return float(feature["score"] if feature["score"] is not None else feature["value"])


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


def _feature(opened: OpenRun, key: str, latent: int) -> None:
    """One feature's page in the terminal: explanation, density, top examples, the logit lens (the
    weights) and the measured output effects (`outputs.latent_outputs`: the model runs unless the
    run folder keeps them)."""
    from gemmascope.outputs import latent_outputs

    d_sae = opened.saes[key].d_sae
    if not 0 <= latent < d_sae:
        raise ConfigError(f"--feature {latent} is out of range: expected 0..{d_sae - 1}")
    f = opened.feature_index().feature(key, latent)
    print(f"{key} #{latent}: {f['explanation'] or '(no explanation)'}")
    n_tokens = (f.get("stats") or {}).get("n_tokens", "?")
    print(
        f"density {100 * f['density']:.3g}%, max activation {f['max_act']:.4g}, fired on {f['n_fired']} of {n_tokens} tokens"
    )
    print("top activations:")
    for ex in f["top_examples"][:5]:
        text = "".join(f"[{t}]" if i == ex["focus"] else t for i, t in enumerate(ex["tokens"]))
        print(f"  {ex['value']:8.2f}  {text.replace(chr(10), ' ')}")
    lens = f["logit_lens"]
    print("logit lens (the weights): promotes " + " ".join(repr(r["token"]) for r in lens["promoted"][:8]))
    print(
        "                          suppresses " + " ".join(repr(r["token"]) for r in lens["suppressed"][:8])
    )
    out = latent_outputs(opened, key, latent)
    if out.get("note"):
        print(f"output effects: {out['note']}")
        return
    where = "measured earlier, kept in the run folder" if out["cached"] else "measured now"
    print(
        f"turned up ({where}): +{out['strength']:.4g} x its decoder direction after "
        f"{len(out['prompts'])} neutral prompts, mean KL {out['kl']:.3g} nats; next token"
    )
    for side in ("rose", "fell"):
        shown = " ".join(f"{r['token']!r} x{math.exp(r['log_ratio']):.3g}" for r in out[side][:8])
        print(f"  {'rises' if side == 'rose' else 'falls'}: {shown}")
    if out.get("not_cached"):
        print(f"  (not kept: {out['not_cached']})")
