"""Tests for the feature index (features/): the streaming pass against brute force on a small
corpus, histograms against densities, the logit lens and neighbours against direct products,
cross-layer correlations against numpy, per-prompt views, search, explainers (a local fake
OpenAI-compatible server), Neuronpedia export, the CLI, and the bad inputs a user can cause."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gemmascope.corpus import special_mask, token_rows
from gemmascope.errors import ConfigError, CorpusError, GemmaScopeError, StoreError
from gemmascope.features import (
    ChatEndpoint,
    FeatureIndex,
    build_index,
    decoder_neighbours,
    detection_score,
    explain_with_llm,
    export_neuronpedia,
    logit_lens,
    sae_fingerprint,
    search_text,
    top_features,
)
from gemmascope.features.pages import WINDOW
from gemmascope.features.stream import KeepSmallest, Pass1Stats, top_correlations
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig
from gemmascope.sites import Site, capture

N_TOKENS = 1536  # 12 rows of 128
CTX = 128


def random_sae(layer: int, d_sae: int, seed: int, d_in: int = 64, kind: str = "resid_post") -> JumpReLUSAE:
    """A JumpReLU SAE with random weights whose latents fire on a few percent to a third of tokens."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(
        SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, site=f"{kind}.{layer}", model_name="tiny-gemma3")
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 2.0 + 0.5)
    return sae


@pytest.fixture(scope="module")
def saes() -> dict[str, JumpReLUSAE]:
    return {"resid_post.1.w96": random_sae(1, 96, 0), "resid_post.3.w64": random_sae(3, 64, 1)}


