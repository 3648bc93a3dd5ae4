"""Attribution graphs (issue "Transcoders and attribution graphs"): the local replacement model of a
prompt (`replacement`), the graph of direct effects between tokens, transcoder features, error
nodes and logits with its pruning and scores (`graph`), and its files: circuit-tracer's JSON and a
PNG (`files`)."""

from gemmascope.attribution.graph import (
    EDGE_THRESHOLD,
    MAX_FEATURE_NODES,
    MAX_PROMPT_TOKENS,
    NODE_THRESHOLD,
    Graph,
    Pruned,
    attribute,
    influence,
    normalized,
    prompt_ids,
    prune,
    scores,
    transcoder_set,
)
from gemmascope.attribution.replacement import Prompt, ReplacementModel, capture_prompt

__all__ = [
    "EDGE_THRESHOLD",
    "MAX_FEATURE_NODES",
    "MAX_PROMPT_TOKENS",
    "NODE_THRESHOLD",
    "Graph",
    "Prompt",
    "Pruned",
    "ReplacementModel",
    "attribute",
    "capture_prompt",
    "influence",
    "normalized",
    "prompt_ids",
    "prune",
    "scores",
    "transcoder_set",
]
