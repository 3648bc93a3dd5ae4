"""Attribution graphs over HTTP (UI.md, Graph page): `GET /v1/graph/list` (the run's graphs and
whether it can draw new ones: a transcoder per layer, or a cross-layer transcoder: the run's CLT
when the server was asked for it, `serve --clt`, or when the run has no per-layer set but one CLT;
`dictionary` names which), `POST /v1/graph/generate` (draw the graph of a
prompt, written to `RUN/graphs/SLUG.json` in circuit-tracer's schema), `GET /v1/graph/{slug}` (that
JSON, refused when drawn from another transcoder set) and `POST /v1/graph/{slug}/intervene` (set
feature nodes to a value: the graph's predicted change of each output logit beside the measured
one; nodes named `LAYER_LATENT_POSITION` as the graph JSON names them, `attribution.parse_node`).
Graph work waits in the model queue; the last few graphs stay in memory for interventions.

Knows nothing of how graphs are computed: it calls `attribution.draw_graph` and
`attribution.intervene_nodes`, as `gemmascope attribute` does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import Field

from gemmascope.attribution import (
    EDGE_THRESHOLD,
    MAX_FEATURE_NODES,
    NODE_THRESHOLD,
    Graph,
    attribute,
    check_slug,
    draw_graph,
    graph_name,
    intervene_nodes,
    parse_node,
    read_graph,
    transcoder_digest,
    transcoder_set,
)
from gemmascope.attribution.dictionary import Replacing, run_clt
from gemmascope.clt import CrossLayerTranscoder
from gemmascope.errors import GemmaScopeError, StoreError
from gemmascope.limits import (
    MAX_GRAPH_TOKENS,
    MAX_INTERVENE_NODES,
    REQUEST_GRAPH_TOKENS,
    REQUEST_PROMPT_CHARS,
)
from gemmascope.runs import find_clts
from gemmascope.server.errors import ApiError, public_message
from gemmascope.server.lookup import Body, Number, QueueDep, RunDep
from gemmascope.server.run import Run

_KEPT_GRAPHS = 2  # graphs kept in memory for interventions (each up to ~0.3 GB at the node cap)

router = APIRouter()


class _Graphs:
    """What the run's graphs are drawn over (its transcoder set or its CLT, loaded on first use) and
    the last graphs drawn, by slug."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transcoders: Replacing | None = None
        self.problem: str | None = None
        self.digest = ""
        self.graphs: OrderedDict[str, Graph] = OrderedDict()

    def load(self, run: Run) -> Replacing | None:
        with self.lock:
            if self.transcoders is None and self.problem is None:
                try:
                    self.transcoders = _dictionary(run)
                    self.digest = transcoder_digest(self.transcoders)
                except GemmaScopeError as err:
                    self.problem = str(err)
            return self.transcoders

    def name(self) -> str | None:
        """What the graphs are drawn over, in words (None: nothing)."""
        if isinstance(self.transcoders, CrossLayerTranscoder):
            return f"cross-layer transcoder {self.transcoders.cfg.extra.get('folder', '')}".strip()
        return "a transcoder per layer" if self.transcoders is not None else None

    def keep(self, slug: str, graph: Graph) -> None:
        with self.lock:
            self.graphs[slug] = graph
            self.graphs.move_to_end(slug)
            while len(self.graphs) > _KEPT_GRAPHS:
                self.graphs.popitem(last=False)


def _dictionary(run: Run) -> Replacing:
    """The run's CLT when the server was asked for one (`run.graph_clt`: a substring of its folder,
    "" for the only one), else its transcoder set, else its only CLT; a StoreError says what is missing."""
    if run.run_dir is None:
        raise StoreError(
            "graphs need a run folder with a transcoder for every layer or a cross-layer transcoder"
        )
    if run.graph_clt is not None:
        return run_clt(run.run_dir, run.graph_clt or None)
    try:
        return transcoder_set(run.run_dir, run.model.n_layers, saes=run.opened.saes)
    except StoreError:
        if len(find_clts(run.run_dir)) == 1:
            return run_clt(run.run_dir)
        raise


