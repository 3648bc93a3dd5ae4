"""Interventions on an attribution graph: set chosen feature nodes (a transcoder latent at one
position) to a value, 0 to switch them off, and compare what the graph predicts for the output
logits with what the model then does. Owns the prediction (`predict`: through the graph's edges,
every feature downstream following linearly, attention and norms frozen, as the replacement model
has them) and the measurement (`measure`: the real model with each chosen latent clamped at its
position, `steer.Intervention`; a transcoder's latent is read from its layer's MLP input and its
change written into the MLP's output; everything else free).

Logit changes are of the demeaned logit (logit minus the mean logit), what the graph's edges are in;
the measurement also gives each output token's probability before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gemmascope.attribution.graph import Graph
from gemmascope.errors import ConfigError
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE
from gemmascope.steer import Intervention, steering

Node = tuple[int, int, int]  # (layer, position, latent)


def feature_index(graph: Graph, nodes: Sequence[Node]) -> Tensor:
    """`[len(nodes)]`: the graph's feature-node indices of `(layer, position, latent)` triples; a
    ConfigError names any triple that is not an active feature of the graph."""
    lookup = {tuple(int(v) for v in row): i for i, row in enumerate(graph.features.tolist())}
    missing = [n for n in nodes if tuple(n) not in lookup]
    if missing:
        raise ConfigError(
            f"feature nodes {missing} (layer, position, latent) are not active features of the graph of "
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
    index = feature_index(graph, nodes)
    n_feat = graph.n_features
    acts = graph.activations.clamp_min(1e-12)
    unit = graph.adjacency[:, :n_feat] / acts  # [N, n_feat]: effect per unit of each feature's activation
    delta = torch.zeros(n_feat)
    delta[index] = value - graph.activations[index]
    clamped = torch.zeros(n_feat, dtype=torch.bool)
    clamped[index] = True
    direct = unit[graph.logit_start :] @ delta
    for layer in range(graph.n_layers):
        here = (graph.features[:, 0] == layer) & ~clamped
        if here.any():
            # a feature pushed below 0 switches off (JumpReLU): it can lose at most its activation
            delta[here] = torch.maximum(unit[:n_feat][here] @ delta, -graph.activations[here])
    return {"direct": direct, "total": unit[graph.logit_start :] @ delta}


def measure(
    model: LanguageModel, transcoders: Sequence[SAE], graph: Graph, nodes: Sequence[Node], value: float = 0.0
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
    clamps = [
        Intervention(transcoders[layer], latent, "clamp", value, positions=(pos,))
        for layer, pos, latent in nodes
    ]
    with steering(model, clamps):
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
