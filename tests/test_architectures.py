"""Tests of the architectures (`gemmascope.architectures`) and their registry (`sae.py`): the
straight-through functions' gradients (hand-computed cases and finite differences), each module's
encode, each architecture's loss terms against plain references and what it declares (folder tag,
SAELens names, after-step update, saved form), and a new architecture added inside a test in one
class and one registry call, then trained, saved, loaded and evaluated."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gemmascope.activations import harvest
from gemmascope.architectures import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from gemmascope.architectures.jumprelu import dense_penalty, jumprelu, jumprelu_terms, step
from gemmascope.architectures.topk import auxk_loss
from gemmascope.errors import ConfigError
from gemmascope.models import LanguageModel
from gemmascope.sae import (
    SAE,
    Architecture,
    SAEConfig,
    SpecLike,
    Terms,
    architecture,
    architecture_names,
    build_sae,
    register_architecture,
)
from gemmascope.sparse_step import jumprelu_terms_sparse

EPS = 0.001
SITE = "resid_post.2"


def random_sae(
    architecture: str = "jumprelu", d_in: int = 16, d_sae: int = 32, k: int | None = None, seed: int = 0
) -> Any:
    g = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(architecture, d_in=d_in, d_sae=d_sae, k=k, site="resid_post.2"))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.3)
    return sae


def random_jumprelu(d_in: int = 8, d_sae: int = 16, seed: int = 0, unit_rows: bool = False) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, site=SITE))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if unit_rows:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
    return sae


def grads(sae: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in sae.named_parameters()
    }


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


@pytest.mark.parametrize("name", ["jumprelu", "topk", "batchtopk", "relu"])
def test_firing_is_where_the_activation_is_positive(name: str) -> None:
    sae = random_sae(name, k=4 if name in ("topk", "batchtopk") else None)
    with torch.no_grad():
        if isinstance(sae, JumpReLUSAE):  # a threshold at or under 0 too: relu(pre) must still be > 0
            sae.threshold[:3] = torch.tensor([0.0, -0.2, float("nan")])
        pre = sae.pre_acts(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)))
        pre[0, :4] = torch.tensor([0.0, -0.0, -0.1, float("nan")])
        assert torch.equal(sae.firing(pre), sae.activation(pre) > 0)


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


# ---------------------------------------------------------------------------------------------
# JumpReLU's loss terms and their gradients


def test_jumprelu_terms_values() -> None:
    sae = random_jumprelu()
    x = torch.randn(32, 8)
    recon, rate, fired, _ = jumprelu_terms(sae, x, EPS)
    l0 = rate.sum()
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # the pre-encoder bias
        active = pre > sae.threshold
        x_hat = (pre * active) @ sae.W_dec + sae.b_dec
    assert recon.item() == pytest.approx(float((x - x_hat).pow(2).sum(-1).mean()), rel=1e-6)
    assert l0.item() == pytest.approx(float(active.sum(-1).float().mean()))
    assert torch.equal(fired, active.sum(0, dtype=torch.float32))  # per-latent counts


def test_jumprelu_terms_gradients_equal_the_formulas() -> None:
    """Weights get the ordinary gradient through active latents only; θ gets the rectangle-kernel
    pseudo-derivatives of both terms, computed here by hand."""
    sae = random_jumprelu(seed=1)
    x = torch.randn(64, 8)
    lam = 0.3
    # put some pre-activations within half a bandwidth of θ so the kernel is exercised
    with torch.no_grad():
        pre0 = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        sae.threshold.copy_(pre0[0] + 0.0003)  # token 0 sits just below every θ (u = -0.3)
    recon, rate, _, _ = jumprelu_terms(sae, x, EPS)
    (recon + lam * rate.sum()).backward()

    with torch.no_grad():
        theta = sae.threshold.detach()
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        mask = (pre > theta).float()
        f = pre * mask
        x_hat = f @ sae.W_dec + sae.b_dec
        batch = x.shape[0]
        grad_xhat = -2 * (x - x_hat) / batch  # d recon / d x_hat
        grad_f = grad_xhat @ sae.W_dec.T
        kernel = ((pre - theta).abs() / EPS < 0.5).float()
        grad_theta = (grad_f * -(theta / EPS) * kernel).sum(0) + lam * (-(1 / EPS) * kernel).sum(0) / batch
        grad_pre = grad_f * mask
        grad_w_dec = f.T @ grad_xhat
        grad_w_enc = (x - sae.b_dec).T @ grad_pre
        grad_b_enc = grad_pre.sum(0)
        grad_b_dec = grad_xhat.sum(0) - grad_pre.sum(0) @ sae.W_enc.T
    assert kernel[0].sum() == 16 and kernel.sum() >= 16
    assert torch.allclose(sae.threshold.grad, grad_theta, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sae.W_dec.grad, grad_w_dec, atol=1e-6)
    assert torch.allclose(sae.W_enc.grad, grad_w_enc, atol=1e-6)
    assert torch.allclose(sae.b_enc.grad, grad_b_enc, atol=1e-6)
    assert torch.allclose(sae.b_dec.grad, grad_b_dec, atol=1e-5)


def test_the_l0_term_sends_no_gradient_to_the_weights() -> None:
    sae = random_jumprelu(seed=2)
    _, rate, _, _ = jumprelu_terms(sae, torch.randn(16, 8), EPS)
    rate.sum().backward()
    for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        assert p.grad is None or not p.grad.any()


# ---------------------------------------------------------------------------------------------
# The auxiliary terms against plain dense references


@pytest.mark.parametrize("terms", [jumprelu_terms, jumprelu_terms_sparse], ids=["reference", "sparse"])
def test_dead_preact_loss_and_gradient_equal_the_dense_formula(terms: Any) -> None:
    """The loss terms' `below`: computed on the dead columns only (the sparse step: from their own
    small product); the formula masks the full [batch, d_sae] matrix."""
    sae, x = random_jumprelu(unit_rows=True), torch.randn(32, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 9]] = True
    below = terms(sae, x, EPS, dead=dead.nonzero().squeeze(1))[3]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [32, 16]
    reference = (torch.relu(sae.threshold - pre) * dead).sum(-1).mean()
    assert float(below.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    fast, ref = grads(sae, below), grads(sae, reference)
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(fast["threshold"][1]) > 0 and float(fast["threshold"][0]) == 0  # only dead thresholds move
    assert float(fast["W_dec"].abs().sum()) == 0  # the decoder is untouched
    assert float(fast["W_enc"][:, 1].abs().sum()) > 0 and float(fast["W_enc"][:, 0].abs().sum()) == 0
    assert float(terms(sae, x, EPS, dead=torch.zeros(0, dtype=torch.long))[3].detach()) == 0.0


@pytest.mark.parametrize("terms", [jumprelu_terms, jumprelu_terms_sparse], ids=["reference", "sparse"])
def test_dense_penalty_and_gradient_equal_the_dense_formula(terms: Any) -> None:
    """From the loss terms' own firing rates, with no product of its own."""
    sae, x = random_jumprelu(unit_rows=True), torch.randn(64, 8)
    dense = torch.zeros(16, dtype=torch.bool)
    dense[[0, 2, 7]] = True
    limit = 0.1
    with torch.no_grad():  # some tokens within half a bandwidth of θ, so the kernel is exercised
        pre0 = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        sae.threshold.copy_(pre0[0] + 0.0003)
    penalty = dense_penalty(terms(sae, x, EPS)[1], dense, limit)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    density = step(pre, sae.threshold, EPS).mean(0)  # [16]
    reference = (torch.relu(density - limit) * dense).sum()
    assert float(penalty.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    fast, ref = grads(sae, penalty), grads(sae, reference)
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(fast["threshold"].abs().sum()) > 0
    assert float(fast["W_enc"].abs().sum()) == 0  # like the L0 term, it reaches only the thresholds


def test_auxk_loss_equals_the_dense_reference() -> None:
    g = torch.Generator().manual_seed(1)
    sae = TopKSAE(SAEConfig("topk", d_in=8, d_sae=16, k=2, site=SITE))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x, residual = torch.randn(20, 8), torch.randn(20, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 5, 6, 11]] = True
    fast = grads(sae, auxk_loss(sae, x, residual, dead, 2))
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).masked_fill(~dead, float("-inf"))
    values, idx = pre.topk(2, dim=-1)
    f = torch.zeros(20, 16).scatter(-1, idx, values)
    reference = (residual - f @ sae.W_dec).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(
        -1
    ).mean()
    ref = grads(sae, reference)
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert fast["W_dec"][~dead].abs().sum() == 0  # only dead latents learn from it