@pytest.fixture(scope="module")
def built(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One index of two SAEs at different layers, several batches per pass (spilled second pass),
    feature pages written in several chunks."""
    db = tmp_path_factory.mktemp("index") / "features.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gemmascope.features.build.PAGE_CHUNK", 40)
        return build_index(
            tiny_model, saes, db, n_tokens=N_TOKENS, batch_rows=5, flow_tokens=1000, progress=False
        )


@pytest.fixture(scope="module")
def brute(tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE]) -> dict[str, Any]:
    """Every latent activation of the index corpus at once (fine at this size): the reference."""
    rows = token_rows(tiny_model.tokenizer, N_TOKENS, "wiki", "heldout", CTX)
    keep = ~special_mask(rows, tiny_model.special_token_ids)
    out: dict[str, Any] = {"rows": rows, "keep": keep}
    for sid, sae in saes.items():
        site = Site("resid_post", int(sid.split(".")[1]))
        x = capture(tiny_model, rows, [site])[site]
        with torch.no_grad():
            out[sid] = sae.encode(x) * keep[..., None]  # [rows, ctx, d_sae]
    return out


# ---------------------------------------------------------------------------------------------
# Streaming accumulators against brute force


def test_keep_smallest_keeps_the_k_smallest_keys_per_group_over_many_updates() -> None:
    g = torch.Generator().manual_seed(0)
    state = KeepSmallest(n_groups=7, k=4, payload_len=2)
    seen: list[tuple[int, float, int]] = []
    for batch in range(6):
        n = 30
        groups = torch.randint(0, 7, (n,), generator=g)
        keys = torch.rand(n, generator=g)
        token = torch.arange(n) + 100 * batch
        state.update(
            groups, keys, token, lambda sel, token=token: torch.stack([token[sel], token[sel] * 2], 1).float()
        )
        seen += list(zip(groups.tolist(), keys.tolist(), token.tolist(), strict=True))
    for group in range(7):
        expected = sorted((k, t) for grp, k, t in seen if grp == group)[:4]
        got_tokens = state.token[group].tolist()
        assert got_tokens == [t for _, t in expected]
        assert state.keys[group].tolist() == pytest.approx([k for k, _ in expected])
        assert state.payload[group, :, 1].tolist() == [2.0 * t for _, t in expected]


def test_pass1_top_k_equals_brute_force_on_random_sparse_batches() -> None:
    g = torch.Generator().manual_seed(1)
    d_sae, rows, ctx = 10, 3, 16
    stats = Pass1Stats(d_sae, top_k=5, window=2)
    batches = []
    for b in range(4):
        acts = torch.rand(rows, ctx, d_sae, generator=g) * (torch.rand(rows, ctx, d_sae, generator=g) < 0.2)
        batches.append(acts)
        stats.update(acts, rows * ctx, b * rows * ctx)
    everything = torch.cat(batches).reshape(-1, d_sae)
    assert stats.n_fired.tolist() == (everything > 0).sum(0).tolist()
    assert torch.equal(stats.max_act, everything.max(0).values)
    for latent in range(d_sae):
        values, tokens = everything[:, latent].topk(5)
        order = stats.top.keys[latent].argsort()
        assert stats.top.token[latent][order].tolist() == tokens.tolist()
        assert (-stats.top.keys[latent][order]).tolist() == pytest.approx(values.tolist())
        # the window is the latent's activations two tokens either side, within the row
        t = int(tokens[0])
        row, pos = divmod(t, ctx)
        whole = torch.cat(batches).reshape(-1, ctx, d_sae)[row, :, latent]
        expected = [float(whole[p]) if 0 <= p < ctx else 0.0 for p in range(pos - 2, pos + 3)]
        assert stats.top.payload[latent][order][0].tolist() == pytest.approx(expected)


def test_top_correlations_equal_numpy_pearson() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.rand(200, 12, generator=g) * (torch.rand(200, 12, generator=g) < 0.3)
    b = a[:, :8] * 2 + torch.rand(200, 8, generator=g) * (torch.rand(200, 8, generator=g) < 0.2)
    b[:, 7] = 0  # a latent that never fires: no correlations
    a_idx, a_corr, b_idx, b_corr = top_correlations(a.to_sparse(), b.to_sparse(), k=3, chunk_entries=30)
    full = np.corrcoef(np.concatenate([a.numpy(), b[:, :7].numpy()], axis=1).T)[:12, 12:]  # [12, 7]
    for i in range(12):
        order = np.argsort(-full[i])[:3]
        assert a_idx[i].tolist() == order.tolist()
        assert a_corr[i].tolist() == pytest.approx(full[i, order].tolist(), abs=1e-4)
    for j in range(7):
        order = np.argsort(-full[:, j])[:3]
        assert b_idx[j].tolist() == order.tolist()
    assert b_idx[7].tolist() == [-1, -1, -1]
    dense = top_correlations(a, b, k=3, chunk_entries=30)  # dense input: the same
    assert torch.equal(dense[0], a_idx) and torch.equal(dense[2], b_idx)
    assert torch.allclose(dense[1], a_corr, atol=1e-6)
    empty = top_correlations(a[:0].to_sparse(), b[:0].to_sparse(), k=3)  # no tokens: no correlations
    assert (empty[0] == -1).all() and (empty[1] == -torch.inf).all()


# ---------------------------------------------------------------------------------------------
# The built index against brute force


def test_index_top_examples_equal_brute_force(
    built: Path, brute: dict[str, Any], saes: dict[str, JumpReLUSAE]
) -> None:
    index = FeatureIndex(built)
    rows = brute["rows"]
    for sid in saes:
        acts = brute[sid].reshape(-1, saes[sid].d_sae)
        for latent in range(0, saes[sid].d_sae, 7):
            feature = index.feature(sid, latent)
            column = acts[:, latent]
            n_fired = int((column > 0).sum())
            values, tokens = column.topk(min(20, n_fired))
            examples = feature["top_examples"]
            assert len(examples) == min(20, n_fired)
            assert [e["value"] for e in examples] == pytest.approx(
                values.tolist(), abs=1e-4 * float(values[0])
            )
            assert feature["max_act"] == pytest.approx(float(column.max()), rel=1e-6)
            # the strongest window: its tokens and per-token activations, trimmed to its document
            t = int(tokens[0])
            row, pos = divmod(t, CTX)
            top = examples[0]
            lo = pos - top["focus"]
            ids = rows[row, lo : lo + len(top["tokens"])]
            assert lo >= pos - WINDOW and lo + len(top["tokens"]) <= pos + WINDOW + 1
            assert not torch.isin(ids, torch.tensor([0, 1, 2])).any()
            # stored to about 5 significant digits of the latent's max activation
            expected = brute[sid][row, lo : lo + len(ids), latent].tolist()
            assert top["acts"] == pytest.approx(expected, abs=1e-4 * feature["max_act"])


def test_histogram_counts_add_up_to_the_density(
    built: Path, brute: dict[str, Any], saes: dict[str, JumpReLUSAE]
) -> None:
    index = FeatureIndex(built)
    n_tokens = int(brute["keep"].sum())
    assert index.saes()[0]["stats"]["n_tokens"] == n_tokens
    for sid, sae in saes.items():
        acts = brute[sid].reshape(-1, sae.d_sae)
        densities = index.densities(sid)
        for latent in range(sae.d_sae):
            feature = index.feature(sid, latent)
            counts = feature["histogram"]["counts"]
            assert sum(counts) == feature["n_fired"] == int((acts[:, latent] > 0).sum())
            assert feature["density"] == pytest.approx(sum(counts) / n_tokens)
            assert float(densities[latent]) == pytest.approx(feature["density"])
            if not counts:
                continue
            assert len(counts) == 50 and len(feature["histogram"]["edges"]) == 51
            edges = np.array(feature["histogram"]["edges"])
            nonzero = acts[:, latent][acts[:, latent] > 0].double().numpy()
            expected, _ = np.histogram(nonzero, bins=edges)
            assert np.abs(np.array(counts) - expected).sum() <= 2  # float edge cases at bin borders only
            intervals = feature["intervals"]
            assert len(intervals) == 5
            assert sum(iv["count"] for iv in intervals) == sum(counts)
            assert sum(iv["share"] for iv in intervals) == pytest.approx(1.0)
            for iv in intervals:
                assert len(iv["examples"]) == min(5, iv["count"])
                for ex in iv["examples"]:
                    assert iv["lo"] - 1e-3 <= ex["value"] <= iv["hi"] + 1e-3


def test_logit_lens_equals_the_direct_matrix_product(
    tiny_model: LanguageModel, built: Path, saes: dict[str, JumpReLUSAE]
) -> None:
    from gemmascope.features.lens import lens_agreement

    sid = "resid_post.1.w96"
    sae = saes[sid]
    w_u = tiny_model.hf.lm_head.weight.detach().t()  # [d_model, vocab]
    direct = sae.W_dec.detach() @ w_u
    up_ids, up_vals, down_ids, down_vals = logit_lens(tiny_model, sae, Site("resid_post", 1), k=10)
    assert torch.allclose(up_vals, direct.topk(10, dim=1).values, atol=1e-5)
    assert torch.allclose(down_vals, direct.topk(10, dim=1, largest=False).values, atol=1e-5)
    assert torch.equal(direct.gather(1, up_ids), up_vals)
    feature = FeatureIndex(built).feature(sid, 5)
    tok = tiny_model.tokenizer
    assert [p["token"] for p in feature["logit_lens"]["promoted"]] == [
        tok.decode([i]) for i in up_ids[5].tolist()
    ]
    assert [p["value"] for p in feature["logit_lens"]["suppressed"]] == pytest.approx(
        down_vals[5].tolist(), abs=1e-4
    )
    assert feature["logit_lens"]["agreement"] == pytest.approx(
        float(lens_agreement(tiny_model, up_ids[5:6])[0]), abs=1e-3
    )
    # attn_out latents are read through the attention output projection
    attn = random_sae(2, 16, 3, d_in=64, kind="attn_out")
    o_proj = tiny_model.hf.model.layers[2].self_attn.o_proj.weight.detach()
    direct = attn.W_dec.detach() @ o_proj.t() @ w_u
    up_ids, up_vals, _, _ = logit_lens(tiny_model, attn, Site("attn_out", 2), k=3)
    assert torch.allclose(up_vals, direct.topk(3, dim=1).values, atol=1e-4)


def test_logit_lens_blocks_give_the_same_tokens(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lens is the top-k of the top-k of vocabulary blocks, a block of latents at a time: any
    block sizes (a ragged last block, blocks smaller than k) give the whole product's top-k."""
    import gemmascope.features.lens as lens

    sae, site = saes["resid_post.1.w96"], Site("resid_post", 1)
    whole = logit_lens(tiny_model, sae, site, k=10)
    for rows, block in ((40, 7_000), (96, 6), (1, 1 << 20)):
        monkeypatch.setattr(lens, "_LENS_ROWS", rows)
        monkeypatch.setattr(lens, "_LENS_BLOCK", block)
        got = logit_lens(tiny_model, sae, site, k=10)
        assert torch.equal(got[0], whole[0]) and torch.equal(got[2], whole[2])
        assert torch.allclose(got[1], whole[1], atol=1e-6) and torch.allclose(got[3], whole[3], atol=1e-6)


def test_logit_lens_reads_through_the_final_norms_gain(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE]
) -> None:
    """The lens is what the output reads: W_dec @ diag(1 + w) @ W_U for Gemma's final RMSNorm weight w
    (the tiny model's w is 0, a trained Gemma's is not: 0.19 to 301 in Gemma 3 270M)."""
    from gemmascope.models import final_norm_gain

    sae = saes["resid_post.1.w96"]
    norm = tiny_model.hf.model.norm.weight
    before = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.copy_(torch.randn(norm.shape, generator=torch.Generator().manual_seed(0)) * 3)
        gain = 1.0 + norm.detach()
        assert torch.allclose(final_norm_gain(tiny_model.hf), gain, atol=1e-5)
        w_u = tiny_model.hf.lm_head.weight.detach().t()
        folded = sae.W_dec.detach() @ (gain[:, None] * w_u)
        up_ids, up_vals, _, _ = logit_lens(tiny_model, sae, Site("resid_post", 1), k=10)
        assert torch.allclose(up_vals, folded.topk(10, dim=1).values, atol=1e-4)
        assert not torch.equal(up_ids, (sae.W_dec.detach() @ w_u).topk(10, dim=1).indices)
        # the word search reads the same lens
        from gemmascope.features import promoting, word_token_ids

        ids = word_token_ids(tiny_model, "dog")
        z = (folded - folded.mean(1, keepdim=True)) / folded.std(1, unbiased=False, keepdim=True)
        got = promoting(tiny_model, sae, Site("resid_post", 1), ids, k=5)
        assert [g["index"] for g in got] == z[:, ids].max(1).values.topk(5).indices.tolist()
        # a bfloat16 model's gain is read in float32: exactly 1 + its (rounded) weight
        half = tiny_model.cast(torch.bfloat16)
        assert torch.equal(final_norm_gain(half.hf), 1.0 + half.hf.model.norm.weight.detach().float())
    finally:
        with torch.no_grad():
            norm.copy_(before)


