"""Contrastive feature search (features/contrast.py) and the one text -> latents function it pools
through (features/encode.py): the separation against hand-computed values, pooling against a direct
encode on the one mask (mean divided by the positions kept), ranking over several SAEs, dense latents
hidden and counted, bad input."""

from __future__ import annotations

import pytest
import torch

from gemmascope.corpus import special_mask
from gemmascope.errors import ConfigError
from gemmascope.features.contrast import contrast, separation
from gemmascope.features.encode import dense_latents, encode
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig, encode_inputs
from gemmascope.sites import capture, parse_site

pytestmark = pytest.mark.usefixtures("one_thread")

A = ["The dog barked at the dog.", "A dog ran after another dog.", "My dog sleeps."]
B = ["The sun rose over the hills.", "Numbers add up to seven.", "Rain fell all night."]


def _sae(site: str, d: int = 64, seed: int = 0) -> JumpReLUSAE:
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d, d_sae=2 * d, site=site, model_name="tiny-gemma3"))
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():  # latents relu(q·x) and relu(-q·x): an exact, rotated dictionary
        sae.W_enc.copy_(torch.cat([q, -q], dim=1))
        sae.W_dec.copy_(torch.cat([q.T, -q.T], dim=0))
    return sae


def test_separation_is_cohens_d_with_a_floor() -> None:
    a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    d = separation(a, b)
    pooled_sd = ((1 * 2.0 + 2 * 1.0) / 3) ** 0.5  # variances 2 (a) and 1 (b)
    assert float(d[0]) == pytest.approx((2.0 - 1.0) / pooled_sd)
    assert float(d[1]) == pytest.approx(2.0 / (0.01 * 2.0))  # no spread at all: the floor
    assert float(d[2]) == 0.0


