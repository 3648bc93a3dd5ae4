"""Tests of sae.py: the JumpReLU SAE and baselines, and the straight-through functions' gradients
(hand-computed cases and finite differences)."""

from __future__ import annotations

import pytest
import torch

from gemmascope.errors import ConfigError, ModelError, SiteError
from gemmascope.models import LanguageModel
from gemmascope.sae import (
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAEConfig,
    TopKSAE,
    build_sae,
    encode_inputs,
    jumprelu,
    massive_mask,
    sae_site,
    step,
)
from gemmascope.sites import Site, capture

EPS = 0.001


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


# ---------------------------------------------------------------------------------------------
# Straight-through functions: hand-computed cases


def test_jumprelu_forward_and_gradients_by_hand() -> None:
    pre = torch.tensor([[0.5, 0.0103, 0.0098, 0.2]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.3, 0.01, 0.01, 0.2004], dtype=torch.float64, requires_grad=True)
    f = jumprelu(pre, theta, EPS)
    assert f.tolist() == [[0.5, 0.0103, 0.0, 0.0]]
    f.sum().backward()
    # d f / d pre = H(pre - theta)
    assert pre.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # d f / d theta = -(theta / eps) K((pre - theta) / eps); K = 1 only within half a bandwidth
    expected = [0.0, -0.01 / EPS, -0.01 / EPS, -0.2004 / EPS]
    assert theta.grad.tolist() == pytest.approx(expected, rel=1e-12)


def test_step_forward_and_gradients_by_hand() -> None:
    pre = torch.tensor([[0.5, 0.0103, 0.0098, 0.2]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.3, 0.01, 0.01, 0.2004], dtype=torch.float64, requires_grad=True)
    h = step(pre, theta, EPS)
    assert h.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    (h * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).sum().backward()
    assert pre.grad.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # the L0 term sends no gradient to pre
    # d H / d theta = -(1 / eps) K((pre - theta) / eps), times the upstream gradient
    assert theta.grad.tolist() == pytest.approx([0.0, -2 / EPS, -3 / EPS, -4 / EPS], rel=1e-12)


def test_threshold_gradient_sums_over_the_batch() -> None:
    pre = torch.tensor([[0.0102, 0.5], [0.0099, 0.5], [0.3, 0.5]], requires_grad=True)
    theta = torch.tensor([0.01, 0.1], requires_grad=True)
    step(pre, theta, EPS).sum().backward()
    assert theta.grad.tolist() == pytest.approx([-2 / EPS, 0.0])


def test_rectangle_kernel_is_open_at_half_a_bandwidth() -> None:
    theta = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    pre = torch.tensor([[1.0 + 0.5 * 0.25, 1.0 - 0.5 * 0.25]], dtype=torch.float64)  # exactly |u| = 1/2
    step(pre, theta, 0.25).sum().backward()
    assert theta.grad.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Straight-through functions: finite differences of the expected value


def test_step_pseudo_derivative_equals_finite_difference_of_the_mean() -> None:
    """With many samples, the pseudo-derivative of mean H(pre - θ) equals the central finite difference
    of that mean with half-step ε/2: both count the samples within ε/2 of θ (JumpReLU paper, §4)."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    theta = torch.tensor([-0.5, 0.2, 1.0], dtype=torch.float64, requires_grad=True)
    eps = 0.01
    step(pre, theta, eps).mean(0).sum().backward()
    with torch.no_grad():
        plus = (pre > theta + eps / 2).double().mean(0)
        minus = (pre > theta - eps / 2).double().mean(0)
        finite_difference = (plus - minus) / eps
    assert torch.allclose(theta.grad, finite_difference, atol=2 / (eps * len(pre)))
    # and both estimate -p(θ), the density of N(0, 1) at θ
    density = torch.exp(-(theta.detach() ** 2) / 2) / (2 * torch.pi) ** 0.5
    assert torch.allclose(theta.grad, -density, rtol=0.1)


def test_jumprelu_pseudo_derivative_matches_finite_difference_of_the_mean() -> None:
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
    theta = torch.tensor([0.5, 1.2], dtype=torch.float64, requires_grad=True)
    eps = 0.01
    jumprelu(pre, theta, eps).mean(0).sum().backward()
    with torch.no_grad():

        def mean_f(t: torch.Tensor) -> torch.Tensor:
            return (pre * (pre > t)).mean(0)

        finite_difference = (mean_f(theta + eps / 2) - mean_f(theta - eps / 2)) / eps
    # equal up to pre varying by ±ε/2 around θ inside the window: relative error <= ε / (2θ)
    assert torch.allclose(theta.grad, finite_difference, rtol=0.011)


# ---------------------------------------------------------------------------------------------
# Modules


def reference_encode(sae: JumpReLUSAE, x: torch.Tensor) -> torch.Tensor:
    """The Gemma Scope tutorial's JumpReLUSAE.encode, verbatim in substance."""
    pre_acts = x @ sae.W_enc + sae.b_enc
    mask = pre_acts > sae.threshold
    return mask * torch.nn.functional.relu(pre_acts)


def test_jumprelu_sae_matches_the_gemma_scope_reference() -> None:
    sae = random_sae()
    x = torch.randn(50, 16)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), reference_encode(sae, x))
        assert torch.equal(sae(x), reference_encode(sae, x) @ sae.W_dec + sae.b_dec)
        # it is pre * H(pre - θ) for θ >= 0, which is what the straight-through function computes
        assert torch.equal(sae.encode(x), jumprelu(sae.pre_acts(x), sae.threshold, EPS))


def test_topk_keeps_k_relu_values_per_token() -> None:
    sae = random_sae("topk", k=5)
    x = torch.randn(40, 16)
    with torch.no_grad():
        f = sae.encode(x)
        pre = sae.pre_acts(x)
    assert isinstance(sae, TopKSAE)
    assert ((f != 0).sum(-1) <= 5).all()
    top = pre.topk(5, dim=-1)
    assert torch.equal(f.gather(-1, top.indices), top.values.clamp_min(0))
    assert f.shape == (40, 32)
    assert sae.encode(x[None]).shape == (1, 40, 32)  # any leading shape


def test_batchtopk_keeps_k_per_token_on_average_and_converts_to_jumprelu() -> None:
    sae = random_sae("batchtopk", k=4)
    assert isinstance(sae, BatchTopKSAE)
    x = torch.randn(64, 16)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        f = sae.batch_activation(pre)
    assert int((f > 0).sum()) == 4 * 64
    kept_min = f[f > 0].min()
    assert (pre.clamp_min(0)[f == 0] <= kept_min).all()
    sae.threshold.fill_(0.25)
    jump = sae.to_jumprelu()
    assert isinstance(jump, JumpReLUSAE) and jump.cfg.architecture == "jumprelu"
    assert jump.cfg.extra["trained_as"] == "batchtopk" and jump.cfg.extra["k"] == 4
    assert torch.equal(jump.threshold, torch.full((32,), 0.25))
    with torch.no_grad():
        assert torch.equal(jump.encode(x), sae.encode(x))
        assert torch.equal(sae.encode(x), (pre > 0.25) * pre.clamp_min(0))


def test_relu_sae() -> None:
    sae = random_sae("relu")
    assert isinstance(sae, ReLUSAE)
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), torch.relu(sae.pre_acts(x)))


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
