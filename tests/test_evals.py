"""Tests for the evals package (core, metrics, probing, report): each metric on hand-built cases with known answers, the splice on the tiny
model (an exact SAE leaves the forward pass unchanged, a zero SAE equals zero-ablation), bad input,
the probes, the files and plots, and the real Gemma 3 270M."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from gemmascope import evals, sites
from gemmascope.corpus import special_mask
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.models import LanguageModel, OutputHead
from gemmascope.sae import SAE, JumpReLUSAE, SAEConfig
from gemmascope.sites import Site, capture, parse_site

# ---------------------------------------------------------------------------------------------
# Hand-built SAEs


def identity_sae(site: str, d: int, model_name: str = "tiny-gemma3") -> JumpReLUSAE:
    """An exact "SAE": latents relu(x) and relu(-x), threshold 0, so x_hat = x bit for bit."""
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d, d_sae=2 * d, site=site, model_name=model_name))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def zero_sae(site: str, d: int, model_name: str = "tiny-gemma3") -> JumpReLUSAE:
    """All parameters zero: x_hat = 0 everywhere, the same as zero-ablating the site."""
    return JumpReLUSAE(SAEConfig("jumprelu", d_in=d, d_sae=16, site=site, model_name=model_name))


def random_sae(site: str, d: int, d_sae: int = 96, model_name: str = "tiny-gemma3") -> JumpReLUSAE:
    gen = torch.Generator().manual_seed(0)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d, d_sae=d_sae, site=site, model_name=model_name))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae, generator=gen) / math.sqrt(d))
        sae.W_dec.copy_(sae.W_enc.T)
        sae.threshold.fill_(0.3)
    return sae


def eval_rows(model: LanguageModel, rows: int = 2, context_len: int = 32) -> torch.Tensor:
    """A few packed rows of held-out text (BOS first, EOS between articles)."""
    return evals.eval_token_ids(model, rows * (context_len - 1), context_len=context_len)[:rows]


# ---------------------------------------------------------------------------------------------
# Metrics on hand-built numbers


def _feed(stats: evals.ReconstructionStats, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
    positions = torch.arange(x.shape[0]) % stats.context_len
    half = x.shape[0] // 2  # in two chunks: the running sums must not depend on batching
    stats.update(x[:half], x_hat[:half], f[:half], positions[:half])
    stats.update(x[half:], x_hat[half:], f[half:], positions[half:])


def test_reconstruction_metrics_known_answers() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10, 8, generator=gen, dtype=torch.float64) + 3.0
    x = torch.cat([a, -a])  # exactly zero mean, so the total variance is sum ||x||^2
    f = torch.zeros(20, 4)
    f[:, 0] = 1.0  # fires on every token: dense
    f[7, 2] = 2.0  # 1 of 20 tokens: 5%
    f[[1, 5, 9], 3] = 0.5  # 3 of 20: 15%, dense; latent 1 never fires: dead

    exact = evals.ReconstructionStats(d_sae=4, context_len=8)
    _feed(exact, x, x.clone(), f)
    m = exact.metrics()
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert m["explained_variance"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(0.0, abs=1e-12)
    assert m["cossim"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx(1.0)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert m["l0"] == pytest.approx((20 + 1 + 3) / 20)
    assert m["l1"] == pytest.approx((20 * 1.0 + 2.0 + 3 * 0.5) / 20)
    assert m["frac_dead"] == 0.25 and m["frac_alive"] == 0.75
    assert m["frac_dense"] == 0.5 and m["freq_over_10_percent"] == 0.5
    assert m["freq_over_1_percent"] == 0.75
    hist = m["density_histogram"]
    assert hist["n_dead"] == 1 and sum(hist["counts"]) == 3
    edges = hist["log10_bin_edges"]
    assert len(hist["counts"]) == len(edges) - 1
    # log10(0.05) = -1.30 and log10(0.15) = -0.82 fall in their tenth-of-a-decade bins, 1.0 in the last
    assert hist["counts"][-1] == 1
    assert hist["counts"][edges.index(-1.4)] == 1 and hist["counts"][edges.index(-0.9)] == 1

    half = evals.ReconstructionStats(d_sae=4, context_len=8)
    _feed(half, x, x / 2, f)
    m = half.metrics()
    assert m["fvu"] == pytest.approx(0.25)
    assert m["explained_variance"] == pytest.approx(0.75)
    assert m["mse"] == pytest.approx(float((x / 2).pow(2).mean()))
    assert m["l2_ratio"] == pytest.approx(0.5)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert m["cossim"] == pytest.approx(1.0)
    # the token-weighted mean of the position curve is the FVU
    counts = half.n_by_position.double()
    curve = torch.tensor([v if v is not None else 0.0 for v in m["fvu_by_position"]], dtype=torch.float64)
    assert float((curve * counts).sum() / counts.sum()) == pytest.approx(m["fvu"])

    mean_only = evals.ReconstructionStats(d_sae=4, context_len=8)
    _feed(mean_only, x, torch.zeros_like(x), f)  # x_hat = mean(x) = 0
    assert mean_only.metrics()["fvu"] == pytest.approx(1.0)


def test_health_on_hand_built_latents() -> None:
    # 10 latents on 20 tokens: latent 0 always on, latent 1 on 12 tokens (60%), latent 2 on 4 (20%),
    # latent 3 on 2 (10%: not over 10%), latent 4 on 1, latents 5..9 never: dead
    n, d_sae = 20, 10
    fires = [20, 12, 4, 2, 1, 0, 0, 0, 0, 0]
    f = torch.zeros(n, d_sae)
    for j, k in enumerate(fires):
        f[:k, j] = 1.0 + j
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    stats = evals.ReconstructionStats(d_sae=d_sae, context_len=8)
    _feed(stats, x, x, f)
    m = stats.metrics()
    h = m["health"]
    l0 = sum(fires) / n  # 39 / 20
    assert m["l0"] == pytest.approx(l0)
    assert h["n_tokens"] == n and h["d_sae"] == d_sae
    assert h["n_dead"] == 5 and h["frac_dead"] == pytest.approx(0.5) == m["frac_dead"]
    assert h["n_over_50_percent"] == 2 and h["frac_over_50_percent"] == pytest.approx(0.2)
    assert h["l0_share_over_50_percent"] == pytest.approx((20 + 12) / 39)
    assert h["n_over_10_percent"] == 3 and h["frac_over_10_percent"] == pytest.approx(0.3) == m["frac_dense"]
    assert h["l0_share_over_10_percent"] == pytest.approx((20 + 12 + 4) / 39)
    # degenerate: always-on latents and dense latents carrying most of L0 (dead 50% is not over 50%)
    assert h["warning"].startswith("SAE looks degenerate: 2 latents fire on over half")
    assert "carry 92% of L0" in h["warning"] and "never fired" not in h["warning"]


def test_health_warning_rule() -> None:
    def health(density: list[float]) -> dict[str, object]:
        return evals.health(torch.tensor(density, dtype=torch.float64), n_tokens=1000)

    # healthy: nothing over 50%, the one latent over 10% carries 0.15 / 0.85 < 20% of L0, 1 of 9 dead
    fine = health([0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0])
    assert fine["n_over_50_percent"] == 0 and fine["n_dead"] == 1 and fine["n_over_10_percent"] == 1
    assert fine["l0_share_over_10_percent"] == pytest.approx(0.15 / 0.85) and fine["warning"] is None
    # two latents over 10% carrying 0.4 / 0.9 of L0: warned
    dense = health([0.15, 0.1, 0.1, 0.1, 0.1, 0.1, 0.25, 0.0])
    assert dense["n_over_10_percent"] == 2 and dense["l0_share_over_10_percent"] == pytest.approx(0.4 / 0.9)
    assert dense["warning"] == "SAE looks degenerate: the 2 latents over 10% density carry 44% of L0"
    # one latent over 50% is enough
    assert "1 latents fire on over half" in str(health([0.51] + [0.01] * 99)["warning"])
    # over half the latents dead, N named
    dead = health([0.05, 0.05, 0.0, 0.0, 0.0])
    assert dead["warning"] == "SAE looks degenerate: 60% of latents never fired on 1000 held-out tokens"
    # all dead: L0 0, shares 0, still warned
    none = health([0.0, 0.0])
    assert none["l0_share_over_10_percent"] == 0.0 and "100% of latents never fired" in str(none["warning"])


def test_health_in_eval_json_table_and_summary(tiny_model: LanguageModel, tmp_path: Path) -> None:
    results = evals.evaluate_tokens(
        tiny_model, {"zero": zero_sae("resid_post.2", 64)}, eval_rows(tiny_model, 2, 32), min_tokens=32
    )
    h = results[0]["health"]
    n = results[0]["eval_result_metrics"]["gemmascope"]["n_tokens"]
    assert h["n_tokens"] == n and h["n_dead"] == 16 and h["frac_dead"] == 1.0
    assert h["warning"] == f"SAE looks degenerate: 100% of latents never fired on {n} held-out tokens"
    data = json.loads(evals.write_eval(tmp_path / "sae", results[0]).read_text())
    assert data["health"] == h
    s = evals.summary(data)
    assert s["n_over_50_percent"] == 0 and s["health_warning"] == h["warning"]
    table = evals.format_table([data])
    assert ">50%" in table and "L0>10%" in table
    assert f"({n} held-out tokens per SAE; dead = never fired on them" in table
    assert f"! zero: {h['warning']}" in table
    # an eval.json from before the health block still makes a table
    old = {k: v for k, v in data.items() if k != "health"}
    assert evals.summary(old)["health_warning"] is None and "!" not in evals.format_table([old])


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk", [7, 50, 64])
def test_next_token_metrics_match_a_plain_reference(chunk: int, softcap: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    head = OutputHead(torch.randn(50, 8, generator=gen), torch.randn(50, generator=gen), softcap)
    clean_hidden = torch.randn(6, 8, generator=gen) * 2
    edited_hidden = clean_hidden + torch.randn(6, 8, generator=gen)
    targets = torch.randint(0, 50, (6,), generator=gen)
    clean_logits, edited_logits = head.logits(clean_hidden), head.logits(edited_hidden)
    if softcap is not None:
        assert float(edited_logits.abs().max()) <= softcap
    clean = evals.CleanDistribution(head, clean_hidden, targets, chunk=chunk)
    ce, kl = clean.compare(edited_hidden)
    ref_ce = torch.nn.functional.cross_entropy(edited_logits, targets, reduction="none")
    p, logp_edit = clean_logits.log_softmax(-1).exp(), edited_logits.log_softmax(-1)
    ref_kl = (p * (clean_logits.log_softmax(-1) - logp_edit)).sum(-1)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-5)
    ce_same, kl_same = clean.compare(clean_hidden)
    assert (
        float(kl_same.abs().max()) < 1e-4
    )  # float32 rounding of two log-softmax paths (1.9e-5 on AVX512 CPUs)
    torch.testing.assert_close(clean.unedited()[0], ce_same)
    torch.testing.assert_close(
        clean.unedited()[0], torch.nn.functional.cross_entropy(clean_logits, targets, reduction="none")
    )
    # differentiable in the edited hidden states, as the plain formula is
    edited = edited_hidden.clone().requires_grad_(True)
    ce_g, kl_g = clean.compare(edited)
    (ce_g.sum() + kl_g.sum()).backward()
    ref = edited_hidden.clone().requires_grad_(True)
    ref_logits = head.logits(ref)
    ref_loss = (
        torch.nn.functional.cross_entropy(ref_logits, targets, reduction="sum")
        + (p * (clean_logits.log_softmax(-1) - ref_logits.log_softmax(-1))).sum()
    )
    ref_loss.backward()
    assert edited.grad is not None and ref.grad is not None
    torch.testing.assert_close(edited.grad, ref.grad, rtol=1e-4, atol=1e-5)
    stats = evals.NextTokenStats()
    stats.update(ce[:3], kl[:3])
    stats.update(ce[3:], kl[3:])
    assert stats.n == 6 and stats.ce == pytest.approx(float(ref_ce.mean()))
    assert stats.kl == pytest.approx(float(ref_kl.mean()), rel=1e-4)


def test_scores_known_answers() -> None:
    assert evals.ce_loss_score(ce_clean=1.0, ce_sae=2.0, ce_ablation=3.0) == 0.5
    assert evals.ce_loss_score(ce_clean=1.0, ce_sae=3.0, ce_ablation=3.0) == 0.0  # zero reconstruction
    assert evals.ce_loss_score(ce_clean=1.0, ce_sae=1.0, ce_ablation=3.0) == 1.0
    assert evals.kl_div_score(kl_sae=0.5, kl_ablation=2.0) == 0.75
    assert math.isnan(evals.ce_loss_score(1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# The splice and the whole evaluation on the tiny model


def test_splicing_an_exact_sae_leaves_the_forward_pass_unchanged(tiny_model: LanguageModel) -> None:
    ids = eval_rows(tiny_model, rows=2, context_len=24)
    keep = ~special_mask(ids, tiny_model.special_token_ids)
    with torch.no_grad():
        clean = tiny_model.hf(input_ids=ids).logits
        for site in ("resid_post.1", "attn_out.2", "mlp_out.0"):
            with evals.splice(tiny_model, [identity_sae(site, 64)], keep):
                spliced = tiny_model.hf(input_ids=ids).logits
            torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-5)
        with evals.splice(tiny_model, [zero_sae("resid_post.1", 64)], keep):
            zeroed = tiny_model.hf(input_ids=ids).logits
        with evals.zero_ablate(tiny_model, Site("resid_post", 1), keep):
            ablated = tiny_model.hf(input_ids=ids).logits
    torch.testing.assert_close(zeroed, ablated, rtol=0, atol=1e-5)
    # BOS (and EOS) positions stay clean: the output at position 0 only sees position 0
    torch.testing.assert_close(zeroed[:, 0], clean[:, 0], rtol=0, atol=1e-5)
    assert float((zeroed[:, 1:] - clean[:, 1:]).abs().max()) > 1e-3


def _reference_under(
    model: LanguageModel, batch: evals.EditBatch, edit: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference of `EditBatch.under`: whole forward passes to the logits, clean and
    edited, and cross-entropy and KL from their log-softmax."""
    with torch.no_grad():
        clean = model.hf(input_ids=batch.ids).logits[:, :-1][batch.predict].log_softmax(-1)
        with edit:
            edited = model.hf(input_ids=batch.ids).logits[:, :-1][batch.predict].log_softmax(-1)
    ce = -edited.gather(1, batch.targets[:, None]).squeeze(1)
    return ce, (clean.exp() * (clean - edited)).sum(-1)


