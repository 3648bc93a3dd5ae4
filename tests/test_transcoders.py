"""Transcoders (Gemma Scope 2): TrainSpecs reading `mlp_in.L` and predicting `mlp_out.L`, with and
without the affine skip connection; folding both scales in; the native and SAELens files; bad specs."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from gemmascope.activations import ActivationStore, harvest
from gemmascope.corpus import special_mask
from gemmascope.errors import ConfigError, FormatError
from gemmascope.evals import eval_token_ids, evaluate, evaluate_replacement, splice, zero_ablate
from gemmascope.formats import load_sae, save_params_safetensors, save_sae
from gemmascope.models import LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig, build_sae
from gemmascope.sites import capture, parse_site
from gemmascope.train import TrainConfig, TrainSpec, fold_scaling, train_saes
from gemmascope.train.config import resolve
from gemmascope.train.recipe import SHORT_RUN

pytestmark = pytest.mark.usefixtures("one_thread")
IN, OUT = "mlp_in.1", "mlp_out.1"


@pytest.fixture(scope="module")
def mlp_store(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("tc_run")
    harvest(tiny_model, [IN, OUT, "resid_post.1"], run_dir, n_tokens=8192, context_len=64, progress=False)
    return run_dir


@pytest.fixture
def run_dir(mlp_store: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(mlp_store / "activations", dest / "activations")
    return dest


def random_transcoder(skip: bool, arch: str = "jumprelu") -> JumpReLUSAE:
    g = torch.Generator().manual_seed(3)
    cfg = SAEConfig(
        arch, d_in=8, d_sae=16, k=3 if arch == "topk" else None, site=IN, out_site=OUT, affine_skip=skip
    )
    sae = build_sae(cfg)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        sae.b_in.copy_(torch.randn(8, generator=g))
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(torch.rand(16, generator=g) * 0.5)
    return sae  # type: ignore[return-value]


@pytest.mark.parametrize("skip", [False, True])
def test_folded_transcoder_on_raw_x_predicts_raw_y(tmp_path: Path, skip: bool) -> None:
    """Trained on x / C_in to predict y / C_out: saved, it maps raw x to C_out × the training output."""
    sae = random_transcoder(skip)
    c_in, c_out = 12.5, 40.0
    x_raw = torch.randn(50, 8) * c_in
    with torch.no_grad():
        x = x_raw / c_in
        f_train = sae.activation(sae.pre_acts(x - sae.b_in))
        y_train = sae.decode(f_train) + sae.skip(x)
        saved = load_sae(save_sae(fold_scaling(sae, c_in, c_out), tmp_path / "tc"))
        assert saved.is_transcoder and saved.cfg.out_site == OUT and saved.cfg.affine_skip == skip
        assert (saved.W_skip is not None) == skip
        assert torch.allclose(saved.encode(x_raw), f_train * c_in, rtol=1e-5, atol=1e-4)
        assert torch.allclose(saved(x_raw), y_train * c_out, rtol=1e-5, atol=1e-3)
        assert torch.equal(saved.b_in, torch.zeros(8))  # folded into b_enc


def test_saelens_config_names_the_transcoder(tmp_path: Path) -> None:
    folder = save_sae(fold_scaling(random_transcoder(True), 1.0), tmp_path / "tc")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == 8
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    # a SAELens transcoder folder without our metadata still loads, its output site from the hook
    del cfg["metadata"]["gemmascope"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    again = load_sae(folder)
    assert again.cfg.out_site == OUT and again.cfg.affine_skip and again.W_skip is not None


def test_transcoder_lr_default_yields_to_the_run_and_the_spec(run_dir: Path) -> None:
    store = ActivationStore(run_dir)
    tc, sae = TrainSpec(IN, 64, target_l0=8, out_site=OUT), TrainSpec("resid_post.1", 32, target_l0=6)

    def lrs(specs: list[TrainSpec], cfg: TrainConfig) -> list[float | None]:
        return [s.lr for s in resolve(store, specs, 1024, cfg).specs]

    assert lrs([tc, sae], TrainConfig()) == [SHORT_RUN.lr_signum_transcoder, SHORT_RUN.lr_signum]
    assert lrs([tc, sae], TrainConfig(lr=1e-3)) == [1e-3, 1e-3]  # the run's lr
    assert lrs([TrainSpec(IN, 64, target_l0=8, out_site=OUT, lr=2e-3)], TrainConfig()) == [2e-3]
    assert lrs([tc], TrainConfig(optimizer="adam")) == [SHORT_RUN.lr]  # Adam: the run's lr


@pytest.mark.parametrize("skip", [False, True])
def test_transcoders_train_and_predict_the_mlp_output(run_dir: Path, skip: bool) -> None:
    specs = [
        TrainSpec(IN, 64, target_l0=8, out_site=OUT, skip=skip),
        TrainSpec("resid_post.1", 32, target_l0=6),
    ]
    cfg = TrainConfig(batch_size=128, checkpoint_every=20, log_every=10)
    outputs = train_saes(run_dir, specs, 8192, cfg, progress=False)
    tc, sae = (load_sae(p) for p in outputs)
    assert outputs[0].name.endswith("_skip_transcoder" if skip else "_transcoder")
    assert outputs[0].parent.parent.parent.name == "mlp_in"
    assert tc.cfg.out_site == OUT and tc.cfg.site == IN and not sae.is_transcoder
    assert tc.cfg.extra["out_scale"] == pytest.approx(ActivationStore(run_dir).scale(OUT))
    # a transcoder takes its own default lr under the sign optimiser, an SAE of the same run the SAEs'
    assert tc.cfg.extra["lr"] == SHORT_RUN.lr_signum_transcoder != SHORT_RUN.lr_signum == sae.cfg.extra["lr"]
    # on raw activations the saved transcoder predicts the MLP output: FVU well under 1
    store = ActivationStore(run_dir)
    batch = next(iter(store.batches([IN, OUT], 2048, seed=1)))
    x, y = batch[parse_site(IN)], batch[parse_site(OUT)]  # raw, as the model gives them
    with torch.no_grad():
        pred = tc(x.float())
    fvu = float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.9, fvu
    assert fvu == pytest.approx(tc.cfg.extra["fvu"], rel=0.5)


@pytest.mark.parametrize(
    "spec,message",
    [
        (TrainSpec("resid_post.1", 32, target_l0=4, skip=True), "skip"),
        (TrainSpec(IN, 32, target_l0=4, out_site="mlp_out.3"), "mlp_out.3"),
    ],
)
def test_bad_transcoder_specs_are_clear_errors(run_dir: Path, spec: TrainSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train_saes(run_dir, [spec], 1024, TrainConfig(batch_size=128), progress=False)


def zero_transcoder(layer: int, d: int = 64) -> JumpReLUSAE:
    """A transcoder that predicts 0: splicing it is zero-ablating its layer's MLP output."""
    cfg = SAEConfig("jumprelu", d_in=d, d_sae=8, site=f"mlp_in.{layer}", out_site=f"mlp_out.{layer}")
    return JumpReLUSAE(cfg)


