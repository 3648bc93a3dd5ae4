"""The demo: the whole loop on one site in one command (the suite's stages on a small plan), then the
eval table, a few features that read well in a terminal with their top windows, and the web UI. Owns the
choice of those features, how a window is printed, and the demo's graphs (`demo_graphs`: a small
cross-layer transcoder beside the SAE and the graphs of `GRAPH_PROMPTS`, drawn over it).

Calls only the public functions of the suite and the pipeline modules; knows nothing of their internals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmascope.runs import FEATURES_DB
from gemmascope.suite import SuitePlan, run_suite

if TYPE_CHECKING:
    from gemmascope.models import LanguageModel
    from gemmascope.server.commands import RunLine
    from gemmascope.train.clt import CLTSpec

# The graphs a fresh install shows on the graph page (`gemmascope demo --graphs`).
GRAPH_PROMPTS = ("The capital of France is", "Which is bigger, 9.11 or 9.8? Answer:")


@dataclass
class GraphPlan:
    """The demo's cross-layer transcoder: `width` latents per layer, `target_l0` per layer, trained
    on `tokens` harvested at every layer's MLP input and output."""

    tokens: int = 50_000
    width: int = 1024
    target_l0: float = 45.0
    index_tokens: int = 16_384  # held-out tokens the feature pages of its latents read (every layer)

    def spec(self) -> CLTSpec:
        """The CLT to train, checked (a ConfigError names the first value out of range)."""
        from gemmascope.errors import ConfigError
        from gemmascope.train.clt import CLTSpec

        spec = CLTSpec(width=self.width, target_l0=self.target_l0, tokens=self.tokens)
        try:
            spec.check()
        except ConfigError as err:
            raise ConfigError(f"the demo's graphs: {err} (--graph-width, --graph-tokens, --l0)") from None
        return spec


def demo_graphs(
    run_dir: Path, model: LanguageModel, plan: GraphPlan, suite: SuitePlan, say: Callable[[str], None] = print
) -> list[Path]:
    """Harvest every layer's MLP input and output into the demo's run folder (`plan.tokens` of the
    suite's corpus, at its context length and model dtype, and the
    held-out slice training measures on), train one CLT over them (`train.clt.train_clt`; skipped
    when the run has one), and draw the graph of each of `GRAPH_PROMPTS` over it into
    `run_dir/graphs/` (one already drawn over this CLT is kept), where the graph page lists them,
    its nodes labelled from the feature pages of every layer's latents (`suite.run.index_clts`).
    Returns the graph files."""
    from gemmascope.activations import harvest
    from gemmascope.attribution import draw_graph, graph_name, read_graph, transcoder_digest
    from gemmascope.attribution.dictionary import run_clt
    from gemmascope.errors import GemmaScopeError, StoreError
    from gemmascope.models import reading_dtype
    from gemmascope.opening import open_run
    from gemmascope.runs import GRAPHS, HELDOUT
    from gemmascope.sites import transcoder_sites
    from gemmascope.suite.run import index_clts
    from gemmascope.train.clt import train_clt
    from gemmascope.train.recipe import HELDOUT_TOKENS

    width = f"width_{plan.width}/"
    corpus, ctx = suite.corpus, suite.context_len

    def reader() -> LanguageModel:  # the passes that only read activations: a bfloat16 copy, held briefly
        return model.cast(reading_dtype(suite.model_dtype, model.device))

    try:
        clt = run_clt(run_dir, width)  # one trained before, of this width
    except StoreError:
        sites = [site for layer in range(model.n_layers) for site in transcoder_sites(layer)]
        copy = reader()
        dtype = copy.dtype_name  # a bfloat16 model's outputs lose nothing in it
        harvest(copy, sites, run_dir, plan.tokens, corpus, ctx, dtype=dtype)
        harvest(copy, sites, run_dir / HELDOUT, HELDOUT_TOKENS, corpus, ctx, dtype=dtype, split="heldout")
        del copy
        say(f"training a cross-layer transcoder ({plan.width} latents a layer) for the graph page")
        train_clt(run_dir, plan.spec(), restart=True)
        clt = run_clt(run_dir, width)
    if index_clts(run_dir, model, reader(), plan.index_tokens, corpus, ctx):
        say(f"indexed the latents of every layer of {clt.cfg.extra['folder']} (their feature pages)")
    explain = open_run(run_dir, [], model=model, clt_layers=True).explanations
    digest = transcoder_digest(clt)
    drawn = []
    for prompt in GRAPH_PROMPTS:
        path = run_dir / GRAPHS / f"{graph_name(run_dir / GRAPHS, prompt)}.json"
        try:
            read_graph(path, digest)  # drawn over this very CLT: kept
        except GemmaScopeError:
            say(f"drawing the graph of {prompt!r} over {clt.cfg.extra['folder']}")
            path = draw_graph(
                model, clt, prompt, run_dir / GRAPHS, run=str(run_dir), digest=digest, explain=explain
            ).path
        drawn.append(path)
    return drawn