def test_latents_promoting_a_word_rank_by_the_standardised_logit_lens(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE]
) -> None:
    """`promoting` equals the z-score of each latent's full logit lens over the vocabulary (computed
    here the slow way), best token of the word's forms first; hidden latents are left out."""
    from gemmascope.features import promoting, word_token_ids

    sae = saes["resid_post.1.w96"]
    ids = word_token_ids(tiny_model, "dog")
    assert len(ids) >= 2  # ' dog', 'dog', ' Dog', ... in the bundled tokenizer
    assert tiny_model.tokenizer.decode(ids[:1]).strip().lower() == "dog"
    assert word_token_ids(tiny_model, "qqxqzvbrtl") == []
    lens = sae.W_dec.detach() @ tiny_model.hf.lm_head.weight.detach().t()  # [d_sae, vocab]
    z = (lens - lens.mean(1, keepdim=True)) / lens.std(1, unbiased=False, keepdim=True)
    best, which = z[:, ids].max(1)
    got = promoting(tiny_model, sae, Site("resid_post", 1), ids, k=5)
    assert [g["index"] for g in got] == best.topk(5).indices.tolist()
    assert [g["z"] for g in got] == pytest.approx(best.topk(5).values.tolist(), rel=1e-3)
    assert [g["token_id"] for g in got] == [ids[int(which[g["index"]])] for g in got]
    hidden = torch.zeros(sae.d_sae, dtype=torch.bool)
    hidden[got[0]["index"]] = True
    again = promoting(tiny_model, sae, Site("resid_post", 1), ids, hidden, k=5)
    assert [g["index"] for g in again] == [g["index"] for g in got[1:]] + [best.topk(6).indices[5].item()]
    assert promoting(tiny_model, sae, Site("resid_post", 1), [], k=5) == []


def test_neighbours_are_the_highest_decoder_cosines(built: Path, saes: dict[str, JumpReLUSAE]) -> None:
    sae = saes["resid_post.3.w64"]
    w = sae.W_dec.detach()
    cos = (w / w.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    cos.fill_diagonal_(-2)
    idx, values = decoder_neighbours(sae, k=10)
    assert torch.equal(idx, cos.topk(10, dim=1).indices)
    neighbours = FeatureIndex(built).feature("resid_post.3.w64", 9)["neighbours"]
    assert [n["index"] for n in neighbours] == idx[9].tolist()
    assert [n["cosine"] for n in neighbours] == pytest.approx(values[9].tolist(), abs=1e-4)


def test_cross_layer_flow_is_the_pearson_correlation_on_the_token_sample(
    built: Path, brute: dict[str, Any], saes: dict[str, JumpReLUSAE]
) -> None:
    index = FeatureIndex(built)
    assert index.saes()[0]["stats"]["flow_tokens"] == 1000
    keep = brute["keep"].flatten()
    a = brute["resid_post.1.w96"].reshape(-1, 96)[keep][:1000].double().numpy()
    b = brute["resid_post.3.w64"].reshape(-1, 64)[keep][:1000].double().numpy()
    latent = int(np.argmax((a > 0).sum(0) * ((a > 0).sum(0) < 900)))  # a busy latent that varies
    flow = index.feature("resid_post.1.w96", latent)["flow"]
    assert flow and all(f["sae_id"] == "resid_post.3.w64" and f["layer"] == 3 for f in flow)
    corr = np.array(
        [np.corrcoef(a[:, latent], b[:, j])[0, 1] if b[:, j].std() > 0 else -np.inf for j in range(64)]
    )
    best = np.argsort(-corr)[: len(flow)]
    assert [f["index"] for f in flow] == best.tolist()
    assert [f["corr"] for f in flow] == pytest.approx(corr[best].tolist(), abs=1e-3)
    back = index.feature("resid_post.3.w64", int(best[0]))["flow"]
    assert latent in [f["index"] for f in back]


def test_second_pass_by_recomputing_equals_the_spilled_one(
    tiny_model: LanguageModel, built: Path, saes: dict[str, JumpReLUSAE], tmp_path: Path
) -> None:
    sid = "resid_post.3.w64"
    db = build_index(
        tiny_model,
        {sid: saes[sid]},
        tmp_path / "f.sqlite",
        n_tokens=N_TOKENS,
        batch_rows=5,
        spill_bytes=0,
        progress=False,
    )
    fresh, spilled = FeatureIndex(db), FeatureIndex(built)
    assert fresh.saes()[0]["stats"]["second_pass"] == "recompute"
    assert spilled.saes()[0]["stats"]["second_pass"] == "spill"
    for latent in (0, 13, 40):
        a, b = fresh.feature(sid, latent), spilled.feature(sid, latent)
        for key in (
            "density",
            "max_act",
            "histogram",
            "top_examples",
            "intervals",
            "logit_lens",
            "neighbours",
        ):
            assert a[key] == b[key]
        assert a["flow"] == []  # one layer: no flow


# ---------------------------------------------------------------------------------------------
# Per-prompt views and search


def test_top_features_hide_bos_and_match_the_encoder(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE]
) -> None:
    sae = saes["resid_post.1.w96"]
    text = "The cat sat on the mat in Paris."
    rows = top_features(tiny_model, sae, text, k=3, densities=None)
    ids = tiny_model.to_tokens(text)
    site = Site("resid_post", 1)
    acts = sae.encode(capture(tiny_model, ids, [site])[site][0]).detach()
    assert [r["position"] for r in rows] == list(range(1, ids.shape[1]))
    assert all(r["token"] != "<bos>" for r in rows)
    for r in rows:
        values, latents = acts[r["position"]].topk(3)
        expected = [(int(i), float(v)) for v, i in zip(values, latents, strict=True) if v > 0]
        assert [(f["index"], pytest.approx(f["value"])) for f in r["features"]] == expected
    # hiding dense latents: none of them may appear
    densities = torch.zeros(96)
    densities[acts[1:].max(0).values.topk(5).indices] = 0.5
    hidden = top_features(tiny_model, sae, text, k=3, hide_dense=0.01, densities=densities)
    shown = {f["index"] for r in hidden for f in r["features"]}
    assert not shown & set(densities.nonzero().squeeze(1).tolist())


