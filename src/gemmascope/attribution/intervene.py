"""Interventions on an attribution graph: set chosen feature nodes (a transcoder latent at one
position) to a value, 0 to switch them off, and compare what the graph predicts for the output
logits with what the model then does. Owns the choice of nodes (`strongest`: those the graph says
hold the answer up, or its lead over another output), the prediction (`predict`: through the graph's edges,
every feature downstream following linearly, attention and norms frozen, as the replacement model
has them) and the measurement (`measure`: the real model with each chosen latent clamped at its
position, `steer.Intervention`; a transcoder's latent is read from its layer's MLP input and its
change written into the MLP's output, a cross-layer transcoder's into every layer it writes,
`clt.clamp_clt`; everything else free).

Logit changes are of the demeaned logit (logit minus the mean logit), what the graph's edges are in;
the measurement also gives each output token's probability before and after (`intervene_nodes`: both side
by side). Nodes are named as the graph JSON names them (`files.parse_node`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from gemmascope.attribution.dictionary import Replacing
from gemmascope.attribution.graph import Graph
from gemmascope.clt import CrossLayerTranscoder, clamp_clt
from gemmascope.errors import ConfigError
from gemmascope.models import LanguageModel
from gemmascope.steer import Intervention, steering
from gemmascope.values import finite32

Node = tuple[int, int, int]  # (layer, position, latent)
STRONGEST_BATCH = 256  # candidates propagated at once by `strongest` ([n_features, 256] floats)


def feature_index(graph: Graph, nodes: Sequence[Node]) -> Tensor:
    """`[len(nodes)]`: the graph's feature-node indices of `(layer, position, latent)` triples; a
    ConfigError names any triple that is not an active feature of the graph."""
    lookup = {tuple(int(v) for v in row): i for i, row in enumerate(graph.features.tolist())}
    missing = [n for n in nodes if tuple(n) not in lookup]
    if missing:
        named = ", ".join(f"{layer}_{latent}_{pos}" for layer, pos, latent in missing)
        raise ConfigError(
            f"feature nodes {named} (LAYER_LATENT_POSITION) are not active features of the graph of "
            f"{graph.prompt!r}; pick nodes the graph shows"
        )
    if not nodes:
        raise ConfigError("no feature nodes to intervene on: give at least one (layer, position, latent)")
    return torch.tensor([lookup[tuple(n)] for n in nodes])


def predict(graph: Graph, nodes: Sequence[Node], value: float = 0.0) -> dict[str, Tensor]:
    """The change of every output node's demeaned logit when the feature `nodes` are set to `value`:
    `direct` (their direct edges only) and `total` (through the graph: each downstream feature's
    pre-activation moves by its incoming edges, and it moves its own targets in proportion to its
    activation, in layer order; one pushed below 0 switches off). Returns `[n_logits]` tensors.
    Features that are not active on the prompt stay off, and attention and norms stay frozen: where
    those matter, the measured change differs."""
    value = finite32(value, "node value")
    index = feature_index(graph, nodes)
    delta = torch.zeros(graph.n_features, 1)
    delta[index, 0] = value - graph.activations[index]
    clamped = torch.zeros(graph.n_features, 1, dtype=torch.bool)
    clamped[index, 0] = True
    direct, total = _propagate(graph, _unit(graph), delta, clamped)
    return {"direct": direct[:, 0], "total": total[:, 0]}


def _unit(graph: Graph) -> Tensor:
    """`[N, n_features]`: each edge from a feature per unit of that feature's activation."""
    return graph.adjacency[:, : graph.n_features] / graph.activations.clamp_min(1e-12)


def _propagate(graph: Graph, unit: Tensor, delta: Tensor, clamped: Tensor) -> tuple[Tensor, Tensor]:
    """`predict` for C interventions at once: `delta [n_features, C]` the set features' changes,
    `clamped [n_features, C]` which features each sets, `unit` from `_unit`. Returns the direct and
    total changes of the output logits, `[n_logits, C]` each."""
    n_feat = graph.n_features
    direct = unit[graph.logit_start :] @ delta
    delta = delta.clone()
    for layer in range(graph.n_layers):
        here = graph.features[:, 0] == layer
        if here.any():
            # a feature pushed below 0 switches off (JumpReLU): it can lose at most its activation
            moved = torch.maximum(unit[:n_feat][here] @ delta, -graph.activations[here, None])
            delta[here] = torch.where(clamped[here], delta[here], moved)
    return direct, unit[graph.logit_start :] @ delta


