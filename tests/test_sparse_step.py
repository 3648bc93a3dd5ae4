"""The fast JumpReLU step (sparse_step.py) against the plain reference (`jumprelu_terms`, in
architectures/jumprelu.py): the same recon, firing rates, fired and dead-latent loss, and the same gradient for every
parameter, within fp32 tolerance, on random data and on real activations; and a short training
run with `fast=True` ending where the reference run ends."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from gemmascope import sparse_step
from gemmascope.activations import harvest
from gemmascope.architectures import JumpReLUSAE
from gemmascope.architectures.jumprelu import dense_penalty
from gemmascope.formats import load_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import SAEConfig
from gemmascope.sites import Site, capture
from gemmascope.sparse_step import jumprelu_terms_sparse, kept_pairs, latent_major_encoder
from gemmascope.train import TrainConfig, TrainSpec, init_sae, jumprelu_terms, train_saes
from gemmascope.train.optim import make_optimizer

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (recon, rate [d_sae], below) -> loss
LOSSES: dict[str, LossFn] = {
    "recon + lambda l0": lambda recon, rate, below: recon + 0.3 * rate.sum(),
    "target-L0 penalty": lambda recon, rate, below: recon + 2.0 * (rate.sum() / 10.0 - 1).pow(2),
    "recon only": lambda recon, rate, below: recon,
    "l0 only": lambda recon, rate, below: 0.5 * rate.sum(),
    "the training loss": lambda recon, rate, below: (  # target L0, dense penalty, dead latents
        recon
        + 2.0 * (rate.sum() / 10.0 - 1).pow(2)
        + dense_penalty(rate, rate.detach() > 0.04, 0.04)
        + 0.5 * below
    ),
}
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small matrices on a shared 2-core machine run far faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_sae(d_in: int, d_sae: int, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    return sae


def set_thresholds_for_l0(sae: JumpReLUSAE, x: Tensor, l0: float) -> None:
    """θ per latent at the pre-activation quantile that makes each latent fire on l0/d_sae of `x`."""
    with torch.no_grad():
        pre_acts = sae.pre_acts(x - sae.b_dec)
        sae.threshold.copy_(torch.quantile(pre_acts, 1 - l0 / sae.d_sae, dim=0).clamp_min(1e-3))


def run(
    fn: Callable[..., tuple[Tensor, Tensor, Tensor]],
    sae: JumpReLUSAE,
    x: Tensor,
    eps: float,
    loss: LossFn,
    prefixes: tuple[int, ...] | None = None,
):
    """Values and gradients (of every parameter, and of x if it requires one) of one step; every
    seventh latent counts as dead."""
    sae.zero_grad(set_to_none=True)
    if x.grad is not None:
        x.grad = None
    dead = torch.arange(0, sae.d_sae, 7)
    recon, rate, fired, below = fn(sae, x, eps, prefixes=prefixes, dead=dead)
    loss(recon, rate, below).backward()
    grads = {name: getattr(sae, name).grad for name in PARAMS}
    if x.requires_grad:
        grads["x"] = x.grad
    return recon.detach(), rate.detach(), fired, grads, below.detach()


def assert_same_step(
    sae: JumpReLUSAE,
    x: Tensor,
    eps: float,
    loss: LossFn = LOSSES["recon + lambda l0"],
    prefixes: tuple[int, ...] | None = None,
) -> None:
    ref = run(jumprelu_terms, sae, x, eps, loss, prefixes)
    fast = run(jumprelu_terms_sparse, sae, x, eps, loss, prefixes)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[1], ref[1]), "rates differ"
    assert torch.equal(fast[2], ref[2]), "fired differs"
    torch.testing.assert_close(fast[4], ref[4], rtol=1e-5, atol=1e-6)
    for name, want in ref[3].items():
        got = fast[3][name]
        if want is None:  # the reference sends this parameter no gradient: neither may we, or zeros
            assert got is None or not got.any(), name
            continue
        assert got is not None, f"no gradient for {name}"
        assert got.shape == want.shape, name
        scale = float(want.abs().max())
        err = float((got - want).abs().max())
        assert err <= 1e-5 * scale + 1e-7, f"{name}: max error {err:.3g}, gradient scale {scale:.3g}"


def near_pairs(sae: JumpReLUSAE, x: Tensor, eps: float) -> tuple[int, int]:
    """(pairs inside the kernel's support, of which inactive) — so a test knows θ's gradient is exercised."""
    with torch.no_grad():
        u = (sae.pre_acts(x - sae.b_dec) - sae.threshold) / eps
        near = (u > -0.5) & (u < 0.5)
        return int(near.sum()), int((near & (u <= 0)).sum())


# ---------------------------------------------------------------------------------------------
# Random data


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("eps", [0.001, 0.05])
def test_equal_to_the_reference_on_random_data(loss_name: str, eps: float) -> None:
    sae = random_sae(32, 384, seed=1)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(2)) / 32**0.5 * 3
    set_thresholds_for_l0(sae, x[:100], l0=20)
    near, near_inactive = near_pairs(sae, x, eps)
    if eps == 0.05:  # make sure the θ pseudo-gradient and the inactive side of the kernel are tested
        assert near > 100 and near_inactive > 50
    assert_same_step(sae, x, eps, LOSSES[loss_name])


@pytest.mark.parametrize("loss_name", ["recon + lambda l0", "recon only"])
def test_matryoshka_prefixes_equal_the_reference(loss_name: str) -> None:
    """Nested reconstructions from the first 24 / 96 / 200 / all 384 latents: the bands' sparse
    products and the cumulative gradients against the plain nested loss."""
    sae = random_sae(32, 384, seed=6)
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(7)) / 32**0.5 * 3
    set_thresholds_for_l0(sae, x[:100], l0=20)
    prefixes = (24, 96, 200, 384)
    assert_same_step(sae, x, 0.05, LOSSES[loss_name], prefixes)
    assert_same_step(sae, x.clone().requires_grad_(True), 0.05, LOSSES[loss_name], prefixes)
    # the value, written out: the mean of the four prefixes' reconstruction errors
    with torch.no_grad():
        f = sae.encode(x - sae.b_dec)  # the SAE's own encoder (b_enc included), as training sees it
        each = [(x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).sum(-1).mean() for m in prefixes]
        nested = jumprelu_terms_sparse(sae, x, 0.05, prefixes)[0]
    torch.testing.assert_close(nested, torch.stack(each).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(nested, each[-1])  # not the plain loss


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("loss_name", ["recon + lambda l0", "the training loss"])
def test_a_transcoder_equals_the_reference(skip: bool, loss_name: str) -> None:
    """A transcoder (its own target, b_in as the pre-encoder bias, with or without the affine skip
    connection): the same values and gradients for every parameter, W_skip and x included."""
    g = torch.Generator().manual_seed(8)
    d_in, d_sae = 24, 256
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, out_site="mlp_out.1", affine_skip=skip))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.b_in.copy_(torch.randn(d_in, generator=g) * 0.3)
        if sae.W_skip is not None:
            sae.W_skip.copy_(torch.randn(d_in, d_in, generator=g) * 0.1)
    x = (torch.randn(200, d_in, generator=g) * 2).requires_grad_(True)
    target = torch.randn(200, d_in, generator=g)
    with torch.no_grad():
        pre_acts = sae.pre_acts(sae.centered(x))
        sae.threshold.copy_(torch.quantile(pre_acts, 1 - 15 / d_sae, dim=0).clamp_min(1e-3))
    names = PARAMS + (("W_skip",) if skip else ())
    out = []
    for fn in (jumprelu_terms, jumprelu_terms_sparse):
        sae.zero_grad(set_to_none=True)
        x.grad = None
        recon, rate, fired, below = fn(sae, x, 0.05, target=target, dead=torch.arange(0, d_sae, 7))
        LOSSES[loss_name](recon, rate, below).backward()
        out.append(
            (recon.detach(), rate.detach(), fired, {n: getattr(sae, n).grad for n in names} | {"x": x.grad})
        )
    ref, fast = out
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[1], ref[1]) and torch.equal(fast[2], ref[2])
    for name, want in ref[3].items():
        got = fast[3][name]
        assert got is not None and want is not None, name
        err, scale = float((got - want).abs().max()), float(want.abs().max())
        assert err <= 1e-5 * scale + 1e-7, f"{name}: max error {err:.3g}, gradient scale {scale:.3g}"


def test_gradient_to_x_when_it_requires_one() -> None:
    sae = random_sae(16, 128, seed=3)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    set_thresholds_for_l0(sae, x, l0=12)
    assert_same_step(sae, x.requires_grad_(True), 0.05)


def test_no_latent_active() -> None:
    sae = random_sae(16, 64, seed=5)
    x = torch.randn(40, 16)
    with torch.no_grad():
        sae.threshold.fill_(1e3)
    recon, rate, fired, below = jumprelu_terms_sparse(sae, x, 0.001)
    assert not rate.any() and not fired.any() and below == 0
    torch.testing.assert_close(recon, (x - sae.b_dec).pow(2).sum(-1).mean())
    assert_same_step(sae, x, 0.001)


def test_row_blocks_give_the_same_step(monkeypatch: pytest.MonkeyPatch) -> None:
    sae = random_sae(24, 256, seed=6)
    x = torch.randn(100, 24)
    set_thresholds_for_l0(sae, x, l0=15)
    whole = run(jumprelu_terms_sparse, sae, x, 0.02, LOSSES["recon + lambda l0"])
    monkeypatch.setattr(sparse_step, "BLOCK_ELEMENTS", 7 * 256)  # blocks of 7 rows, the last one short
    blocks = run(jumprelu_terms_sparse, sae, x, 0.02, LOSSES["recon + lambda l0"])
    torch.testing.assert_close(blocks[0], whole[0])
    assert torch.equal(blocks[1], whole[1]) and torch.equal(blocks[2], whole[2])
    for name in PARAMS:
        torch.testing.assert_close(blocks[3][name], whole[3][name])


def random_encoder(seed: int, tokens: int, d_in: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs `[tokens, d_in]`, W_enc `[d_in, 96]`, b_enc and a lower bound `[96]`."""
    g = torch.Generator().manual_seed(seed)
    x, W_enc, b_enc = (
        torch.randn(tokens, d_in, generator=g),
        torch.randn(d_in, 96, generator=g),
        torch.randn(96, generator=g),
    )
    return x, W_enc, b_enc, torch.rand(96, generator=g) * 2


def test_kept_pairs_are_the_dense_pairs_above_the_bound() -> None:
    x, W_enc, b_enc, low = random_encoder(7, 50, 8)
    rows, cols, pre_acts = kept_pairs(x, W_enc, b_enc, low, block_elements=96 * 9)
    dense = x @ W_enc + b_enc
    # the kept set is decided on the product before the bias; only pairs within rounding of `low` may differ
    want = (dense > low).nonzero()
    assert abs(len(rows) - len(want)) <= 2
    assert torch.equal(rows * 96 + cols, (rows * 96 + cols).sort().values)  # row-major order
    torch.testing.assert_close(pre_acts, dense[rows, cols])


def test_kept_pairs_in_bfloat16_are_the_bfloat16_products_above_the_bound() -> None:
    x, W_enc, b_enc, low = random_encoder(8, 64, 32)
    rows, cols, pre_acts = kept_pairs(x, W_enc, b_enc, low, block_elements=96 * 9, dtype=torch.bfloat16)
    product = (x.bfloat16() @ W_enc.bfloat16()).float()  # [64, 96]
    want = (product > low - b_enc).nonzero()  # held to the float32 bound, not to a rounded one
    assert torch.equal(torch.stack([rows, cols], 1), want)
    assert pre_acts.dtype == torch.float32
    torch.testing.assert_close(pre_acts, product[rows, cols] + b_enc[cols])
    # and within bfloat16's rounding of the float32 pre-activations
    torch.testing.assert_close(pre_acts, (x @ W_enc + b_enc)[rows, cols], atol=0.1, rtol=0.02)


def test_a_bfloat16_step_trains_as_well_as_float32(tiny_model: LanguageModel, tmp_path: Path) -> None:
    harvest(tiny_model, ["resid_post.2"], tmp_path / "store", n_tokens=4096, context_len=64, progress=False)
    figures = {}
    for dtype in ("float32", "bfloat16"):
        run_dir = tmp_path / dtype
        shutil.copytree(tmp_path / "store" / "activations", run_dir / "activations")
        cfg = TrainConfig(batch_size=256, checkpoint_every=100, step_dtype=dtype, refit_tokens=0)
        (folder,) = train_saes(
            run_dir, [TrainSpec("resid_post.2", 128, target_l0=20)], 256 * 12, cfg, progress=False
        )
        extra = load_sae(folder).cfg.extra
        assert extra["step_dtype"] == dtype
        figures[dtype] = extra
    # not the same weights (another product's rounding), the same quality
    assert figures["bfloat16"]["fvu"] == pytest.approx(figures["float32"]["fvu"], rel=0.05)
    assert figures["bfloat16"]["l0"] == pytest.approx(figures["float32"]["l0"], rel=0.1)


# ---------------------------------------------------------------------------------------------
# Real activations


def scaled_acts(model: LanguageModel, site: Site, texts: list[str]) -> Tensor:
    """`[tokens, d_model]`: the site's activations on `texts` (BOS dropped), scaled so E‖x‖² = 1."""
    acts = [capture(model, model.to_tokens(t), [site])[site][0, 1:] for t in texts]
    x = torch.cat(acts).float()
    return x / x.pow(2).sum(-1).mean().sqrt()


TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "In 1969 the Apollo 11 mission landed the first two people on the Moon.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]


@pytest.mark.parametrize("start", ["recipe init", "sparse thresholds"])
def test_equal_to_the_reference_on_tiny_model_activations(tiny_model: LanguageModel, start: str) -> None:
    x = scaled_acts(tiny_model, Site("resid_post", 2), TEXTS)
    sae = init_sae(
        JumpReLUSAE(SAEConfig("jumprelu", d_in=x.shape[1], d_sae=512)), torch.Generator().manual_seed(0)
    )
    if start == "sparse thresholds":
        set_thresholds_for_l0(sae, x, l0=20)
    assert_same_step(sae, x, 0.001)


@pytest.mark.real
def test_equal_to_the_reference_on_gemma_3_270m_activations(real_model: LanguageModel) -> None:
    x = scaled_acts(real_model, Site("resid_post", 6), TEXTS * 2)  # ~180 tokens of d_in 640
    sae = init_sae(JumpReLUSAE(SAEConfig("jumprelu", d_in=640, d_sae=2048)), torch.Generator().manual_seed(0))
    assert_same_step(sae, x, 0.001)
    set_thresholds_for_l0(sae, x, l0=50)
    assert_same_step(sae, x, 0.001)
    assert near_pairs(sae, x, 0.001)[0] > 0


def test_fast_training_run_ends_where_the_reference_run_ends(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    harvest(tiny_model, ["resid_post.2"], tmp_path / "store", n_tokens=4096, context_len=64, progress=False)
    saes = {}
    for fast in (False, True):
        run_dir = tmp_path / f"fast_{fast}"
        shutil.copytree(tmp_path / "store" / "activations", run_dir / "activations")
        # float32: the fast step's arithmetic is the reference's (bfloat16's product is tested below)
        cfg = TrainConfig(batch_size=256, lr=1e-3, fast=fast, checkpoint_every=100, step_dtype="float32")
        specs = [TrainSpec("resid_post.2", 256, l0_coeff=1e-3), TrainSpec("resid_post.2", 128, target_l0=20)]
        folders = train_saes(run_dir, specs, tokens=256 * 12, config=cfg, progress=False)
        saes[fast] = [load_sae(f) for f in folders]
        assert all(load_sae(f).cfg.extra["fast"] is fast for f in folders)
    # Adam (β1 = 0) moves each weight by about ±lr a step whatever its gradient's size, so a weight
    # whose gradient is near zero (θ of a latent with few pairs in the kernel's support) follows the
    # sign of rounding noise and may end a few steps apart. So: nearly every weight within a fifth of
    # one step (lr = 1e-3, in the training-time scale), and the same L0 and FVU; a wrong gradient
    # would leave most weights apart.
    for ref, fast in zip(saes[False], saes[True], strict=True):
        scale = ref.cfg.extra["scale"]
        for name in PARAMS:
            unit = scale if name in ("b_enc", "b_dec", "threshold") else 1.0  # folded: times C
            diff = (getattr(fast, name) - getattr(ref, name)).abs() / unit
            assert float((diff <= 2e-4).float().mean()) >= 0.99, f"{name}: {int((diff > 2e-4).sum())} apart"
        assert fast.cfg.extra["l0"] == pytest.approx(ref.cfg.extra["l0"], rel=1e-3)
        assert fast.cfg.extra["fvu"] == pytest.approx(ref.cfg.extra["fvu"], rel=1e-3)


def test_a_latent_major_encoder_takes_its_gradient_as_computed_and_steps_alike() -> None:
    """`latent_major_encoder` stores W_enc as the transpose of a [d_sae, d_in] tensor, the layout of
    the sparse step's encoder gradient, which autograd then keeps without a copy; the step's values
    and gradients, and the sign optimiser's step, are those of the plain layout."""
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(3))
    plain, relaid = random_sae(32, 256, seed=9), random_sae(32, 256, seed=9)
    latent_major_encoder(relaid)
    assert relaid.W_enc.stride() == (1, 32) and torch.equal(relaid.W_enc, plain.W_enc)
    for sae in (plain, relaid):
        set_thresholds_for_l0(sae, x, l0=15)
    steps = [run(jumprelu_terms_sparse, sae, x, 0.02, LOSSES["the training loss"]) for sae in (plain, relaid)]
    assert relaid.W_enc.grad is not None and relaid.W_enc.grad.stride() == relaid.W_enc.stride()
    for name in PARAMS:
        torch.testing.assert_close(steps[1][3][name], steps[0][3][name], rtol=0, atol=0)
    for sae in (plain, relaid):
        optimizer = make_optimizer(sae, "signum", 1e-2, 1e-3, (0.0, 0.999), 1e-8)
        optimizer.step()
        optimizer.step()
    torch.testing.assert_close(relaid.W_enc, plain.W_enc, rtol=0, atol=0)
    torch.testing.assert_close(relaid.W_dec, plain.W_dec, rtol=0, atol=0)


def test_a_checkpoint_with_contiguous_optimizer_state_resumes_laid_out_as_the_parameters() -> None:
    """A checkpoint written before the trainer stored W_enc latent-major holds contiguous optimiser
    states; loaded into a latent-major trainee they take its layout (values unchanged), so its steps'
    elementwise passes are not transposing ones."""
    from gemmascope.train.trainee import _lay_out_as_parameters

    sae = random_sae(16, 64, seed=2)
    optimizer = make_optimizer(sae, "signum", 1e-2, 1e-3, (0.0, 0.999), 1e-8)
    sae.W_enc.grad, sae.W_dec.grad = torch.randn(16, 64), torch.randn(64, 16)
    optimizer.step()
    saved = optimizer.state_dict()
    latent_major_encoder(sae)
    optimizer = make_optimizer(sae, "signum", 1e-2, 1e-3, (0.0, 0.999), 1e-8)
    optimizer.load_state_dict(saved)
    before = {k: v.clone() for k, v in optimizer.state[sae.W_enc].items() if isinstance(v, Tensor)}
    assert optimizer.state[sae.W_enc]["z"].stride() != sae.W_enc.stride()
    _lay_out_as_parameters(optimizer)
    for key, value in before.items():
        assert optimizer.state[sae.W_enc][key].stride() == sae.W_enc.stride()
        assert torch.equal(optimizer.state[sae.W_enc][key], value)