def test_edited_passes_equal_whole_forward_passes(tiny_model: LanguageModel) -> None:
    """The fast path (the clean pass once, edited passes resumed after the layers no edit touches,
    the output layer a vocabulary block at a time) equals whole forward passes to 1e-4, for a splice
    at each kind of site, a transcoder, several SAEs at once, an ablation and a steer."""
    from gemmascope.sites import capture
    from gemmascope.steer import Intervention, steering

    model = tiny_model
    ids = eval_rows(model, rows=3, context_len=24)
    tc = random_sae("mlp_in.1", 64)
    tc.cfg.out_site = "mlp_out.1"
    saes = [random_sae("resid_post.2", 64), random_sae("attn_out.1", 64), random_sae("mlp_out.0", 64)]
    batches = list(evals.edited_batches(model, ids, [*saes, tc], batch_rows=2, min_tokens=1))
    assert [b.ids.shape[0] for b in batches] == [2, 1]
    for batch in batches:
        ce_clean, _ = _reference_under(model, batch, contextlib.nullcontext())
        torch.testing.assert_close(batch.unedited[0], ce_clean, rtol=0, atol=1e-4)
        assert float(batch.unedited[1].abs().max()) == 0.0
        keep = batch.keep
        edits: dict[str, Callable[[], Any]] = {
            **{f"splice {sae.cfg.site}": partial(evals.splice, model, [sae], keep) for sae in [*saes, tc]},
            "all at once": partial(evals.splice, model, [*saes, tc], keep),
            "ablate resid_post.0": partial(evals.zero_ablate, model, Site("resid_post", 0), keep),
            "steer": partial(steering, model, [Intervention(saes[0], latent=3, value=4.0)]),
        }
        for name, edit in edits.items():
            with torch.no_grad():
                ce, kl = batch.under(edit())
            ref_ce, ref_kl = _reference_under(model, batch, edit())
            torch.testing.assert_close(ce, ref_ce, rtol=0, atol=1e-4, msg=name)
            torch.testing.assert_close(kl, ref_kl, rtol=0, atol=1e-4, msg=name)
            assert float((ce - ce_clean).abs().max()) > 1e-3, name  # every edit changes the loss
    # the layers before the first one an edit touches are replayed (a resid_post site's own layer too);
    # transformers' own output recorders, left on the model by `output_hidden_states`, edit nothing
    with torch.no_grad():
        model.hf(input_ids=ids[:1], output_hidden_states=True, output_attentions=True)
    for site, replayed in (("resid_post.2", 3), ("attn_out.1", 1), ("mlp_out.0", 0), ("mlp_in.1", 1)):
        with evals.replaced_at(model, parse_site(site), torch.zeros_like, batches[0].keep):
            assert sites._replayable_layers(model) == replayed, site
    assert sites._replayable_layers(model) == model.n_layers
    # a resumed pass is the whole pass bit for bit: the same final hidden states
    batch = batches[0]
    for edit in (contextlib.nullcontext(), evals.splice(model, saes[:1], batch.keep)):
        with edit:
            resumed = sites.resume(model, batch.ids, batch.trunk)
            _, whole = capture(model, batch.ids, [], trunk=True)
        assert torch.equal(resumed, whole.final)


