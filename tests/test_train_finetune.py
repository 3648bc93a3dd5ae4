"""End-to-end fine-tuning (train/finetune.py): the two loss terms against direct computations, for an
SAE and for a transcoder (the MLP output it predicts), the loss going down on the tiny model, what is
and is not changed, the folder it writes, SIGKILL and bit-exact resume, a trained transcoder
fine-tuned on the right objective, and bad input refused before anything is loaded."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemmascope.cli import main
from gemmascope.errors import ConfigError
from gemmascope.evals import edited_batches, evaluate, summary
from gemmascope.formats import load_sae, save_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig, build_sae
from gemmascope.sites import capture, parse_site
from gemmascope.train import finetune as ft

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


def _transcoder(model: LanguageModel, layer: int = 1) -> JumpReLUSAE:
    d = model.d_model
    cfg = SAEConfig(
        "jumprelu", d_in=d, d_sae=32, site=f"mlp_in.{layer}", out_site=f"mlp_out.{layer}", affine_skip=True,
        model_name="tiny-gemma3",
    )  # fmt: skip
    tc = build_sae(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for _, p in tc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tc.threshold.fill_(0.05)  # type: ignore[operator]
    return tc  # type: ignore[return-value]


def _batch(model: LanguageModel, sae: JumpReLUSAE) -> tuple[torch.Tensor, object]:
    ids = torch.randint(3, model.hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = model.tokenizer.bos_token_id
    return ids, next(edited_batches(model, ids, [sae], 2, min_tokens=1))


def test_terms_are_the_fvu_and_the_kl_computed_directly(tiny_model: LanguageModel) -> None:
    sae = _sae(tiny_model)
    ids, batch = _batch(tiny_model, sae)
    fvu, kl = ft.terms(tiny_model, sae, batch)  # type: ignore[arg-type]
    x = capture(tiny_model, ids, [parse_site("resid_post.1")])[parse_site("resid_post.1")][:, 1:]
    x = x.reshape(-1, x.shape[-1]).float()  # the text positions
    with torch.no_grad():
        expected = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert float(fvu.detach()) == pytest.approx(expected, rel=1e-4)
    assert float(kl.detach()) > 0 and math.isfinite(float(kl.detach()))
    exact_sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=x.shape[1], d_sae=2 * x.shape[1], site="resid_post.1"))
    with torch.no_grad():  # relu(x) and relu(-x): reconstructs exactly, so KL = 0
        eye = torch.eye(x.shape[1])
        exact_sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact_sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    fvu0, kl0 = ft.terms(tiny_model, exact_sae, batch)  # type: ignore[arg-type]
    assert float(fvu0.detach()) < 1e-10 and abs(float(kl0.detach())) < 1e-6


def test_a_transcoders_terms_are_those_of_the_mlp_output_it_replaces(tiny_model: LanguageModel) -> None:
    """The reconstruction term is the FVU of the MLP output against the prediction from the MLP input
    (not of the input), and the KL is that of the model with the MLP's output replaced."""
    tc = _transcoder(tiny_model)
    ids, batch = _batch(tiny_model, tc)
    fvu, kl = ft.terms(tiny_model, tc, batch)  # type: ignore[arg-type]
    acts = capture(tiny_model, ids, [parse_site("mlp_in.1"), parse_site("mlp_out.1")])
    x, y = (acts[parse_site(s)][:, 1:].reshape(-1, tiny_model.d_model) for s in ("mlp_in.1", "mlp_out.1"))
    with torch.no_grad():
        pred = tc(x)
        expected = float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        against_input = float((x - pred).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert float(fvu.detach()) == pytest.approx(expected, rel=1e-4)
    assert abs(expected - against_input) > 0.1 * expected  # the two objectives are told apart here
    # the KL: the model with the MLP output replaced by the prediction at the text positions
    from gemmascope.sites import edit_from

    def write(x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        replaced = tc(x_in)
        replaced[:, 0] = out[:, 0]  # BOS as the model computes it
        return replaced

    with torch.no_grad():
        clean = tiny_model.hf(input_ids=ids).logits[:, 1:-1].log_softmax(-1)
        with edit_from(tiny_model, parse_site("mlp_in.1"), parse_site("mlp_out.1"), write):
            spliced = tiny_model.hf(input_ids=ids).logits[:, 1:-1].log_softmax(-1)
    direct = float((clean.exp() * (clean - spliced)).sum(-1).mean())
    assert float(kl.detach()) == pytest.approx(direct, rel=1e-3)


def test_finetune_lowers_the_loss_and_changes_only_the_weights(tiny_model: LanguageModel) -> None:
    sae = _sae(tiny_model)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    tuned, info = ft.finetune(
        tiny_model, sae, tokens=1024, lr=3e-3, context_len=16, batch_rows=2, progress=False
    )
    assert info["steps"] >= 10 and info["alpha"] > 0
    assert info["last_10pct"]["loss"] < 0.8 * info["first"]["loss"]
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items()), "the input SAE is untouched"
    # training's rules: thresholds and (JumpReLU) biases stay, the encoder and decoder learn
    for name in ("threshold", "b_enc", "b_dec"):
        assert torch.equal(getattr(tuned, name), getattr(sae, name)), name
    assert not torch.equal(tuned.W_enc, sae.W_enc) and not torch.equal(tuned.W_dec, sae.W_dec)
    assert torch.allclose(tuned.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert tuned.cfg.extra["finetune"]["tokens"] == info["tokens"]


def test_finetune_folder_writes_beside_and_never_replaces(tiny_model: LanguageModel, tmp_path: Path) -> None:
    folder = save_sae(_sae(tiny_model), tmp_path / "l0_20")
    out, info = ft.finetune_folder(tiny_model, folder, tokens=256, context_len=32, progress=False)
    assert out == tmp_path / "l0_20_finetuned" and load_sae(out).cfg.extra["finetuned_from"] == "l0_20"
    checkpoints = tmp_path / "checkpoints" / "finetune_l0_20_finetuned"
    assert (checkpoints / "done.json").exists() and not (checkpoints / "state.pt").exists()
    log = (tmp_path / "report" / "finetune_l0_20_finetuned_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, info["steps"] + 1))
    with pytest.raises(ConfigError, match="already exists"):
        ft.finetune_folder(tiny_model, folder, tokens=256, context_len=32, progress=False)


def test_a_checkpoint_resumes_only_the_same_fine_tune(tiny_model: LanguageModel, tmp_path: Path) -> None:
    from gemmascope.errors import StoreError

    sae, where = _sae(tiny_model), tmp_path / "checkpoints"
    job = {"tokens": 4 * 15, "context_len": 16, "batch_rows": 2, "checkpoint_every": 1, "progress": False}
    first, info = ft.finetune(tiny_model, sae, checkpoints=where, lr=3e-3, **job)  # type: ignore[arg-type]
    assert info["steps"] == 2 and (where / "state.pt").exists()  # not finished: finetune_folder does that
    again, info = ft.finetune(tiny_model, sae, checkpoints=where, lr=3e-3, **job)  # type: ignore[arg-type]
    assert info["steps"] == 2 and torch.equal(again.W_enc, first.W_enc)  # resumed after its last step
    with pytest.raises(StoreError, match=r"lr: 0.003 -> 0.001"):
        ft.finetune(tiny_model, sae, checkpoints=where, lr=1e-3, **job)  # type: ignore[arg-type]
    other, _ = ft.finetune(tiny_model, sae, checkpoints=where, lr=1e-3, restart=True, **job)  # type: ignore[arg-type]
    assert not torch.equal(other.W_enc, first.W_enc)


# A fine-tune run by a subprocess we kill and, resumed and uninterrupted, in this process.
JOB = {"tokens": 24 * 2 * 15, "context_len": 16, "batch_rows": 2, "lr": 3e-3, "checkpoint_every": 3}
FINETUNE_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from gemmascope.models import load_model
from gemmascope.train.finetune import finetune_folder
finetune_folder(load_model("tiny-gemma3"), sys.argv[1], progress=False, **json.loads(sys.argv[2]))
"""


def test_sigkill_and_resume_reproduce_the_uninterrupted_finetune(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    folder = save_sae(_sae(tiny_model), tmp_path / "killed" / "l0_20")
    other = save_sae(_sae(tiny_model), tmp_path / "uninterrupted" / "l0_20")
    script = tmp_path / "finetune_script.py"
    script.write_text(FINETUNE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder), json.dumps(JOB)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    state = tmp_path / "killed" / "checkpoints" / "finetune_l0_20_finetuned" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (tmp_path / "killed" / "l0_20_finetuned").exists()
    killed_at = torch.load(state, weights_only=False)["step"]
    assert 0 < killed_at < 24

    resumed, info = ft.finetune_folder(tiny_model, folder, progress=False, **JOB)  # type: ignore[arg-type]
    assert info["steps"] == 24
    uninterrupted, _ = ft.finetune_folder(tiny_model, other, progress=False, **JOB)  # type: ignore[arg-type]
    wa, wb = (load_file(str(p / "sae_weights.safetensors")) for p in (resumed, uninterrupted))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    extra_a, extra_b = (load_sae(p).cfg.extra["finetune"] for p in (resumed, uninterrupted))
    assert {**extra_a, "seconds": 0} == {**extra_b, "seconds": 0}
    log_a, log_b = (
        (tmp_path / run / "report" / "finetune_l0_20_finetuned_log.jsonl").read_text()
        for run in ("killed", "uninterrupted")
    )
    assert log_a == log_b


def test_a_trained_transcoder_fine_tuned_keeps_its_fvu_and_lowers_its_delta_lm(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    """On the MLP output it predicts, with the model's loss through the MLP replaced: a trained
    transcoder keeps its FVU of the MLP output (within noise) and its ΔLM loss goes down or stays.
    (Measured: FVU 0.871 -> 0.876 here; the old objective, the error against the MLP input with the
    prediction written there, took it to 0.922.)"""
    from gemmascope.activations import harvest
    from gemmascope.train import TrainConfig, TrainSpec, train_saes

    harvest(tiny_model, ["mlp_in.1", "mlp_out.1"], tmp_path, n_tokens=4096, context_len=64, progress=False)
    spec = TrainSpec("mlp_in.1", 64, target_l0=8, out_site="mlp_out.1", skip=True)
    (folder,) = train_saes(tmp_path, [spec], 4096, TrainConfig(batch_size=128), progress=False)
    out, _ = ft.finetune_folder(tiny_model, folder, tokens=1024, lr=1e-2, context_len=32, progress=False)
    before, after = (
        summary(r)
        for r in evaluate(tiny_model, {"before": load_sae(folder), "after": load_sae(out)}, n_tokens=1024,
                          context_len=64, min_tokens=512)
    )  # fmt: skip
    assert after["fvu"] <= before["fvu"] + 0.02, (before["fvu"], after["fvu"])
    assert after["delta_lm_loss"] <= before["delta_lm_loss"] + 1e-3, (
        before["delta_lm_loss"],
        after["delta_lm_loss"],
    )


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokens": 0}, "tokens 0"),
        ({"tokens": 2.5}, "tokens 2.5"),
        ({"lr": -1.0}, "lr -1.0"),
        ({"lr": 0.0}, "lr 0.0"),
        ({"beta": float("nan")}, "beta nan"),
        ({"lr": float("inf")}, "lr inf"),
        ({"batch_rows": 0}, "batch_rows 0"),
        ({"context_len": 1}, "context_len 1"),
        ({"checkpoint_every": 0}, "checkpoint_every 0"),
        ({"learning_rate": 1.0}, "learning_rate"),
    ],
)
def test_bad_settings_are_clear_errors_before_anything_loads(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ft.check_settings(**kwargs)
    with pytest.raises(ConfigError, match=message):  # before the folder is even read
        ft.finetune_folder(None, tmp_path / "no such folder", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "--lr -1.0 must be finite and > 0"),
        (["--beta", "nan"], "argument --beta: 'nan' is not finite"),
        (["--tokens", "0"], "--tokens 0 must be a whole number >= 1"),
        (["--eval-tokens", "-5"], "--eval-tokens -5"),
    ],
)
def test_cli_checks_every_argument_before_the_model_loads(
    tiny_model: LanguageModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    import gemmascope.models

    folder = save_sae(_sae(tiny_model), tmp_path / "l0_20")

    def no_model(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(gemmascope.models, "load_model", no_model)
    assert main(["finetune", str(folder), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    (tmp_path / "l0_20_finetuned").mkdir()
    assert main(["finetune", str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_refuses_a_missing_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "not a folder" in err and "\n" not in err