def showcase_features(db_path: Path, sae_id: str, n: int = 3, candidates: int = 400) -> list[dict[str, Any]]:
    """Pick `n` latents that read well in a terminal: not rare, not dense, and whose top windows
    mostly fire on the same token (a plainly interpretable latent). Returns their feature records."""
    from collections import Counter

    from gemmascope.features import FeatureIndex

    index = FeatureIndex(db_path)
    d_sae = int(next(s for s in index.saes() if s["sae_id"] == sae_id)["d_sae"])
    scored: list[tuple[float, int]] = []
    seen_tokens: set[str] = set()
    for i in range(min(d_sae, candidates)):
        feature = index.feature(sae_id, i)
        examples = feature.get("top_examples") or []
        if not 1e-4 <= float(feature.get("density") or 0) <= 0.05 or len(examples) < 5:
            continue
        focus = Counter(e["tokens"][e["focus"]].strip().lower() for e in examples)
        token, count = focus.most_common(1)[0]
        scored.append((count / len(examples) + 0.01 * len(token), i))
    picked = []
    for _score, i in sorted(scored, reverse=True):
        feature = index.feature(sae_id, i)
        examples = feature["top_examples"]
        token = examples[0]["tokens"][examples[0]["focus"]].strip().lower()
        if token in seen_tokens:
            continue
        seen_tokens.add(token)
        picked.append(feature)
        if len(picked) == n:
            break
    return picked


# What a readable SAE at the demo's budget reaches (the issue "SAEs worth reading", 300k tokens).
TARGETS = (
    ("ΔLM loss", "delta_lm_loss", 0.8, "{:.3f} nats"),
    ("dead", "frac_dead", 0.05, "{:.1%}"),
    ("latents over 50% density", "n_over_50_percent", 0, "{:d}"),
    ("L0 share of latents over 10%", "l0_share_over_10_percent", 0.20, "{:.0%}"),
)


def target_lines(result: dict[str, Any]) -> list[str]:
    """One line per quality target: the SAE's value, the bound, and whether it is met."""
    from gemmascope.evals import summary

    flat = summary(result)
    lines = []
    for label, key, bound, fmt in TARGETS:
        value = flat.get(key)
        if value is None:
            lines.append(f"  unknown  {label} (this eval has no health block)")
            continue
        met = value <= bound
        lines.append(
            f"  {'met    ' if met else 'NOT met'}  {label} {fmt.format(value)} (target <= {fmt.format(bound)})"
        )
    return lines


def format_window(example: dict[str, Any]) -> str:
    """One top-activating window as text, the activating token in [[brackets]]."""
    parts = []
    for j, tok in enumerate(example["tokens"]):
        parts.append(f"[[{tok}]]" if j == example["focus"] else tok)
    return "".join(parts).replace("\n", " ")


def run_demo(
    run_dir: Path | str,
    plan: SuitePlan,
    serve: bool = True,
    host: str = "127.0.0.1",
    port: int = 8000,
    say: Callable[[str], None] = print,
    run_line: RunLine | None = None,
    graphs: GraphPlan | None = None,
) -> dict[str, Any]:
    """The whole loop on one site: harvest, train one JumpReLU SAE, evaluate, index; print the eval
    table and three features with their top text; with `graphs`, a small CLT and the graphs of
    `GRAPH_PROMPTS` (`demo_graphs`); then serve the web UI (unless `serve` is False; `run_line`: the
    CLI's, so the command line's commands about the run are run by it)."""
    from gemmascope.evals import format_table
    from gemmascope.models import load_model
    from gemmascope.runs import sae_id

    run_dir = Path(run_dir)
    started = time.monotonic()
    plan.check()
    if graphs is not None:
        graphs.spec()  # before anything runs
    model = load_model(plan.model)
    out = run_suite(run_dir, plan, model=model, say=say)
    folder = out["saes"][0]
    say("\n" + format_table(out["results"]))  # with each SAE's health warning under it
    key = sae_id(folder)
    say(f"\nQuality targets of {key}:")
    for line in target_lines(out["results"][0]):
        say(line)
    features = showcase_features(run_dir / FEATURES_DB, key)
    say(f"\nThree features of {key} and where they fire most:")
    for feature in features:
        say(
            f"\n  feature {feature['index']}  (density {feature['density']:.2e}, max activation {feature['max_act']:.1f})"
        )
        if feature.get("explanation"):
            say(f"  explanation: {feature['explanation']}")
        for example in feature["top_examples"][:3]:
            say(f"    {max(example['acts']):6.1f}  {format_window(example)}")
    if graphs is not None:
        say("\n== graphs")
        out["graphs"] = demo_graphs(run_dir, model, graphs, plan, say)
        say(f"graphs drawn: {', '.join(p.stem for p in out['graphs'])} (the graph page draws others)")
    say(f"\ndemo finished in {time.monotonic() - started:.0f} s; run folder {run_dir}")
    out["showcase"] = features
    if serve:
        from gemmascope.server.app import serve as serve_ui

        say(f"serving the web UI at http://{host}:{port}/  (Ctrl-C to stop)")
        serve_ui(run_dir, host=host, port=port, run_line=run_line)
    return out
