"""Attribution graphs: which features, at which positions, made the model say this next token, and
through which others. Owns `attribute()` (the direct-effect edges of the replacement model between
token embeddings, active features of a transcoder per layer or of a cross-layer transcoder, error
nodes and the top output logits), the `Graph`
it returns (circuit-tracer's node order and meaning, so the two can be compared entry by entry),
pruning by node and edge influence, and the replacement and completeness scores.

Conventions (those of circuit-tracer 0.5, the field's reference): rows of the adjacency matrix are
targets, columns sources; nodes are the active features (sorted by layer, position, latent), then one
error node per (layer, position), then one token node per position, then the logits. An edge is
`read_t · J · write_s` in the frozen linear model: a feature target reads with its encoder column
(its pre-activation without b_enc), a logit target with its demeaned unembedding row (logit minus
the mean logit, after the frozen final norm); a source writes its activation times its decoder row,
its error vector or its (scaled) token embedding; a cross-layer transcoder's feature is one node
whose edge sums what it writes into every layer from its own on (Σ_t read · J · write_{s→t}).
Features and errors at the first position (BOS)
are left out. Two differences, on purpose. A transcoder has no feature where its input is massive
(Gemma 3's massive activations, `replacement.massive_positions`, the rule evals and the index
follow); its error node there is the MLP's whole output, left exact (circuit-tracer has no such
rule: `benchmarks/attribute.py` compares the two on transcoders without a norm limit). And
circuit-tracer's nnsight backend writes the token embedding without Gemma's √d_model scale, so its
token edges are √d_model times too small (BENCHMARKS.md, "Attribution graphs"); here they are the
embedding's real effect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.attribution.dictionary import Dictionary, Replacing, dictionary_of
from gemmascope.attribution.replacement import Prompt, ReplacementModel, capture_prompt, massive_positions
from gemmascope.errors import ConfigError
from gemmascope.limits import MAX_GRAPH_TOKENS
from gemmascope.models import LanguageModel, prompt_tokens

# Feature nodes a graph keeps by default (the most influential): its N x N float32 adjacency is then
# at most ~0.3 GB and pruning holds a few of them. All active features of a 64-token prompt at L0 45
# over 18 layers would be ~52k nodes, ~11 GB each.
MAX_FEATURE_NODES = 8192
MAX_N_LOGITS = 10  # circuit-tracer's defaults for the output nodes
DESIRED_LOGIT_PROB = 0.95
INFLUENCE_BLOCK = 256  # rows read at a time while ranking features by influence
NODE_THRESHOLD = 0.8  # pruning: keep the nodes holding this share of the influence on the logits
EDGE_THRESHOLD = 0.98  # and the edges holding this share of it


@dataclass
class Graph:
    """An attribution graph of one prompt. `adjacency [N, N]` (rows targets, columns sources) over
    N = n_features + n_layers·n_pos + n_pos + n_logits nodes, in that order; `features [n_features,
    3]` (layer, position, latent) and `activations [n_features]` of the feature nodes; `logit_ids`
    and `logit_probs [n_logits]` of the output nodes. `transcoders` names the set (for the files)."""

    prompt: str
    ids: Tensor  # [n_pos] token ids, BOS first
    tokens: list[str]  # [n_pos] their text
    features: Tensor  # [n_features, 3] int64: layer, position, latent
    activations: Tensor  # [n_features]
    adjacency: Tensor  # [N, N] float32
    logit_ids: Tensor  # [n_logits]
    logit_probs: Tensor  # [n_logits]
    logit_tokens: list[str]
    n_layers: int
    model_name: str = ""
    transcoders: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_feature_nodes: int | None = None  # the cap it was drawn with

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def node(self, index: int) -> dict[str, Any]:
        """What node `index` is: `{"kind": "feature", "layer", "pos", "latent", "activation"}`, an
        error (`layer`, `pos`), a token (`pos`, `token`) or a logit (`token`, `prob`)."""
        if index < self.error_start:
            layer, pos, latent = (int(v) for v in self.features[index])
            act = float(self.activations[index])
            return {"kind": "feature", "layer": layer, "pos": pos, "latent": latent, "activation": act}
        if index < self.token_start:
            layer, pos = divmod(index - self.error_start, self.n_pos)
            return {"kind": "error", "layer": layer, "pos": pos}
        if index < self.logit_start:
            pos = index - self.token_start
            return {"kind": "token", "pos": pos, "token": self.tokens[pos]}
        k = index - self.logit_start
        return {"kind": "logit", "token": self.logit_tokens[k], "prob": float(self.logit_probs[k])}


# ---------------------------------------------------------------------------------------------
# Building a graph


def attribute(
    model: LanguageModel,
    transcoders: Replacing,
    prompt: str,
    *,
    max_n_logits: int = MAX_N_LOGITS,
    desired_logit_prob: float = DESIRED_LOGIT_PROB,
    max_feature_nodes: int | None = MAX_FEATURE_NODES,
    batch_size: int = 64,
    max_tokens: int = MAX_GRAPH_TOKENS,
    first_position: int = 1,
    progress: bool = True,
) -> Graph:
    """The attribution graph of `prompt`'s next token over `transcoders` (one per layer, in order,
    or a cross-layer transcoder):
    every active feature's direct effect on every other node it can reach and on the top logits
    (the fewest whose probabilities sum to `desired_logit_prob`, at most `max_n_logits`). At most
    `max_feature_nodes` features become nodes (None: every active feature), chosen as circuit-tracer
    does (the most influential on the logits so far, re-ranked as rows are computed). Features and errors at
    positions before `first_position` (BOS) are left out. Prompts over `max_tokens` tokens are
    refused (a ConfigError saying so)."""
    started = time.monotonic()
    if max_feature_nodes is not None and max_feature_nodes < 1:
        raise ConfigError(
            f"max_feature_nodes {max_feature_nodes} must be at least 1 (or None: every feature)"
        )
    ids = prompt_ids(model, prompt, max_tokens)
    captured = capture_prompt(model, ids)
    dictionary = dictionary_of(model, transcoders)  # checks the set: one transcoder per layer, or a CLT
    rm = ReplacementModel(model, dictionary, captured)
    active, acts, errors = _components(dictionary, captured, first_position)
    edges = _Edges(rm, dictionary, captured, active, acts, errors)
    logit_ids, logit_probs = _logit_targets(captured.logits, max_n_logits, desired_logit_prob)
    unembed = model.hf.lm_head.weight.detach().float().cpu()  # [vocab, d]
    logit_vectors = unembed[logit_ids] - unembed.mean(0)  # [n_logits, d] demeaned
    n_layers, n_pos, n_logits = dictionary.n_layers, captured.ids.shape[0], logit_ids.shape[0]
    logit_rows = edges.rows(
        torch.full((n_logits,), n_layers), torch.full((n_logits,), n_pos - 1), logit_vectors
    )
    selected, feature_rows, rows = _feature_rows(
        edges, logit_rows, logit_probs, max_feature_nodes, batch_size, progress
    )
    adjacency = _assemble(feature_rows, rows, logit_rows, selected, active.shape[0], n_layers, n_pos)
    tokenizer = model.tokenizer
    return Graph(
        prompt=prompt,
        ids=captured.ids,
        tokens=[tokenizer.decode([int(t)]) for t in captured.ids],
        features=active[selected],
        activations=acts[selected],
        adjacency=adjacency,
        logit_ids=logit_ids,
        logit_probs=logit_probs,
        logit_tokens=[tokenizer.decode([int(t)]) for t in logit_ids],
        n_layers=n_layers,
        model_name=model.name,
        transcoders=dictionary.names,
        seconds=time.monotonic() - started,
        max_feature_nodes=max_feature_nodes,
    )


class _Edges:
    """The edges into a batch of reads (feature encoders or logit directions at a layer and
    position) from every source: the active features, the error nodes and the token embeddings."""

    def __init__(
        self,
        rm: ReplacementModel,
        dictionary: Dictionary,
        captured: Prompt,
        active: Tensor,
        acts: Tensor,
        errors: list[Tensor],
    ) -> None:
        self.rm, self.captured, self.active, self.acts, self.errors = rm, captured, active, acts, errors
        self.n_layers, self.n_pos, self.n_active = dictionary.n_layers, captured.ids.shape[0], active.shape[0]
        self.n_sources = self.n_active + self.n_layers * self.n_pos + self.n_pos
        self.decoders = dictionary.decoders  # per layer [width, n_targets, d]
        self.encoders = dictionary.encoders
        self.layer_rows = [torch.nonzero(active[:, 0] == layer).squeeze(1) for layer in range(self.n_layers)]

    def rows(self, read_layers: Tensor, read_pos: Tensor, vectors: Tensor) -> Tensor:
        """`[B, n_sources]`: the edges into a batch of reads from every source (none from a layer at
        or above the batch's highest read: those stay 0)."""
        g_embed, g_out = self.rm.backward(read_layers, read_pos, vectors)
        out = torch.zeros(read_layers.shape[0], self.n_sources)
        n_active, n_pos = self.n_active, self.n_pos
        for layer in range(min(int(read_layers.max()), self.n_layers)):
            idx = self.layer_rows[layer]
            if idx.numel():
                out[:, idx] = self._feature_edges(layer, idx, g_out) * self.acts[idx]
            start = n_active + layer * n_pos
            out[:, start : start + n_pos] = (g_out[layer] * self.errors[layer]).sum(-1)
        out[:, n_active + self.n_layers * n_pos :] = (g_embed * self.captured.embeds).sum(-1)
        return out

    def _feature_edges(self, layer: int, idx: Tensor, g_out: list[Tensor]) -> Tensor:
        """`[B, len(idx)]`: each active feature `idx` of `layer` per unit of activation, its decoders
        into every layer it writes (from its own on) dotted with the reads' gradients there, at its
        position: one product per position, `[B, n_targets·d] @ [n_targets·d, f]`."""
        pos, latent = self.active[idx, 1], self.active[idx, 2]
        decoders = self.decoders[layer]  # [width, n_targets, d]
        span = decoders.shape[1] * decoders.shape[2]
        g = torch.stack(g_out[layer : layer + decoders.shape[1]], 2)  # [B, n, n_targets, d]
        proj = torch.empty(g.shape[0], idx.numel())
        for p in pos.unique().tolist():
            here = pos == p
            proj[:, here] = g[:, p].reshape(-1, span) @ decoders[latent[here]].reshape(-1, span).t()
        return proj

    def feature_reads(self, chunk: Tensor) -> Tensor:
        """`[len(chunk), n_sources]`: the edges into the features `chunk` (their encoder columns)."""
        layers_, pos_ = self.active[chunk, 0], self.active[chunk, 1]
        vectors = self.encoders[0].new_empty(chunk.numel(), self.captured.embeds.shape[1])
        for j, (layer, latent) in enumerate(
            zip(layers_.tolist(), self.active[chunk, 2].tolist(), strict=True)
        ):
            vectors[j] = self.encoders[layer][:, latent]
        return self.rows(layers_, pos_, vectors)


def _feature_rows(
    edges: _Edges,
    logit_rows: Tensor,
    logit_probs: Tensor,
    max_feature_nodes: int | None,
    batch_size: int,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The feature nodes kept (`[k]` indices of the active features, sorted), the rows computed
    `[k, n_sources]` (in the order computed) and which row is each kept feature's `[k]`: every active
    feature, or the `max_feature_nodes` most influential on the logits, found as circuit-tracer does
    (re-ranked as rows are computed)."""
    n_active = edges.n_active
    limit = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    feature_rows = torch.zeros(limit, edges.n_sources)  # one row per feature node, in the order computed
    row_of = torch.full((n_active,), -1, dtype=torch.long)  # feature -> its row, -1: not computed
    computed_features = torch.zeros(limit, dtype=torch.long)  # row -> its feature
    visited = torch.zeros(n_active, dtype=torch.bool)
    filled = 0
    with tqdm(total=limit, desc="attribution", unit="feature", disable=not progress) as bar:
        while int(visited.sum()) < limit:
            if limit == n_active:
                order = torch.nonzero(~visited).squeeze(1)
            else:  # circuit-tracer's order: the most influential on the logits so far
                influence = _partial_influence(
                    feature_rows[:filled], computed_features[:filled], edges.active[computed_features[:filled], 0],
                    logit_rows, logit_probs, n_active,
                )  # fmt: skip
                influence[visited] = -1
                order = influence.argsort(descending=True)[: int((~visited).sum())]
            order = order[: min(4 * batch_size, limit - int(visited.sum()))]
            # batches of reads alike in position and layer: each runs the layers and positions it needs
            order = order[
                torch.argsort(edges.active[order, 1] * (edges.n_layers + 1) + edges.active[order, 0])
            ]
            for chunk in order.split(batch_size):
                feature_rows[filled : filled + chunk.numel()] = edges.feature_reads(chunk)
                row_of[chunk] = torch.arange(filled, filled + chunk.numel())
                computed_features[filled : filled + chunk.numel()] = chunk
                filled += chunk.numel()
                visited[chunk] = True
                bar.update(chunk.numel())
    selected = torch.nonzero(visited).squeeze(1)  # sorted: the graph's feature order
    return selected, feature_rows, row_of[selected]


def prompt_ids(model: LanguageModel, prompt: str, max_tokens: int = MAX_GRAPH_TOKENS) -> Tensor:
    """`[n]` token ids of `prompt` with BOS first (`models.prompt_tokens`); a ConfigError for an empty
    prompt or one of more than `max_tokens` tokens after BOS (the CPU budget of a graph)."""
    try:
        return prompt_tokens(model, prompt, max_tokens)[0].cpu()
    except ConfigError as err:
        if "empty" in str(err):
            raise ConfigError("the prompt is empty: give the text whose next token to explain") from None
        raise ConfigError(
            f"{err}: attribution graphs take at most {max_tokens} tokens here (nodes grow with positions x "
            "L0 x layers, and so do time and memory on a CPU): shorten it"
        ) from None


def _components(
    dictionary: Dictionary, prompt: Prompt, first_position: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The active features `[n_active, 3]` (layer, position, latent; sorted), their activations
    `[n_active]`, and each layer's error vectors `[n, d]` (the MLP output minus the transcoder's
    prediction, skip connection and b_dec included), zero before `first_position`. At a position
    where a transcoder's input is massive (`replacement.massive_positions`) it has no active feature
    (`sae.encode_inputs`) and its error is the whole MLP output (the model's own, left exact)."""
    active, values, errors = [], [], []
    massive = massive_positions(dictionary, prompt)
    predicted = dictionary.predict(prompt.mlp_in)
    with torch.no_grad():
        for layer in range(dictionary.n_layers):
            f = dictionary.encode(layer, prompt.mlp_in[layer])  # [n, width], zero at massive inputs
            f[:first_position] = 0
            pos, latent = torch.nonzero(f, as_tuple=True)
            active.append(torch.stack([torch.full_like(pos, layer), pos, latent], 1))
            values.append(f[pos, latent])
            error = prompt.mlp_out[layer] - predicted[layer]
            error[massive[layer]] = prompt.mlp_out[layer][massive[layer]]
            error[:first_position] = 0
            errors.append(error)
    return torch.cat(active), torch.cat(values), errors


def _logit_targets(logits: Tensor, max_n: int, desired: float) -> tuple[Tensor, Tensor]:
    """The fewest top tokens whose probabilities reach `desired`, at most `max_n`: `(ids, probs)`."""
    probs = torch.softmax(logits.float(), -1)
    top_p, top_i = probs.topk(max_n)
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired))) + 1
    return top_i[:cutoff], top_p[:cutoff]