def test_identity_sae_scores_perfectly_and_zero_sae_recovers_nothing(tiny_model: LanguageModel) -> None:
    ids = eval_rows(tiny_model, rows=2, context_len=32)
    saes = {
        "identity": identity_sae("resid_post.2", 64),
        "zero": zero_sae("resid_post.2", 64),
        "random": random_sae("resid_post.2", 64),
        "attn_identity": identity_sae("attn_out.1", 64),
    }
    results = {r["sae_id"]: r for r in evals.evaluate_tokens(tiny_model, saes, ids, min_tokens=32)}
    n_tokens = int((~special_mask(ids, tiny_model.special_token_ids)).sum())

    for name in ("identity", "attn_identity"):
        s = evals.summary(results[name])
        assert s["fvu"] == pytest.approx(0.0, abs=1e-10)
        assert s["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
        assert s["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
        assert s["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
        assert s["n_tokens"] == n_tokens
    zero = results["zero"]["eval_result_metrics"]
    perf = zero["model_performance_preservation"]
    assert perf["ce_loss_with_sae"] == pytest.approx(perf["ce_loss_with_ablation"], abs=1e-6)
    assert perf["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert zero["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert zero["gemmascope"]["frac_dead"] == 1.0 and zero["sparsity"]["l0"] == 0.0
    assert zero["reconstruction_quality"]["explained_variance"] < 0.0  # x_hat = 0 is worse than the mean

    rand = evals.summary(results["random"])
    assert 0 < rand["l0"] < 96 and rand["fvu"] > 0 and rand["kl_div_with_sae"] > 0
    # the SAEs of one site share one clean pass and one ablation pass; each SAE has its own splice
    assert results["random"]["eval_config"]["forward_passes_per_batch"] == 1 + 2 + 4
    assert results["random"]["eval_config"]["model_name"] == "tiny-gemma3"
    # evaluating an SAE alone gives the same numbers as evaluating it with others
    alone = evals.evaluate_tokens(tiny_model, {"random": saes["random"]}, ids, min_tokens=32)[0]
    assert evals.summary(alone) == pytest.approx(rand)
    assert len(results["random"]["fvu_by_position"]) == 32 and results["random"]["fvu_by_position"][0] is None


def test_positions_above_the_training_norm_limit_are_left_out(tiny_model: LanguageModel) -> None:
    """An SAE trained without Gemma 3's massive-activation tokens (cfg max_scaled_norm x scale) is not
    scored or spliced on them: they are left out as BOS is."""
    ids = eval_rows(tiny_model, rows=2, context_len=32)
    site = parse_site("resid_post.2")
    x = capture(tiny_model, ids, [site])[site]  # [rows, T, d]
    keep = ~special_mask(ids, tiny_model.special_token_ids)
    norms = x.norm(dim=-1)[keep]
    limit = float(norms.median())
    zero = zero_sae("resid_post.2", 64)
    zero.cfg.extra.update({"max_scaled_norm": 2.0, "scale": limit / 2.0})
    assert evals.norm_limit(zero) == pytest.approx(limit)
    result = evals.evaluate_tokens(tiny_model, {"zero": zero}, ids, min_tokens=8)[0]
    metrics = result["eval_result_metrics"]
    above = int((norms > limit).sum())
    assert f"BOS/EOS/pad and {above} massive-activation tokens excluded" in evals.format_table([result])
    assert 0 < above < len(norms)
    assert metrics["gemmascope"]["n_massive_tokens_excluded"] == above
    assert metrics["gemmascope"]["n_tokens"] == len(norms) - above
    # the kept positions are those at or below the limit: the zero SAE's error there is their sum of squares
    kept = x[keep][norms <= limit]
    assert metrics["reconstruction_quality"]["mse"] == pytest.approx(float(kept.pow(2).mean()), rel=1e-4)


def test_evaluate_reads_heldout_text_and_names_fields_as_saebench(tiny_model: LanguageModel) -> None:
    result = evals.evaluate(
        tiny_model, [random_sae("mlp_out.3", 64)], n_tokens=60, context_len=32, min_tokens=32
    )[0]
    assert result["eval_config"]["split"] == "heldout" and result["eval_config"]["dataset"] == "wiki"
    metrics = result["eval_result_metrics"]
    assert set(metrics) >= {
        "model_behavior_preservation",
        "model_performance_preservation",
        "reconstruction_quality",
        "shrinkage",
        "sparsity",
        "token_stats",
        "misc_metrics",
    }
    assert set(metrics["model_performance_preservation"]) == {
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    }
    assert set(metrics["model_behavior_preservation"]) == {
        "kl_div_score",
        "kl_div_with_ablation",
        "kl_div_with_sae",
    }
    assert set(metrics["reconstruction_quality"]) == {"explained_variance", "mse", "cossim"}
    assert metrics["gemmascope"]["n_tokens"] >= 32


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_gives_clear_errors(tiny_model: LanguageModel) -> None:
    ids = eval_rows(tiny_model, rows=2, context_len=16)
    narrow = random_sae("resid_post.1", 32)
    with pytest.raises(ConfigError, match=r"d_in=32 .* 64 wide"):
        evals.evaluate_tokens(tiny_model, [narrow], ids, min_tokens=1)
    with pytest.raises(ConfigError, match=r"layer 9 .* valid layers are 0..3"):
        evals.evaluate_tokens(tiny_model, [random_sae("resid_post.9", 64)], ids, min_tokens=1)
    with pytest.raises(ConfigError, match="names no site"):
        evals.evaluate_tokens(tiny_model, [random_sae("", 64)], ids, min_tokens=1)
    with pytest.raises(CorpusError, match=r"has \d+ non-special tokens \(2 rows of 16\); at least 1024"):
        evals.evaluate_tokens(tiny_model, [random_sae("resid_post.1", 64)], ids)
    with pytest.raises(ConfigError, match="no SAEs"):
        evals.evaluate_tokens(tiny_model, [], ids, min_tokens=1)
    with pytest.warns(UserWarning, match="made for model 'gemma-3-270m'"):
        evals.sae_site(tiny_model, random_sae("resid_post.1", 64, model_name="gemma-3-270m"))


# ---------------------------------------------------------------------------------------------
# Probing


def test_logistic_probe_and_top_k_selection_on_separable_data() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=gen)
    y = (x[:, 3] > 0).long()  # only feature 3 carries the label
    x[:, 3] += torch.where(y == 1, 2.0, -2.0)
    assert evals.top_k_by_mean_difference(x, y, 1).tolist() == [3]
    probe = evals.LogisticProbe.fit(x[:150], y[:150], 2)
    assert probe.accuracy(x[150:], y[150:]) == 1.0
    acc = evals.probe_accuracies(x[:150], y[:150], x[150:], y[150:], ks=(1, 2), prefix="sae")
    assert acc["sae_top_1_test_accuracy"] == 1.0 and set(acc) == {
        "sae_test_accuracy",
        "sae_top_1_test_accuracy",
        "sae_top_2_test_accuracy",
    }
    # three classes: multinomial
    y3 = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.5, 0.5]))
    x3 = x.clone()
    x3[:, 0] *= 20
    assert evals.LogisticProbe.fit(x3, y3, 3).accuracy(x3, y3) > 0.95


