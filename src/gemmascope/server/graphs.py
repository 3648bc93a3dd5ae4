"""Attribution graphs over HTTP (UI.md, Graph page): `GET /v1/graph/list` (the run's graphs and
whether it can draw new ones: a transcoder per layer), `POST /v1/graph/generate` (draw the graph of a
prompt, written to `RUN/graphs/SLUG.json` in circuit-tracer's schema), `GET /v1/graph/{slug}` (that
JSON, refused when drawn from another transcoder set) and `POST /v1/graph/{slug}/intervene` (set
feature nodes to a value: the graph's predicted change of each output logit beside the measured
one). Graph work waits in the model queue; the last few graphs stay in memory for interventions.

Knows nothing of how graphs are computed: it calls `attribution`.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from gemmascope.attribution import (
    MAX_FEATURE_NODES,
    MAX_PROMPT_TOKENS,
    Graph,
    attribute,
    prune,
    transcoder_set,
)
from gemmascope.attribution.files import (
    check_slug,
    graph_json,
    graph_slug,
    pruned_explanations,
    read_graph,
    transcoder_digest,
    write_graph,
)
from gemmascope.attribution.intervene import measure, predict
from gemmascope.errors import GemmaScopeError, StoreError
from gemmascope.sae import SAE
from gemmascope.server.errors import ApiError
from gemmascope.server.lookup import Body, Number, QueueDep, RunDep
from gemmascope.server.run import MAX_PROMPT_CHARS, Run

MAX_GRAPH_TOKENS = 32  # prompt tokens after BOS one graph request may take (time grows with them)
MAX_INTERVENE_NODES = 64
# A feature node id, LAYER_LATENT_POSITION: ASCII digits only ('²'.isdigit() is True, int('²') fails)
# and at most 9 of them (int() of thousands of digits is slow, then refused).
_NODE_ID = re.compile(r"([0-9]{1,9})_([0-9]{1,9})_([0-9]{1,9})")
_KEPT_GRAPHS = 2  # graphs kept in memory for interventions (each up to ~0.3 GB at the node cap)

router = APIRouter()


class _Graphs:
    """The run's transcoder set (loaded on first use) and the last graphs drawn, by slug."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transcoders: list[SAE] | None = None
        self.problem: str | None = None
        self.digest = ""
        self.graphs: OrderedDict[str, Graph] = OrderedDict()

    def load(self, run: Run) -> list[SAE] | None:
        with self.lock:
            if self.transcoders is None and self.problem is None:
                try:
                    if run.run_dir is None:
                        raise StoreError("graphs need a run folder with a transcoder for every layer")
                    self.transcoders = transcoder_set(run.run_dir, run.model.n_layers)
                    self.digest = transcoder_digest(self.transcoders)
                except GemmaScopeError as err:
                    self.problem = str(err)
            return self.transcoders

    def keep(self, slug: str, graph: Graph) -> None:
        with self.lock:
            self.graphs[slug] = graph
            self.graphs.move_to_end(slug)
            while len(self.graphs) > _KEPT_GRAPHS:
                self.graphs.popitem(last=False)


def _state(run: Run) -> _Graphs:
    state = getattr(run, "_graph_state", None)
    if state is None:
        state = _Graphs()
        run._graph_state = state  # type: ignore[attr-defined]
    return state


def _transcoders_or_409(run: Run) -> tuple[_Graphs, list[SAE]]:
    state = _state(run)
    transcoders = state.load(run)
    if transcoders is None:
        raise ApiError(409, f"this run cannot draw attribution graphs: {state.problem}")
    return state, transcoders


@router.get("/v1/graph/list")
def graph_list(run: RunDep) -> dict[str, Any]:
    state = _state(run)
    state.load(run)
    graphs: list[dict[str, Any]] = []
    folder = run.graph_dir()
    for path in sorted(folder.glob("*.json")) if folder else []:
        try:
            meta = read_graph(path)["metadata"]
        except GemmaScopeError as err:  # listed as damaged: one bad file hides no other graph
            graphs.append({"slug": path.stem, "prompt": None, "scores": {}, "damaged": str(err)})
            continue
        graphs.append({"slug": path.stem, "prompt": meta["prompt"], "scores": meta.get("gemmascope") or {}})
    return {"available": state.transcoders is not None, "why_not": state.problem, "graphs": graphs}


