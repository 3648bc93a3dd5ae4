"""The replacement model's loss (`evaluate_replacement`): every layer's MLP output replaced at once,
by one transcoder per layer or by a cross-layer transcoder, measured the one way the model is
measured under an edit (`core.edited_batches`), beside the same layers' MLP outputs zero-ablated
(CE recovered). The suite's report and the CLT benchmark read it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from gemmascope.clt import CrossLayerTranscoder, check_model, splice_clt
from gemmascope.corpus import DEFAULT_CORPUS
from gemmascope.errors import ConfigError
from gemmascope.evals.core import (
    MIN_EVAL_TOKENS,
    edited_batches,
    eval_token_ids,
    splice,
    written_site,
    zero_ablate,
)
from gemmascope.evals.metrics import NextTokenStats
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE
from gemmascope.sites import Site


def evaluate_replacement(
    model: LanguageModel,
    transcoders: Sequence[SAE] | CrossLayerTranscoder,
    n_tokens: int = 8192,
    corpus: str = DEFAULT_CORPUS,
    context_len: int = 128,
    batch_size: int = 4,
    min_tokens: int = MIN_EVAL_TOKENS,
) -> dict[str, Any]:
    """The replacement model's loss: every transcoder of `transcoders` (one per layer, at most), or a
    cross-layer transcoder (`clt.splice_clt`: every layer), replaces its layers' MLP outputs at once,
    on about `n_tokens` held-out tokens, under the per-SAE rule: positions where some transcoder's
    input is massive are left as the model computes them, like BOS, and their predictions are not
    counted. Returns `layers`, `ce_loss_without`, `ce_loss_with`, `delta_lm_loss`, `kl_div`,
    `ce_loss_zero_ablated` (those layers' MLP outputs zeroed instead), `ce_recovered` (1 − (with −
    without) / (zero-ablated − without)), `n_predictions` (predictions whose input and target are
    kept) and `n_massive_tokens_excluded`."""
    if isinstance(transcoders, CrossLayerTranscoder):
        check_model(model, transcoders)
        layers, saes = list(range(transcoders.n_layers)), []
    else:
        saes = list(transcoders)
        layers = [written_site(model, tc).layer for tc in saes]
        if not saes or not all(tc.is_transcoder for tc in saes):
            raise ConfigError(
                "the replacement model needs transcoders (SAEs with an output site), one per layer"
            )
        if len(set(layers)) != len(layers):
            raise ConfigError(f"the replacement model takes one transcoder per layer; layers given: {layers}")
    token_ids = eval_token_ids(model, n_tokens, corpus, "heldout", context_len)
    clean, replaced, zeroed, n_massive = NextTokenStats(), NextTokenStats(), NextTokenStats(), 0
    batches = edited_batches(
        model, token_ids, saes, batch_size, min_tokens=min_tokens, desc="replacement model"
    )
    with torch.no_grad():
        for batch in batches:
            clean.update(*batch.unedited)
            if isinstance(transcoders, CrossLayerTranscoder):
                replaced.update(*batch.under(splice_clt(model, transcoders, batch.keep)))
            else:
                replaced.update(*batch.under(splice(model, saes, batch.keep)))
            zeroed.update(*batch.under(_zero_mlps(model, layers, batch.keep)))
            n_massive += batch.n_massive
    return {
        "layers": sorted(layers),
        "ce_loss_without": clean.ce,
        "ce_loss_with": replaced.ce,
        "delta_lm_loss": replaced.ce - clean.ce,
        "kl_div": replaced.kl,
        "ce_loss_zero_ablated": zeroed.ce,
        "ce_recovered": 1 - (replaced.ce - clean.ce) / (zeroed.ce - clean.ce),
        "n_predictions": clean.n,
        "n_massive_tokens_excluded": n_massive,
    }


@contextmanager
def _zero_mlps(model: LanguageModel, layers: Sequence[int], keep: Tensor) -> Iterator[None]:
    """Within the block, the MLP outputs of `layers` are zero at the `keep [B, T]` positions."""
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(zero_ablate(model, Site("mlp_out", layer), keep))
        yield


# ---------------------------------------------------------------------------------------------
# The one way to measure the model under an edit