def test_sparse_probing_on_topics(tiny_model: LanguageModel) -> None:
    saes = {"a": random_sae("resid_post.1", 64), "b": identity_sae("resid_post.1", 64)}
    probing = evals.sparse_probing(tiny_model, saes, n_per_class=12, context_len=16, ks=(1, 2))
    assert len(probing["classes"]) >= 5 and "Uncategorized" not in probing["classes"]
    llm = probing["llm"]["resid_post.1"]
    for name in ("a", "b"):
        sae = probing["saes"][name]["sae"]
        assert set(sae["per_class"]) == set(probing["classes"])
        for key in ("sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"):
            assert 0.0 <= sae[key] <= 1.0
    # the identity SAE's latents are relu(x), relu(-x): a probe on all of them sees what the raw probe sees
    assert probing["saes"]["b"]["sae"]["sae_test_accuracy"] >= llm["llm_test_accuracy"] - 0.15
    results = evals.evaluate_tokens(tiny_model, saes, eval_rows(tiny_model, 2, 32), min_tokens=32)
    evals.attach_probing(results, probing)
    assert "sae_top_1_test_accuracy" in evals.summary(results[0])
    assert "top1" in evals.format_table(results) and "raw activations" in evals.probing_table(probing)


# ---------------------------------------------------------------------------------------------
# Files and plots