def _state(run: Run) -> _Graphs:
    state = getattr(run, "_graph_state", None)
    if state is None:
        state = _Graphs()
        run._graph_state = state  # type: ignore[attr-defined]
    return state


def _transcoders_or_409(run: Run) -> tuple[_Graphs, Replacing]:
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
            why = public_message(str(err), run.run_dir)  # no server path, as in every error
            graphs.append({"slug": path.stem, "prompt": None, "scores": {}, "damaged": why})
            continue
        ours = meta.get("gemmascope") or {}
        stale = state.transcoders is not None and ours.get("transcoder_digest") != state.digest
        graphs.append({"slug": path.stem, "prompt": meta["prompt"], "scores": ours, "stale": stale})
    return {
        "available": state.transcoders is not None, "why_not": state.problem, "dictionary": state.name(),
        "graphs": graphs,
    }  # fmt: skip


class GraphRequest(Body):
    prompt: str = Field(max_length=REQUEST_PROMPT_CHARS)
    slug: str | None = None
    node_threshold: float = Field(NODE_THRESHOLD, ge=0.0, le=1.0)
    edge_threshold: float = Field(EDGE_THRESHOLD, ge=0.0, le=1.0)
    max_feature_nodes: int = Field(MAX_FEATURE_NODES, ge=1, le=MAX_FEATURE_NODES)


@router.post("/v1/graph/generate")
async def graph_generate(body: GraphRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    run.check_text(body.prompt)
    state, transcoders = _transcoders_or_409(run)
    folder = run.graph_dir()
    assert folder is not None  # transcoders were found in the run folder
    if body.slug is not None:  # a bad name, or one holding another prompt's graph: refused now
        await anyio.to_thread.run_sync(lambda: graph_name(folder, body.prompt, body.slug))

    def work() -> dict[str, Any]:
        drawn = draw_graph(  # the name is found here, when no other graph is being drawn
            run.model, transcoders, body.prompt, folder, slug=body.slug, node_threshold=body.node_threshold,
            edge_threshold=body.edge_threshold, max_feature_nodes=body.max_feature_nodes,
            max_tokens=REQUEST_GRAPH_TOKENS, explain=run.opened.explanations, run=str(run.run_dir),
            digest=state.digest, progress=False,
        )  # fmt: skip
        state.keep(drawn.path.stem, drawn.graph)
        return drawn.data

    data = await queue.run(work)
    return {"slug": data["metadata"]["slug"], "metadata": data["metadata"]}


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
    nodes: list[str] = Field(min_length=1, max_length=MAX_INTERVENE_NODES)  # LAYER_LATENT_POSITION
    value: Number = Field(0.0, ge=-1e4, le=1e4)


@router.post("/v1/graph/{slug}/intervene")
async def graph_intervene(slug: str, body: InterveneRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    path = _path_or_404(run, slug)
    state, transcoders = _transcoders_or_409(run)
    try:
        meta = read_graph(path, state.digest)["metadata"]
    except GemmaScopeError as err:
        raise ApiError(409, str(err)) from None
    nodes = [parse_node(node_id) for node_id in body.nodes]  # 400 for anything but a feature node

    def work() -> dict[str, Any]:
        graph = state.graphs.get(slug)
        if graph is None or graph.prompt != meta["prompt"]:  # drawn before a restart, or by the CLI
            cap = (meta.get("gemmascope") or {}).get("max_feature_nodes")
            graph = attribute(
                run.model, transcoders, meta["prompt"], max_feature_nodes=cap, max_tokens=MAX_GRAPH_TOKENS,
                progress=False,
            )  # fmt: skip
            state.keep(slug, graph)
        return {
            "nodes": body.nodes,
            "value": body.value,
            **intervene_nodes(run.model, transcoders, graph, nodes, body.value),
        }

    return await queue.run(work)