def _partial_influence(
    feature_rows: Tensor,
    features: Tensor,
    layers: Tensor,
    logit_rows: Tensor,
    logit_probs: Tensor,
    n_active: int,
) -> Tensor:
    """`[n_active]`: each feature's influence on the logits through the rows computed so far
    (`feature_rows [k, n_sources]`, row i that of feature `features[i]` at layer `layers[i]`): the
    logits' weights spread back along the normalised |edges| (circuit-tracer's influence), in one
    sweep from the top layer down. A feature reads only what lower layers wrote, so when a layer's
    rows are reached their own influence is complete; each row is read once, a block at a time
    (no copy of the rows, which are most of a long prompt's memory)."""
    logits_normed = logit_rows.abs()
    logits_normed /= logits_normed.sum(1, keepdim=True).clamp_min(1e-10)
    spread = logit_probs @ logits_normed  # [n_sources]: every node's influence so far
    for layer in layers.unique().flip(0).tolist():
        here = torch.nonzero(layers == layer).squeeze(1)
        weights = spread[features[here]]  # complete: only higher layers' rows reach these features
        for start in range(0, here.numel(), INFLUENCE_BLOCK):
            block = feature_rows[here[start : start + INFLUENCE_BLOCK]].abs_()
            w = weights[start : start + INFLUENCE_BLOCK] / block.sum(1).clamp_min(1e-10)
            spread += w @ block
    return spread[:n_active]