def test_positions_above_the_training_norm_limit_show_no_features(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE]
) -> None:
    """Inputs like those the SAE's training left out (Gemma 3's massive activations, cfg
    max_scaled_norm x scale) get no features, as BOS does; the others are unchanged."""
    sae = saes["resid_post.1.w96"]
    text = "The cat sat on the mat in Paris."
    ids = tiny_model.to_tokens(text)
    site = Site("resid_post", 1)
    x = capture(tiny_model, ids, [site])[site][0]
    norms = x[1:].norm(dim=-1)
    limit = float(norms.median())
    plain = top_features(tiny_model, sae, text, k=3, densities=None)
    limited = JumpReLUSAE(
        SAEConfig(**{**sae.cfg.__dict__, "extra": {"max_scaled_norm": 2.0, "scale": limit / 2}})
    )
    limited.load_state_dict(sae.state_dict())
    rows = top_features(tiny_model, limited, text, k=3, densities=None)
    for r, p, n in zip(rows, plain, norms, strict=True):
        assert r["features"] == ([] if n > limit else p["features"])
    assert any(n > limit for n in norms) and any(r["features"] for r in rows)


def test_search_text_ranks_latents_by_their_max_on_the_text_or_token(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE]
) -> None:
    sae = saes["resid_post.1.w96"]
    text = "Rivers flow into the sea. The sea is salty."
    hits = search_text(tiny_model, sae, text, limit=5)
    values = [h["value"] for h in hits]
    assert values == sorted(values, reverse=True) and len(hits) == 5
    ids = tiny_model.to_tokens(text)
    site = Site("resid_post", 1)
    acts = sae.encode(capture(tiny_model, ids, [site])[site][0]).detach()[1:]
    assert hits[0]["index"] == int(acts.max(0).values.argmax())
    at_sea = search_text(tiny_model, sae, text, token="sea", limit=3)
    assert all(h["token"].strip() == "sea" for h in at_sea)
    with pytest.raises(ConfigError, match=r"token 'ocean' does not occur"):
        search_text(tiny_model, sae, text, token="ocean")
    with pytest.raises(ConfigError, match="empty"):
        top_features(tiny_model, sae, "   ")


def test_baseline_explanation_names_only_lens_tokens_the_corpus_uses() -> None:
    from gemmascope.features import baseline_explanation

    feature = {
        "top_examples": [{"tokens": [" the", " sea"], "acts": [0.0, 3.0], "focus": 1}],
        "logit_lens": {"promoted": [{"token": "मंत्रियों", "value": 2.0}, {"token": " waves", "value": 1.0}]},
    }
    assert baseline_explanation(feature) == 'fires on "sea"; after "the"; promotes "मंत्रियों", "waves"'
    assert (
        baseline_explanation(feature, {"the", "sea", "waves"})
        == 'fires on "sea"; after "the"; promotes "waves"'
    )
    # a plain word the corpus lacks is named when the lens says it twice; once, or a short piece, not
    assert baseline_explanation(feature, {"the"}) == 'fires on "sea"; after "the"'
    feature["logit_lens"]["promoted"].append({"token": " Waves", "value": 0.5})
    assert baseline_explanation(feature, {"the"}) == 'fires on "sea"; after "the"; promotes "waves"'
    feature["logit_lens"]["promoted"][1]["token"] = " wav"
    feature["logit_lens"]["promoted"][2]["token"] = " Wav"
    assert baseline_explanation(feature, {"the"}) == 'fires on "sea"; after "the"'


def _page(top: list[str], intervals: list[tuple[int, list[str]]], density: float = 0.04) -> dict[str, Any]:
    """A feature page: top examples on the tokens `top` (strongest first), and interval samples,
    each interval `(count of firings, its sampled tokens)`; every window its own."""

    def window(token: str, n: int, act: float) -> dict[str, Any]:
        return {"tokens": [f" w{n}", f" {token}"], "acts": [0.0, act], "focus": 1}

    return {
        "density": density,
        "top_examples": [window(t, i, 10.0 - i / 10) for i, t in enumerate(top)],
        "intervals": [
            {"count": count, "examples": [window(t, 100 * k + j, 1.0) for j, t in enumerate(tokens)]}
            for k, (count, tokens) in enumerate(intervals)
        ],
        "logit_lens": {"promoted": [], "suppressed": []},
    }


def test_a_broad_latent_is_labelled_by_what_it_fires_on_not_by_its_peak() -> None:
    """A latent whose peak is on "ocean" but most of whose firings are on all sorts of tokens says
    so first; one that mostly fires on a token names it, and the tokens most firings are on."""
    from gemmascope.features import baseline_explanation

    broad = _page(["ocean"] * 20, [(900, ["as", "in", "house", "level", "name"]), (10, ["ocean"] * 5)])
    assert baseline_explanation(broad) == 'fires on varied tokens (4% of all tokens), most strongly "ocean"'
    narrow = _page(["the"] * 20, [(900, ["the", "the", "the", "The", "a"]), (10, ["the"] * 5)])
    assert baseline_explanation(narrow) == 'fires on "the"'
    # the token most firings are on is named beside the strongest, once seen in two windows
    typical = _page(["the"] * 20, [(900, ["The", "The", "The", "a", "of"]), (10, ["the"] * 5)])
    assert baseline_explanation(typical) == 'fires on "the", "The"'
    # without interval samples, the windows shown count one each (the stored pages of old indexes)
    old = _page(["sea", "sea", "sea", "boat"], [])
    assert baseline_explanation(old) == 'fires on "sea", "boat"'


