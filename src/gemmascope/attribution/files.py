"""The files of an attribution graph: the JSON that circuit-tracer writes and Neuronpedia's graph
viewer reads (`metadata`, `qParams`, `nodes`, `links`; circuit-tracer 0.5's node ids and fields),
with our own block in `metadata.gemmascope` (the run, the transcoders and a digest of them, the
scores, the whole adjacency's shape); reading it back checked against a run; and the PNG of the
pruned graph (token positions across, layers up, nodes sized by influence, edges by weight, the
logits on top).

Knows nothing of computing graphs (`graph.py`) or of the server.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemmascope.attribution.dictionary import Replacing
from gemmascope.attribution.graph import Graph, Pruned, prune, scores
from gemmascope.clt import CrossLayerTranscoder
from gemmascope.errors import ConfigError, FormatError, StoreError
from gemmascope.runs import write_atomic

SCHEMA_VERSION = 1  # circuit-tracer's frontend schema
KEY_WIDTH = 52  # characters of a label's line in the PNG's key of features
LEGEND = (  # the PNG's shapes and colours, as the web page's caption says them
    "circles: features (larger: more active,\n  darker: more influential)\ngrey squares: errors"
    "\ndark squares: tokens\ndiamonds: outputs\nblue edges excite, red inhibit"
)


def transcoder_digest(transcoders: Replacing) -> str:
    """A short digest of a transcoder set's weights' identity (train ids, else sizes and sites), or a
    CLT's (its config and decoders' sum), so a graph file can say which set it was drawn from. A
    CLT's carries the name of its layers' ids (`runs.clt_layer_id`, "clt-layers"): graphs drawn
    before its nodes were named after those ids (whose links to feature pages do not open) are drawn
    again."""
    if isinstance(transcoders, CrossLayerTranscoder):
        cfg = transcoders.cfg
        weight = sum(float(w.detach().abs().sum()) for w in transcoders.W_dec)
        return hashlib.sha256(
            f"clt-layers:{cfg.n_layers}:{cfg.width}:{cfg.model_name}:{weight}".encode()
        ).hexdigest()[:16]
    parts = [
        f"{tc.cfg.site}>{tc.cfg.out_site}:{tc.d_sae}:{tc.cfg.extra.get('train_id') or float(tc.W_dec.detach().abs().sum()):}"
        for tc in transcoders
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


NODE_ID_FORMAT = "LAYER_LATENT_POSITION"  # a feature node's id, as circuit-tracer's JSON names it
_FEATURE_NODE = re.compile(r"([0-9]{1,4})_([0-9]{1,9})_([0-9]{1,6})")


def feature_node_id(layer: int, latent: int, pos: int) -> str:
    """The id of a feature node in the graph JSON, `LAYER_LATENT_POSITION` (circuit-tracer's): the
    one node id of the graph files, the graph page, `gemmascope attribute --ablate` and the
    intervene API."""
    return f"{layer}_{latent}_{pos}"


def parse_node(node_id: str) -> tuple[int, int, int]:
    """`(layer, position, latent)` of a feature node id `LAYER_LATENT_POSITION` (`feature_node_id`);
    a ConfigError for anything else (an error, token or logit node, digits beyond ASCII, a huge
    number)."""
    m = _FEATURE_NODE.fullmatch(node_id)
    if m is None:
        raise ConfigError(
            f"node {node_id[:40]!r} is not a feature node: expected {NODE_ID_FORMAT} as the graph names "
            "its nodes, e.g. 12_1033_5"
        )
    layer, latent, pos = (int(v) for v in m.groups())
    return layer, pos, latent


_BASE = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": ""}


def _node(
    graph: Graph, pruned: Pruned, index: int, explanations: dict[tuple[int, int], str]
) -> dict[str, Any]:
    """Node `index` of the graph as circuit-tracer's frontend JSON has it."""
    info = graph.node(index)
    influence = float(pruned.cumulative[index])
    if info["kind"] == "feature":
        layer, pos, latent = info["layer"], info["pos"], info["latent"]
        return {
            **_BASE, "node_id": feature_node_id(layer, latent, pos), "feature": _cantor(layer, latent),
            "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
            "jsNodeId": f"{layer}_{latent}-0", "clerp": explanations.get((layer, latent), ""),
            "influence": influence, "activation": info["activation"],
        }  # fmt: skip
    if info["kind"] == "error":
        layer, pos = info["layer"], info["pos"]
        return {
            **_BASE, "node_id": f"err_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
            "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0",
            "influence": influence, "activation": None,
        }  # fmt: skip
    if info["kind"] == "token":
        pos, token_id = info["pos"], int(graph.ids[info["pos"]])
        return {
            **_BASE, "node_id": f"E_{token_id}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
            "feature_type": "embedding", "jsNodeId": f"E_{token_id}-{pos}", "influence": influence,
            "activation": None,
        }  # fmt: skip
    k, last = index - graph.logit_start, graph.n_pos - 1
    token_id = int(graph.logit_ids[k])
    return {
        **_BASE, "node_id": f"{graph.n_layers + 1}_{token_id}_{last}", "feature": token_id,
        "layer": str(graph.n_layers + 1), "ctx_idx": last, "feature_type": "logit", "token_prob": info["prob"],
        "is_target_logit": k == 0, "jsNodeId": f"L_{token_id}-{last}",
        "clerp": f'Output "{info["token"]}" (p={info["prob"]:.3f})', "activation": None,
    }  # fmt: skip


def graph_json(
    graph: Graph,
    slug: str,
    pruned: Pruned | None = None,
    run: str = "",
    digest: str = "",
    explanations: dict[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """The graph as circuit-tracer's frontend JSON: the pruned nodes (features `LAYER_LATENT_POS`,
    errors `err_LAYER_POS`, tokens `E_TOKENID_POS`, logits `L+1_TOKENID_POS`) and the kept links
    with their signed weights. `explanations[(layer, latent)]` become the nodes' `clerp`.
    circuit-tracer names error nodes `0_LAYER_POS`, which collides with a layer-0 feature whose
    latent is LAYER (`0_LATENT_POS`); node types come from `feature_type`, so `err_` loses nothing."""
    pruned = pruned or prune(graph)
    replacement, completeness = scores(graph)
    kept = torch.nonzero(pruned.nodes).squeeze(1).tolist()
    nodes = [_node(graph, pruned, index, explanations or {}) for index in kept]
    ids = {index: node["node_id"] for index, node in zip(kept, nodes, strict=True)}
    links = [
        {"source": ids[source], "target": ids[target], "weight": float(graph.adjacency[target, source])}
        for target, source in torch.nonzero(pruned.edges).tolist()
        if target in ids and source in ids
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [n for n in nodes if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": {
            "slug": slug,
            "scan": f"gemmascope-{digest}" if digest else "gemmascope",
            "transcoder_list": graph.transcoders,
            "prompt_tokens": graph.tokens,
            "prompt": graph.prompt,
            "node_threshold": pruned.node_threshold,
            "schema_version": SCHEMA_VERSION,
            "gemmascope": {
                "run": Path(run).name if run else run,  # the run folder's name, never a server path
                "transcoder_digest": digest,
                "model": graph.model_name,
                "replacement_score": replacement,
                "completeness_score": completeness,
                "n_features": graph.n_features,
                "n_nodes": int(graph.adjacency.shape[0]),
                "n_pruned_nodes": len(nodes),
                "n_links": len(links),
                "edge_threshold": pruned.edge_threshold,
                "max_feature_nodes": graph.max_feature_nodes,
                "seconds": graph.seconds,
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def graph_slug(prompt: str) -> str:
    """A file name for a prompt's graph: its words in lower case joined by '-' (at most 48
    characters), with a short hash when that leaves little of the prompt (other scripts, symbols)."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    base = words[:48].strip("-")
    if len(base) < 8 or len(words) > 48:
        base = f"{base[:40].strip('-')}-{hashlib.sha256(prompt.encode()).hexdigest()[:6]}".strip("-")
    return base


def check_slug(slug: str) -> str:
    """`slug` when it is a valid graph name (lower-case letters, digits, '-'), else a ConfigError."""
    if not _SLUG.match(slug):
        raise ConfigError(
            f"graph name {slug!r} is not valid: expected lower-case letters, digits and '-' (at most 64)"
        )
    return slug


def graph_name(graph_dir: Path | str, prompt: str, slug: str | None = None) -> str:
    """The name `prompt`'s graph is written under in `graph_dir`, losing no other prompt's graph:
    `slug` when given (a ConfigError when its file holds another prompt's graph), else
    `graph_slug(prompt)`, or, where that file holds another prompt's graph ("The capital of France
    is" and "the capital of france is?" make one slug), the same with the prompt's hash. A graph of
    the same prompt is drawn again under its name; a damaged file is replaced. (A CLI run and a
    server drawing into one folder at once are not guarded against each other.)"""
    name = check_slug(slug or graph_slug(prompt))
    held = _held_prompt(Path(graph_dir) / f"{name}.json")
    if held is None or held == prompt:
        return name
    if not slug:  # a default name (at most 48 characters) with the prompt's hash: at most 55
        name = f"{name}-{hashlib.sha256(prompt.encode()).hexdigest()[:6]}"
        held = _held_prompt(Path(graph_dir) / f"{name}.json")
        if held is None or held == prompt:
            return name
    raise ConfigError(
        f"graph name {name!r} already holds the graph of {held!r}: pick another name, or remove "
        f"graphs/{name}.json to draw {prompt!r} under it"
    )


def _held_prompt(path: Path) -> str | None:
    """The prompt of the graph file at `path`; None when there is none or it cannot be read."""
    try:
        return str(read_graph(path)["metadata"]["prompt"])
    except FormatError:  # none there, or damaged
        return None


def pruned_explanations(
    graph: Graph, pruned: Pruned, lookup: Callable[[str, list[int]], dict[int, str]]
) -> dict[tuple[int, int], str]:
    """The explanations of the pruned graph's feature nodes, `(layer, latent) -> text`, from
    `lookup(sae_id, latents) -> {latent: text}` (the run's feature index)."""
    wanted: dict[int, set[int]] = {}
    for j in torch.nonzero(pruned.nodes[: graph.n_features]).squeeze(1).tolist():
        layer, _, latent = (int(v) for v in graph.features[j])
        wanted.setdefault(layer, set()).add(latent)
    out: dict[tuple[int, int], str] = {}
    for layer, latents in wanted.items():
        for latent, text in lookup(graph.transcoders[layer], sorted(latents)).items():
            out[(layer, latent)] = text
    return out


def write_graph(path: Path | str, data: dict[str, Any]) -> Path:
    """Write a graph JSON atomically."""
    return write_atomic(Path(path), json.dumps(data))


def read_graph(path: Path | str, digest: str | None = None) -> dict[str, Any]:
    """A graph JSON written by `write_graph`; with `digest`, one drawn from that very transcoder set
    (else a StoreError: a graph file of another run or set)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise FormatError(f"cannot read graph {str(path)!r}: {err}") from err
    if not isinstance(data, dict) or not {"metadata", "nodes", "links"} <= set(data):
        raise FormatError(f"{str(path)!r} is not an attribution graph: expected metadata, nodes and links")
    meta = data["metadata"]
    kinds = (
        isinstance(meta, dict)
        and isinstance(meta.get("prompt"), str)
        and isinstance(meta.get("gemmascope") or {}, dict)
        and isinstance(data["nodes"], list)
        and isinstance(data["links"], list)
        and all(isinstance(item, dict) for item in data["nodes"] + data["links"])
    )
    if not kinds:
        raise FormatError(
            f"graph {str(path)!r} is damaged: expected metadata with a prompt, and lists of nodes and links"
        )
    ours = meta.get("gemmascope") or {}
    if digest is not None and ours.get("transcoder_digest") != digest:
        raise StoreError(
            f"graph {str(path)!r} was drawn from another transcoder set (run {ours.get('run') or '?'!r}, digest "
            f"{ours.get('transcoder_digest') or 'none'}), not this run's ({digest}): draw it again here"
        )
    return data


# ---------------------------------------------------------------------------------------------
# The picture


def _for_display(data: dict[str, Any], max_nodes: int, max_edges: int) -> dict[str, Any]:
    """The graph JSON cut to its `max_nodes` most influential inner nodes (features, errors; tokens
    and logits always) and the `max_edges` strongest links among what is left."""
    inner = [n for n in data["nodes"] if n["feature_type"] not in ("embedding", "logit")]
    inner.sort(key=lambda n: n.get("influence") if n.get("influence") is not None else 1.0)
    keep = {n["node_id"] for n in inner[:max_nodes]}
    keep |= {n["node_id"] for n in data["nodes"] if n["feature_type"] in ("embedding", "logit")}
    links = [link for link in data["links"] if link["source"] in keep and link["target"] in keep]
    links = sorted(links, key=lambda link: -abs(link["weight"]))[:max_edges]
    return {**data, "nodes": [n for n in data["nodes"] if n["node_id"] in keep], "links": links}


def plot_graph(
    data: dict[str, Any],
    path: Path | str,
    title: str | None = None,
    max_nodes: int = 48,
    max_edges: int = 240,
) -> Path:
    """The pruned graph as a PNG: columns are token positions, rows the embedding, the layers and
    the logits; feature nodes are circles sized by their activation and shaded by influence, error
    nodes squares; edges are lines, blue excitatory and red inhibitory, as wide as their weight.
    For a readable picture it shows the `max_nodes` most influential feature and error nodes (every
    token and logit) and the `max_edges` strongest edges among them; the JSON keeps them all. The
    12 most influential features are numbered on the plot and named in a key beside it (layer,
    latent, position and explanation); the title gives the prompt, the top outputs and the scores.
    Drawn on a bare matplotlib `Figure` (no pyplot: safe on the server's worker thread)."""
    from matplotlib.figure import Figure

    from gemmascope.evals.report import save_png

    data = _for_display(data, max_nodes, max_edges)
    tokens = data["metadata"]["prompt_tokens"]
    n_layers = max((int(n["layer"]) for n in data["nodes"] if n["feature_type"] == "logit"), default=1) - 1
    xy = _layout(data["nodes"])
    fig = Figure(figsize=(max(8, 1.4 * len(tokens)) + 4.5, 9), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    _draw_edges(ax, data["links"], xy)
    _draw_nodes(ax, data["nodes"], xy)
    _draw_key(ax, data["nodes"], xy, tokens)
    ax.text(1.02, 0.0, LEGEND, transform=ax.transAxes, fontsize=7.5, va="bottom", ha="left", color="#4a5568")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=30, ha="right", fontsize=9)
    ax.set_yticks([-1, *range(n_layers), n_layers + 1])
    ax.set_yticklabels(["emb", *[f"L{i}" for i in range(n_layers)], "logit"], fontsize=8)
    ax.set_ylim(-1.8, n_layers + 3.2)  # room above the outputs for their slanted labels
    ax.set_xlim(-0.7, len(tokens) - 0.1)  # and right of the likeliest one, before the key
    ax.set_title(title or _title(data), fontsize=10, loc="left", parse_math=False)
    ax.grid(axis="y", alpha=0.2)
    path = Path(path)
    with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box, fine
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        save_png(fig, path)
    return path


OUTPUT_SPACING = 0.6  # positions between two outputs on the logit row: each its own label


def _layout(nodes: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each node's (x, y): its position across, its layer up (the embedding at -1), nodes sharing a
    cell spread side by side, the most influential in the middle-left. The outputs (all at the last
    position) spread leftwards along their own row, the likeliest rightmost, so none hides another."""
    xy: dict[str, tuple[float, float]] = {}
    by_cell: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for n in nodes:
        by_cell.setdefault((n["ctx_idx"], n["layer"]), []).append(n)
    for (ctx, layer), cell in by_cell.items():
        y = -1.0 if layer == "E" else float(layer)
        if cell[0]["feature_type"] == "logit":
            cell.sort(key=lambda n: n["token_prob"])
            step = min(OUTPUT_SPACING, (ctx + 0.5) / max(len(cell) - 1, 1))
            for k, n in enumerate(cell):
                xy[n["node_id"]] = (ctx - (len(cell) - 1 - k) * step, y)
            continue
        cell.sort(key=lambda n: n.get("influence") or 0)
        spread = 0.8 / max(len(cell), 1)
        for k, n in enumerate(cell):
            xy[n["node_id"]] = (ctx + (k - (len(cell) - 1) / 2) * spread, y)
    return xy


def _draw_edges(ax: Any, links: list[dict[str, Any]], xy: dict[str, tuple[float, float]]) -> None:
    top = max([abs(link["weight"]) for link in links] or [1.0])
    for link in sorted(links, key=lambda link: abs(link["weight"])):
        (x0, y0), (x1, y1) = xy[link["source"]], xy[link["target"]]
        w = abs(link["weight"]) / top
        color = "#2b6cb0" if link["weight"] > 0 else "#c53030"
        ax.plot([x0, x1], [y0, y1], color=color, alpha=0.15 + 0.6 * w, linewidth=0.3 + 3 * w, zorder=1)


def _draw_nodes(ax: Any, nodes: list[dict[str, Any]], xy: dict[str, tuple[float, float]]) -> None:
    import matplotlib

    oranges = matplotlib.colormaps["Oranges"]
    for n in nodes:
        x, y = xy[n["node_id"]]
        kind = n["feature_type"]
        if kind == "embedding":
            ax.scatter([x], [y], s=120, marker="s", color="#4a5568", zorder=3)
        elif kind == "logit":  # each output named above its diamond, the graph's own in bold
            ax.scatter([x], [y], s=40 + 400 * n["token_prob"], marker="D", color="#2f855a", zorder=3)
            label = _one_line(n["clerp"].removeprefix("Output "))
            ax.annotate(
                label, (x, y), (-2, 9), textcoords="offset points", fontsize=7.5, rotation=35,
                fontweight="bold" if n["is_target_logit"] else "normal", parse_math=False,
            )  # fmt: skip
        elif kind == "mlp reconstruction error":
            ax.scatter([x], [y], s=50, marker="s", color="#a0aec0", edgecolor="#4a5568", zorder=3)
        else:
            shade = 1 - min(1.0, n.get("influence") or 1.0)
            size = 40 + 40 * min(n["activation"] or 0, 10)
            ax.scatter([x], [y], s=size, color=oranges(0.3 + 0.7 * shade), edgecolor="#7b341e", zorder=3)


def _draw_key(
    ax: Any, nodes: list[dict[str, Any]], xy: dict[str, tuple[float, float]], tokens: list[str]
) -> None:
    """Number the 12 most influential features on the plot and name them in a key beside it."""
    labelled = sorted(
        (n for n in nodes if n["feature_type"] == "cross layer transcoder"),
        key=lambda n: n.get("influence") or 1,
    )[:12]
    key = []
    for number, n in enumerate(labelled, 1):
        x, y = xy[n["node_id"]]
        ax.annotate(
            str(number), (x, y), (4, 4), textcoords="offset points", fontsize=7, color="#7b341e", zorder=4
        )
        key.append(f"{number}. L{n['layer']}/{n['node_id'].split('_')[1]} at {tokens[n['ctx_idx']]!r}")
        key += [f"     {line}" for line in _key_label(n.get("clerp") or "")]
    if key:
        ax.text(
            1.02, 1.0, "Most influential features\n" + "\n".join(key), transform=ax.transAxes, fontsize=7.5,
            va="top", ha="left", color="#7b341e", linespacing=1.35, parse_math=False,
        )  # fmt: skip


def _key_label(label: str, width: int = KEY_WIDTH, lines: int = 2) -> list[str]:
    """A feature's label in the key: wrapped at word breaks into at most `lines` lines of `width`
    characters, the last ending in "..." when the label is longer (labels lead with what a latent is
    about, so the start is what to keep)."""
    return textwrap.wrap(label, width, max_lines=lines, placeholder="...")


def _one_line(text: str) -> str:
    """`text` with newlines and tabs written as \\n and \\t (an output token such as "\\n\\n" would
    break the picture's title across lines)."""
    return text.replace("\n", "\\n").replace("\t", "\\t")


def _title(data: dict[str, Any]) -> str:
    """The prompt, the top outputs, the scores and how much of the graph is shown."""
    meta = data["metadata"]
    ours = meta.get("gemmascope", {})
    outputs = sorted(
        (n for n in data["nodes"] if n["feature_type"] == "logit"), key=lambda n: -n["token_prob"]
    )
    said = ", ".join(_one_line(n["clerp"].removeprefix("Output ")) for n in outputs[:3])
    return (
        f"{meta['prompt']!r} -> {said}\nreplacement {ours.get('replacement_score', float('nan')):.2f}, "
        f"completeness {ours.get('completeness_score', float('nan')):.2f}\nshown: the {len(data['nodes'])} "
        f"most influential of {ours.get('n_pruned_nodes', '?')} nodes, the {len(data['links'])} strongest edges"
    )