class GraphRequest(Body):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    slug: str | None = None
    node_threshold: float = Field(0.8, ge=0.0, le=1.0)
    edge_threshold: float = Field(0.98, ge=0.0, le=1.0)
    max_feature_nodes: int = Field(MAX_FEATURE_NODES, ge=1, le=MAX_FEATURE_NODES)


@router.post("/v1/graph/generate")
async def graph_generate(body: GraphRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    run.check_text(body.prompt)
    state, transcoders = _transcoders_or_409(run)
    slug = check_slug(body.slug or graph_slug(body.prompt))

    def work() -> dict[str, Any]:
        run.prompt_ids(body.prompt, MAX_GRAPH_TOKENS)  # 400 beyond the request bound
        graph = attribute(
            run.model, transcoders, body.prompt, max_feature_nodes=body.max_feature_nodes,
            max_tokens=MAX_GRAPH_TOKENS, progress=False,
        )  # fmt: skip
        pruned = prune(graph, body.node_threshold, body.edge_threshold)
        explanations = pruned_explanations(
            graph, pruned, lambda key, latents: _explanations(run, key, latents)
        )
        data = graph_json(
            graph, slug, pruned, run=str(run.run_dir), digest=state.digest, explanations=explanations
        )
        folder = run.graph_dir()
        assert folder is not None  # transcoders were found in the run folder
        write_graph(folder / f"{slug}.json", data)
        state.keep(slug, graph)
        return data

    data = await queue.run(work)
    return {"slug": slug, "metadata": data["metadata"]}


def _explanations(run: Run, sae_id: str, latents: list[int]) -> dict[int, str]:
    entry = run.saes.get(sae_id)
    return {} if entry is None else run.explanations(entry, latents)


@router.get("/v1/graph/{slug}")
def graph_get(slug: str, run: RunDep) -> dict[str, Any]:
    path = _path_or_404(run, slug)
    state = _state(run)
    state.load(run)
    try:
        return read_graph(path, state.digest if state.transcoders is not None else None)
    except GemmaScopeError as err:
        raise ApiError(409, str(err)) from None


def _path_or_404(run: Run, slug: str) -> Path:
    folder = run.graph_dir()
    try:
        check_slug(slug)
    except GemmaScopeError:
        folder = None
    path = folder / f"{slug}.json" if folder else None
    if path is None or not path.is_file():
        raise ApiError(404, f"no graph {slug!r} in this run: draw it with POST /v1/graph/generate")
    return path


class InterveneRequest(Body):
    nodes: list[str] = Field(
        min_length=1, max_length=MAX_INTERVENE_NODES
    )  # feature node ids LAYER_LATENT_POS
    value: Number = Field(0.0, ge=-1e4, le=1e4)


@router.post("/v1/graph/{slug}/intervene")
async def graph_intervene(slug: str, body: InterveneRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    path = _path_or_404(run, slug)
    state, transcoders = _transcoders_or_409(run)
    try:
        meta = read_graph(path, state.digest)["metadata"]
    except GemmaScopeError as err:
        raise ApiError(409, str(err)) from None
    nodes = []
    for node_id in body.nodes:
        found = _NODE_ID.fullmatch(node_id)
        if found is None:
            raise ApiError(
                400,
                f"node {node_id[:40]!r} is not a feature node: expected LAYER_LATENT_POSITION, e.g. 12_1033_5",
            )
        layer, latent, pos = (int(p) for p in found.groups())
        nodes.append((layer, pos, latent))

    def work() -> dict[str, Any]:
        graph = state.graphs.get(slug)
        if graph is None or graph.prompt != meta["prompt"]:  # drawn before a restart, or by the CLI
            cap = (meta.get("gemmascope") or {}).get("max_feature_nodes")
            graph = attribute(
                run.model, transcoders, meta["prompt"], max_feature_nodes=cap, max_tokens=MAX_PROMPT_TOKENS,
                progress=False,
            )  # fmt: skip
            state.keep(slug, graph)
        try:
            predicted = predict(graph, nodes, body.value)
        except GemmaScopeError as err:
            raise ApiError(400, str(err)) from None
        measured = measure(run.model, transcoders, graph, nodes, body.value)
        return {
            "nodes": body.nodes,
            "value": body.value,
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

    return await queue.run(work)