def test_write_eval_and_report(tiny_model: LanguageModel, tmp_path: Path) -> None:
    saes = {"w96": random_sae("resid_post.2", 64, 96), "w128": random_sae("resid_post.2", 64, 128)}
    results = evals.evaluate_tokens(tiny_model, saes, eval_rows(tiny_model, 2, 32), min_tokens=32)
    path = evals.write_eval(tmp_path / "sae", results[0])
    data = json.loads(path.read_text())
    assert data["eval_type_id"] == "core" and "log10_density" not in data
    assert data["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(
        results[0]["eval_result_metrics"]["sparsity"]["l0"]
    )
    report = evals.write_report(tmp_path / "run", results)
    report_data = json.loads((report / "evals.json").read_text())
    assert [s["sae_id"] for s in report_data["summary"]] == ["w96", "w128"]
    for name in report_data["plots"].values():
        png = (report / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ConfigError, match="unknown frontier metric 'l1'"):
        evals.plot_frontier(results, "l1", tmp_path / "x.png")


def test_drawing_a_plot_frees_its_callers_locals_at_once(tmp_path: Path) -> None:
    """matplotlib's mathtext (log-scale ticks) leaves pyparsing exceptions in reference cycles that
    hold every caller's frame: a training run's tensors lived on until a full collection (the
    18-layer suite grew ~1.5 GB a layer). With the cyclic collector off, they are freed on return."""
    from gemmascope.evals.report import plot_training_log

    rows = [{"step": i, "tokens": 100 * i, "a": {"loss": 1 / i, "l0": 10.0 * i, "fvu": 0.5, "dead_fraction": 0.0}}
            for i in range(1, 5)]  # fmt: skip
    held: list[Any] = []

    def train_and_plot() -> None:
        big = _Big()
        held.append(weakref.ref(big))
        plot_training_log(rows, tmp_path / "curves.png")

    gc.collect()
    gc.disable()
    try:
        train_and_plot()
        assert held[0]() is None, "the caller's locals outlived it (a reference cycle holds its frame)"
    finally:
        gc.enable()


