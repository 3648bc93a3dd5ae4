"""The decoder refit (train/refit.py): the least-squares solve against torch's own, the refit of an
SAE and of a skip transcoder on a tiny store against a plain regression on the same tokens (codes
untouched, latents that never fired keep their rows), and the refit as the last stage of training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import gemmascope.train.refit as refit
from gemmascope.activations import ActivationStore, harvest
from gemmascope.architectures import JumpReLUSAE
from gemmascope.errors import ConfigError
from gemmascope.formats import load_sae
from gemmascope.models import LanguageModel
from gemmascope.runs import HELDOUT
from gemmascope.sae import SAEConfig, build_sae
from gemmascope.train import TrainConfig, TrainSpec, train_saes
from gemmascope.train.refit import refit_decoder, solve_decoder
from gemmascope.train.trainee import Trainee, new_trainee, training_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_dir(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("refit_run")
    sites = ["resid_post.1", "mlp_in.1", "mlp_out.1"]
    harvest(tiny_model, sites, run_dir, n_tokens=4096, context_len=64, progress=False)
    harvest(
        tiny_model, sites, run_dir / HELDOUT, n_tokens=2048, context_len=64, split="heldout", progress=False
    )
    return run_dir


def test_solve_decoder_is_least_squares_and_keeps_unused_rows() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g, dtype=torch.float64)
    z[:, 2] = 0  # a latent that never fired
    y = torch.randn(200, 4, generator=g, dtype=torch.float64)
    old = torch.randn(6, 4, generator=g, dtype=torch.float64)
    solved = solve_decoder(z.T @ z, z.T @ y, old, ridge=0.0)
    used = [0, 1, 3, 4, 5]
    expected = torch.linalg.lstsq(z[:, used], y).solution
    assert torch.allclose(solved[used].double(), expected, atol=1e-5)
    assert torch.equal(solved[2], old[2].float())
    # the ridge pulls towards the old rows: a large one leaves them almost where they were
    pulled = solve_decoder(z.T @ z, z.T @ y, old, ridge=1e6)
    assert torch.allclose(pulled.double(), old, atol=1e-4)


def test_nested_normal_equations_are_the_matryoshka_least_squares() -> None:
    """Σⱼ ‖Y − Z[:, :mⱼ] W[:mⱼ]‖² with two extra columns in every prefix, against lstsq on the
    design stacked once per prefix (columns past the prefix zeroed)."""
    g = torch.Generator().manual_seed(1)
    prefixes, n_extra = (2, 4, 8), 2
    z = torch.randn(300, 8 + n_extra, generator=g, dtype=torch.float64)
    y = torch.randn(300, 3, generator=g, dtype=torch.float64)
    gram, rhs = refit.nested_normal_equations(z.T @ z, z.T @ y, prefixes)
    solved = solve_decoder(gram, rhs, torch.zeros(8 + n_extra, 3, dtype=torch.float64), ridge=0.0)
    stacked = []
    for m in prefixes:
        part = z.clone()
        part[:, m:8] = 0  # latents past the prefix; the extras (columns 8, 9) stay
        stacked.append(part)
    expected = torch.linalg.lstsq(torch.cat(stacked), y.repeat(len(prefixes), 1)).solution
    assert torch.allclose(solved.double(), expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk", "relu"])
def test_sparse_codes_and_their_gram_equal_the_dense_ones(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit's codes, encoded a block of tokens at a time as sparse entries (`SAE.active`),
    are the dense activations exactly, and the Gram summed from them is FᵀF."""
    monkeypatch.setattr(refit, "REFIT_BLOCK_ELEMENTS", 32 * 7)  # blocks of 7 tokens: 300 is not a multiple
    g = torch.Generator().manual_seed(2)
    sae = build_sae(SAEConfig(arch, d_in=12, d_sae=32, k=5 if "topk" in arch else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if isinstance(sae, JumpReLUSAE):
            sae.threshold[:4] = -0.5  # a negative threshold: pre between it and 0 does not fire
    x = torch.randn(300, 12, generator=g)
    dense = sae.activation(sae.pre_acts(sae.centered(x)))
    codes = refit.sparse_codes(sae, x)
    assert torch.equal(codes.to_dense(), dense)
    assert torch.equal(refit.csr_codes(dense).to_dense(), dense)
    total = torch.ones(32, 32, dtype=torch.float64)  # the Gram is added to what is there
    refit._add_codes_gram(total, [codes])
    assert torch.allclose(total, 1 + dense.double().T @ dense.double(), atol=1e-9, rtol=1e-12)
    # the encoder's product in bfloat16: the same codes to its rounding, a pair at the threshold aside
    rounded = refit.sparse_codes(sae, x, torch.bfloat16).to_dense()
    both = (rounded != 0) & (dense != 0)
    assert ((rounded != 0) != (dense != 0)).float().mean() < 0.01
    bound = 2**-7 * (sae.centered(x).abs() @ sae.W_enc.abs())  # bfloat16's rounding of both factors
    assert ((rounded - dense).abs() <= bound)[both].all()


@pytest.mark.parametrize("threads", [1, 3])
def test_the_gram_of_several_batches_is_their_stacked_codes_gram(threads: int) -> None:
    """Batches of different sizes (one with no code at all), a latent that never fires, and the
    latents cut into chunks over threads: the sum is FᵀF of all the codes, in float64."""
    g = torch.Generator().manual_seed(5)
    parts = []
    for rows in (7, 1, 20, 4):
        codes = torch.rand(rows, 50, generator=g) * (torch.rand(rows, 50, generator=g) < 0.2)
        codes[:, 3] = 0
        parts.append(codes if rows != 1 else torch.zeros(1, 50))
    total = torch.full((50, 53), 2.0, dtype=torch.float64)  # a transcoder's: 3 extra columns past the codes'
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        refit._add_codes_gram(total, [refit.csr_codes(p) for p in parts])
    finally:
        torch.set_num_threads(before)
    f = torch.cat(parts).double()
    assert torch.allclose(total[:, :50], 2 + f.T @ f, atol=1e-12)
    assert (total[:, 50:] == 2).all()  # the extras' columns are not the codes' to fill


def trainee(store: ActivationStore, spec: TrainSpec, seed: int = 0) -> Trainee:
    t = new_trainee(0, spec, store, TrainConfig(lr=1e-2))
    g = torch.Generator().manual_seed(seed)
    sae = t.sae
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc[0] = -1e9  # latent 0 never fires
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.fill_(1.0)
    return t


def regression(
    t: Trainee, store: ActivationStore, tokens: int, columns: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The design matrix and target of the refit, gathered the plain way from the same batches."""
    zs, ys, n = [], [], 0
    cfg = TrainConfig()
    for batch in store.batches(
        t.sites, refit.REFIT_BATCH, seed=cfg.seed, buffer_tokens=cfg.buffer_tokens, scaled=True
    ):
        x, target = training_pair(t, batch, "cpu", cfg.max_norm)
        f = t.sae.activation(t.sae.pre_acts(t.sae.centered(x)))
        parts = [f] + ([x] if "x" in columns else []) + ([torch.ones(len(x), 1)] if "1" in columns else [])
        zs.append(torch.cat(parts, 1))
        ys.append(x - t.sae.b_dec if target is None else target)
        n += len(x)
    z, y = torch.cat(zs)[:tokens].double(), torch.cat(ys)[:tokens].double()
    return z, y


@pytest.mark.parametrize("kind", ["sae", "topk", "transcoder", "skip_transcoder"])
def test_refit_equals_a_plain_regression_and_leaves_the_codes(
    store_dir: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refit, "REFIT_RIDGE", 0.0)
    monkeypatch.setattr(refit, "REFIT_FLUSH", 2)  # flushes mid-pass and at the end
    monkeypatch.setattr(refit, "REFIT_BATCH", 512)
    monkeypatch.setattr(refit, "REFIT_BLOCK_ELEMENTS", 16 * 100)  # blocks of 100 tokens, one batch 6
    store = ActivationStore(store_dir)
    if kind == "sae":
        spec, columns = TrainSpec("resid_post.1", 16, target_l0=4), ""
    elif kind == "topk":
        spec, columns = TrainSpec("resid_post.1", 16, "topk", k=4), ""
    elif kind == "transcoder":
        spec, columns = TrainSpec("mlp_in.1", 16, target_l0=4, out_site="mlp_out.1"), "1"
    else:
        spec, columns = TrainSpec("mlp_in.1", 16, target_l0=4, out_site="mlp_out.1", skip=True), "x1"
    t = trainee(store, spec)
    encoder = {
        k: v.clone() for k, v in t.sae.state_dict().items() if k in ("W_enc", "b_enc", "threshold", "b_in")
    }
    z, y = regression(t, store, 3000, columns)
    dead_row = t.sae.W_dec[0].detach().clone()
    with torch.no_grad():
        before = (y - z @ torch.cat([t.sae.W_dec, *refit._extra_rows(t.sae)]).double()).pow(2).sum()
    n = refit_decoder(t, store, TrainConfig(refit_dtype="float32"), 3000, progress=False)  # exact codes
    assert n == 3000
    for name, value in encoder.items():
        assert torch.equal(t.sae.state_dict()[name], value), name
    weights = torch.cat([t.sae.W_dec, *refit._extra_rows(t.sae)]).detach().double()
    used = z.abs().sum(0) > 0
    assert not used[0] and torch.equal(t.sae.W_dec[0], dead_row)  # never fired: its row is kept
    expected = torch.linalg.lstsq(z[:, used], y).solution
    assert torch.allclose(weights[used], expected, atol=1e-3, rtol=1e-3)
    after = (y - z @ weights).pow(2).sum()
    assert after < before


def test_training_ends_with_the_refit_and_says_so(store_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(store_dir / "activations", run_dir / "activations")
    shutil.copytree(store_dir / HELDOUT, run_dir / HELDOUT)
    spec = TrainSpec("resid_post.1", 32, target_l0=4)
    kw = {"batch_size": 128, "checkpoint_every": 10}
    [plain] = train_saes(
        run_dir, [spec], 2048, TrainConfig(name="plain", refit_tokens=0, **kw), progress=False
    )
    [refitted] = train_saes(
        run_dir, [spec], 2048, TrainConfig(name="refit", refit_tokens=1024, **kw), progress=False
    )
    a, b = load_sae(plain), load_sae(refitted)
    assert "decoder_refit_tokens" not in a.cfg.extra and b.cfg.extra["decoder_refit_tokens"] == 1024
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.threshold, b.threshold)  # same codes
    assert not torch.equal(a.W_dec, b.W_dec)
    assert "held-out" in b.cfg.extra["measured_on"]
    assert b.cfg.extra["fvu"] < a.cfg.extra["fvu"]  # on the held-out tokens, after the refit
    # without held-out activations the figures come from the last part of training, before the refit
    shutil.rmtree(run_dir / HELDOUT)
    [late] = train_saes(
        run_dir, [spec], 2048, TrainConfig(name="late", refit_tokens=1000, **kw), progress=False
    )
    assert "before the decoder refit" in load_sae(late).cfg.extra["measured_on"]


def test_a_negative_refit_is_a_clear_error(store_dir: Path) -> None:
    with pytest.raises(ConfigError, match="refit_tokens -1"):
        train_saes(
            store_dir, [TrainSpec("resid_post.1", 16, target_l0=4)], 1024, TrainConfig(refit_tokens=-1)
        )
