"""The feature index: what each latent of an SAE means and where it fires, computed locally (what a
Neuronpedia feature page and its microscope show). Owns densities, activation histograms, top and
interval-sampled activating windows, the logit lens (and the latents promoting a word), decoder neighbours, cross-layer flow,
explanations (a baseline and an optional OpenAI-compatible chat endpoint, with detection scoring),
per-token top features and a text's topics ranked meaning first (`rank`), search, the SQLite file
they live in, and export to Neuronpedia's format.

Knows nothing of HTTP (the server reads the index through `FeatureIndex`).

Modules: `stream` (bounded-memory accumulators), `lens` (weight-only views), `build` (the pass over
the corpus), `pages` (accumulators to feature pages), `store` (SQLite), `encode` (the one way from
text to latents, with pooling, and the one dense rule), `rank` (the meaning-first order), `prompt`
(live per-text views), `contrast`, `documents`, `explain`, `export`.
"""

from gemmascope.features.build import build_index
from gemmascope.features.encode import HIDE_DENSE, POOLS, Encoded, dense_latents, encode
from gemmascope.features.explain import ChatEndpoint, baseline_explanation, detection_score, explain_with_llm
from gemmascope.features.export import export_neuronpedia
from gemmascope.features.lens import decoder_neighbours, logit_lens, promoting, word_token_ids
from gemmascope.features.prompt import latent_values, search_text, text_features, top_features
from gemmascope.features.rank import DEFAULT_ORDER, ORDERS, Firing, meaning_scores, topic_scores
from gemmascope.features.store import FeatureIndex, sae_fingerprint

__all__ = [
    "DEFAULT_ORDER",
    "HIDE_DENSE",
    "ORDERS",
    "POOLS",
    "ChatEndpoint",
    "Encoded",
    "FeatureIndex",
    "Firing",
    "baseline_explanation",
    "build_index",
    "decoder_neighbours",
    "dense_latents",
    "detection_score",
    "encode",
    "explain_with_llm",
    "export_neuronpedia",
    "latent_values",
    "logit_lens",
    "meaning_scores",
    "promoting",
    "sae_fingerprint",
    "search_text",
    "text_features",
    "top_features",
    "topic_scores",
    "word_token_ids",
]