# ---------------------------------------------------------------------------------------------
# The registry and what each architecture declares


def test_the_built_in_architectures_are_registered_and_old_imports_still_work() -> None:
    import gemmascope.sae as sae_module

    assert architecture_names()[:4] == ("jumprelu", "topk", "batchtopk", "relu")
    assert sae_module.ARCHITECTURES == architecture_names()
    for name, cls in (
        ("jumprelu", JumpReLUSAE),
        ("topk", TopKSAE),
        ("batchtopk", BatchTopKSAE),
        ("relu", ReLUSAE),
    ):
        assert architecture(name).module is cls and architecture(name).name == name
        assert getattr(sae_module, cls.__name__) is cls  # `from gemmascope.sae import JumpReLUSAE`
    with pytest.raises(ConfigError, match=r"unknown architecture 'gated': expected one of \('jumprelu'"):
        architecture("gated")
    with pytest.raises(AttributeError):
        sae_module.GatedSAE  # noqa: B018

    class Other(Architecture):
        name = "jumprelu"

    with pytest.raises(ValueError, match="already registered"):
        register_architecture(Other())


@pytest.mark.parametrize(
    "spec,kind",
    [
        ({"architecture": "jumprelu", "target_l0": 8.0}, ""),
        ({"architecture": "topk", "k": 8}, "topk"),
        ({"architecture": "batchtopk", "k": 8}, "batchtopk"),
        ({"architecture": "relu", "l0_coeff": 1e-3}, "relu"),
        ({"architecture": "jumprelu", "target_l0": 8.0, "matryoshka": True}, "matryoshka"),
        ({"architecture": "topk", "k": 8, "matryoshka": True}, "matryoshka_topk"),
        ({"architecture": "jumprelu", "target_l0": 8.0, "out_site": "mlp_out.1"}, "transcoder"),
        (
            {"architecture": "jumprelu", "target_l0": 8.0, "out_site": "mlp_out.1", "skip": True},
            "skip_transcoder",
        ),
        ({"architecture": "topk", "k": 8, "out_site": "mlp_out.1", "skip": True}, "skip_topk_transcoder"),
        (
            {"architecture": "topk", "k": 8, "out_site": "mlp_out.1", "skip": True, "matryoshka": True},
            "skip_matryoshka_topk_transcoder",
        ),
    ],
)
def test_folder_suffixes_come_from_the_architecture(spec: dict[str, Any], kind: str) -> None:
    from gemmascope.runs import sae_dir
    from gemmascope.train import TrainSpec

    folder_kind = TrainSpec("mlp_in.1", 64, **spec).folder_kind
    assert folder_kind == kind
    assert sae_dir("R", "mlp_in.1", 64, 7.6, folder_kind).name == "l0_8" + (f"_{kind}" if kind else "")