def _assemble(
    feature_rows: Tensor,
    rows: Tensor,
    logit_rows: Tensor,
    selected: Tensor,
    n_active: int,
    n_layers: int,
    n_pos: int,
) -> Tensor:
    """The graph's `[N, N]` adjacency in circuit-tracer's node order, over the `selected` features
    (sorted; `feature_rows[rows]` are their rows, in that order), read out of the rows in place of
    a reordered copy of them (the rows are most of a long prompt's memory)."""
    n_feat, n_logits = selected.numel(), logit_rows.shape[0]
    n = n_feat + (n_layers + 1) * n_pos + n_logits
    columns = torch.cat([selected, torch.arange(n_active, n_active + (n_layers + 1) * n_pos)])
    adjacency = torch.zeros(n, n)
    adjacency[:n_feat, : columns.numel()] = feature_rows[rows[:, None], columns[None, :]]
    adjacency[n - n_logits :, : columns.numel()] = logit_rows[:, columns]
    return adjacency


# ---------------------------------------------------------------------------------------------
# Influence, pruning, scores (circuit-tracer's definitions)


def normalized(adjacency: Tensor) -> Tensor:
    """`|A|` with each row summing to 1 (rows with no edges stay 0)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(normed: Tensor, weights: Tensor) -> Tensor:
    """`[N]`: `w A + w A² + …` (the graph has no cycles, so the series ends)."""
    current = weights @ normed
    total = current.clone()
    for _ in range(10_000):
        if not current.any():
            break
        current = current @ normed
        total += current
    return total


def logit_weights(graph: Graph) -> Tensor:
    """`[N]`: the logit nodes' probabilities, 0 elsewhere (what influence is measured against)."""
    weights = torch.zeros(graph.adjacency.shape[0])
    weights[graph.logit_start :] = graph.logit_probs
    return weights


