"""Tests of sae.py: the SAE config's checks, building each registered architecture's module, and the
one path from model activations to latents (the site check, the special and massive-token mask).
The architectures themselves are tests/test_architectures.py's."""

from __future__ import annotations

import pytest
import torch

from gemmascope.architectures import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from gemmascope.errors import ConfigError, ModelError, SiteError
from gemmascope.models import LanguageModel
from gemmascope.sae import SAEConfig, build_sae, encode_inputs, massive_mask, sae_site
from gemmascope.sites import Site, capture


def random_sae(
    architecture: str = "jumprelu", d_in: int = 16, d_sae: int = 32, k: int | None = None, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture, d_in=d_in, d_sae=d_sae, k=k, site="resid_post.2"))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.3)
    return sae


@pytest.mark.parametrize(
    "kwargs",
    [
        {"architecture": "gated", "d_in": 4, "d_sae": 8},
        {"architecture": "jumprelu", "d_in": 0, "d_sae": 8},
        {"architecture": "jumprelu", "d_in": 4, "d_sae": -1},
        {"architecture": "topk", "d_in": 4, "d_sae": 8},
        {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 9},
        {"architecture": "batchtopk", "d_in": 4, "d_sae": 8, "k": 0},
    ],
)
def test_bad_configs_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SAEConfig(**kwargs)


def test_build_sae_gives_each_architecture_its_class() -> None:
    kinds = {"jumprelu": JumpReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "relu": ReLUSAE}
    for arch, cls in kinds.items():
        sae = build_sae(SAEConfig(arch, d_in=4, d_sae=8, k=2 if "topk" in arch else None))
        assert type(sae) is cls
        assert sae.W_enc.shape == (4, 8) and sae.W_dec.shape == (8, 4)


# ---------------------------------------------------------------------------------------------
# The one path from model activations to latents


def test_sae_site_checks_the_site_against_the_model_with_one_error_class(tiny_model: LanguageModel) -> None:
    assert sae_site(tiny_model, random_sae(d_in=64)) == Site("resid_post", 2)
    cases = [
        (SAEConfig("jumprelu", d_in=64, d_sae=8), r"SAE 'x' has no site in its config, so it names no site"),
        (SAEConfig("jumprelu", d_in=64, d_sae=8, site="resid_post.9"), r"no site 'resid_post.9' .* 0..3"),
        (SAEConfig("jumprelu", d_in=32, d_sae=8, site="mlp_out.1"), r"d_in=32 .* mlp_out.1 .* 64 wide"),
    ]
    for cfg, message in cases:
        for error in (SiteError, ConfigError, ModelError):  # one class, caught as either
            with pytest.raises(error, match=message):
                sae_site(tiny_model, build_sae(cfg), "x")
    made_elsewhere = build_sae(
        SAEConfig("jumprelu", d_in=64, d_sae=8, site="resid_post.1", model_name="gemma-2-2b")
    )
    with pytest.warns(UserWarning, match="made for model 'gemma-2-2b'"):
        sae_site(tiny_model, made_elsewhere)


def test_encode_inputs_masks_special_and_massive_positions(tiny_model: LanguageModel) -> None:
    ids = tiny_model.to_tokens("The cat sat on the mat in Paris.")
    site = Site("resid_post", 2)
    x = capture(tiny_model, ids, [site])[site][0]  # [T, 64]
    sae = random_sae(d_in=64)
    plain = sae.encode(x)
    torch.testing.assert_close(encode_inputs(sae, x), plain, rtol=0, atol=0)
    assert not massive_mask(sae, x).any()  # no norm limit in the cfg
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[0] = False  # BOS
    masked = encode_inputs(sae, x, keep)
    assert not masked[0].any() and torch.equal(masked[1:], plain[1:])
    norms = x[1:].norm(dim=-1)
    limit = float(norms.median())
    sae.cfg.max_norm = limit
    massive = massive_mask(sae, x)
    assert torch.equal(massive, x.norm(dim=-1) > limit) and 0 < int(massive[1:].sum()) < len(norms)
    limited = encode_inputs(sae, x, keep)
    assert encode_inputs(sae, x.double()).dtype == sae.W_enc.dtype  # any input dtype: encoded in the SAE's
    for t in range(x.shape[0]):
        expected = torch.zeros_like(plain[t]) if t == 0 or massive[t] else plain[t]
        torch.testing.assert_close(limited[t], expected)