def test_the_logit_lens_is_named_only_where_it_is_coherent() -> None:
    """A lens whose top tokens are mostly junk (other scripts, byte pieces, words the corpus never
    uses) names none of them, not even the few common words among them."""
    from gemmascope.features import baseline_explanation
    from gemmascope.features.explain import coherent_lens

    page = _page(["sea"] * 4, [(10, ["sea"] * 5)])
    junk = ["\u200c", "\ufffd", " години", "scripts", " is", "\xad", " 思", " std", "¬", " er"]
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in junk]
    known = {"is", "er", "sea", "waves", "ships", "boats"}  # as lens_vocabulary writes them
    assert coherent_lens(page, known) == [] and baseline_explanation(page, known) == 'fires on "sea"'
    lens = [" waves", " ships", " boats", " is", " er", "\u200c", " години", " std"]
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in lens]
    assert coherent_lens(page, known) == [" waves", " ships", " boats", " is", " er"]
    assert baseline_explanation(page, known) == 'fires on "sea"; promotes "waves", "ships", "boats"'
    # a word is the same word in any case, with or without its leading blank
    lens = [" Waves", "ships", " BOATS", " sea", "\u200c", " години"]
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in lens]
    assert coherent_lens(page, known) == [" Waves", "ships", " BOATS", " sea"]
    page["logit_lens"]["promoted"] = [
        {"token": t, "value": 1.0} for t in [" ships", " Ships", "ships", " sea"]
    ]
    assert baseline_explanation(page, known) == 'fires on "sea"; promotes "ships", "sea"'  # one form a word
    # plain words the small index corpus lacks are words a reader knows; short pieces are not
    lens = [" coronavirus", "Coronavirus", " pandemic", " Covid", "\u200c", " std", "pri", " години"]
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in lens]
    assert coherent_lens(page, known) == [" coronavirus", "Coronavirus", " pandemic", " Covid"]
    assert baseline_explanation(page, known) == 'fires on "sea"; promotes "coronavirus", "pandemic", "Covid"'
    lens = [" coronavirus", " std", "pri", " години", "\u200c", " Tango"]  # 2 of 6 plain words: junk
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in lens]
    assert coherent_lens(page, known) == []
    lens = [" patients", " software", " blackjack", " sea"]  # plain words, none said twice: a random lens
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in lens]
    assert coherent_lens(page, known) == []
    # readable words whose embeddings do not agree (the page's `agreement` under LENS_AGREES): noise
    page["logit_lens"]["promoted"] = [{"token": t, "value": 1.0} for t in [" ships", " Ships", " sea"]]
    page["logit_lens"]["agreement"] = 0.4
    assert coherent_lens(page, known) == [" ships", " Ships", " sea"]
    page["logit_lens"]["agreement"] = 0.1
    assert coherent_lens(page, known) == []
    assert baseline_explanation(page, known) == 'fires on "sea"'


def test_a_lens_led_by_words_of_the_corpus_is_named_whatever_follows() -> None:
    """A male latent's lens: " his", " himself", " he", then other scripts' words for the same
    (a minority of readable tokens, which the coherence share alone refuses): named by its words
    of the corpus, when they lead it and its tokens agree at least LENS_LEAD_AGREES."""
    from gemmascope.features import baseline_explanation
    from gemmascope.features.explain import LENS_AGREES, LENS_LEAD_AGREES, coherent_lens

    page = _page(["."] * 4, [(10, ["."] * 5)])
    known = {"his", "himself", "he", "him", "."}
    lens = [" his", " himself", " he", "他", "彼", " его", "他的", " him", "他们", "彼は"]
    page["logit_lens"] = {"promoted": [{"token": t, "value": 1.0} for t in lens], "agreement": 0.5}
    assert coherent_lens(page, known) == [" his", " himself", " he", " him"]
    assert baseline_explanation(page, known) == 'fires on "."; promotes "his", "himself", "he"'
    # agreeing, but under the lead's bar: the share rule decides, and 4 of 10 readable is junk
    page["logit_lens"]["agreement"] = (LENS_AGREES + LENS_LEAD_AGREES) / 2
    assert coherent_lens(page, known) == []
    page["logit_lens"]["agreement"] = 0.5
    # led by two words only, or by a mark that is no word: junk
    page["logit_lens"]["promoted"][2]["token"] = " 彼女"
    assert coherent_lens(page, known) == []
    page["logit_lens"]["promoted"][2]["token"] = "."
    assert coherent_lens(page, known) == []
    page["logit_lens"]["promoted"][2]["token"] = " he"
    assert coherent_lens(page, known) == [" his", " himself", " he", " him"]
    del page["logit_lens"]["agreement"]  # an index built before agreement: the share rule alone
    assert coherent_lens(page, known) == []
    # a lens of countries with one the corpus lacks and no stem said twice, which the share rule
    # refuses; led by corpus words, it is named by them, the marks after them left out
    countries = [" Japan", " Italy", " Germany", " Belgium", ",", " France"]
    page["logit_lens"] = {"promoted": [{"token": t, "value": 1.0} for t in countries], "agreement": 0.7}
    places = {"japan", "italy", "germany", "france", ","}
    assert coherent_lens(page, places) == [" Japan", " Italy", " Germany", " France"]
    page["logit_lens"]["agreement"] = 0.2
    assert coherent_lens(page, places) == []


def test_lens_agreement_is_the_mean_cosine_of_centred_output_embeddings(tiny_model: LanguageModel) -> None:
    """`lens_agreement` computed the slow way: every ordered pair of distinct tokens of a row; a row
    of one token repeated agrees fully (the built pages' values: the direct-product test above)."""
    from gemmascope.features.lens import lens_agreement

    w = tiny_model.hf.get_output_embeddings().weight.detach()
    centred = w - w.mean(0)
    ids = torch.tensor([[5, 17, 300, 4000], [9, 9, 9, 9], [11, 12, 13, 14]])
    expected = []
    for row in ids.tolist():
        cos = [
            float(torch.cosine_similarity(centred[a], centred[b], dim=0))
            for i, a in enumerate(row)
            for j, b in enumerate(row)
            if i != j
        ]
        expected.append(sum(cos) / len(cos))
    got = lens_agreement(tiny_model, ids)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[1] == pytest.approx(1.0, abs=1e-5)


def test_relabel_writes_the_weights_part_and_labels_a_build_writes(
    built: Path, tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE], tmp_path: Path
) -> None:
    """`gemmascope index --relabel`: the logit lens, neighbours and baseline explanations of an
    existing index written again from the SAE's weights and its stored pages, as the build writes
    them, without a pass over the corpus; another SAE's weights are refused, nothing written."""
    import shutil

    from gemmascope.features.build import relabel

    sid = "resid_post.1.w96"
    db = tmp_path / "features.sqlite"
    shutil.copy(built, db)
    index = FeatureIndex(db)
    pages = [index.feature(sid, i) for i in range(96)]
    index.patch_features(sid, {i: {"logit_lens": {"promoted": [], "suppressed": []}} for i in range(96)})
    index.set_explanations(sid, [(i, "stale", None) for i in range(96)])
    with pytest.raises(StoreError, match="latent 96 of 'resid_post.1.w96' has no page"):
        index.patch_features(sid, {0: {"neighbours": []}, 96: {"neighbours": []}})
    assert index.feature(sid, 0)["neighbours"] == pages[0]["neighbours"]  # nothing written
    index.close()
    with pytest.raises(StoreError, match="other weights"):
        relabel(tiny_model, db, sid, saes["resid_post.3.w64"])
    assert set(FeatureIndex(db).best_explanations(sid, range(96)).values()) == {"stale"}
    assert relabel(tiny_model, db, sid, saes[sid]) == 96
    again = FeatureIndex(db)
    assert [again.feature(sid, i) for i in range(96)] == pages  # the lens, neighbours and labels
    assert set(again.best_explanations("resid_post.3.w64", range(64)).values()) != {"stale"}


