"""Headlines and their topics: for each headline of a file (by default examples/headlines.txt), the
top features as the microscope ranks them, so a person can judge which are topical.

    python benchmarks/headlines.py RUN [--sae ID] [--headlines FILE] [-k 5] [--out FILE]

Per headline, two lists, each feature with its label (best explanation), the tokens it fires on most
in the index's top examples, its score and activation:
- topics: the headline's features pooled over its tokens (`features.text_features`' topics, meaning
  first), what the microscope shows at the top;
- by token: the features of the per-token lists (top 5 per token, meaning first), each at its best
  token, best first: the microscope's "Features on the prompt";
and, for contrast, the same two lists in the raw activation order (`order="raw"`).
Dense features (over `features.HIDE_DENSE` of tokens) are hidden, as the microscope hides them.

Prints Markdown (for the README) and writes JSON (default benchmarks/results/headlines.json).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from gemmascope.features import text_features
from gemmascope.opening import OpenRun, open_run

HERE = Path(__file__).resolve().parent
HEADLINES = HERE.parent / "examples" / "headlines.txt"
PER_TOKEN = 5  # the microscope's default per token


def top_tokens(opened: OpenRun, key: str, index: int, n: int = 5) -> list[str]:
    """The tokens latent `index` fires on most often among its top examples in the index."""
    page = opened.feature_index().feature(key, index)
    counts = Counter(
        e["tokens"][e["focus"]].strip() or repr(e["tokens"][e["focus"]]) for e in page["top_examples"]
    )
    return [t for t, _ in counts.most_common(n)]


def ranked(opened: OpenRun, key: str, text: str, order: str, k: int) -> dict[str, Any]:
    """The headline's topics and its features by token, `k` each, in `order`."""
    firing = opened.firing(key)
    found = text_features(
        opened.model, opened.saes[key], text, k=PER_TOKEN, topics=k, densities=opened.densities(key),
        firing=firing, order=order,
    )  # fmt: skip
    tokens = [r["token"] for r in found["tokens"]]
    best: dict[int, dict[str, Any]] = {}
    for r in found["tokens"]:  # each feature at its best token, as the page's prompt-wide list
        for f in r["features"]:
            rank = f["score"] if found["order"] == "meaning" else f["value"]
            if f["index"] not in best or rank > best[f["index"]]["rank"]:
                best[f["index"]] = {**f, "rank": rank, "token": r["token"]}
    by_token = sorted(best.values(), key=lambda f: -f["rank"])[:k]
    topics = [{**t, "token": tokens[t["position"] - 1]} for t in found["topics"]]
    names = opened.explanations(key, [f["index"] for f in (*topics, *by_token)])
    for f in (*topics, *by_token):
        f.pop("rank", None)
        f.update(label=names.get(f["index"], ""), top_tokens=top_tokens(opened, key, f["index"]))
    return {"order": found["order"], "topics": topics, "by_token": by_token}


def markdown(text: str, result: dict[str, Any]) -> str:
    lines = [
        f"**{text}**",
        "",
        "| # | topics (pooled, meaning first) | fires most on | by token (meaning first) | fires most on |",
    ]
    lines.append("|---|---|---|---|---|")
    topics, by_token = result["meaning"]["topics"], result["meaning"]["by_token"]
    for i in range(max(len(topics), len(by_token))):
        cells = [str(i + 1)]
        for f in (topics[i] if i < len(topics) else None, by_token[i] if i < len(by_token) else None):
            if f is None:
                cells += ["", ""]
                continue
            where = f" at {f['token'].strip()!r}" if "token" in f else ""
            cells += [f"#{f['index']} {f['score']:.2f}{where}: {f['label']}", ", ".join(f["top_tokens"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    raw = result["raw"]
    topics_raw = ", ".join(f"#{f['index']}" for f in raw["topics"])
    by_token_raw = ", ".join(f"#{f['index']} at {f['token'].strip()!r}" for f in raw["by_token"])
    lines += ["", f"raw order, for contrast: topics {topics_raw}; by token {by_token_raw}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--sae", help="SAE id of the run (default: its only SAE)")
    p.add_argument("--headlines", type=Path, default=HEADLINES, help="one headline per line")
    p.add_argument("-k", type=int, default=5, help="features per list (default 5)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "headlines.json")
    args = p.parse_args()
    opened = open_run(args.run, [args.sae])
    key = next(iter(opened.saes))
    if opened.not_indexed(key):
        raise SystemExit(f"headlines.py needs a feature index: {opened.not_indexed(key)}")
    texts = [line.strip() for line in args.headlines.read_text().splitlines() if line.strip()]
    results = []
    for text in texts:
        result = {"text": text, **{o: ranked(opened, key, text, o, args.k) for o in ("meaning", "raw")}}
        results.append(result)
        print(markdown(text, result) + "\n", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "run": str(args.run),
        "sae_id": key,
        "headlines": str(args.headlines),
        "k": args.k,
        "results": results,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
