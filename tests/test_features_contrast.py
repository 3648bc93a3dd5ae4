"""Contrastive feature search (features/contrast.py): the separation against hand-computed values,
pooling against a direct encode, ranking over several SAEs, dense latents hidden and counted, bad input."""

from __future__ import annotations

import pytest
import torch

from gemmascope.errors import ConfigError
from gemmascope.features.contrast import contrast, pooled_latents, separation
from gemmascope.features.prompt import encode_text
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig

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


def test_pooling_equals_a_direct_encode(tiny_model: LanguageModel) -> None:
    sae = _sae("resid_post.1")
    pooled = {p: pooled_latents(tiny_model, {"s": sae}, A[:2], p)["s"] for p in ("max", "mean", "last")}
    for row, text in enumerate(A[:2]):
        _, acts = encode_text(tiny_model, sae, text)
        acts = acts[1:]  # BOS left out
        torch.testing.assert_close(pooled["max"][row], acts.max(0).values)
        torch.testing.assert_close(pooled["mean"][row], acts.mean(0))
        torch.testing.assert_close(pooled["last"][row], acts[-1])


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