def test_a_suite_sparsity_becomes_each_architectures_knob() -> None:
    assert architecture("jumprelu").sparsity(target_l0=45.0) == {"target_l0": 45.0}
    assert architecture("jumprelu").sparsity(l0_coeff=1e-3) == {"l0_coeff": 1e-3}
    assert architecture("topk").sparsity(target_l0=45.0) == {"k": 45}  # a target L0 is TopK's k
    assert architecture("batchtopk").sparsity(target_l0=14.6) == {"k": 15}
    assert architecture("relu").sparsity(l0_coeff=1e-3) == {"l0_coeff": 1e-3}
    with pytest.raises(ConfigError, match="topk SAE takes no λ"):
        architecture("topk").sparsity(l0_coeff=1e-3)
    with pytest.raises(ConfigError, match="relu SAE takes no target L0"):
        architecture("relu").sparsity(target_l0=45.0)


def test_batchtopk_after_step_moves_its_threshold_towards_the_smallest_kept_value() -> None:
    from gemmascope.architectures.batchtopk import THRESHOLD_MOMENTUM

    sae = random_sae("batchtopk", k=4)
    arch = architecture("batchtopk")
    with torch.no_grad():
        f = arch.train_activation(sae, sae.pre_acts(torch.randn(64, 16)))
    terms = Terms(torch.tensor(0.0), torch.tensor(4.0), (f > 0).sum(0, dtype=torch.float32), 0.0, acts=f)
    smallest = float(f[f > 0].min())
    arch.after_step(sae, terms)  # from 0: the first value itself
    assert float(sae.threshold) == pytest.approx(smallest)
    sae.threshold.fill_(1.0)
    arch.after_step(sae, terms)
    assert float(sae.threshold) == pytest.approx(THRESHOLD_MOMENTUM + (1 - THRESHOLD_MOMENTUM) * smallest)
    assert type(arch.as_saved(sae)) is JumpReLUSAE and not architecture("batchtopk").data_parallel