def test_splice_puts_the_prediction_from_the_same_pass_in_place_of_the_mlp_output(
    tiny_model: LanguageModel,
) -> None:
    tc = build_sae(SAEConfig("jumprelu", d_in=64, d_sae=16, site=IN, out_site=OUT, affine_skip=True))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for _, p in tc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(3, 200, (2, 12))
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[:, 0] = False
    with splice(tiny_model, [tc], keep):
        acts = capture(tiny_model, ids, [parse_site(IN), parse_site(OUT)])
    expected = tc(acts[parse_site(IN)])
    got = acts[parse_site(OUT)]
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)
    clean = capture(tiny_model, ids, [parse_site(OUT)])[parse_site(OUT)]
    assert torch.equal(got[~keep], clean[~keep])  # BOS untouched


def test_transcoder_evals_measure_the_mlp_they_replace(tiny_model: LanguageModel) -> None:
    """A transcoder predicting 0 is the MLP output zero-ablated: CE recovered 0, FVU 1 (its
    prediction is no better than... nothing: FVU = E‖y‖² / E‖y − ȳ‖² ≥ 1); with every layer's
    such transcoder, the replacement model's loss is that of the model with every MLP output zeroed."""
    result = evaluate(tiny_model, {"tc": zero_transcoder(1)}, n_tokens=1200, context_len=64, min_tokens=100)[
        0
    ]
    m = result["eval_result_metrics"]
    assert result["sae_cfg"]["out_site"] == OUT
    perf = m["model_performance_preservation"]
    assert perf["ce_loss_with_sae"] == pytest.approx(perf["ce_loss_with_ablation"], rel=1e-5)
    assert m["gemmascope"]["fvu"] >= 1.0
    replacement = evaluate_replacement(
        tiny_model,
        [zero_transcoder(layer) for layer in range(4)],
        n_tokens=1200,
        context_len=64,
        min_tokens=100,
    )
    ids = eval_token_ids(tiny_model, 1200, context_len=64)
    keep = ~special_mask(ids, tiny_model.special_token_ids)
    with ExitStack() as stack:
        for layer in range(4):
            stack.enter_context(zero_ablate(tiny_model, parse_site(f"mlp_out.{layer}"), keep))
        with torch.no_grad():
            logits = tiny_model.hf(input_ids=ids).logits[:, :-1]
    predict = keep[:, :-1] & keep[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[predict].float(), ids[:, 1:][predict])
    assert replacement["ce_loss_with"] == pytest.approx(float(ce), rel=1e-4)
    assert replacement["layers"] == [0, 1, 2, 3] and replacement["delta_lm_loss"] > 0
    with pytest.raises(ConfigError, match="one transcoder per layer"):
        evaluate_replacement(tiny_model, [zero_transcoder(1), zero_transcoder(1)], n_tokens=1200)