def strongest(
    graph: Graph, n: int, against: int | None = None, candidates: Sequence[int] | None = None
) -> list[Node]:
    """The `n` feature nodes whose switching off the graph predicts to lower the answer's (output 0)
    demeaned logit most, each on its own (`predict`'s total), or, with `against` (an output node's
    index), the answer's margin over that output: the nodes to switch off to make the model say it
    instead. `candidates` (feature indices, e.g. the pruned graph's) limits the search; by default
    every feature is tried. Nodes predicted to help are never returned, so the list can be shorter
    than `n`."""
    if n < 1:
        raise ConfigError(f"the number of nodes to pick, {n}, must be at least 1")
    if against is not None and not 0 < against < len(graph.logit_tokens):
        raise ConfigError(
            f"output {against} to compare the answer with is not one of the graph's outputs 1.."
            f"{len(graph.logit_tokens) - 1} ({graph.logit_tokens[1:]})"
        )
    pool = torch.arange(graph.n_features) if candidates is None else torch.as_tensor(list(candidates))
    if len(pool) and (
        int(pool.min()) < 0 or int(pool.max()) >= graph.n_features or len(set(pool.tolist())) < len(pool)
    ):
        raise ConfigError(
            f"candidates must be distinct feature indices 0..{graph.n_features - 1} of the graph of {graph.prompt!r}"
        )
    unit = _unit(graph)
    effects = torch.zeros(len(pool))
    for start in range(0, len(pool), STRONGEST_BATCH):  # one column per candidate, switched off
        chunk = pool[start : start + STRONGEST_BATCH]
        cols = torch.arange(len(chunk))
        delta = torch.zeros(graph.n_features, len(chunk))
        delta[chunk, cols] = -graph.activations[chunk]
        clamped = torch.zeros(graph.n_features, len(chunk), dtype=torch.bool)
        clamped[chunk, cols] = True
        total = _propagate(graph, unit, delta, clamped)[1]  # [n_logits, C]
        effects[start : start + len(chunk)] = total[0] - (total[against] if against is not None else 0.0)
    ranked = torch.argsort(effects)[:n]
    picked = graph.features[pool[ranked[effects[ranked] < 0]]].tolist()
    return [(layer, pos, latent) for layer, pos, latent in picked]


def measure(
    model: LanguageModel, transcoders: Replacing, graph: Graph, nodes: Sequence[Node], value: float = 0.0
) -> dict[str, Any]:
    """Run the prompt with the feature `nodes` set to `value` in the real model and return, for the
    graph's output tokens: `clean` and `changed` demeaned logits and probabilities `[n_logits]`,
    `delta` (changed − clean demeaned logits) and the new top token."""
    feature_index(graph, nodes)  # every node must be one of the graph's
    ids = graph.ids[None].to(model.device)

    def last_logits() -> Tensor:
        with torch.no_grad():
            out: Tensor = model.hf(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
        return out

    clean = last_logits()
    if isinstance(transcoders, CrossLayerTranscoder):  # a latent writes every layer from its own on
        edit: AbstractContextManager[None] = clamp_clt(model, transcoders, nodes, value)
    else:
        edit = steering(
            model,
            [
                Intervention(transcoders[layer], latent, "clamp", value, positions=(pos,))
                for layer, pos, latent in nodes
            ],
        )
    with edit:
        changed = last_logits()
    k = graph.logit_ids

    def demeaned(logits: Tensor) -> Tensor:
        return logits[k] - logits.mean()

    top = int(changed.argmax())
    return {
        "clean": demeaned(clean),
        "changed": demeaned(changed),
        "delta": demeaned(changed) - demeaned(clean),
        "clean_probs": torch.softmax(clean, -1)[k],
        "changed_probs": torch.softmax(changed, -1)[k],
        "top_token": model.tokenizer.decode([top]),
        "top_prob": float(torch.softmax(changed, -1)[top]),
    }


def intervene_nodes(
    model: LanguageModel, transcoders: Replacing, graph: Graph, nodes: Sequence[Node], value: float = 0.0
) -> dict[str, Any]:
    """`predict` beside `measure` for the graph's outputs, as `gemmascope attribute --ablate` prints
    them and `POST /v1/graph/SLUG/intervene` answers: `{"logits": [{token, predicted,
    predicted_direct, measured, prob_before, prob_after}], "top_token", "top_prob"}` (demeaned
    logit changes; probabilities before and after)."""
    predicted = predict(graph, nodes, value)
    measured = measure(model, transcoders, graph, nodes, value)
    return {
        "logits": [
            {
                "token": token,
                "predicted": float(predicted["total"][k]),
                "predicted_direct": float(predicted["direct"][k]),
                "measured": float(measured["delta"][k]),
                "prob_before": float(measured["clean_probs"][k]),
                "prob_after": float(measured["changed_probs"][k]),
            }
            for k, token in enumerate(graph.logit_tokens)
        ],
        "top_token": measured["top_token"],
        "top_prob": measured["top_prob"],
    }
