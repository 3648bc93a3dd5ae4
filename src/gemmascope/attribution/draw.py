"""The one graph pipeline: attribute a prompt's next token over a transcoder set, prune the graph,
look up the explanations of the pruned graph's features, and write the graph's JSON (circuit-tracer's
schema, `files.graph_json`) and PNG (`files.plot_graph`) under the run's `graphs/`. `gemmascope
attribute` and `POST /v1/graph/generate` both call `draw_graph`; what they print or answer is read off
the `Drawn` it returns.

Knows nothing of the CLI, the server or the feature index: explanations come from the `explain`
callable a caller passes (`opening.OpenRun.explanations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemmascope.attribution.dictionary import Replacing
from gemmascope.attribution.files import (
    feature_node_id,
    graph_json,
    graph_name,
    plot_graph,
    pruned_explanations,
    transcoder_digest,
    write_graph,
)
from gemmascope.attribution.graph import (
    EDGE_THRESHOLD,
    MAX_FEATURE_NODES,
    NODE_THRESHOLD,
    Graph,
    Pruned,
    attribute,
    prune,
)
from gemmascope.attribution.intervene import Node, strongest
from gemmascope.errors import ConfigError
from gemmascope.limits import MAX_GRAPH_TOKENS
from gemmascope.models import LanguageModel

Explain = Callable[[str, list[int]], dict[int, str]]  # (sae_id, latents) -> {latent: explanation}


@dataclass
class Drawn:
    """A graph drawn and written: the graph, its pruning, its JSON (`data`) and where the JSON and
    PNG went, and the explanations of its pruned feature nodes by `(layer, latent)`."""

    graph: Graph
    pruned: Pruned
    data: dict[str, Any]
    path: Path
    png: Path | None
    explanations: dict[tuple[int, int], str]

    @property
    def slug(self) -> str:
        return str(self.data["metadata"]["slug"])

    def kept(self) -> list[int]:
        """The pruned graph's feature nodes (indices into `graph.features`)."""
        return torch.nonzero(self.pruned.nodes[: self.graph.n_features]).squeeze(1).tolist()  # type: ignore[no-any-return]

    def influential(self, n: int = 12) -> list[dict[str, Any]]:
        """The `n` most influential feature nodes kept: `{node_id, layer, pos, latent, token,
        activation, explanation}`."""
        ranked = sorted(self.kept(), key=lambda j: float(self.pruned.cumulative[j]))[:n]
        out = []
        for j in ranked:
            layer, pos, latent = (int(v) for v in self.graph.features[j])
            out.append(
                {
                    "node_id": feature_node_id(layer, latent, pos),
                    "layer": layer,
                    "pos": pos,
                    "latent": latent,
                    "token": self.graph.tokens[pos],
                    "activation": float(self.graph.activations[j]),
                    "explanation": self.explanations.get((layer, latent), ""),
                }
            )
        return out

    def strongest(self, n: int, against: str | None = None) -> list[Node]:
        """The `n` kept feature nodes the graph says hold the answer (output 0) up most, each on its
        own (`intervene.strongest`), or its lead over the output token `against`."""
        index = None
        if against is not None:
            if against not in self.graph.logit_tokens[1:]:
                raise ConfigError(
                    f"output {against!r} is not one of the graph's other outputs: {self.graph.logit_tokens[1:]}"
                )
            index = self.graph.logit_tokens.index(against, 1)
        return strongest(self.graph, n, index, self.kept())


def draw_graph(
    model: LanguageModel,
    transcoders: Replacing,
    prompt: str,
    graph_dir: Path | str,
    *,
    slug: str | None = None,
    node_threshold: float = NODE_THRESHOLD,
    edge_threshold: float = EDGE_THRESHOLD,
    max_feature_nodes: int | None = MAX_FEATURE_NODES,
    max_tokens: int = MAX_GRAPH_TOKENS,
    explain: Explain | None = None,
    run: str = "",
    digest: str | None = None,
    png: bool = True,
    progress: bool = True,
) -> Drawn:
    """Attribute `prompt` over `transcoders` (one per layer, or a CLT; `graph.attribute`), prune it
    (`graph.prune`), name its kept features by `explain(sae_id, latents)`, and write
    `graph_dir/SLUG.json` (and `SLUG.png` with `png`). `slug` defaults to one made from the prompt
    (`files.graph_name`: never another prompt's graph's); `digest` to the set's
    (`files.transcoder_digest`). ConfigError: a bad slug or one holding another prompt's graph, a
    threshold or node cap out of range, an empty prompt or one over `max_tokens` tokens."""
    slug = graph_name(graph_dir, prompt, slug)
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} {value} must be between 0 and 1 (a share of the influence)")
    graph = attribute(
        model,
        transcoders,
        prompt,
        max_feature_nodes=max_feature_nodes,
        max_tokens=max_tokens,
        progress=progress,
    )
    pruned = prune(graph, node_threshold, edge_threshold)
    explanations = pruned_explanations(graph, pruned, explain or (lambda _key, _latents: {}))
    digest = transcoder_digest(transcoders) if digest is None else digest
    data = graph_json(graph, slug, pruned, run=run, digest=digest, explanations=explanations)
    path = write_graph(Path(graph_dir) / f"{slug}.json", data)
    picture = plot_graph(data, path.with_suffix(".png")) if png else None
    return Drawn(graph, pruned, data, path, picture, explanations)