def test_jumprelu_after_step_keeps_its_thresholds_over_the_floor() -> None:
    from gemmascope.architectures.jumprelu import THRESHOLD_FLOOR

    sae = random_jumprelu()
    with torch.no_grad():
        sae.threshold[:3] = -1.0
    architecture("jumprelu").after_step(
        sae, Terms(torch.tensor(0.0), torch.tensor(0.0), sae.threshold > 0, 0.0)
    )
    assert float(sae.threshold.detach().min()) == pytest.approx(THRESHOLD_FLOOR)


# ---------------------------------------------------------------------------------------------
# A new architecture in one class and one registry call


@pytest.fixture(scope="module")
def tiny_run(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's resid_post.2 activations, about 4k tokens."""
    run_dir = tmp_path_factory.mktemp("toy_run")
    harvest(tiny_model, [SITE], run_dir, n_tokens=4096, context_len=64, progress=False)
    return run_dir


@pytest.fixture
def unregister() -> Iterator[list[str]]:
    """Names registered by a test, taken out of the registry after it."""
    import gemmascope.sae as sae_module

    names: list[str] = []
    yield names
    for name in names:
        sae_module._REGISTRY.pop(name, None)


def test_a_new_architecture_is_one_class_and_one_registry_call(
    tiny_run: Path, tiny_model: LanguageModel, tmp_path: Path, unregister: list[str]
) -> None:
    """A "shifted ReLU" SAE, f = relu(pre − shift) with a learned per-latent shift ≥ 0 and a tanh
    penalty, declared here in one place, trains with `train_saes`, saves, loads back with
    `formats.load_sae` and is evaluated with `evals.evaluate`, with no edit anywhere else."""
    from gemmascope.cli import build_parser
    from gemmascope.evals import evaluate
    from gemmascope.formats import load_sae
    from gemmascope.train import TrainConfig, TrainSpec, train_saes

    class ShiftReLUSAE(SAE):
        """f = relu(pre_acts − shift): a ReLU SAE whose latents fire only past a learned shift."""

        def __init__(self, cfg: SAEConfig) -> None:
            super().__init__(cfg)
            self.shift = nn.Parameter(torch.zeros(cfg.d_sae))

        def activation(self, pre_acts: Tensor) -> Tensor:
            return torch.relu(pre_acts - self.shift)

    class ShiftReLU(Architecture):
        name = "shiftrelu"
        module = ShiftReLUSAE
        knobs = ("l0_coeff",)
        saelens_name = "shiftrelu"
        folder_tag = "shiftrelu"
        extra_tensors = ("shift",)  # saved beside W_enc, W_dec, b_enc, b_dec
        input_scaled = ("shift",)  # in the pre-activations' units: times C when saved
        fixed_biases = False

        def check_spec(self, spec: SpecLike) -> None:
            self.check_positive(spec, "l0_coeff", spec.l0_coeff)

        def param_groups(self, sae: SAE, lr: float, threshold_lr: float) -> list[dict[str, Any]]:
            return [{"params": [sae.shift], "lr": threshold_lr, "lr_scale": threshold_lr / lr, "floor": 0.0}]

        def penalty(self, f: Tensor, spec: SpecLike) -> Tensor | float:
            return float(spec.l0_coeff or 0.0) * torch.tanh(f).sum(-1).mean()

        def after_step(self, sae: SAE, terms: Terms) -> None:
            with torch.no_grad():
                sae.shift.clamp_(min=0.0)  # type: ignore[operator]

    register_architecture(ShiftReLU())
    unregister.append("shiftrelu")

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "activations", run / "activations")
    specs = [TrainSpec(SITE, 32, "shiftrelu", l0_coeff=3e-2), TrainSpec(SITE, 32, "relu", l0_coeff=3e-2)]
    config = TrainConfig(batch_size=256, checkpoint_every=8, log_every=4, refit_tokens=0)
    toy_folder, relu_folder = train_saes(run, specs, 4096, config, progress=False)

    assert toy_folder.name.endswith("_shiftrelu") and toy_folder.parent.name == "width_32"
    toy = load_sae(toy_folder)
    assert type(toy) is ShiftReLUSAE and toy.cfg.architecture == "shiftrelu"
    shift = toy.shift.detach()
    assert float(shift.min()) >= 0 and float(shift.max()) > 0  # it trained, and kept its floor
    assert toy.cfg.extra["fixed_biases"] is False and toy.cfg.extra["l0_coeff"] == 3e-2
    relu = load_sae(relu_folder)
    assert not torch.equal(toy.W_enc, relu.W_enc)  # another SAE than the ReLU one of the same run
    [result] = evaluate(tiny_model, {"toy": toy}, n_tokens=1024)
    metrics = result["eval_result_metrics"]
    assert result["sae_cfg"]["architecture"] == "shiftrelu"
    assert 0 < metrics["sparsity"]["l0"] < 32
    assert metrics["gemmascope"]["fvu"] < 1.0
    # the command line offers it too
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    assert "shiftrelu" in train_help