class _Big:
    """A stand-in for a caller's tensors (weakly referenceable)."""


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_real_model_identity_and_zero_saes(real_model: LanguageModel) -> None:
    ids = eval_rows(real_model, rows=2, context_len=96)
    saes: dict[str, SAE] = {
        "identity": identity_sae("resid_post.6", 640, "gemma-3-270m"),
        "zero": zero_sae("resid_post.6", 640, "gemma-3-270m"),
    }
    full = {r["sae_id"]: r for r in evals.evaluate_tokens(real_model, saes, ids, min_tokens=128)}
    results = {name: evals.summary(r) for name, r in full.items()}
    clean_ce = full["identity"]["eval_result_metrics"]["model_performance_preservation"][
        "ce_loss_without_sae"
    ]
    assert 1.0 < clean_ce < 6.0  # a trained LM on Wikipedia, in nats per token
    assert results["identity"]["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5)
    assert results["identity"]["fvu"] == pytest.approx(0.0, abs=1e-8)
    assert results["zero"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert results["zero"]["delta_lm_loss"] > 1.0  # zeroing the mid-layer residual stream breaks the model


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_eval_writes_eval_json_report_and_prints_table_or_json(
    tiny_model: LanguageModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gemmascope import models
    from gemmascope.cli import main
    from gemmascope.formats import sae_dir, save_sae

    real_load = models.load_model  # the tiny model is built once per session, not per command
    monkeypatch.setattr(
        models,
        "load_model",
        lambda name, **kw: tiny_model if name == "tiny-gemma3" else real_load(name, **kw),
    )

    run = tmp_path / "run"
    for width, l0 in ((96, 20), (128, 30)):
        save_sae(random_sae("resid_post.1", 64, width), sae_dir(run, "resid_post.1", width, l0))
    common = ["--n-tokens", "62", "--context-len", "32", "--min-tokens", "32", "--batch-size", "2"]
    probe = ["--probe-per-class", "10", "--probe-k", "1,2"]
    assert main(["eval", str(run), *common, *probe, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = [s["sae_id"] for s in out["summary"]]
    assert ids == ["resid_post.1.w96.l0_20", "resid_post.1.w128.l0_30"]  # runs.sae_order: width 96 before 128
    assert "sae_top_2_test_accuracy" in out["summary"][0]
    assert out["report"] == str(run / "report")
    for folder in (sae_dir(run, "resid_post.1", 96, 20), sae_dir(run, "resid_post.1", 128, 30)):
        data = json.loads((folder / "eval.json").read_text())
        assert data["sparse_probing"]["sae"]["sae_top_1_test_accuracy"] >= 0.0
    report = json.loads((run / "report" / "evals.json").read_text())
    assert report["sparse_probing"]["eval_type_id"] == "sparse_probing"
    assert (run / "report" / "frontier_l0_delta_lm_loss.png").stat().st_size > 0

    # one SAE folder, no probing: the table; its run is found from the folder
    one = sae_dir(run, "resid_post.1", 96, 20)
    assert main(["eval", str(one), *common, "--no-probe"]) == 0
    text = capsys.readouterr().out
    assert "resid_post.1.w96.l0_20" in text and "dLM loss" in text and "held-out tokens" in text

    # bad input: one line on stderr, exit status 2
    assert main(["eval", str(one), "--context-len", "32", "--n-tokens", "62", "--no-probe"]) == 2
    assert "at least 1024 are needed" in capsys.readouterr().err
    assert main(["eval", str(one), *common, "--no-probe", "--model", "gemma-9000"]) == 2
    assert "unknown model 'gemma-9000'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