def _direct(model: LanguageModel, sae: JumpReLUSAE, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents `[T, d_sae]` and the kept positions `[T]` of one text, computed without `encode`."""
    site = parse_site(sae.cfg.site)
    ids = model.to_tokens(text)
    x = capture(model, ids, [site])[site][0]
    keep = ~special_mask(ids, model.special_token_ids)[0]
    if sae.cfg.max_norm is not None:
        keep &= x.norm(dim=-1) <= sae.cfg.max_norm
    return encode_inputs(sae, x, keep).float(), keep


def test_pooling_equals_a_direct_encode(tiny_model: LanguageModel) -> None:
    sae = _sae("resid_post.1")
    pooled = encode(tiny_model, {"s": sae}, A[:2], pool=("max", "mean", "last")).pooled
    for row, text in enumerate(A[:2]):
        acts, keep = _direct(tiny_model, sae, text)
        acts = acts[1:]  # BOS left out
        torch.testing.assert_close(pooled["max"]["s"][row], acts.max(0).values)
        torch.testing.assert_close(pooled["mean"]["s"][row], acts.mean(0))
        torch.testing.assert_close(pooled["last"]["s"][row], acts[-1])
    per_token = encode(tiny_model, {"s": sae}, A[:1])
    acts, keep = _direct(tiny_model, sae, A[0])
    torch.testing.assert_close(per_token.latents["s"][0], acts)
    assert per_token.keep["s"][0].tolist() == keep.tolist() and not keep[0]  # BOS never kept


def test_mean_pooling_divides_by_the_positions_kept(tiny_model: LanguageModel) -> None:
    """Massive positions (inputs over the SAE's norm limit) are left out of the mean, not counted as
    zeros; `last` is the last position kept."""
    sae = _sae("resid_post.1")
    ids = tiny_model.to_tokens(A[0])
    x = capture(tiny_model, ids, [parse_site("resid_post.1")])[parse_site("resid_post.1")][0]
    norms = x.norm(dim=-1)
    sae.cfg.max_norm = float(norms[1:].sort().values[-2])  # the largest non-BOS input is massive
    acts, keep = _direct(tiny_model, sae, A[0])
    assert int(keep.sum()) == ids.shape[1] - 2
    out = encode(tiny_model, {"s": sae}, A[:1], pool=("mean", "last")).pooled
    torch.testing.assert_close(out["mean"]["s"][0], acts[keep].sum(0) / int(keep.sum()))
    assert not torch.allclose(out["mean"]["s"][0], acts[1:].mean(0))  # not over every position
    torch.testing.assert_close(out["last"]["s"][0], acts[keep][-1])


def test_one_dense_rule() -> None:
    densities = torch.tensor([0.0, 0.05, 0.095, 0.0951, 0.5, 1.0], dtype=torch.float64)
    assert dense_latents(densities).tolist() == [False, False, False, True, True, True]
    assert dense_latents(densities, 1.0).tolist() == [False] * 6  # 1: hide nothing
    assert dense_latents(None) is None and dense_latents(densities, None) is None


def test_contrast_ranks_over_every_sae_and_hides_dense_latents(tiny_model: LanguageModel) -> None:
    saes = {"one": _sae("resid_post.1"), "two": _sae("resid_post.2", seed=1)}
    out = contrast(tiny_model, saes, A, B, top=10)
    hits = out["results"]
    assert out["n_a"] == 3 and out["n_b"] == 3 and out["hidden_dense"] == 0 and len(hits) == 10
    assert [h["effect"] for h in hits] == sorted((h["effect"] for h in hits), reverse=True)
    assert {h["sae_id"] for h in hits} <= {"one", "two"}
    best = hits[0]
    assert (
        best["effect"] > 0
        and best["mean_a"] > best["mean_b"]
        and 0 <= best["fired_b"] <= best["fired_a"] <= 3
    )
    assert contrast(tiny_model, saes, A, A)["results"] == []  # nothing separates a set from itself
    dense = {key: torch.ones(sae.d_sae) for key, sae in saes.items()}  # every latent on every token
    hidden = contrast(tiny_model, saes, A, B, densities=dense)
    assert hidden["results"] == [] and hidden["hidden_dense"] > 0
    shown = contrast(tiny_model, saes, A, B, densities=dense, hide_dense=None, top=10)
    assert [h["index"] for h in shown["results"]] == [h["index"] for h in hits]


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (A[:1], B, {}, "set A has 1 prompts: expected 2"),
        (A, "one string", {}, "set B has a single string"),
        (A, ["x", " "], {}, "set B has an empty prompt"),
        (A, B, {"pool": "median"}, "pool 'median'"),
        (A, B, {"top": 0}, "top 0"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model: LanguageModel, a, b, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        contrast(tiny_model, {"s": _sae("resid_post.1")}, a, b, **kwargs)


def test_cli_contrast_prints_the_ranked_latents_of_every_sae(
    tiny_model: LanguageModel, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gemmascope.cli import main
    from gemmascope.formats import sae_dir, save_sae

    save_sae(_sae("resid_post.1"), sae_dir(tmp_path, "resid_post.1", 128, 10))
    save_sae(_sae("resid_post.2", seed=1), sae_dir(tmp_path, "resid_post.2", 128, 12))
    monkeypatch.setattr("gemmascope.models.load_model", lambda name: tiny_model)
    (tmp_path / "b.txt").write_text("\n".join(B) + "\n\n", encoding="utf-8")
    args = ["contrast", str(tmp_path), "--top", "5", "--b-file", str(tmp_path / "b.txt")]
    assert main([*args, *(f"--a={a}" for a in A)]) == 0
    out = capsys.readouterr().out
    assert "than on B (3)" in out and ("resid_post.1.w128.l0_10" in out or "resid_post.2.w128.l0_12" in out)
    assert len([line for line in out.splitlines() if "/3" in line]) == 5
    assert main([*args, "--a", "only one"]) == 2
    assert "set A has 1 prompts" in capsys.readouterr().err
    assert (
        main(["contrast", str(tmp_path), "--a", "x", "--a", "y", "--b-file", str(tmp_path / "nope.txt")]) == 2
    )
    assert "--b-file" in capsys.readouterr().err