def test_the_replacement_model_leaves_massive_inputs_to_the_model(tiny_model: LanguageModel) -> None:
    """The per-SAE rule in the replacement model: where some transcoder's input is over its norm
    limit (Gemma 3's massive activations), every MLP output is left as the model computes it, like
    BOS, and the prediction from there is not counted (before, the MLP outputs were replaced there
    too and counted)."""
    from test_attribution import uneven_mlp_inputs

    ids = eval_token_ids(tiny_model, 1200, context_len=64)
    ins = [parse_site(f"mlp_in.{layer}") for layer in range(4)]
    keep = ~special_mask(ids, tiny_model.special_token_ids)
    with uneven_mlp_inputs(tiny_model), ExitStack() as stack:
        acts = capture(tiny_model, ids, ins)
        tcs = []
        for layer, site in enumerate(ins):
            tc = zero_transcoder(layer)
            tc.cfg.max_norm = float(acts[site].norm(dim=-1)[keep].quantile(0.97))  # 3% of inputs "massive"
            tcs.append(tc)
        massive = torch.zeros_like(keep)
        for tc, site in zip(tcs, ins, strict=True):
            massive |= acts[site].norm(dim=-1) > tc.cfg.max_norm
        kept = keep & ~massive
        got = evaluate_replacement(tiny_model, tcs, n_tokens=1200, context_len=64, min_tokens=100)
        for layer in range(4):
            stack.enter_context(zero_ablate(tiny_model, parse_site(f"mlp_out.{layer}"), kept))
        with torch.no_grad():
            logits = tiny_model.hf(input_ids=ids).logits[:, :-1]
    predict = kept[:, :-1] & kept[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[predict].float(), ids[:, 1:][predict])
    assert got["n_massive_tokens_excluded"] == int((keep & massive).sum()) > 0
    assert got["n_predictions"] == int(predict.sum())
    assert got["ce_loss_with"] == pytest.approx(float(ce), rel=1e-4)


