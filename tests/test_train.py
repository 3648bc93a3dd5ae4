"""Tests of the train package on the tiny model: the loss terms and their gradients, init, schedules,
folding the scaling in, several SAEs from one pass, naming by measured L0, logs and plot, checkpoints
with SIGKILL and bit-exact resume, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gemmascope.train as train_module
import gemmascope.train.checkpoint as train_checkpoint
import gemmascope.train.config as train_config
import gemmascope.train.loop as train_loop
import gemmascope.train.recipe as recipe
from gemmascope.activations import ActivationStore, harvest
from gemmascope.architectures import BatchTopKSAE, JumpReLUSAE, TopKSAE
from gemmascope.cli import main
from gemmascope.errors import ConfigError, StoreError
from gemmascope.formats import load_sae, save_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import SAEConfig, build_sae, norm_limit
from gemmascope.train import (
    PUBLISHED,
    TrainConfig,
    TrainSpec,
    fold_scaling,
    init_sae,
    jumprelu_terms,
    lr_at,
    remove_parallel_grad,
    sparsity_coeff_at,
    train_saes,
)

EPS = 0.001
SITE = "resid_post.2"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small matrices on a shared 2-core machine run far faster on one thread (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_store(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A harvested run folder of the tiny model: resid_post.2 and mlp_out.1, about 8k tokens."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    harvest(tiny_model, [SITE, "mlp_out.1"], run_dir, n_tokens=8192, context_len=64, progress=False)
    return run_dir


@pytest.fixture
def run_dir(tiny_store: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny run folder (activations only) for one test."""
    dest = tmp_path / "run"
    shutil.copytree(tiny_store / "activations", dest / "activations")
    return dest


def small_config(**kwargs: object) -> TrainConfig:
    return TrainConfig(**{"batch_size": 128, "checkpoint_every": 10, "log_every": 5, **kwargs})  # type: ignore[arg-type]


def random_jumprelu(d_in: int = 8, d_sae: int = 16, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, site=SITE))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
    return sae


# ---------------------------------------------------------------------------------------------
# The fast step


def test_fast_flag_uses_sparse_step_or_says_it_cannot(run_dir: Path) -> None:
    try:
        from gemmascope.sparse_step import jumprelu_terms_sparse
    except ImportError:
        with pytest.raises(ConfigError, match="sparse_step"):
            train_saes(
                run_dir, [TrainSpec(SITE, 32, l0_coeff=1e-3)], 256, small_config(fast=True), progress=False
            )
        return
    sae = random_jumprelu(seed=3)
    x = torch.randn(32, 8)
    ref = jumprelu_terms(sae, x, EPS)
    fast = jumprelu_terms_sparse(sae, x, EPS)
    assert torch.allclose(ref[0], fast[0], rtol=1e-5) and torch.equal(ref[1], fast[1])
    assert torch.equal(ref[2], fast[2])


