"""`gemmascope attribute`: the attribution graph of a prompt's next token over a run's transcoders
(`attribution.draw_graph`: RUN/graphs/SLUG.json in circuit-tracer's schema and SLUG.png), its most
influential features, and feature nodes switched off or set (`--ablate NODE_ID`, `--ablate-top N`)
with the graph's predicted logit changes beside the measured ones (`attribution.intervene_nodes`).
Option parsing and printing only.

Nodes are named as the graph JSON names them: `LAYER_LATENT_POSITION` (`attribution.parse_node`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gemmascope.cli.options import add_model, number
from gemmascope.errors import ConfigError


def args_attribute(p: argparse.ArgumentParser) -> None:
    from gemmascope.attribution import EDGE_THRESHOLD, NODE_THRESHOLD
    from gemmascope.limits import MAX_GRAPH_TOKENS

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
        "--clt", nargs="?", const="", default=None, metavar="SUBSTRING",
        help="draw over the run's cross-layer transcoder (gemmascope suite RUN --clt) instead of its "
        "transcoder per layer; SUBSTRING picks one of several",
    )  # fmt: skip
    p.add_argument(
        "--node-threshold",
        type=number,
        default=NODE_THRESHOLD,
        help="pruning: share of influence kept in nodes",
    )
    p.add_argument(
        "--edge-threshold",
        type=number,
        default=EDGE_THRESHOLD,
        help="pruning: share of influence kept in edges",
    )
    p.add_argument(
        "--max-feature-nodes", type=int, default=None, help="cap the feature nodes (most influential)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help=f"longest prompt accepted (default {MAX_GRAPH_TOKENS})"
    )
    p.add_argument(
        "--ablate", action="append", default=[], metavar="NODE_ID",
        help="switch this feature node off, named as the graph names it: LAYER_LATENT_POSITION, e.g. "
        "12_1033_5 (repeat); prints predicted vs measured logit changes",
    )  # fmt: skip
    p.add_argument(
        "--ablate-top", type=int, default=0, metavar="N",
        help="also switch off, together, the N nodes whose switching off the graph predicts lowers the answer most (ranked one by one)",
    )  # fmt: skip
    p.add_argument(
        "--against", default=None, metavar="TOKEN",
        help="with --ablate-top: pick the nodes holding the answer's lead over this output token, "
        "e.g. ' Kyoto' (one of the graph's outputs)",
    )  # fmt: skip
    p.add_argument(
        "--value", type=number, default=0.0, help="with --ablate: set the nodes to this instead of 0"
    )
    add_model(p, None, "model to run (default: the run's, else the one the transcoders' metadata names)")
    p.set_defaults(run=run_attribute)


def _check(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """The --ablate nodes, and every option checked before the model loads."""
    from gemmascope.attribution import MAX_FEATURE_NODES, graph_name, parse_node
    from gemmascope.limits import MAX_PROMPT_TOKENS
    from gemmascope.runs import CLTS, GRAPHS, SAES

    needed = CLTS if args.clt is not None else SAES
    if not (Path(args.run_dir) / needed).is_dir():
        what = "cross-layer transcoders" if args.clt is not None else "SAEs"
        raise ConfigError(
            f"{args.run_dir!r} is not a run folder with {what} (expected {args.run_dir}/{needed}/"
            + (f"; train one: gemmascope suite {args.run_dir} --clt" if args.clt is not None else "")
            + ")"
        )
    if args.slug is not None:  # a bad name, or one holding another prompt's graph: refused now
        graph_name(Path(args.run_dir) / GRAPHS, args.prompt, args.slug)
    nodes = []
    for spec in args.ablate:
        try:
            nodes.append(parse_node(spec))
        except ConfigError as err:
            raise ConfigError(f"--ablate: {err}") from None
    if args.ablate_top and args.value != 0.0:
        raise ConfigError(
            f"--value {args.value:g} sets --ablate nodes; --ablate-top switches its nodes off: drop one of them"
        )
    if args.value != 0.0 and not nodes:
        raise ConfigError("--value sets the --ablate nodes: give at least one --ablate LAYER_LATENT_POSITION")
    if args.ablate_top < 0:
        raise ConfigError(f"--ablate-top {args.ablate_top}: expected a number of nodes, 1 or more")
    if args.against is not None and not args.ablate_top:
        raise ConfigError(f"--against {args.against!r} picks the --ablate-top nodes: give --ablate-top N too")
    for name in ("node_threshold", "edge_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be between 0 and 1")
    if args.max_feature_nodes is None:
        args.max_feature_nodes = MAX_FEATURE_NODES
    if args.max_feature_nodes < 1:
        raise ConfigError(f"--max-feature-nodes {args.max_feature_nodes} must be at least 1")
    if args.max_tokens is not None and not 1 <= args.max_tokens <= MAX_PROMPT_TOKENS:
        raise ConfigError(f"--max-tokens {args.max_tokens}: expected 1..{MAX_PROMPT_TOKENS} prompt tokens")
    return nodes


def run_attribute(args: argparse.Namespace) -> int:
    from gemmascope.runs import lock

    nodes = _check(args)
    with lock(args.run_dir, "attribute"):  # it writes RUN/graphs/SLUG.json and .png
        return _attribute(args, nodes)


def _attribute(args: argparse.Namespace, nodes: list[tuple[int, int, int]]) -> int:
    from gemmascope.attribution import (
        draw_graph,
        feature_node_id,
        graph_slug,
        intervene_nodes,
        transcoder_set,
    )
    from gemmascope.attribution.dictionary import Replacing, run_clt
    from gemmascope.limits import MAX_GRAPH_TOKENS
    from gemmascope.opening import open_run
    from gemmascope.runs import GRAPHS, find_saes

    transcoders: Replacing
    if args.clt is not None:
        clt = run_clt(args.run_dir, args.clt or None)  # before the model loads: a missing CLT is named now
        # its layers as dictionaries (clt_layers): the index's explanations label the graph's nodes
        opened = open_run(args.run_dir, [], model=args.model or clt.cfg.model_name or None, clt_layers=True)
        transcoders = clt
    else:
        transcoder_folders = [
            str(folder) for folder in find_saes(args.run_dir) if "transcoder" in folder.name
        ]
        opened = open_run(args.run_dir, transcoder_folders, model=args.model)
        transcoders = transcoder_set(
            opened.run_dir or args.run_dir, opened.model.n_layers, args.transcoders, opened.saes
        )
    opened.index()  # a damaged index file is an error now, before the model runs
    model = opened.model
    drawn = draw_graph(
        model, transcoders, args.prompt, Path(args.run_dir) / GRAPHS, slug=args.slug,
        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
        max_feature_nodes=args.max_feature_nodes, max_tokens=args.max_tokens or MAX_GRAPH_TOKENS,
        explain=opened.explanations, run=str(args.run_dir),
    )  # fmt: skip
    graph, ours = drawn.graph, drawn.data["metadata"]["gemmascope"]
    outputs = list(zip(graph.logit_tokens, graph.logit_probs.tolist(), strict=True))[:5]
    print(f"{args.prompt!r} -> " + ", ".join(f"{t!r} {p:.2f}" for t, p in outputs))
    capped = (
        " (the cap: the most influential kept; --max-feature-nodes)"
        if graph.n_features == graph.max_feature_nodes
        else ""
    )
    print(
        f"{graph.n_features} active features{capped}, {ours['n_pruned_nodes']} nodes and {ours['n_links']} edges after pruning; "
        f"replacement score {ours['replacement_score']:.3f}, completeness {ours['completeness_score']:.3f}; "
        f"{graph.seconds:.1f} s"
    )
    print("most influential features (node id LAYER_LATENT_POSITION, token, activation, explanation):")
    for n in drawn.influential(12):
        print(f"  {n['node_id']:<14} {n['token']!r:<14} {n['activation']:>7.2f}  {n['explanation']}")
    print(f"graph: {drawn.path} (circuit-tracer / Neuronpedia JSON), {drawn.png}")
    if args.slug is None and drawn.path.stem != graph_slug(args.prompt):
        print(f"  (named {drawn.path.stem!r}: {graph_slug(args.prompt)!r} holds another prompt's graph)")
    if args.ablate_top:
        picked = [n for n in drawn.strongest(args.ablate_top, args.against) if n not in nodes]
        lead = f"its lead over {args.against!r}" if args.against is not None else "its logit"
        if picked:
            print(
                f"the {len(picked)} nodes (besides --ablate) the graph says hold up {graph.logit_tokens[0]!r} "
                f"({lead}) most, switched off together:"
            )
            _print_nodes(drawn.data, [feature_node_id(layer, latent, pos) for layer, pos, latent in picked])
        else:
            print(f"no node of the pruned graph holds up {graph.logit_tokens[0]!r} ({lead}) on its own")
        nodes += picked
    if nodes:
        _print_intervention(args, intervene_nodes(model, transcoders, graph, nodes, args.value), len(nodes))
    return 0


def _print_nodes(data: dict[str, Any], ids: list[str], shown: int = 16) -> None:
    """One line per feature node: its id, token and label as the graph file holds them (`shown` at
    most, then how many more)."""
    nodes = {n.get("node_id"): n for n in data["nodes"]}
    prompt = data["metadata"].get("prompt_tokens") or []
    for node_id in ids[:shown]:
        n = nodes.get(node_id, {})
        pos = int(node_id.rsplit("_", 1)[1])
        token = prompt[pos] if pos < len(prompt) else ""
        print(f"  {node_id:<14} {token!r:<14} {n.get('clerp') or ''}")
    if len(ids) > shown:
        print(f"  ... and {len(ids) - shown} more: " + " ".join(ids[shown:]))


def _print_intervention(args: argparse.Namespace, out: dict[str, Any], n_nodes: int) -> None:
    print(f"set {n_nodes} node(s) to {args.value:g}: change of each output's logit (minus the mean logit)")
    print(f"  {'token':<14} {'predicted':>9} {'(direct)':>9} {'measured':>9} {'p before':>9} {'p after':>8}")
    rows = out["logits"]
    for r in rows:
        print(
            f"  {r['token']!r:<14} {r['predicted']:>9.3f} {r['predicted_direct']:>9.3f} {r['measured']:>9.3f} "
            f"{r['prob_before']:>9.3f} {r['prob_after']:>8.3f}"
        )
    if args.against is not None:
        rival = next(r for r in rows[1:] if r["token"] == args.against)
        predicted, measured = (
            rows[0]["predicted"] - rival["predicted"],
            rows[0]["measured"] - rival["measured"],
        )
        print(
            f"  lead of {rows[0]['token']!r} over {args.against!r}: predicted {predicted:.3f}, measured {measured:.3f}"
        )
    print(f"  the model now says {out['top_token']!r} (p={out['top_prob']:.2f})")