def test_gemma_scope_2_layout_round_trip(tmp_path: Path) -> None:
    """Exported as Gemma Scope 2's params.safetensors (affine_skip_connection, config.json beside it)
    and loaded back, from our export and from the release layout without our config.json."""
    tc = fold_scaling(random_transcoder(True), 2.0, 3.0)
    path = save_params_safetensors(tc, tmp_path / "transcoder" / "layer_1_width_16_l0_small")
    from safetensors.torch import load_file

    keys = set(load_file(str(path)))
    assert keys == {"w_enc", "w_dec", "b_enc", "b_dec", "threshold", "affine_skip_connection"}
    x = torch.randn(20, 8) * 3
    for drop_config in (False, True):
        if drop_config:
            (path.parent / "config.json").unlink()
        again = load_sae(path)
        assert again.cfg.site == IN and again.cfg.out_site == OUT and again.cfg.affine_skip
        assert torch.allclose(again(x), tc(x), atol=1e-5)
    # a transcoder file whose path names no layer, without config.json: a clear error
    bare = tmp_path / "bare" / "params.safetensors"
    bare.parent.mkdir()
    shutil.copy(path, bare)
    with pytest.raises(FormatError, match="names no layer"):
        load_sae(bare)


def test_gemma_scope_2_config_json_is_the_releases(tmp_path: Path) -> None:
    """Our config.json carries Gemma Scope 2's own keys (as google/gemma-scope-2-4b-pt writes them),
    and a release's config.json alone (no key of ours, a path naming no layer) gives the sites."""
    import json

    from gemmascope.sites import Site, site_of_hf_hook

    tc = random_transcoder(True)
    path = save_params_safetensors(tc, tmp_path / "ours")
    written = json.loads((path.parent / "config.json").read_text())
    assert {k: written[k] for k in ("width", "architecture", "affine_connection", "type")} == {
        "width": tc.d_sae, "architecture": "jump_relu", "affine_connection": True, "type": "transcoder",
    }  # fmt: skip
    assert written["hf_hook_point_in"] == "model.layers.1.pre_feedforward_layernorm.output"
    assert written["hf_hook_point_out"] == "model.layers.1.post_feedforward_layernorm.output"
    release = {  # google/gemma-scope-2-4b-pt transcoder/layer_17_width_16k_l0_big/config.json, layer 1
        "width": tc.d_sae, "model_name": "google/gemma-3-4b-pt", "architecture": "jump_relu", "l0": 150,
        "affine_connection": True, "type": "transcoder",
        "hf_hook_point_in": "model.layers.1.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.1.post_feedforward_layernorm.output",
    }  # fmt: skip
    (path.parent / "config.json").write_text(json.dumps(release))
    bare = tmp_path / "bare" / "params.safetensors"  # no layer in the path: the config says it
    bare.parent.mkdir()
    shutil.copy(path, bare)
    shutil.copy(path.parent / "config.json", bare.parent / "config.json")
    again = load_sae(bare)
    assert (again.cfg.site, again.cfg.out_site, again.cfg.model_name) == (IN, OUT, "google/gemma-3-4b-pt")
    for kind in ("resid_post", "attn_out", "mlp_out", "mlp_in"):
        assert site_of_hf_hook(Site(kind, 17).hf_hook_point) == Site(kind, 17)
    assert site_of_hf_hook("model.layers.17.output") == Site("resid_post", 17)
    assert site_of_hf_hook("model.layers.17.self_attn.o_proj.input") == Site("attn_out", 17)
    assert site_of_hf_hook("model.embed_tokens.output") is None


