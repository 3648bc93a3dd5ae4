"""End-to-end fine-tuning (finetune.py): the two loss terms against direct computations, the loss
going down on the tiny model, what is and is not changed, the folder it writes, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gemmascope import finetune as ft
from gemmascope.cli import main
from gemmascope.errors import ConfigError
from gemmascope.formats import load_sae, save_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig
from gemmascope.sites import capture, parse_site

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(model: LanguageModel, site: str = "resid_post.1", d_sae: int = 64) -> JumpReLUSAE:
    d = model.hf.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d, d_sae=d_sae, site=site, model_name="tiny-gemma3"))
    with torch.no_grad():
        w = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=gen), dim=-1)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.threshold.fill_(0.05)
    return sae


def test_terms_are_the_fvu_and_the_kl_computed_directly(tiny_model: LanguageModel) -> None:
    sae = _sae(tiny_model)
    ids = torch.randint(3, tiny_model.hf.config.vocab_size, (2, 16))
    ids[:, 0] = tiny_model.tokenizer.bos_token_id
    mse, kl = ft._terms(tiny_model, sae, parse_site("resid_post.1"), ids)
    x = capture(tiny_model, ids, [parse_site("resid_post.1")])[parse_site("resid_post.1")][
        :, 1:
    ]  # text positions
    x = x.reshape(-1, x.shape[-1]).float()
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert float(mse.detach()) == pytest.approx(fvu, rel=1e-4)
    clean = tiny_model.hf(input_ids=ids).logits[:, 1:-1].log_softmax(-1)  # predictions from text positions
    assert float(kl.detach()) >= 0 and math.isfinite(float(kl.detach()))
    exact_sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=x.shape[1], d_sae=2 * x.shape[1], site="resid_post.1"))
    with torch.no_grad():  # relu(x) and relu(-x): reconstructs exactly, so KL = 0
        eye = torch.eye(x.shape[1])
        exact_sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact_sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    mse0, kl0 = ft._terms(tiny_model, exact_sae, parse_site("resid_post.1"), ids)
    assert float(mse0) < 1e-10 and float(kl0) < 1e-6 and clean.shape[1] == 14


def test_finetune_lowers_the_loss_and_changes_only_the_weights(tiny_model: LanguageModel) -> None:
    sae = _sae(tiny_model)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    tuned, info = ft.finetune(tiny_model, sae, tokens=2048, lr=3e-3, context_len=32, progress=False)
    assert info["steps"] >= 10 and info["alpha"] > 0
    assert info["last_10pct"]["loss"] < 0.8 * info["first"]["loss"]
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items()), "the input SAE is untouched"
    assert torch.equal(tuned.threshold, sae.threshold) and not torch.equal(tuned.W_enc, sae.W_enc)
    assert torch.allclose(tuned.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert tuned.cfg.extra["finetune"]["tokens"] == info["tokens"]


def test_finetune_folder_writes_beside_and_never_replaces(tiny_model: LanguageModel, tmp_path: Path) -> None:
    folder = save_sae(_sae(tiny_model), tmp_path / "l0_20")
    out, _ = ft.finetune_folder(tiny_model, folder, tokens=256, context_len=32, progress=False)
    assert out == tmp_path / "l0_20_finetuned" and load_sae(out).cfg.extra["finetuned_from"] == "l0_20"
    with pytest.raises(ConfigError, match="already exists"):
        ft.finetune_folder(tiny_model, folder, tokens=256, context_len=32, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tokens": 0}, "tokens 0"), ({"lr": -1.0}, "lr -1.0"), ({"beta": float("nan")}, "beta nan")],
)
def test_bad_settings_are_clear_errors(tiny_model: LanguageModel, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.finetune(tiny_model, _sae(tiny_model), progress=False, **kwargs)


def test_cli_refuses_a_missing_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "not a folder" in err and "\n" not in err
