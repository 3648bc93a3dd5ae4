"""The short-run recipe of the train package (issue "SAEs worth reading"): each added loss term's
value and gradient against a plain dense reference, the initialisation from data, the lr decay, the
spike guard on a synthetic spike, and SAE folders named by their held-out L0."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import gemmascope.train.loop as train_loop
from gemmascope.activations import ActivationStore, harvest
from gemmascope.architectures import JumpReLUSAE
from gemmascope.errors import TrainingError
from gemmascope.formats import load_sae
from gemmascope.models import LanguageModel
from gemmascope.runs import HELDOUT
from gemmascope.sae import SAEConfig, massive_mask
from gemmascope.train import TrainConfig, TrainSpec, train_saes
from gemmascope.train.init import init_from_data
from gemmascope.train.recipe import lr_at

SITE = "resid_post.2"
EPS = 0.001


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_store(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's resid_post.2 activations: 8k training tokens and 2k held-out ones."""
    run_dir = tmp_path_factory.mktemp("recipe_run")
    harvest(tiny_model, [SITE], run_dir, n_tokens=8192, context_len=64, progress=False)
    harvest(
        tiny_model, [SITE], run_dir / HELDOUT, n_tokens=2048, context_len=64, split="heldout", progress=False
    )
    return run_dir


@pytest.fixture
def run_dir(tiny_store: Path, tmp_path: Path) -> Path:
    """A fresh copy with training activations only (no held-out store)."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_store / "activations", dest / "activations")
    return dest


def config(**kwargs: object) -> TrainConfig:
    return TrainConfig(**{"batch_size": 128, "checkpoint_every": 10, "log_every": 5, **kwargs})  # type: ignore[arg-type]


def random_jumprelu(d_in: int = 8, d_sae: int = 16, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, site=SITE))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
    return sae


# ---------------------------------------------------------------------------------------------
# Loss terms against plain dense references


def test_the_pages_hide_as_dense_what_training_pushes_down() -> None:
    """Latents hidden as dense (microscope, search, contrast, bias, documents) are those above the
    recipe's density limit, and the pages' labels say that share: read from the API (`GET /v1/saes`
    `limits.dense`), never typed into the pages."""
    from gemmascope.features import HIDE_DENSE
    from gemmascope.server.pages import STATIC
    from gemmascope.server.saes import limits
    from gemmascope.train.recipe import DENSE_DENSITY

    assert HIDE_DENSE == DENSE_DENSITY == limits()["dense"]
    for page in ("index.html", "search.html"):
        assert 'data-limit="dense"' in (Path(STATIC) / page).read_text(), page
    for page in ("index.html", "search.html", "search.js", "microscope.js", "common.js"):
        assert f"{HIDE_DENSE * 100:g}%" not in (Path(STATIC) / page).read_text(), page


def test_init_from_data_starts_b_dec_at_the_mean_and_l0_at_its_target() -> None:
    sae = random_jumprelu(d_in=8, d_sae=400)
    x = torch.randn(2000, 8) + 3.0
    init_from_data(sae, x, TrainConfig(), init_l0=20)
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    l0 = float((sae.pre_acts(x - sae.b_dec) > sae.threshold).sum(-1).float().mean())
    assert 19 <= l0 <= 21
    published = random_jumprelu(d_in=8, d_sae=400)
    before = published.threshold.detach().clone()
    init_from_data(published, x, TrainConfig(b_dec_init="zero", threshold_init=0.001), init_l0=20)
    assert float(published.b_dec.abs().sum()) > 0 and torch.equal(published.threshold.detach(), before)


def test_lr_decays_linearly_to_zero_over_the_last_steps() -> None:
    assert lr_at(50, 1.0, 10, decay_steps=20, n_steps=100) == 1.0
    assert lr_at(80, 1.0, 10, decay_steps=20, n_steps=100) == pytest.approx(20 / 21)
    assert lr_at(99, 1.0, 10, decay_steps=20, n_steps=100) == pytest.approx(1 / 21)
    assert lr_at(5, 1.0, 10) < 1.0 and lr_at(99, 1.0, 10) == 1.0  # no decay unless asked


# ---------------------------------------------------------------------------------------------
# The spike guard


def break_weights_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """A synthetic spike: after the optimiser steps listed, the decoder is blown up 1000x."""
    real = train_loop._optimizer_step
    calls = {"n": 0}

    def spiking(t: object, *args: object, **kwargs: object) -> None:
        real(t, *args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] in steps:
            with torch.no_grad():
                t.sae.W_dec.mul_(1000.0)  # type: ignore[attr-defined]

    monkeypatch.setattr(train_loop, "_optimizer_step", spiking)


def test_spike_guard_goes_back_to_the_checkpoint_with_half_the_lr(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_weights_at(monkeypatch, {25})
    [folder] = train_saes(run_dir, [TrainSpec(SITE, 32, target_l0=6)], 8192, config(lr=1e-3), progress=False)
    extra = load_sae(folder).cfg.extra
    assert extra["spike_recoveries"] == 1 and extra["lr_final"] == pytest.approx(5e-4)
    assert extra["fvu"] < 1.5  # what was saved is the recovered SAE, not the broken one


def test_spike_guard_stops_with_a_message_and_saves_nothing_when_spikes_go_on(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_weights_at(monkeypatch, set(range(20, 200)))
    with pytest.raises(TrainingError, match=r"broke down at step \d+ .* after 3 recoveries"):
        train_saes(run_dir, [TrainSpec(SITE, 32, target_l0=6)], 8192, config(lr=1e-3), progress=False)
    assert not (run_dir / "saes").exists()


# ---------------------------------------------------------------------------------------------
# Naming by held-out L0


def test_sae_folder_is_named_by_its_held_out_l0(tiny_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_store, run)
    [folder] = train_saes(run, [TrainSpec(SITE, 32, target_l0=6)], 2048, config(), progress=False)
    extra = load_sae(folder).cfg.extra
    assert extra["measured_on"].endswith(" held-out tokens")
    assert folder.name == f"l0_{round(extra['l0'])}"
    sae = load_sae(folder)
    store = ActivationStore(run / HELDOUT)
    n = int(store.manifest(SITE)["n_tokens_non_special"])
    [batch] = list(store.batches([SITE], n, seed=0))  # every held-out token, raw
    x = next(iter(batch.values()))
    l0 = float((sae.encode(x[~massive_mask(sae, x)]) > 0).sum(-1).float().mean())
    assert l0 == pytest.approx(extra["l0"], rel=1e-4)