def test_a_fast_run_steps_every_sae_with_the_sparse_step(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default settings (massive activations left out) every step of a fast run of SAEs
    goes through the sparse step, none through the reference; a transcoder's steps too."""
    import gemmascope.architectures.jumprelu as jumprelu_file
    import gemmascope.sparse_step as sparse_step

    calls = {"fast": 0, "reference": 0}
    real_fast, real_ref = sparse_step.jumprelu_terms_sparse, jumprelu_file.jumprelu_terms

    def fast(*args: object) -> object:
        calls["fast"] += 1
        return real_fast(*args)  # type: ignore[arg-type]

    def reference(*args: object) -> object:
        calls["reference"] += 1
        return real_ref(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sparse_step, "jumprelu_terms_sparse", fast)
    monkeypatch.setattr(jumprelu_file, "jumprelu_terms", reference)
    cfg = small_config(fast=True)
    assert cfg.max_norm is not None
    train_saes(run_dir, [TrainSpec(SITE, 32, target_l0=4)], 1024, cfg, progress=False)
    assert calls == {"fast": 1024 // 128, "reference": 0}
    tc = TrainSpec("mlp_out.1", 32, target_l0=4, out_site=SITE, skip=True)  # any two sites of one width
    train_saes(run_dir, [tc], 1024, small_config(fast=True, name="tc"), progress=False)
    assert calls == {"fast": 2 * 1024 // 128, "reference": 0}


def test_density_comes_from_each_step_and_the_extra_pass_only_from_the_final_part(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dense penalty's running rate is each step's own firing counts (`Terms.fired`, counts per
    latent over the batch, as the forward fired); the separate encoder pass (`firing_counts`) runs
    only in the final part that measures the saved SAE."""
    counted = {"passes": 0, "densities": []}
    real_measure, real_counts = train_loop.measure_density, train_loop.firing_counts

    def measure(t: object, fires: torch.Tensor, tokens: int) -> None:
        assert fires.dtype == torch.float32 and fires.sum() > 0 and float(fires.max()) <= tokens
        counted["densities"].append(fires / tokens)  # type: ignore[attr-defined]
        real_measure(t, fires, tokens)  # type: ignore[arg-type]

    def counts(*args: object) -> torch.Tensor:
        counted["passes"] += 1  # type: ignore[operator]
        return real_counts(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(train_loop, "measure_density", measure)
    monkeypatch.setattr(train_loop, "firing_counts", counts)
    steps = 2048 // 128
    train_saes(run_dir, [TrainSpec(SITE, 32, target_l0=4)], 2048, small_config(fast=True), progress=False)
    assert len(counted["densities"]) == steps  # type: ignore[arg-type]
    assert counted["passes"] == max(1, round(steps * recipe.FINAL_FRACTION))


# ---------------------------------------------------------------------------------------------
# Recipe pieces


def test_init_follows_the_recipe() -> None:
    sae = init_sae(build_sae(SAEConfig("jumprelu", d_in=8, d_sae=32)), torch.Generator().manual_seed(0))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.equal(sae.threshold, torch.full((32,), 0.001))
    assert sae.threshold.dtype == torch.float32


def test_lr_and_sparsity_warmups() -> None:
    assert lr_at(0, 1.0, 100) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 100) == pytest.approx(0.55)  # cosine: half way at half time
    assert lr_at(100, 1.0, 100) == 1.0 and lr_at(5, 1.0, 0) == 1.0
    lrs = [lr_at(i, 1.0, 100) for i in range(101)]
    assert lrs == sorted(lrs)
    assert sparsity_coeff_at(0, 2.0, 10) == 0.0
    assert sparsity_coeff_at(5, 2.0, 10) == pytest.approx(1.0)
    assert sparsity_coeff_at(10, 2.0, 10) == 2.0 and sparsity_coeff_at(3, 2.0, 0) == 2.0


def test_remove_parallel_grad_leaves_only_the_orthogonal_part() -> None:
    sae = init_sae(build_sae(SAEConfig("jumprelu", d_in=8, d_sae=16)), torch.Generator().manual_seed(0))
    sae.W_dec.grad = torch.randn(16, 8)
    before = sae.W_dec.grad.clone()
    remove_parallel_grad(sae.W_dec)
    assert not sae.W_dec.grad.requires_grad  # no autograd history kept across steps (it leaked memory)
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(16), atol=1e-6)
    assert torch.allclose(
        before - sae.W_dec.grad, (before * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec.detach(), atol=1e-6
    )


@pytest.mark.parametrize("arch,k", [("jumprelu", None), ("topk", 3), ("batchtopk", 3), ("relu", None)])
def test_folded_sae_on_raw_x_gives_training_output_times_c(tmp_path: Path, arch: str, k: int | None) -> None:
    """RECIPE 2 folding: the saved SAE on raw x reproduces the training-time output × C."""
    g = torch.Generator().manual_seed(4)
    sae = build_sae(SAEConfig(arch, d_in=8, d_sae=16, k=k, site=SITE))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(16, generator=g) * 0.5)
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.3)
    scale = 37.5
    x_raw = torch.randn(50, 8) * scale
    with torch.no_grad():
        x = x_raw / scale
        f_train = sae.activation(sae.pre_acts(x - sae.b_dec))  # the training-time encoder
        x_hat_train = sae.decode(f_train)
        saved = load_sae(save_sae(fold_scaling(sae, scale), tmp_path / "sae"))
        assert torch.allclose(saved.encode(x_raw), f_train * scale, rtol=1e-5, atol=1e-4)
        assert torch.allclose(saved(x_raw), x_hat_train * scale, rtol=1e-5, atol=1e-4)
        assert torch.equal(saved.W_enc, sae.W_enc) and torch.equal(saved.W_dec, sae.W_dec)


# ---------------------------------------------------------------------------------------------
# Training runs on the tiny model


def test_several_saes_from_one_pass(run_dir: Path) -> None:
    specs = [
        TrainSpec(SITE, 64, l0_coeff=1e-3),
        TrainSpec(SITE, 64, l0_coeff=3e-2),
        TrainSpec(SITE, 32, target_l0=6),
        TrainSpec("mlp_out.1", 32, "topk", k=4),
        TrainSpec(SITE, 32, "batchtopk", k=4),
        TrainSpec(SITE, 32, "relu", l0_coeff=1e-2),
    ]
    outputs = train_saes(run_dir, specs, 8192, small_config(), progress=False)
    assert len(outputs) == 6 and len(set(outputs)) == 6
    saes = [load_sae(p) for p in outputs]
    for spec, path, sae in zip(specs, outputs, saes, strict=True):
        extra = sae.cfg.extra
        # named by the measured L0, Gemma Scope style
        assert path.parent.name == f"width_{spec.width}"
        assert path.name.startswith(f"l0_{round(extra['l0'])}")
        assert path.parent.parent.name == f"layer_{spec.site.split('.')[1]}"
        assert sae.cfg.site == spec.site and sae.cfg.model_name == "tiny-gemma3"
        assert extra["scale"] == pytest.approx(ActivationStore(run_dir).scale(spec.site))
        assert extra["steps"] == 64 and extra["batch_size"] == 128
        # the averaged sign optimiser runs without a schedule; thresholds start at the target rate,
        # so the sparsity needs no warm-up either
        assert extra["optimizer"] == "signum" and extra["lr"] == recipe.SHORT_RUN.lr_signum == 3.5e-3
        assert (
            extra["lr_warmup_steps"] == 0 and extra["lr_decay_steps"] == 0 and extra["l0_warmup_steps"] == 0
        )
        assert extra["fixed_biases"] == (spec.architecture != "relu")
        assert extra["published"]["lr"] == PUBLISHED.lr == 7e-5
        assert 0 <= extra["fvu"] < 1.5 and 0 <= extra["dead_fraction"] <= 1
        assert (path / "sparsity.safetensors").exists()
        # wall and CPU seconds of each stage (the steps of all six SAEs together, then each SAE's own)
        stages = extra["stage_seconds"]
        assert stages.keys() == {"steps", "refit", "heldout"} and stages["steps"]["wall"] > 0
        assert all(t["wall"] >= 0 and t["cpu"] >= 0 for t in stages.values())
    assert isinstance(saes[3], TopKSAE) and saes[3].cfg.k == 4 and round(saes[3].cfg.extra["l0"]) <= 4
    assert isinstance(saes[4], JumpReLUSAE) and saes[4].cfg.extra["trained_as"] == "batchtopk"
    assert outputs[3].name.endswith("_topk") and outputs[4].name.endswith("_batchtopk")
    # a larger λ gives a sparser SAE
    assert saes[1].cfg.extra["l0"] < saes[0].cfg.extra["l0"]

    rows = [json.loads(line) for line in (run_dir / "report" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 65, 5)) + [64]
    for name in (s.name for s in specs):
        assert set(rows[-1][name]) >= {"loss", "l0", "fvu", "dead_fraction", "lr"}
    assert (run_dir / "report" / "train_curves.png").stat().st_size > 10_000

    # the same call again returns the finished SAEs and trains nothing
    mtimes = [(p / "sae_weights.safetensors").stat().st_mtime_ns for p in outputs]
    assert train_saes(run_dir, specs, 8192, small_config(), progress=False) == outputs
    assert [(p / "sae_weights.safetensors").stat().st_mtime_ns for p in outputs] == mtimes


def test_matryoshka_saes_put_the_broad_latents_first(run_dir: Path) -> None:
    """Matryoshka (Gemma Scope 2): each nested prefix of the dictionary must reconstruct on its own,
    so it does so better than the same prefix of a plain SAE trained on the same tokens."""
    specs = [
        TrainSpec(SITE, 64, target_l0=6),
        TrainSpec(SITE, 64, target_l0=6, matryoshka=True),
        TrainSpec(SITE, 64, "topk", k=6, matryoshka=True),
    ]
    plain, nested, nested_topk = train_saes(run_dir, specs, 8192, small_config(), progress=False)
    assert "matryoshka" not in plain.name
    assert nested.name.endswith("_matryoshka") and nested_topk.name.endswith("_matryoshka_topk")
    a, b = load_sae(plain), load_sae(nested)
    assert a.cfg.extra["matryoshka_prefixes"] is None
    assert b.cfg.extra["matryoshka_prefixes"] == [4, 8, 16, 32, 64]
    x = torch.cat(
        [acts[:, 1:].reshape(-1, acts.shape[-1]) for acts, _ in ActivationStore(run_dir).rows(SITE)]
    )

    def prefix_fvus(sae: JumpReLUSAE) -> list[float]:
        with torch.no_grad():
            f = sae.encode(x)
            return [
                float((x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
                for m in (4, 8, 16, 32, 64)
            ]

    plain_fvus, nested_fvus = prefix_fvus(a), prefix_fvus(b)  # type: ignore[arg-type]
    # measured: plain 0.96 / 0.93 / 0.83 / 0.67 / 0.36, Matryoshka 0.90 / 0.82 / 0.69 / 0.54 / 0.40
    for m, p, n in zip((8, 16, 32), plain_fvus[1:4], nested_fvus[1:4], strict=True):
        assert n < p - 0.05, f"the first {m} latents of the Matryoshka SAE reconstruct no better"
    assert nested_fvus[-1] < plain_fvus[-1] + 0.1  # the whole SAE pays a little for it


def test_a_training_run_never_overwrites_a_finished_sae(run_dir: Path) -> None:
    specs = [TrainSpec(SITE, 32, l0_coeff=1e-3)]
    (first,) = train_saes(run_dir, specs, 1024, small_config(), progress=False)
    before = (first / "sae_weights.safetensors").read_bytes()
    cfg = json.loads((first / "cfg.json").read_text())
    cfg["metadata"]["gemmascope"]["extra"]["train_id"] = "someone else's"
    (first / "cfg.json").write_text(json.dumps(cfg))
    shutil.rmtree(run_dir / "checkpoints")
    (second,) = train_saes(run_dir, specs, 1024, small_config(), progress=False)
    assert second == first.with_name(first.name + "_v2")
    assert (first / "sae_weights.safetensors").read_bytes() == before


def test_checkpoint_of_another_config_is_a_clear_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = [TrainSpec(SITE, 32, l0_coeff=1e-3)]

    def die(*_args: object) -> None:
        raise KeyboardInterrupt  # stop after the last checkpoint, before the run is marked finished

    monkeypatch.setattr(train_checkpoint.Checkpoint, "finish", die)
    with pytest.raises(KeyboardInterrupt):
        train_saes(run_dir, specs, 2048, small_config(lr=1e-3), progress=False)
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "train" / "state.pt").exists()
    other = [TrainSpec(SITE, 32, l0_coeff=5e-3)]
    with pytest.raises(StoreError, match="unfinished training run .* of another config .*specs"):
        train_saes(run_dir, other, 2048, small_config(lr=1e-3), progress=False)
    with pytest.raises(StoreError, match=r"lr: 0.001 -> 0.002"):
        train_saes(run_dir, specs, 2048, small_config(lr=2e-3), progress=False)
    (done,) = train_saes(run_dir, other, 2048, small_config(), progress=False, restart=True)
    assert load_sae(done).cfg.extra["l0_coeff"] == 5e-3


# One training job, run by a subprocess we kill and, resumed and uninterrupted, in this process.
JOB = {
    "specs": [
        {"site": SITE, "width": 48, "l0_coeff": 2e-3},
        {"site": "mlp_out.1", "width": 32, "architecture": "topk", "k": 4},
    ],
    "tokens": 64 * 300,
    "config": {"batch_size": 64, "checkpoint_every": 7, "log_every": 5},
}
TRAIN_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from gemmascope.train import TrainConfig, TrainSpec, train_saes
job = json.loads(sys.argv[2])
specs = [TrainSpec(**s) for s in job["specs"]]
train_saes(sys.argv[1], specs, job["tokens"], TrainConfig(**job["config"]), progress=False)
"""


def run_job(run_dir: Path) -> list[Path]:
    specs = [TrainSpec(**s) for s in JOB["specs"]]  # type: ignore[arg-type]
    return train_saes(run_dir, specs, JOB["tokens"], TrainConfig(**JOB["config"]), progress=False)  # type: ignore[arg-type]


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), json.dumps(JOB)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    state = run_dir / "checkpoints" / "train" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    assert state.exists() and not (run_dir / "checkpoints" / "train" / "done.json").exists()
    killed_at = torch.load(state, weights_only=False)["step"]
    assert 0 < killed_at < 300

    steps_taken = []
    real_step = train_loop._optimizer_step
    monkeypatch.setattr(train_loop, "_optimizer_step", lambda *a: steps_taken.append(1) or real_step(*a))
    resumed = run_job(run_dir)  # resumes from the checkpoint the killed process left
    assert len(steps_taken) == (300 - killed_at) * 2  # only the steps after the checkpoint, for 2 SAEs
    monkeypatch.undo()
    other = tmp_path / "run_uninterrupted"
    shutil.copytree(run_dir / "activations", other / "activations")
    uninterrupted = run_job(other)

    assert [p.relative_to(run_dir) for p in resumed] == [p.relative_to(other) for p in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        wa, wb = load_file(str(a / "sae_weights.safetensors")), load_file(str(b / "sae_weights.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (a, key)
        extra_a, extra_b = load_sae(a).cfg.extra, load_sae(b).cfg.extra
        # the stage times differ; the resumed run timed only its own steps, and says from where
        assert extra_a.pop("stage_seconds")["resumed_at_step"] == killed_at
        assert "resumed_at_step" not in extra_b.pop("stage_seconds")
        assert extra_a == extra_b
    log_a = (run_dir / "report" / "train_log.jsonl").read_text()
    log_b = (other / "report" / "train_log.jsonl").read_text()
    assert log_a == log_b


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "spec,message",
    [
        (TrainSpec(SITE, 0, l0_coeff=1e-3), "width 0"),
        (TrainSpec(SITE, -8, l0_coeff=1e-3), "width -8"),
        (TrainSpec(SITE, 32, l0_coeff=-1.0), "l0_coeff -1.0"),
        (TrainSpec(SITE, 32, l0_coeff=math.nan), "l0_coeff nan"),
        (TrainSpec(SITE, 32, l0_coeff=math.inf), "l0_coeff inf"),
        (TrainSpec(SITE, 32), "exactly one of l0_coeff"),
        (TrainSpec(SITE, 32, l0_coeff=1e-3, target_l0=5), "exactly one of l0_coeff"),
        (TrainSpec(SITE, 32, target_l0=40), "below the width"),
        (TrainSpec(SITE, 32, "topk"), "whole k"),
        (TrainSpec(SITE, 32, "topk", k=33), "whole k"),
        (TrainSpec(SITE, 32, "relu", l0_coeff=0.0), "L1 coefficient"),
        (TrainSpec("resid_post.3", 32, l0_coeff=1e-3), "not in the activation store"),
        (TrainSpec("resid_post.99x", 32, l0_coeff=1e-3), "unknown site"),
        (TrainSpec(SITE, 32, "gated", l0_coeff=1e-3), "unknown architecture"),
    ],
)
def test_bad_specs_are_clear_errors(run_dir: Path, spec: TrainSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train_saes(run_dir, [spec], 1024, small_config(), progress=False)
    assert not (run_dir / "saes").exists()


def test_bad_settings_are_clear_errors(run_dir: Path) -> None:
    spec = TrainSpec(SITE, 32, l0_coeff=1e-3)
    with pytest.raises(ConfigError, match="at least one batch"):
        train_saes(run_dir, [spec], 100, small_config(), progress=False)
    with pytest.raises(ConfigError, match="learning rate"):
        train_saes(run_dir, [spec], 1024, small_config(lr=0.0), progress=False)
    with pytest.raises(ConfigError, match="asked for twice"):
        train_saes(run_dir, [spec, spec], 1024, small_config(), progress=False)
    with pytest.raises(ConfigError, match="--step-dtype 'half': expected one of auto, float32, bfloat16"):
        train_saes(run_dir, [spec], 1024, small_config(step_dtype="half"), progress=False)
    with pytest.raises(StoreError, match="no activation store"):
        train_saes(run_dir.parent / "nowhere", [spec], 1024, small_config(), progress=False)


def test_a_float32_step_keeps_the_run_key_runs_had_before_the_step_dtype(run_dir: Path) -> None:
    """Runs trained before `step_dtype` existed (float32 products) still resume and stay finished;
    a bfloat16 step is another run."""
    store = ActivationStore(run_dir)
    spec = TrainSpec(SITE, 32, l0_coeff=1e-3)
    settings = {}
    for dtype in ("float32", "bfloat16"):
        plan = train_config.resolve(store, [spec], 1024, small_config(step_dtype=dtype))
        settings[dtype] = json.loads(train_checkpoint.run_key(store, plan.specs, 1024, plan.config))["config"]
    assert "step_dtype" not in settings["float32"]
    assert settings["bfloat16"].pop("step_dtype") == "bfloat16"
    assert settings["bfloat16"] == settings["float32"]
    # a step that never takes the fast JumpReLU product (TopK; --no-fast) stays float32, key and all
    for spec_, cfg in ((TrainSpec(SITE, 32, "topk", k=4), small_config(step_dtype="bfloat16")),
                       (spec, small_config(step_dtype="bfloat16", fast=False))):  # fmt: skip
        plan = train_config.resolve(store, [spec_], 1024, cfg)
        assert plan.config.step_dtype == "float32"
        assert (
            "step_dtype"
            not in json.loads(train_checkpoint.run_key(store, plan.specs, 1024, plan.config))["config"]
        )
    # a checkpoint of a run from before the option names the way to resume it
    assert "--step-dtype float32" in train_checkpoint._key_difference(
        json.dumps({"config": {}}), json.dumps({"config": {"step_dtype": "bfloat16"}})
    )


def test_the_density_limit_falls_as_the_budget_grows(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unless given, the dense penalty's limit is the short-run one below `dense_long_tokens`
    training tokens and the lower long-run one from there; a given limit is kept, a bad one refused."""
    from gemmascope.train import recipe

    store = ActivationStore(run_dir)
    spec = TrainSpec(SITE, 32, target_l0=4)
    short = train_config.resolve(store, [spec], 1024, small_config())
    assert short.config.dense_density == recipe.SHORT_RUN.dense_density == 0.095
    # a short run's key holds the limit it held before the switch: its checkpoints still resume
    key = json.loads(train_checkpoint.run_key(store, short.specs, 1024, short.config))["config"]
    assert key["dense_density"] == 0.095
    monkeypatch.setattr(
        train_config, "SHORT_RUN", dataclasses.replace(recipe.SHORT_RUN, dense_long_tokens=2048)
    )
    assert train_config.resolve(store, [spec], 1024, small_config()).config.dense_density == 0.095
    long = train_config.resolve(store, [spec], 2048, small_config())
    assert long.config.dense_density == recipe.SHORT_RUN.dense_density_long == 0.03
    assert (
        train_config.resolve(store, [spec], 2048, small_config(dense_density=0.2)).config.dense_density == 0.2
    )
    with pytest.raises(ConfigError, match="dense_density"):
        train_config.resolve(store, [spec], 2048, small_config(dense_density=0.0))


def test_non_finite_activations_are_a_clear_error(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ActivationStore.batches

    def poisoned(self: ActivationStore, *args: object, **kwargs: object) -> Iterator[dict]:
        for i, batch in enumerate(real(self, *args, **kwargs)):  # type: ignore[arg-type]
            if i == 2:
                next(iter(batch.values()))[5, 3] = float("nan")
            yield batch

    monkeypatch.setattr(ActivationStore, "batches", poisoned)
    with pytest.raises(StoreError, match="contain NaN or inf .batch 3"):
        train_saes(run_dir, [TrainSpec(SITE, 32, l0_coeff=1e-3)], 1024, small_config(), progress=False)
    assert not (run_dir / "saes").exists()


def test_default_learning_rate_follows_the_optimiser_and_run_length(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sign optimiser takes lr_signum at any length; Adam takes SHORT_RUN's lr for short runs and
    the lower, stable lr_long beyond long_run_steps."""
    spec = TrainSpec(SITE, 32, l0_coeff=1e-3)
    [signum] = train_saes(run_dir, [spec], 1024, small_config(), progress=False)  # 8 steps
    extra = load_sae(signum).cfg.extra
    assert extra["lr"] == train_module.SHORT_RUN.lr_signum
    assert extra["dead_preact_coeff"] == recipe.DEAD_PREACT_COEFF > 0
    assert extra["dense_coeff"] == recipe.DENSE_COEFF > 0
    [short] = train_saes(run_dir, [spec], 1024, small_config(optimizer="adam", name="a"), progress=False)
    assert load_sae(short).cfg.extra["lr"] == train_module.SHORT_RUN.lr
    assert load_sae(short).cfg.extra["dead_preact_coeff"] == load_sae(short).cfg.extra["dense_coeff"] == 0
    monkeypatch.setattr(train_config, "SHORT_RUN", dataclasses.replace(recipe.SHORT_RUN, long_run_steps=4))
    adam = small_config(optimizer="adam", name="b")
    [long] = train_saes(run_dir, [TrainSpec(SITE, 48, l0_coeff=1e-3)], 1024, adam, progress=False)
    assert load_sae(long).cfg.extra["lr"] == train_module.SHORT_RUN.lr_long
    assert load_sae(long).cfg.extra["lr_warmup_steps"] == 0  # 5% of 8 steps, rounded
    with pytest.raises(ConfigError, match="optimizer 'sgd' must be one of"):
        train_saes(run_dir, [spec], 1024, small_config(optimizer="sgd", name="c"), progress=False)


def test_massive_activation_tokens_are_left_out_of_training(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3 has ordinary tokens with 4-10x the median norm; one in a batch made Adam (beta1 = 0)
    diverge. The trainer leaves tokens with ‖x/C‖ > max_norm out, as it does BOS."""
    real_batches, real_loss = ActivationStore.batches, train_loop._loss
    seen: list[torch.Tensor] = []

    def with_massive_tokens(self: ActivationStore, *args: object, **kwargs: object) -> Iterator[dict]:
        for i, batch in enumerate(real_batches(self, *args, **kwargs)):  # type: ignore[arg-type]
            if i % 2 == 0:
                x = next(iter(batch.values()))
                x[7] *= 50.0  # a token at 50x its norm
            yield batch

    def spy(t: object, x: torch.Tensor, *args: object) -> dict:
        seen.append(x.norm(dim=-1))
        return real_loss(t, x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ActivationStore, "batches", with_massive_tokens)
    monkeypatch.setattr(train_loop, "_loss", spy)
    spec = TrainSpec(SITE, 32, l0_coeff=1e-3)
    [folder] = train_saes(run_dir, [spec], 1024, small_config(), progress=False)
    assert [len(n) for n in seen] == [127, 128] * 4
    assert max(float(n.max()) for n in seen) <= 3.0
    assert load_sae(folder).cfg.extra["max_scaled_norm"] == 3.0
    with pytest.raises(ConfigError, match="max_norm 0.5 must be a finite number > 1"):
        train_saes(run_dir, [TrainSpec(SITE, 64, l0_coeff=1e-3)], 1024, small_config(max_norm=0.5))


def test_saved_sae_records_its_norm_limit_and_old_folders_still_give_it(run_dir: Path) -> None:
    """Training writes the raw-input norm above which it left tokens out as `SAEConfig.max_norm`
    (max_norm x C); a cfg.json from before that field, with only the extra keys, gives the same."""
    [folder] = train_saes(run_dir, [TrainSpec(SITE, 32, l0_coeff=1e-3)], 1024, small_config(), progress=False)
    sae = load_sae(folder)
    limit = 3.0 * ActivationStore(run_dir).scale(SITE)
    assert sae.cfg.max_norm == limit and norm_limit(sae) == limit
    cfg_path = folder / "cfg.json"
    raw = json.loads(cfg_path.read_text())
    del raw["metadata"]["gemmascope"]["max_norm"]
    cfg_path.write_text(json.dumps(raw))
    old = load_sae(folder)
    assert old.cfg.max_norm == limit and norm_limit(old) == limit
    [every] = train_saes(
        run_dir, [TrainSpec(SITE, 48, l0_coeff=1e-3)], 1024, small_config(max_norm=None), progress=False
    )
    assert load_sae(every).cfg.max_norm is None and norm_limit(load_sae(every)) is None


# ---------------------------------------------------------------------------------------------
# gemmascope train


def test_train_command_prints_the_saes_written(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "train",
        str(run_dir),
        "--sites",
        SITE,
        "--widths",
        "32,48",
        "--l0-coeffs",
        "1e-3",
        "--tokens",
        "1024",
    ]
    assert main([*argv, "--batch-size", "128", "--lr", "2e-3"]) == 0
    out = capsys.readouterr().out
    assert out.count("jumprelu") == 2 and "width_48/l0_" in out and "train_log.jsonl" in out
    assert load_sae(next((run_dir / "saes").glob("**/width_48/l0_*"))).cfg.extra["lr"] == 2e-3
    assert main(["train", str(run_dir), "--arch", "topk", "--widths", "32", "--tokens", "1024"]) == 2
    assert "needs --k" in capsys.readouterr().err
    assert main(["train", str(run_dir), "--widths", "x", "--l0-coeffs", "1"]) == 2
    assert "--widths 'x'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_real_gemma_saes_take_raw_activations(real_model: LanguageModel, tmp_path: Path) -> None:
    """On Gemma 3 270M (resid_post norms in the thousands), the saved SAE reads raw activations:
    its d_in is the site's, and on the raw stored activations its FVU is the one measured in training
    on the scaled ones (an unfolded scale would make it about ‖x‖² / var(x) ≈ 8)."""
    from gemmascope.sites import parse_site, site_d_in

    site = parse_site("resid_post.6")
    store = harvest(real_model, [site], tmp_path, n_tokens=1024, context_len=64, progress=False)
    assert store.scale(site) > 100  # the scaling matters here: E‖x‖² is far from 1
    config = small_config(batch_size=64, log_every=50)
    spec = TrainSpec(str(site), 128, l0_coeff=1e-4)
    (folder,) = train_saes(tmp_path, [spec], 64 * 150, config, progress=False)  # ~10 epochs
    sae = load_sae(folder, d_in=site_d_in(real_model, site))
    assert sae.cfg.extra["scale"] == pytest.approx(store.scale(site))
    special = torch.tensor(sorted(store.special_ids))
    x = torch.cat([acts[~torch.isin(ids, special)] for acts, ids in store.rows(site)])
    with torch.no_grad():
        fvu = float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.6
    # the recorded FVU is of the last training steps, before the decoder refit, which only lowers it
    assert 0.3 * sae.cfg.extra["fvu"] < fvu < 1.3 * sae.cfg.extra["fvu"]


def test_a_copied_run_folder_names_its_own_saes(run_dir: Path, tmp_path: Path) -> None:
    """done.json records the SAE folders relative to the run folder (an older absolute one is read
    as the same place in this folder): a copy finds its own SAEs, never the original's."""
    specs = [TrainSpec(SITE, 32, l0_coeff=1e-3)]
    (first,) = train_saes(run_dir, specs, 1024, small_config(), progress=False)
    done = run_dir / "checkpoints" / "train" / "done.json"
    assert json.loads(done.read_text())["outputs"] == [str(first.relative_to(run_dir))]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert train_saes(copy, specs, 1024, small_config(), progress=False) == [
        copy / first.relative_to(run_dir)
    ]
    old = json.loads(done.read_text())  # as an older version wrote it: absolute, in the original
    old["outputs"] = [str(first)]
    (copy / "checkpoints" / "train" / "done.json").write_text(json.dumps(old))
    assert train_saes(copy, specs, 1024, small_config(), progress=False) == [
        copy / first.relative_to(run_dir)
    ]


def test_resume_survives_a_torn_last_line_of_the_log(tmp_path: Path) -> None:
    """A crash in the middle of an append leaves part of a row: resuming keeps the whole rows up to
    the checkpoint and drops the torn one; reading the log skips it."""
    from gemmascope.train import read_training_log
    from gemmascope.train.checkpoint import TrainingLog

    path = tmp_path / "report" / "train_log.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 10, "fvu": 0.5}\n{"step": 20, "fvu": 0.4}\n{"step": 30, "fv')
    assert [r["step"] for r in read_training_log(path)] == [10, 20]
    log = TrainingLog(path, resume_after=20)
    log.write({"step": 30, "fvu": 0.3})
    log.close()
    assert [r["step"] for r in read_training_log(path)] == [10, 20, 30]
    assert path.read_text().endswith('"fvu": 0.3}\n')