def test_steering_a_transcoder_latent_edits_the_mlp_output(tiny_model: LanguageModel) -> None:
    """A transcoder's latent is read at the MLP input and its change written into the MLP output,
    at the chosen positions only."""
    from gemmascope.steer import Intervention, steering

    tc = build_sae(SAEConfig("jumprelu", d_in=64, d_sae=16, site=IN, out_site=OUT))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for _, p in tc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tc.threshold.fill_(0.0)
    ids = torch.randint(3, 200, (1, 10))
    sites = [parse_site(IN), parse_site(OUT)]
    clean = capture(tiny_model, ids, sites)
    f = tc.encode(clean[parse_site(IN)])[0, 4, 2]
    with steering(tiny_model, [Intervention(tc, 2, "clamp", 7.0, positions=(4,))]):
        edited = capture(tiny_model, ids, sites)
    change = edited[parse_site(OUT)] - clean[parse_site(OUT)]
    assert torch.allclose(change[0, 4], (7.0 - f) * tc.W_dec[2].detach(), atol=1e-5)
    assert torch.equal(change[0, :4], torch.zeros_like(change[0, :4]))  # earlier positions untouched
    assert torch.equal(edited[parse_site(IN)][0, :5], clean[parse_site(IN)][0, :5])  # input read, not edited


def test_saelens_skip_layout_is_d_out_by_d_in(tmp_path: Path) -> None:
    """SAELens applies its `W_skip [d_out, d_in]` as `x @ W_skip.T`: ours is saved transposed, so a
    SAELens reader computes what we do (a square matrix would load either way, silently wrong)."""
    from safetensors.torch import load_file

    tc = random_transcoder(True)
    folder = save_sae(fold_scaling(tc, 1.0), tmp_path / "tc")
    stored = load_file(str(folder / "sae_weights.safetensors"))["W_skip"]
    x = torch.randn(5, 8)
    assert tc.W_skip is not None
    assert torch.allclose(x @ stored.T, x @ tc.W_skip.detach(), atol=1e-6)
    assert not torch.allclose(stored, tc.W_skip.detach())
    cfg = json.loads((folder / "cfg.json").read_text())
    for arch, name in [("jumprelu", "jumprelu_skip_transcoder"), ("relu", "skip_transcoder")]:
        cfg["architecture"] = name
        (folder / "cfg.json").write_text(json.dumps(cfg))
        assert load_sae(folder).cfg.architecture == arch


def test_the_skip_connection_starts_as_the_ridge_regression() -> None:
    """`fit_skip` recovers an exact linear map (up to the ridge's slight shrinkage) and its offset."""
    from gemmascope.train.init import fit_skip

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 8, generator=g) + 3.0
    w_true, b_true = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    w, b = fit_skip(x, x @ w_true + b_true, ridge=1e-6)
    assert torch.allclose(w, w_true, atol=1e-3) and torch.allclose(b, b_true, atol=1e-2)
    shrunk, _ = fit_skip(x, x @ w_true + b_true, ridge=1.0)
    assert shrunk.norm() < w_true.norm()


def test_a_transcoder_trains_on_large_outputs_and_leaves_out_massive_inputs(run_dir: Path) -> None:
    """Early MLPs of Gemma 3 write outputs several times the RMS norm from ordinary inputs: those
    tokens are what the transcoder must predict; only massive inputs are left out, as in use."""
    from gemmascope.train.trainee import new_trainee, training_pair

    store = ActivationStore(run_dir)
    t = new_trainee(0, TrainSpec(IN, 16, target_l0=4, out_site=OUT, skip=True), store, TrainConfig(lr=1e-2))
    x, y = torch.randn(6, t.sae.d_in) * 0.1, torch.randn(6, t.sae.d_in) * 0.1
    y[1] *= 100  # a large output from an ordinary input: kept
    x[2] *= 100  # a massive input: left out, with its output
    kept_x, kept_y = training_pair(t, {t.site: x, t.out_site: y}, "cpu", max_norm=3.0)  # type: ignore[dict-item]
    assert kept_y is not None and len(kept_x) == len(kept_y) == 5
    assert torch.equal(kept_y[1], y[1]) and torch.equal(kept_x[2], x[3])