def test_jumprelu_dense_penalty_needs_a_resolved_limit_and_coefficient() -> None:
    """Latents over the density limit add the dense penalty; a limit or coefficient left unresolved
    (None, as `TrainConfig` holds them before `train.config.resolve`) adds none."""
    from gemmascope.sae import TrainBatch
    from gemmascope.train import TrainConfig, TrainSpec

    sae = random_jumprelu()
    batch = TrainBatch(
        x=torch.randn(32, 8),
        target=None,
        dead=torch.zeros(16, dtype=torch.bool),
        density=torch.full((16,), 0.5),
    )
    spec = TrainSpec(SITE, 16, target_l0=4)
    terms = architecture("jumprelu").terms
    assert float(terms(sae, batch, spec, TrainConfig(dense_coeff=1.0, dense_density=0.1)).extra) > 0
    assert float(terms(sae, batch, spec, TrainConfig(dense_coeff=1.0, dense_density=None)).extra) == 0
    assert float(terms(sae, batch, spec, TrainConfig(dense_coeff=None, dense_density=0.1)).extra) == 0


def test_jumprelu_terms_read_a_step_dtype_of_auto_as_the_device_computes_it() -> None:
    """`step_dtype` "auto" (a TrainConfig not resolved by `train.config.resolve`) is a dtype too."""
    from gemmascope.sae import TrainBatch
    from gemmascope.train import TrainConfig, TrainSpec

    sae = random_jumprelu()
    batch = TrainBatch(
        x=torch.randn(32, 8), target=None, dead=torch.zeros(16, dtype=torch.bool), density=-torch.ones(16)
    )
    for step_dtype in ("auto", "float32", "bfloat16"):
        terms = architecture("jumprelu").terms(
            sae, batch, TrainSpec(SITE, 16, target_l0=4), TrainConfig(step_dtype=step_dtype)
        )
        assert torch.isfinite(terms.recon) and terms.l0 >= 0
