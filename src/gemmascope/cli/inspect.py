"""`gemmascope inspect`: a text's top features per token (shaded in the terminal), the features that
fire most on it (`--search`), a search of the index's explanations (`--find`) and the document-level
analysis of a file (`--documents`). Option parsing and printing over `opening.open_run`,
`features.top_features`, `features.search_text` and `features.documents`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gemmascope.cli.options import add_dense, add_model, add_sae_choice, prompt_set
from gemmascope.errors import ConfigError, StoreError
from gemmascope.opening import OpenRun, open_run


def args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text to look at (not needed with --find)")
    add_sae_choice(p)
    add_model(p, None, "model to run (default: the run's, else the one the SAE's metadata names)")
    p.add_argument("-k", type=int, default=5, help="features per token (default 5)")
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
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from gemmascope.features.encode import check_dense_limit

    if args.sae is None and args.run_dir is None:
        raise ConfigError(
            "inspect needs --sae SAE_FOLDER, or --run RUN_DIR (with --sae SAE_ID if it has several)"
        )
    for flag, value, low in (("-k", args.k, 1), ("--limit", args.limit, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be at least {low}")
    check_dense_limit(args.dense)
    if args.find:  # every SAE of the index when none is named
        opened = open_run(args.run_dir, [args.sae] if args.sae else [], index=args.db)
        return _find(args, opened)
    if not args.text and not args.documents:
        raise ConfigError("inspect needs a text (or --find QUERY, or --documents FILE)")
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

    out = documents(
        opened.model, opened.saes[key], texts, top=args.k, densities=opened.densities(key), dense=args.dense
    )
    seen = {r["index"] for d in out["documents"] for part in ("max", "mean", "topic") for r in d[part]}
    names = opened.explanations(key, seen | {r["index"] for r in out["shared"]})

    def show(rows: list[dict[str, Any]]) -> str:
        return "; ".join(
            f"#{r['index']} {r['value']:.1f}{' (dense)' if r.get('dense') else ''} {names.get(r['index'], '')}".rstrip()
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
    from gemmascope.features import top_features

    densities = opened.densities(key)
    hide = None if args.show_dense else args.dense
    rows = top_features(
        opened.model, opened.saes[key], args.text, k=args.k, hide_dense=hide, densities=densities
    )
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
    if opened.not_indexed(key) is None and seen:
        strongest = sorted(seen, key=lambda i: -seen[i])[:15]
        names = opened.explanations(key, strongest)
        print("\nexplanations:")
        for i in strongest:
            print(f"  #{i:<6} {names.get(i, '')}")


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