def _threshold(scores: Tensor, share: float) -> float:
    """The score above which the top scores hold `share` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(share)).clamp(max=ordered.numel() - 1))
    return float(ordered[index])


@dataclass
class Pruned:
    """Which nodes and edges of a graph to show: `nodes [N]` and `edges [N, N]` (bool), and each
    node's `cumulative [N]` share of the influence held by nodes at least as influential."""

    nodes: Tensor
    edges: Tensor
    cumulative: Tensor
    node_threshold: float = NODE_THRESHOLD
    edge_threshold: float = EDGE_THRESHOLD


def prune(
    graph: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD
) -> Pruned:
    """circuit-tracer's pruning: keep the nodes holding `node_threshold` of the influence on the
    logits (tokens and logits always), then the edges holding `edge_threshold` of it, then drop
    feature and error nodes left without a kept edge out (features also without one in), repeatedly."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} {value!r} must be between 0 and 1 (a share of the influence)")
    weights = logit_weights(graph)
    tail = graph.token_start  # tokens and logits from here on
    node_influence = influence(normalized(graph.adjacency), weights)
    nodes = node_influence >= _threshold(node_influence, node_threshold)
    nodes[tail:] = True
    kept = graph.adjacency.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    normed = normalized(kept)
    edge_scores = normed * (influence(normed, weights) + weights)[:, None]
    edges = edge_scores >= _threshold(edge_scores, edge_threshold)
    n_feat = graph.n_features
    before = nodes.clone()
    nodes[:tail] &= edges[:, :tail].any(0)  # features and errors need a kept edge out
    nodes[:n_feat] &= edges[:n_feat].any(1)  # features one in
    while not torch.equal(nodes, before):
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:tail] &= edges[:, :tail].any(0)
        nodes[:n_feat] &= edges[:n_feat].any(1)
    order = node_influence.argsort(descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = node_influence[order].cumsum(0) / node_influence.sum().clamp_min(1e-30)
    return Pruned(nodes, edges, cumulative, node_threshold, edge_threshold)


def scores(graph: Graph) -> tuple[float, float]:
    """`(replacement, completeness)`: the share of the logits' influence that ends in tokens rather
    than error nodes, and the influence-weighted share of every node's input that is not error."""
    normed = normalized(graph.adjacency)
    weights = logit_weights(graph)
    infl = influence(normed, weights)
    errors = slice(graph.error_start, graph.token_start)
    tokens = slice(graph.token_start, graph.logit_start)
    token_part, error_part = float(infl[tokens].sum()), float(infl[errors].sum())
    replacement = token_part / max(token_part + error_part, 1e-30)
    non_error = 1 - normed[:, errors].sum(1)
    weight = infl + weights
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-30))
    return replacement, completeness
