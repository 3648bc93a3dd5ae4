"""The limits on what one call may ask of the model, named once: the library and the command line
check against the `MAX_*` values; the web server, which runs requests for whoever asks, bounds what
costs model time tighter with the `REQUEST_*` values, and serves every value here to the pages
(`GET /v1/saes`, `limits`), which read them instead of restating them.

Where a request costs the server no more than the others it takes, the value is the same for the
library, the CLI and a request (documents: 32 of at most 256 tokens, as much as a contrast of two
sets of 32 prompts; watched tokens cost nothing); where a length multiplies model time (prompt and
generated tokens, prompts of a set, strengths of a sweep), the library's value and a request's
stand side by side here.

Knows nothing: plain numbers (and `strength_limit`, the one rule over two of them), imported by models, features, steer, effects, attribution, server, cli
(`cli.options.read_lines` bounds the text files a user names with `MAX_TEXT_FILE_*`).
"""

from __future__ import annotations

import math

# Prompt length, in tokens after BOS
MAX_PROMPT_TOKENS = 512  # one prompt run by the library or the CLI (microscope, search, steering)
REQUEST_PROMPT_TOKENS = 256  # one prompt of an HTTP request
REQUEST_PROMPT_CHARS = 4000  # an HTTP request's prompt, refused before tokenising
# an attribution graph's prompt, for the library, the CLI and an HTTP request alike: 128 tokens draw
# in about 7 minutes and 7 GB on 2 cores (BENCHMARKS.md, "Attribution graphs")
MAX_GRAPH_TOKENS = 128
REQUEST_GRAPH_TOKENS = 128

# Generation
MAX_NEW_TOKENS = 512  # tokens one steered generation may add
REQUEST_NEW_TOKENS = 64  # the same for an HTTP request
MAX_TEMPERATURE = 2.0  # an HTTP request's sampling temperature (the library takes any finite >= 0)
MAX_FREQ_PENALTY = 2.0  # OpenAI's and Neuronpedia's range is [-2, 2]

# Sets of texts and of things to measure (the same for the library, the CLI and a request)
MAX_DOCUMENTS = 32  # documents of one document-level analysis
MIN_CONTRAST_PROMPTS = 2  # per set of a contrast: a standard deviation needs two
MAX_CONTRAST_PROMPTS = 200  # per set of a contrast run by the library or the CLI
REQUEST_CONTRAST_PROMPTS = 32  # per set of a contrast asked over HTTP
MAX_MEASURE_PROMPTS = 64  # prompts a measured intervention runs over
REQUEST_MEASURE_PROMPTS = 16  # the same for an HTTP request
MAX_WATCH = 16  # watched next tokens
MAX_SWEEP = 16  # strengths of one sweep (each: the prompts, the cost and a completion)
REQUEST_SWEEP = 8  # the same for an HTTP request
MIN_SIDE_EFFECT_TOKENS = 128  # held-out tokens the side-effect cost needs at least
REQUEST_SIDE_EFFECT_TOKENS = 4096  # held-out tokens of the cost, at most, in an HTTP request
MAX_STEER_FEATURES = 8  # interventions of one HTTP steering request
MAX_INTERVENE_NODES = 64  # graph nodes one HTTP intervention sets

# A text file the command line names (prompt sets, documents): read whole only up to these
MAX_TEXT_FILE_BYTES = 8 << 20  # 8 MiB (/dev/zero never ends: refused at the bound, not read)
MAX_TEXT_FILE_LINES = 100_000

# How many results one call lists
MAX_TOP = 100  # features of a search, a contrast, a document
MAX_TOP_PER_TOKEN = 20  # features per token in the microscope

# Steering strengths an HTTP request may ask for
STRENGTH_FACTOR = 100.0  # |strength| <= this x the feature's max activation
STRENGTH_LIMIT = 10_000.0  # |strength| bound when the feature's max activation is unknown


def strength_limit(max_activation: float | None) -> float:
    """The bound on |strength| of a feature with this max activation: `STRENGTH_FACTOR` times it,
    `STRENGTH_LIMIT` when it is unknown (None, zero or not finite)."""
    if max_activation is not None and math.isfinite(max_activation) and max_activation > 0:
        return STRENGTH_FACTOR * max_activation
    return STRENGTH_LIMIT


def served() -> dict[str, float | int]:
    """The limits the web pages need, as `GET /v1/saes` serves them under `limits` (the request
    bounds where a request has its own)."""
    return {
        "max_prompt_tokens": REQUEST_PROMPT_TOKENS,
        "max_prompt_chars": REQUEST_PROMPT_CHARS,
        "max_graph_tokens": REQUEST_GRAPH_TOKENS,
        "max_new_tokens": REQUEST_NEW_TOKENS,
        "max_temperature": MAX_TEMPERATURE,
        "max_freq_penalty": MAX_FREQ_PENALTY,
        "max_documents": MAX_DOCUMENTS,
        "min_contrast_prompts": MIN_CONTRAST_PROMPTS,
        "max_contrast_prompts": REQUEST_CONTRAST_PROMPTS,
        "max_measure_prompts": REQUEST_MEASURE_PROMPTS,
        "max_watch": MAX_WATCH,
        "max_sweep": REQUEST_SWEEP,
        "min_side_effect_tokens": MIN_SIDE_EFFECT_TOKENS,
        "max_side_effect_tokens": REQUEST_SIDE_EFFECT_TOKENS,
        "max_steer_features": MAX_STEER_FEATURES,
        "max_intervene_nodes": MAX_INTERVENE_NODES,
        "max_top": MAX_TOP,
        "max_top_per_token": MAX_TOP_PER_TOKEN,
    }