def test_a_broad_latent_is_labelled_by_the_words_its_windows_are_about() -> None:
    """A latent firing on "the" and "to" in texts about disease: its label names the words its
    windows share far above the corpus rate ("virus"), not a word every text holds ("which"), and a
    window repeated (the same text shifted) counts once."""
    from gemmascope.features.explain import CorpusWords, baseline_explanation, context_words

    corpus = CorpusWords({"virus": 20, "which": 5000, "the": 9000, "fever": 30, "city": 400})
    fillers = [[f"w{chr(97 + i)}{chr(97 + j)}" for j in range(6)] for i in range(8)]  # words of each text

    def window(words: list[str], focus: int) -> dict[str, Any]:
        return {"tokens": [f" {w}" for w in words], "acts": [1.0] * len(words), "focus": focus}

    about = [window(["the", "virus", "which", "fever", *f], 4) for f in fillers]  # on a word of its own
    page = {"density": 0.03, "top_examples": about, "intervals": []}
    assert context_words(page, corpus) == ["virus", "fever"]  # "which": in every text of the corpus
    label = baseline_explanation(page, corpus)
    assert label.startswith(  # what a broad latent is about leads: a list cutting labels short keeps it
        'in text with "virus", "fever"; fires on varied tokens (3% of all tokens), most strongly'
    )
    page["logit_lens"] = {"promoted": [{"token": t, "value": 1.0} for t in [" virus", " Virus", " fever"]]}
    assert baseline_explanation(page, corpus).startswith(
        'in text with "virus", "fever"; promotes "virus", "fever"; fires on varied tokens'
    )
    del page["logit_lens"]
    assert baseline_explanation(page, set(corpus)).startswith(
        "fires on varied tokens (3% of all tokens), most"
    )
    # the same text shifted by a token, eight times, is one window: too few to name anything
    same = [window(["the", "virus", "which", "fever", *fillers[0]][i % 2 :], 0) for i in range(8)]
    assert context_words({"top_examples": same, "intervals": []}, corpus) == []


def test_lens_tokens_named_are_those_the_corpus_uses_often() -> None:
    from gemmascope.features.build import lens_vocabulary

    rows = torch.tensor([[1, 2, 2, 3, 5, 6], [2, 2, 3, 4, 5, 6]])  # 1, 4 once; 3, 5, 6 twice; 2 four times
    decode = {
        1: " once",
        2: " often",
        3: " twice",
        4: " rare",
        5: "\ufffd",
        6: "\u200c",
    }  # 5, 6: nothing to see
    assert lens_vocabulary(rows, decode, min_count=2) == {"often": 4, "twice": 2}  # word: its count
    assert lens_vocabulary(rows, decode, min_count=4) == {"often": 4}
    # the forms of one word count together: " Rare" (7) twice and " rare" (4) once make 3; " once" 5
    decode[7] = " Rare"
    rows = torch.cat([rows, torch.tensor([[7, 7, 1, 1, 1, 1]])])
    assert lens_vocabulary(rows, decode, min_count=3) == {"often": 4, "rare": 3, "once": 5}


def test_baseline_explanations_are_stored_and_searchable(built: Path) -> None:
    import re

    index = FeatureIndex(built)
    for latent in range(96):
        feature = index.feature("resid_post.1.w96", latent)
        assert feature["explanation"].startswith("fires on ") or not feature["top_examples"]
        fires_on = (feature["explanation"] or "").split(";")[0]
        words = re.findall(r'"\s*([A-Za-z]{3,})\s*"', fires_on)
        if words:
            break
    # the most frequent activating token is named first
    focus = [e["tokens"][e["focus"]].strip() for e in feature["top_examples"]]
    assert words[0] in focus
    hits = index.search_explanations("resid_post.1.w96", words[0], limit=96)
    assert latent in [h["index"] for h in hits]
    assert all(words[0].lower() in h["explanation"].lower() for h in hits)
    assert index.search_explanations(None, words[0], limit=200)
    with pytest.raises(ConfigError, match="at least one word"):
        index.search_explanations(None, "  ?? ")


# ---------------------------------------------------------------------------------------------
# The optional explainer against a small local OpenAI-compatible server


