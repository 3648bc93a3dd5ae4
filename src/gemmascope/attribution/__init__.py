"""Attribution graphs (issue "Transcoders and attribution graphs"): the local replacement model of a
prompt (`replacement`), the graph of direct effects between tokens, transcoder features, error
nodes and logits with its pruning and scores (`graph`), its files: circuit-tracer's JSON and a PNG
(`files`), interventions on its feature nodes (`intervene`), and the one pipeline from a prompt to
the written graph (`draw`: `draw_graph`). A feature node is named `LAYER_LATENT_POSITION` everywhere
(`feature_node_id`, `parse_node`)."""

from gemmascope.attribution.dictionary import transcoder_set
from gemmascope.attribution.draw import Drawn, draw_graph
from gemmascope.attribution.files import (
    NODE_ID_FORMAT,
    check_slug,
    feature_node_id,
    graph_json,
    graph_name,
    graph_slug,
    parse_node,
    plot_graph,
    read_graph,
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
    influence,
    normalized,
    prompt_ids,
    prune,
    scores,
)
from gemmascope.attribution.intervene import intervene_nodes, measure, predict, strongest
from gemmascope.attribution.replacement import Prompt, ReplacementModel, capture_prompt

__all__ = [
    "EDGE_THRESHOLD",
    "MAX_FEATURE_NODES",
    "NODE_ID_FORMAT",
    "NODE_THRESHOLD",
    "Drawn",
    "Graph",
    "Prompt",
    "Pruned",
    "ReplacementModel",
    "attribute",
    "capture_prompt",
    "check_slug",
    "draw_graph",
    "feature_node_id",
    "graph_json",
    "graph_name",
    "graph_slug",
    "influence",
    "intervene_nodes",
    "measure",
    "normalized",
    "parse_node",
    "plot_graph",
    "predict",
    "prompt_ids",
    "prune",
    "read_graph",
    "scores",
    "strongest",
    "transcoder_digest",
    "transcoder_set",
    "write_graph",
]