class _FakeChat(BaseHTTPRequestHandler):
    """Explains every latent as 'the word zebra'; in detection, says 1 exactly for texts holding
    'zebra' (or the opposite, when the server is told to lie)."""

    requests: list[dict[str, Any]] = []
    lie = False

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        prompt = body["messages"][-1]["content"]
        if "Reply with the phrase only" in prompt:
            reply = "the word zebra"
        else:
            texts = [
                line.split(". ", 1)[1] for line in prompt.splitlines() if line[:1].isdigit() and ". " in line
            ]
            reply = json.dumps([int(("zebra" in t) != type(self).lie) for t in texts])
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def chat_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    _FakeChat.requests, _FakeChat.lie = [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _window(words: list[str], focus: int) -> dict[str, Any]:
    tokens = [f" {w}" for w in words]
    return {
        "tokens": tokens,
        "acts": [1.0 if i == focus else 0.0 for i in range(len(words))],
        "focus": focus,
        "value": 1.0,
    }


def _zebra_index(path: Path) -> FeatureIndex:
    """A hand-written index of one latent that fires on 'zebra' and one that never fires."""
    index = FeatureIndex(path, create=True)
    sae = random_sae(1, 2, 7)
    index.begin_sae(
        {
            "sae_id": "toy",
            "site": "resid_post.1",
            "layer": 1,
            "width": 2,
            "d_in": 64,
            "architecture": "jumprelu",
            "model_name": "tiny-gemma3",
            "fingerprint": sae_fingerprint(sae),
        }
    )
    top = [_window(["a", "striped", "zebra", f"number{i}", "ran"], 2) for i in range(20)]
    interval = {"lo": 0.0, "hi": 1.0, "count": 5, "share": 1.0, "examples": top[15:]}
    empty = {
        "histogram": {"edges": [], "counts": []},
        "top_examples": [],
        "intervals": [],
        "neighbours": [],
        "logit_lens": {"promoted": [], "suppressed": []},
    }
    index.write_features(
        "toy",
        [
            (
                0,
                0.1,
                20,
                1.0,
                {
                    **empty,
                    "top_examples": top,
                    "intervals": [interval],
                    "logit_lens": {"promoted": [{"token": " stripes", "value": 1.0}], "suppressed": []},
                },
            ),
            (1, 0.0, 0, 0.0, empty),
        ],
    )
    index.write_null_windows(
        "toy", [([" a", " quiet", f" horse{i}"], np.array([1], dtype=np.int32)) for i in range(10)]
    )
    index.set_explanations("toy", [(0, "fires on zebra", None)])
    index.finish_sae("toy", {"n_tokens": 200})
    return index


def test_llm_explainer_writes_explanations_and_detection_scores(chat_server: str, tmp_path: Path) -> None:
    index = _zebra_index(tmp_path / "toy.sqlite")
    endpoint = ChatEndpoint(chat_server, "fake-model", api_key="secret")
    results = explain_with_llm(index, "toy", [0, 1], endpoint, n_shown=10, n_scored=5, progress=False)
    assert [r["index"] for r in results] == [0]  # the latent that never fired is skipped
    assert results[0]["explanation"] == "the word zebra"
    assert results[0]["score"] == 1.0 and results[0]["baseline_score"] == 1.0
    feature = index.feature("toy", 0)
    assert feature["explanation"] == "the word zebra"
    assert feature["explanations"][0] == {
        "explainer": "llm:fake-model",
        "text": "the word zebra",
        "score": 1.0,
        "model": "fake-model",
    }
    first = _FakeChat.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["body"]["model"] == "fake-model"
    assert first["auth"] == "Bearer secret"
    assert "<< zebra>>" in first["body"]["messages"][0]["content"]
    scoring = _FakeChat.requests[1]["body"]["messages"][0]["content"]
    assert "number1 " not in scoring  # the windows shown to the explainer are not scored
    assert index.search_explanations("toy", "zebra")[0]["explainer"] == "llm:fake-model"
    _FakeChat.lie = True
    assert detection_score(endpoint, "x", ["a zebra", "a horse", "zebra!"], [True, False, True]) == 0.0


def test_llm_explainer_errors_name_the_endpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        ChatEndpoint("localhost:9", "m")
    index = _zebra_index(tmp_path / "toy.sqlite")
    with pytest.raises(
        GemmaScopeError, match=r"cannot reach chat endpoint 'http://127.0.0.1:9/v1/chat/completions'"
    ):
        explain_with_llm(
            index, "toy", [0], ChatEndpoint("http://127.0.0.1:9/v1", "m", timeout_s=5), progress=False
        )


# ---------------------------------------------------------------------------------------------
# Export


def test_neuronpedia_export_writes_batched_gzipped_jsonl(built: Path, tmp_path: Path) -> None:
    dest = export_neuronpedia(built, "resid_post.3.w64", tmp_path / "np", batch_size=25)
    assert dest == tmp_path / "np" / "tiny-gemma3" / "3-gemmascope-res-64"
    for sub in ("features", "activations", "explanations"):
        assert sorted(p.name for p in (dest / sub).iterdir()) == [f"batch-{i}.jsonl.gz" for i in range(3)]
    features = [
        json.loads(line)
        for i in range(3)
        for line in gzip.open(dest / "features" / f"batch-{i}.jsonl.gz", "rt")
    ]
    assert [f["index"] for f in features] == [str(i) for i in range(64)]
    index = FeatureIndex(built)
    page = index.feature("resid_post.3.w64", 10)
    assert features[10]["frac_nonzero"] == page["density"] and features[10]["maxActApprox"] == page["max_act"]
    assert features[10]["freq_hist_data_bar_heights"] == page["histogram"]["counts"]
    assert features[10]["pos_str"] == [p["token"] for p in page["logit_lens"]["promoted"]]
    assert (
        features[10]["layer"] == "3-gemmascope-res-64"
        and features[10]["hookName"] == "blocks.3.hook_resid_post"
    )
    acts = [json.loads(line) for line in gzip.open(dest / "activations" / "batch-0.jsonl.gz", "rt")]
    mine = [a for a in acts if a["index"] == "10"]
    assert len(mine) == len(page["top_examples"]) + sum(len(iv["examples"]) for iv in page["intervals"])
    assert (
        mine[0]["tokens"] == page["top_examples"][0]["tokens"]
        and mine[0]["values"] == page["top_examples"][0]["acts"]
    )
    expl = [json.loads(line) for line in gzip.open(dest / "explanations" / "batch-0.jsonl.gz", "rt")]
    assert {"description", "typeName", "modelId", "layer", "index"} <= set(expl[0])


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_requests_are_clear_errors(built: Path, saes: dict[str, JumpReLUSAE]) -> None:
    index = FeatureIndex(built)
    with pytest.raises(
        ConfigError, match=r"latent 96 is out of range for SAE 'resid_post.1.w96': valid latents are 0..95"
    ):
        index.feature("resid_post.1.w96", 96)
    with pytest.raises(ConfigError, match="out of range"):
        index.feature("resid_post.1.w96", -1)
    with pytest.raises(StoreError, match=r"unknown SAE 'resid_post.9.w1'.*resid_post.1.w96"):
        index.feature("resid_post.9.w1", 0)
    index.check_sae("resid_post.1.w96", saes["resid_post.1.w96"])
    with pytest.raises(StoreError, match="built from other weights"):
        index.check_sae("resid_post.1.w96", saes["resid_post.3.w64"])


def test_an_sae_without_a_site_or_of_the_wrong_width_is_refused(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    sae = random_sae(1, 8, 0)
    sae.cfg.site = ""
    with pytest.raises(ConfigError, match=r"SAE 'x' has no site in its config.*--site"):
        build_index(tiny_model, {"x": sae}, tmp_path / "f.sqlite", n_tokens=256, progress=False)
    wide = random_sae(1, 8, 0, d_in=32)
    with pytest.raises(ConfigError, match=r"reads 32-wide activations but site resid_post.1 .* is 64 wide"):
        build_index(tiny_model, {"x": wide}, tmp_path / "f.sqlite", n_tokens=256, progress=False)


def test_a_corpus_too_small_is_a_clear_error(tiny_model: LanguageModel, tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"Paragraph {i} about rivers, hills and the sea." for i in range(40)))
    with pytest.raises(CorpusError, match=r"holds 512 tokens in rows of 128, fewer than the 5,000 asked for"):
        build_index(
            tiny_model,
            {"x": random_sae(1, 8, 0)},
            tmp_path / "f.sqlite",
            n_tokens=5000,
            corpus=str(small),
            split="all",
            progress=False,
        )
    assert not (tmp_path / "f.sqlite").exists()


def test_a_half_built_index_is_never_served(
    tiny_model: LanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "f.sqlite"
    sae = random_sae(1, 8, 0)
    build_index(tiny_model, {"x": sae}, db, n_tokens=256, progress=False)
    assert FeatureIndex(db).feature("x", 0)["index"] == 0

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr("gemmascope.features.build.decoder_neighbours", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(tiny_model, {"x": sae}, db, n_tokens=256, progress=False)
    index = FeatureIndex(db)  # a killed re-build leaves the good index whole
    assert [s["sae_id"] for s in index.saes()] == ["x"] and index.feature("x", 0)["index"] == 0
    db = tmp_path / "first.sqlite"  # a killed first build is never served
    with pytest.raises(RuntimeError, match="killed"):
        build_index(tiny_model, {"x": sae}, db, n_tokens=256, progress=False)
    index = FeatureIndex(db)
    assert index.saes() == [] and index.saes(include_incomplete=True)[0]["complete"] is False
    with pytest.raises(StoreError, match=r"index of SAE 'x' .* is incomplete"):
        index.feature("x", 0)


def test_files_that_are_not_an_index_of_this_model_are_refused(
    tiny_model: LanguageModel, built: Path, tmp_path: Path
) -> None:
    with pytest.raises(StoreError, match="no feature index at"):
        FeatureIndex(tmp_path / "missing.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite feature index"):
        FeatureIndex(junk)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="is not a gemmascope feature index"):
        FeatureIndex(other)
    index = FeatureIndex(built)
    info = {**index.saes()[0], "sae_id": "y", "model_name": "gemma-3-270m"}
    with pytest.raises(StoreError, match=r"indexes SAEs of model 'tiny-gemma3', not 'gemma-3-270m'"):
        index.begin_sae(info)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_index_and_inspect_on_a_saved_sae(
    tiny_model: LanguageModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    chat_server: str,
) -> None:
    from gemmascope.cli import main
    from gemmascope.formats import sae_dir, save_sae

    loaded: list[str] = []
    monkeypatch.setattr("gemmascope.models.load_model", lambda name: loaded.append(name) or tiny_model)

    run = tmp_path / "run"
    folder = save_sae(random_sae(2, 32, 5), sae_dir(run, "resid_post.2", 32, 9))
    key = "resid_post.2.w32.l0_9"
    assert main(["index", str(run), "--tokens", "256", "--quiet", "--model-dtype", "bfloat16"]) == 0
    assert loaded == ["tiny-gemma3"]  # the model named in the SAE's metadata (a bfloat16 copy reads)
    out = capsys.readouterr().out
    assert "resid_post.2.w32.l0_9:" in out and str(run / "features.sqlite") in out
    assert (
        main(
            [
                "inspect",
                "The river flows to the sea",
                "--sae",
                str(folder),
                "--show-dense",
                "--color",
                "always",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "\033[48;5;" in out
        and "top 5 features of resid_post.2.w32.l0_9 per token" in out
        and "' river'" in out
    )
    assert main(["inspect", "--run", str(run), "--find", "fires on"]) == 0
    assert "resid_post.2.w32.l0_9#" in capsys.readouterr().out
    # explanations from an OpenAI-compatible endpoint, then a Neuronpedia export, on the existing index
    args = ["index", str(run), "--no-build", "--llm-url", chat_server, "--llm-model", "fake"]
    assert main([*args, "--llm-latents", "0-3", "--quiet", "--export", str(tmp_path / "np")]) == 0
    out = capsys.readouterr().out
    assert "explanations by fake" in out and "the word zebra" in out
    exported = tmp_path / "np" / "tiny-gemma3" / "2-gemmascope-res-32-l0-9"
    assert (exported / "features" / "batch-0.jsonl.gz").is_file()
    live = [i for i in range(4) if FeatureIndex(run / "features.sqlite").feature(key, i)["top_examples"]]
    assert FeatureIndex(run / "features.sqlite").feature(key, live[0])["explanation"] == "the word zebra"
    # bad input: one line on stderr, status 2
    assert main(["index", str(tmp_path / "nowhere")]) == 2
    assert "no run folder or SAE folder" in capsys.readouterr().err
    bare = random_sae(2, 8, 6)
    bare.cfg.model_name = ""
    save_sae(bare, tmp_path / "bare")
    assert main(["index", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "name no single model in their metadata" in err and "pass --model NAME" in err


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_index_on_the_real_model_shows_real_text(real_model: LanguageModel, tmp_path: Path) -> None:
    sae = random_sae(6, 32, 11, d_in=640)
    sae.cfg.model_name = "gemma-3-270m"
    db = build_index(
        real_model, {"resid_post.6.w32": sae}, tmp_path / "f.sqlite", n_tokens=256, progress=False
    )
    feature = FeatureIndex(db).feature("resid_post.6.w32", 0)
    words = "".join(t for e in feature["top_examples"] for t in e["tokens"])
    assert sum(c.isalpha() for c in words) > 0.5 * len(words)  # windows of English text
    assert len(feature["logit_lens"]["promoted"]) == 10
    rows = top_features(real_model, sae, "Paris is the capital of France.", k=2)
    assert rows[0]["token"] == "Paris"


def test_a_spill_the_disk_has_no_room_for_is_recomputed_not_a_sigbus(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spill file's blocks are allocated before it is mapped: a disk without room for them is
    an OSError there (the second pass then runs the model again), never a SIGBUS at a first write
    into the map, which killed the process without a word."""
    import errno

    from gemmascope.features import build

    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build.os, "posix_fallocate", no_room)
    sid = "resid_post.3.w64"
    db = build_index(tiny_model, {sid: saes[sid]}, tmp_path / "f.sqlite", n_tokens=N_TOKENS, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.sqlite"]
    assert FeatureIndex(db).saes()[0]["stats"]["second_pass"] == "recompute"


_SPILL_SCRIPT = """
import sys
from pathlib import Path
import torch
from gemmascope.features import FeatureIndex, build_index
from gemmascope.models import load_model
from gemmascope.sae import JumpReLUSAE, SAEConfig
sae = JumpReLUSAE(SAEConfig("jumprelu", 64, 64, site="resid_post.1", model_name="tiny-gemma3"))
torch.nn.init.normal_(sae.W_enc), torch.nn.init.normal_(sae.W_dec)
db = build_index(load_model("tiny-gemma3"), {"a": sae}, Path(sys.argv[1]) / "f.sqlite", n_tokens=4096, progress=False)
print(FeatureIndex(db).saes()[0]["stats"]["second_pass"])
"""


def test_an_index_on_a_disk_without_room_for_its_spill_builds_on_a_real_disk(tmp_path: Path) -> None:
    """The same on a small tmpfs (where one can be mounted): room for the index (~0.4 MB) and its
    write-ahead log, not for its 1 MB spill. The earlier build died of SIGBUS (exit -7) and left its
    spill folder."""
    import subprocess
    import sys

    import gemmascope

    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(disk)], capture_output=True
        )
    except OSError:  # no mount command here
        pytest.skip("cannot mount a tmpfs here")
    if mount.returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or in a container without the right)")
    try:
        env = {**os.environ, "PYTHONPATH": str(Path(gemmascope.__file__).parents[1])}
        done = subprocess.run(
            [sys.executable, "-c", _SPILL_SCRIPT, str(disk)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0 and done.stdout.strip() == "recompute", done.stderr[-2000:]
        assert sorted(p.name for p in disk.iterdir()) == ["f.sqlite"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_spill_folders_a_killed_build_left_are_removed(
    tiny_model: LanguageModel, saes: dict[str, JumpReLUSAE], tmp_path: Path
) -> None:
    """A killed build cannot remove its spill folder (up to 1 GiB); the next build beside it does,
    for every process that is gone (and leaves a running one's alone)."""
    stale = [tmp_path / ".index-spill-999999999-abcd", tmp_path / ".index-spill-8bdljrry"]  # dead; older
    running = tmp_path / f".index-spill-{os.getppid()}-efgh"
    for folder in (*stale, running):
        folder.mkdir()
        (folder / "resid_post.3.npy").write_bytes(b"\0" * 1024)
    sid = "resid_post.3.w64"
    build_index(tiny_model, {sid: saes[sid]}, tmp_path / "f.sqlite", n_tokens=N_TOKENS, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f.sqlite", running.name])
