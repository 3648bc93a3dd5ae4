"""Cross-layer transcoders: the module and its sparse training terms against a dense reference, the
replacement of every MLP in one pass, folding the scales in, both file layouts (and circuit-tracer's
keys), training on a harvest of every layer's MLP input and output, and bad input."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from gemmascope.activations import ActivationStore, harvest
from gemmascope.architectures.jumprelu import jumprelu, step
from gemmascope.clt import CLTConfig, CrossLayerTranscoder, clt_terms, fold_scales, splice_clt
from gemmascope.errors import ConfigError, FormatError, SiteError, StoreError
from gemmascope.evals import evaluate_replacement, splice
from gemmascope.formats.clt import export_gemma_scope_2, load_clt, save_clt
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE, SAEConfig, build_sae
from gemmascope.sites import Site, capture
from gemmascope.train.clt import CLTSpec, train_clt

pytestmark = pytest.mark.usefixtures("one_thread")
N, D, W = 4, 64, 32  # the tiny model's layers and width; latents per layer


def random_clt(skip: bool = True, seed: int = 0, n: int = N, d: int = D, w: int = W) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n, d, w, "tiny-gemma3", skip))
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for t in clt.threshold:
            t.copy_(torch.rand(w, generator=g) * 0.3)
        clt.b_in.copy_(torch.randn(n, d, generator=g) * 0.1)
    return clt


def test_each_layer_of_a_clt_as_a_dictionary_of_its_own() -> None:
    """`layer_sae`: the CLT's own latents at that layer (b_in folded), its decoder the latent's whole
    write (summed over the layers it reaches), named as graphs name the layer (`clt_layer_id`)."""
    from gemmascope.clt import layer_sae
    from gemmascope.runs import clt_layer_id

    clt = random_clt()
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    for layer in range(N):
        sae = layer_sae(clt, layer)
        assert sae.cfg.site == f"mlp_in.{layer}" and sae.cfg.out_site == f"mlp_out.{layer}"
        torch.testing.assert_close(sae.encode(x), clt.encode(layer, x), rtol=1e-5, atol=1e-6)
        assert (sae.encode(x) > 0).any()  # a non-trivial check
        whole = sum(clt.decoder(layer)[:, t] for t in range(N - layer))
        torch.testing.assert_close(sae.W_dec, whole)
    assert clt_layer_id("clts/width_32/l0_5_skip", 3) == "clt.3.w32.l0_5_skip"
    assert clt_layer_id("elsewhere/my_clt", 0) == "clt.0.my_clt"


def dense_terms(
    clt: CrossLayerTranscoder, xs: torch.Tensor, ys: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: every layer's latents dense, the same straight-through functions."""
    acts, l0 = [], []
    for s in range(clt.n_layers):
        pre = clt.pre_acts(s, xs[s])
        acts.append(jumprelu(pre, clt.threshold[s], eps))
        l0.append(step(pre, clt.threshold[s], eps).sum(-1).mean())
    recon = sum(
        (ys[t] - clt.decode(t, acts) - clt.skip(t, xs[t])).pow(2).sum(-1).mean() for t in range(clt.n_layers)
    )
    assert isinstance(recon, torch.Tensor)
    return recon, torch.stack(l0)


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_terms_equal_the_dense_reference_in_value_and_gradient(skip: bool) -> None:
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(3, 40, 8, generator=g), torch.randn(3, 40, 8, generator=g)
    eps = 0.05
    grads = []
    for fn in ("sparse", "dense"):
        clt = random_clt(skip, n=3, d=8, w=16)
        if fn == "sparse":
            terms = clt_terms(clt, xs, ys, eps)
            recon, l0 = terms.recon, terms.l0
            assert terms.fired.shape == (3, 16) and float(terms.errors.sum()) == pytest.approx(recon.item())
        else:
            recon, l0 = dense_terms(clt, xs, ys, eps)
        (recon + 0.3 * l0.sum()).backward()
        grads.append(
            (
                recon.item(),
                l0.detach(),
                {n: p.grad.clone() for n, p in clt.named_parameters() if p.grad is not None},
            )
        )
    (r_sparse, l0_sparse, g_sparse), (r_dense, l0_dense, g_dense) = grads
    assert r_sparse == pytest.approx(r_dense, rel=1e-5)
    assert torch.allclose(l0_sparse, l0_dense)
    assert set(g_sparse) == set(g_dense) and any("threshold" in n for n in g_sparse)
    for name in g_dense:
        assert torch.allclose(g_sparse[name], g_dense[name], atol=1e-4, rtol=1e-4), name


def test_the_tanh_term_is_the_batch_mean_of_tanh_of_the_activations() -> None:
    """Anthropic's penalty term per layer, Σᵢ tanh(cₗ·aᵢ) averaged over the batch, on the sparse
    path equals the dense activations' (and is zero work when not asked for)."""
    g = torch.Generator().manual_seed(4)
    xs, ys = torch.randn(3, 40, 8, generator=g), torch.randn(3, 40, 8, generator=g)
    clt, c = random_clt(n=3, d=8, w=16), torch.tensor([0.5, 1.0, 2.0])
    terms = clt_terms(clt, xs, ys, 0.05, tanh_c=c)
    with torch.no_grad():
        expected = torch.stack([torch.tanh(c[s] * clt.encode(s, xs[s])).sum(-1).mean() for s in range(3)])
    assert torch.allclose(terms.tanh.detach(), expected, atol=1e-5)
    terms.tanh.sum().backward()  # the gradient reaches the encoder and the thresholds
    assert clt.W_enc[0].grad is not None and clt.threshold[2].grad is not None
    assert torch.equal(clt_terms(clt, xs, ys, 0.05).tanh, torch.zeros(3))


def own_layer_transcoders(clt: CrossLayerTranscoder) -> list[SAE]:
    """The per-layer transcoders a CLT is once its decoders into later layers are zeroed (here)."""
    transcoders = []
    n, d, w = clt.n_layers, clt.cfg.d_model, clt.width
    with torch.no_grad():
        for s in range(n):
            clt.decoder(s)[:, 1:] = 0
            cfg = SAEConfig(
                "jumprelu", d, w, site=f"mlp_in.{s}", out_site=f"mlp_out.{s}", affine_skip=clt.cfg.affine_skip
            )
            tc = build_sae(cfg)
            tc.W_enc.copy_(clt.W_enc[s])
            tc.b_enc.copy_(clt.b_enc[s] - clt.b_in[s] @ clt.W_enc[s])
            tc.threshold.copy_(clt.threshold[s])
            tc.W_dec.copy_(clt.decoder(s)[:, 0])
            tc.b_dec.copy_(clt.b_dec[s])
            if tc.W_skip is not None and clt.W_skip is not None:
                tc.W_skip.copy_(clt.W_skip[s])
            transcoders.append(tc)
    return transcoders


def test_a_clt_with_only_own_layer_decoders_is_a_set_of_transcoders(tiny_model: LanguageModel) -> None:
    """With every cross-layer decoder zero, splicing the CLT in is splicing per-layer transcoders."""
    clt = random_clt(skip=True)
    transcoders = own_layer_transcoders(clt)
    ids = torch.randint(3, 200, (2, 10))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[:, 0] = False
    outs = [Site("mlp_out", s) for s in range(N)]
    with torch.no_grad(), splice_clt(tiny_model, clt, keep):
        got = capture(tiny_model, ids, outs)
    with torch.no_grad(), splice(tiny_model, transcoders, keep):
        expected = capture(tiny_model, ids, outs)
    for site in outs:
        assert torch.allclose(got[site], expected[site], atol=1e-4)


def test_splice_decodes_earlier_layers_latents_into_later_layers(tiny_model: LanguageModel) -> None:
    clt = random_clt(skip=False)
    ids = torch.randint(3, 200, (1, 8))
    keep = torch.ones(1, 8, dtype=torch.bool)
    sites = [Site(k, s) for s in range(N) for k in ("mlp_in", "mlp_out")]
    with torch.no_grad(), splice_clt(tiny_model, clt, keep):
        acts = capture(tiny_model, ids, sites)
    with torch.no_grad():
        xs = torch.stack([acts[Site("mlp_in", s)] for s in range(N)])
        expected = clt(xs)  # the dense module on the inputs of the edited pass itself
    for t in range(N):
        assert torch.allclose(acts[Site("mlp_out", t)], expected[t], atol=1e-4)
    with pytest.raises(SiteError, match="spans 3 layers"):
        with splice_clt(tiny_model, random_clt(n=3), keep):
            pass


def test_folded_clt_on_raw_inputs_predicts_raw_outputs() -> None:
    clt = random_clt(skip=True)
    in_scales, out_scales = [2.0, 0.5, 3.0, 1.5], [4.0, 1.0, 0.25, 2.0]
    xs = torch.randn(N, 20, D)
    with torch.no_grad():
        scaled = clt(torch.stack([xs[s] / in_scales[s] for s in range(N)]))
        folded = fold_scales(clt, in_scales, out_scales)
        raw = folded(xs)
    assert torch.count_nonzero(folded.b_in) == 0
    for t in range(N):
        assert torch.allclose(raw[t], scaled[t] * out_scales[t], atol=1e-4, rtol=1e-4)


def test_both_layouts_round_trip_and_keep_circuit_tracers_keys(tmp_path: Path) -> None:
    clt = random_clt(skip=True)
    with torch.no_grad():
        clt.b_in.zero_()
    xs = torch.randn(N, 6, D)
    ct = save_clt(clt, tmp_path / "ct")
    gs2 = export_gemma_scope_2(clt, tmp_path / "gs2")
    from safetensors import safe_open

    with safe_open(str(ct / "W_enc_2.safetensors"), "pt") as f:
        assert set(f.keys()) == {"W_enc_2", "b_enc_2", "b_dec_2", "threshold_2", "W_skip_2"}
        assert tuple(f.get_tensor("W_enc_2").shape) == (W, D)  # circuit-tracer: [d_transcoder, d_model]
    with safe_open(str(ct / "W_dec_2.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("W_dec_2").shape) == (W, N - 2, D)
    assert "model_kind: cross_layer_transcoder" in (ct / "config.yaml").read_text()
    with safe_open(str(gs2 / "params_layer_1.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("w_dec").shape) == (W, N, D)
        assert torch.count_nonzero(f.get_tensor("w_dec")[:, :1]) == 0
    with torch.no_grad():
        expected = clt(xs)
        for folder in (ct, gs2):
            loaded = load_clt(folder)
            assert loaded.cfg.affine_skip and loaded.cfg.model_name == "tiny-gemma3"
            assert torch.allclose(loaded(xs), expected, atol=1e-5)
    with pytest.raises(FormatError, match="already exists"):
        save_clt(clt, ct)


def test_an_official_layout_folder_loads(tmp_path: Path) -> None:
    """A release folder laid out as Google's: params_layer_i.safetensors with lower-case keys, w_dec
    over every layer, bf16, its own config.json."""
    g = torch.Generator().manual_seed(5)
    folder = tmp_path / "clt" / "width_32_l0_medium_affine"
    folder.mkdir(parents=True)
    for i in range(N):
        w_dec = torch.randn(W, N, D, generator=g)
        w_dec[:, :i] = 0
        params = {"w_enc": torch.randn(D, W, generator=g), "b_enc": torch.randn(W, generator=g),
                  "b_dec": torch.randn(D, generator=g), "threshold": torch.rand(W, generator=g),
                  "w_dec": w_dec, "affine_skip_connection": torch.randn(D, D, generator=g)}  # fmt: skip
        save_file(
            {k: v.to(torch.bfloat16) for k, v in params.items()},
            str(folder / f"params_layer_{i}.safetensors"),
        )
    (folder / "config.json").write_text(json.dumps({"model_name": "google/gemma-3-270m", "width": 32}))
    clt = load_clt(folder)
    assert (clt.n_layers, clt.width, clt.cfg.d_model, clt.cfg.affine_skip) == (N, W, D, True)
    (folder / "params_layer_2.safetensors").unlink()
    with pytest.raises(FormatError, match=r"lacks the files of layers \[2\]"):
        load_clt(folder)


def test_a_circuit_tracer_config_listing_the_layers_files_loads_and_names_what_is_missing(
    tmp_path: Path,
) -> None:
    clt = random_clt()
    files = export_gemma_scope_2(clt, tmp_path / "files")
    folder = tmp_path / "clt"
    folder.mkdir()
    listed = [f"../files/params_layer_{i}.safetensors" for i in range(N)]

    def config(entries: list[str], kind: str = "cross_layer_transcoder") -> None:
        lines = [f"model_kind: {kind}", "feature_input_hook: mlp.hook_in", "transcoders:"]
        (folder / "config.yaml").write_text("\n".join(lines + [f"  - {e}" for e in entries]) + "\n")

    config(listed)
    loaded = load_clt(folder)
    assert torch.equal(loaded.decoder(1), clt.decoder(1)) and torch.equal(loaded.W_skip, clt.W_skip)
    for entries, kind, expected in [
        ([*listed[:2], "hf://google/gemma-scope-2/p.safetensors", *listed[3:]], "cross_layer_transcoder",
         "lists 1 of its 4 layer files that are not here (first 'hf://google"),
        (listed, "transcoder_set", "says model_kind 'transcoder_set': expected cross_layer_transcoder"),
    ]:  # fmt: skip
        config(entries, kind)
        with pytest.raises(FormatError, match=re.escape(expected)):
            load_clt(folder)
    config(listed)
    (files / "params_layer_3.safetensors").unlink()
    with pytest.raises(FormatError, match=re.escape("(first '../files/params_layer_3.safetensors')")):
        load_clt(folder)
    (folder / "config.yaml").write_text("model_kind: [unclosed\n")
    with pytest.raises(FormatError, match="cannot read"):
        load_clt(folder)


def test_layers_of_different_widths_are_a_clear_error(tmp_path: Path) -> None:
    folder = save_clt(random_clt(skip=False), tmp_path / "ct")
    other = random_clt(skip=False, w=W + 8)
    save_file(
        {"W_enc_3": other.W_enc[3].t().contiguous(), "b_enc_3": other.b_enc[3], "b_dec_3": other.b_dec[3],
         "threshold_3": other.threshold[3]},
        str(folder / "W_enc_3.safetensors"),
    )  # fmt: skip
    with pytest.raises(FormatError, match=r"layer 3: W_enc has shape \(64, 40\), expected \(64, 32\)"):
        load_clt(folder)
    with pytest.raises(FormatError, match="holds no CLT"):
        load_clt(tmp_path)


@pytest.mark.parametrize(("skip", "layers_a_pass"), [(False, 3), (True, 3), (True, 1)])
def test_refit_solves_each_layers_own_decoder_given_the_earlier_writes(
    skip: bool, layers_a_pass: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gemmascope.train.refit as refit

    monkeypatch.setattr(refit, "REFIT_RIDGE", 0.0)
    # one layer's sums (float64 normal equations, float32 between flushes): width 12, d 8 (below)
    size = 12 + (8 if skip else 0) + 1
    one_layer = 8 * size * (size + 8) + 4 * (12 * 12 + (size - 12) * size + size * 8)
    monkeypatch.setattr(refit, "REFIT_CLT_BYTES", layers_a_pass * one_layer)
    passes = []
    real_sums = refit._refit_sums
    monkeypatch.setattr(refit, "_refit_sums", lambda *a: passes.append(1) or real_sums(*a))
    monkeypatch.setattr(refit, "REFIT_FLUSH", 2)  # flushes mid-pass and at the end
    n, d, w = 3, 8, 12
    clt = random_clt(skip, n=n, d=d, w=w)
    with torch.no_grad():
        for theta in clt.threshold:
            theta.fill_(-0.2)  # most latents fire on most tokens: a well-posed regression
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(n, 500, d, generator=g), torch.randn(n, 500, d, generator=g)
    ins, outs = [Site("mlp_in", layer) for layer in range(n)], [Site("mlp_out", layer) for layer in range(n)]
    batches = [
        {
            **{s: xs[i, a : a + 100] for i, s in enumerate(ins)},
            **{s: ys[i, a : a + 100] for i, s in enumerate(outs)},
        }
        for a in range(0, 500, 100)
    ]
    encoder = [p.detach().clone() for p in (*clt.W_enc, *clt.b_enc, *clt.threshold)]
    cross = [clt.decoder(s)[:, 1:].detach().clone() for s in range(n)]
    with torch.no_grad():
        acts = [clt.encode(s, xs[s]) for s in range(n)]
        before = [float((ys[t] - clt.decode(t, acts) - clt.skip(t, xs[t])).pow(2).sum()) for t in range(n)]
        expected = []
        for t in range(n):  # the plain regression of each layer's target on its own codes (+ skip, bias)
            z = torch.cat([acts[t]] + ([xs[t]] if skip else []) + [torch.ones(500, 1)], 1).double()
            target = ys[t] - sum(acts[s] @ clt.decoder(s)[:, t - s] for s in range(t))
            expected.append(torch.linalg.lstsq(z, target.double()).solution.float())
    assert refit.refit_clt(copy.deepcopy(clt), lambda: iter(batches), 450, progress=False) == 450
    passes.clear()
    assert refit.refit_clt(clt, lambda: iter(batches), 10**6, progress=False) == 500
    assert len(passes) == -(-n // layers_a_pass)  # as many layers a pass as the budget holds
    for p, old in zip((*clt.W_enc, *clt.b_enc, *clt.threshold), encoder, strict=True):
        assert torch.equal(p, old)  # the encoders, thresholds and cross-layer decoders are kept
    for s in range(n):
        assert torch.equal(clt.decoder(s)[:, 1:], cross[s])
        solved = torch.cat([clt.decoder(s)[:, 0]] + ([clt.W_skip[s]] if skip else []) + [clt.b_dec[s][None]])
        assert torch.allclose(solved, expected[s], atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        after = [float((ys[t] - clt.decode(t, acts) - clt.skip(t, xs[t])).pow(2).sum()) for t in range(n)]
    assert all(a < b for a, b in zip(after, before, strict=True))


def test_decoders_step_in_each_output_dimension_by_its_spread() -> None:
    """A dimension of a layer's MLP output that does not vary is written by no latent (start and
    steps sized by its spread, 0): plain sign descent put as much into it as into any other, and in
    Gemma 3 such dimensions are those the final norm multiplies by up to 300. Decoders into later
    layers start at 0."""
    import gemmascope.train.clt as training

    torch.manual_seed(0)
    n, d, w, b = 3, 16, 24, 256
    xs = torch.randn(n, b, d)
    ys = torch.randn(n, b, d) * torch.linspace(0.5, 2.0, d)  # spreads differ by dimension
    ys[2, :, 5] = 0.7  # layer 2's dimension 5 never varies
    spec = CLTSpec(width=w, target_l0=4, batch_size=b)
    clt = CrossLayerTranscoder(CLTConfig(n, d, w, "", affine_skip=True))
    training._init(clt, xs, ys, spec)
    assert float(clt.decoder(0).detach()[:, 1:].abs().max()) == 0.0
    opt = training._optimizer(clt, spec, ys)
    last_fired = torch.zeros(n, w, dtype=torch.long)
    for i in range(5):
        training._step(clt, opt, xs, torch.randn(n, b, d) * ys.std(1, keepdim=True) + ys, spec, last_fired, i)
    for s in range(n):
        into = clt.decoder(s).detach()[:, 2 - s]  # [w, d]: what layer s's latents write into layer 2
        assert float(into[:, 5].abs().max()) == 0.0
        assert float(into[:, 4].abs().max()) > 0.0
    wide, narrow = clt.decoder(0).detach()[:, 1, -1], clt.decoder(0).detach()[:, 1, 0]  # spreads 2.0 and 0.5
    assert 2 < float(wide.pow(2).mean() / narrow.pow(2).mean()) ** 0.5 < 8
    # a layer that never varies on the batch, or a batch of one token: plain steps, no 0 / 0
    ys[1] = 0.3
    assert torch.equal(training._column_scales(ys)[1], torch.ones(d))
    assert torch.equal(training._column_scales(ys[:, :1]), torch.ones(n, d))
    training._init(clt, xs, ys, spec)
    assert all(bool(torch.isfinite(w).all()) for w in clt.W_dec)


@pytest.fixture(scope="module")
def mlp_run(tiny_model: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("clt_run")
    sites = [f"{k}.{layer}" for layer in range(N) for k in ("mlp_in", "mlp_out")]
    harvest(tiny_model, sites, run_dir, n_tokens=8192, context_len=64, progress=False)
    harvest(
        tiny_model, sites, run_dir / "heldout", n_tokens=2048, context_len=64, split="heldout", progress=False
    )
    return run_dir


def test_a_clt_trains_on_every_layers_mlp_and_replaces_them(
    mlp_run: Path, tmp_path: Path, tiny_model: LanguageModel
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(mlp_run, run_dir)
    folder = train_clt(run_dir, CLTSpec(width=64, target_l0=8, tokens=16384, batch_size=256), progress=False)
    assert folder.parent == run_dir / "clts" / "width_64" and folder.name.endswith("_skip")
    clt = load_clt(folder)
    held = clt.cfg.extra["heldout"]
    assert len(held["fvu"]) == N and all(0 <= f < 1 for f in held["fvu"])  # better than the mean
    assert (
        0 < clt.cfg.extra["decoder_refit_tokens"] <= 16384
    )  # training ends with the refit (one epoch at most)
    assert all(2 <= l0 <= 32 for l0 in held["l0"])
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["fvu_mean"] < log[1]["fvu_mean"]  # (the first row is the skip's own batch)
    result = evaluate_replacement(tiny_model, clt, n_tokens=1200, context_len=64, min_tokens=100)
    assert result["layers"] == list(range(N)) and result["n_predictions"] > 0
    assert result["ce_loss_with"] < result["ce_loss_zero_ablated"]  # it recovers some of the MLPs


@pytest.mark.parametrize("penalty", ["l0", "tanh"])
def test_a_killed_clt_run_resumes_to_the_same_weights(
    mlp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, penalty: str
) -> None:
    """Killed after step 12 of 16 (checkpoints every 5 steps), the same call resumes from step 10
    and saves bit for bit the CLT of an uninterrupted run; called once more it returns that folder
    without training; an unfinished checkpoint of another spec is refused unless restarted."""
    import gemmascope.train.clt as training

    spec = CLTSpec(
        width=32,
        target_l0=6,
        tokens=4096,
        batch_size=256,
        checkpoint_every=5,
        refit_tokens=512,
        penalty=penalty,
    )
    whole_run, killed_run = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(mlp_run, whole_run)
    shutil.copytree(mlp_run, killed_run)
    whole = train_clt(whole_run, spec, progress=False)
    step = training._step

    def dies_at_12(*args: Any) -> dict[str, Any]:
        if args[6] == 12:  # (clt, opt, xs, ys, spec, last_fired, step_index, tanh)
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(training, "_step", dies_at_12)
    with pytest.raises(KeyboardInterrupt):
        train_clt(killed_run, spec, progress=False)
    assert (killed_run / "checkpoints" / spec.checkpoint_name() / "state.pt").is_file()
    assert not (killed_run / "clts").exists()
    monkeypatch.setattr(training, "_step", step)
    folder = train_clt(killed_run, spec, progress=False)
    assert folder.relative_to(killed_run) == whole.relative_to(whole_run)
    a, b = load_clt(whole), load_clt(folder)
    assert b.cfg.extra["resumed_at_step"] == 10 and "resumed_at_step" not in a.cfg.extra
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not (killed_run / "checkpoints" / spec.checkpoint_name() / "state.pt").exists()  # done.json now

    monkeypatch.setattr(training, "_step", lambda *args: pytest.fail("a finished CLT trained again"))
    assert train_clt(killed_run, spec, progress=False) == folder

    if penalty == "tanh":  # steered towards the target L0 (6), as the quadratic penalty ends near 2-3 here
        assert all(1 <= l0 <= 12 for l0 in b.cfg.extra["heldout"]["l0"]), b.cfg.extra["heldout"]["l0"]
    other = CLTSpec(width=32, target_l0=6, tokens=2048, batch_size=256, checkpoint_every=5, penalty=penalty)
    monkeypatch.setattr(training, "_step", dies_at_12)
    (killed_run / "checkpoints" / spec.checkpoint_name() / "done.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        train_clt(killed_run, spec, progress=False)  # an unfinished run of `spec` ...
    monkeypatch.setattr(training, "_step", step)
    with pytest.raises(StoreError, match=r"unfinished training run \(step 10\) of another config .*tokens"):
        train_clt(killed_run, other, progress=False)  # ... is not resumed by another spec
    assert train_clt(killed_run, other, progress=False, restart=True).is_dir()


def test_a_clt_needs_every_layers_mlp_input_and_output(tmp_path: Path, tiny_model: LanguageModel) -> None:
    run_dir = tmp_path / "run"
    harvest(
        tiny_model,
        ["mlp_in.0", "mlp_out.0", "mlp_in.1"],
        run_dir,
        n_tokens=512,
        context_len=64,
        progress=False,
    )
    with pytest.raises(StoreError, match="lacks mlp_out.1"):
        train_clt(run_dir, CLTSpec(width=16, target_l0=4), progress=False)
    assert not (run_dir / "clts").exists()
    with pytest.raises(ConfigError, match="target L0 40 must be > 0 and below the width 16"):
        train_clt(run_dir, CLTSpec(width=16, target_l0=40), progress=False)
    with pytest.raises(ConfigError, match="CLT penalty 'l1': expected one of l0, tanh"):
        train_clt(run_dir, CLTSpec(width=16, target_l0=4, penalty="l1"), progress=False)
    with pytest.raises(ConfigError, match="CLT step_dtype 'half': expected one of auto, float32, bfloat16"):
        train_clt(run_dir, CLTSpec(width=16, target_l0=4, step_dtype="half"), progress=False)
    ActivationStore(run_dir)  # the store is untouched


def test_suite_with_clt_trains_one_clt_beside_the_transcoders_from_one_harvest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gemmascope.cli import main

    run_dir = tmp_path / "clt"
    argv = ["suite", str(run_dir), "--model", "tiny-gemma3", "--transcoders", "--clt", "--layers", "all",
            "--widths", "64", "--l0", "8", "--tokens", "4096", "--eval-tokens", "1200", "--index-tokens", "2048",
            "--clt-penalty", "l0,tanh"]  # fmt: skip
    assert main(argv) == 0
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["transcoders"] == ["skip", "clt"] and recorded["clt_penalties"] == ["l0", "tanh"]
    rows = json.loads((run_dir / "report" / "clt.json").read_text())
    assert len(rows) == 2 and all(r["clt"].startswith("clts/width_64/l0_") for r in rows)
    assert rows[0]["clt"].endswith("_skip") and rows[1]["clt"].endswith("_skip_tanh")
    assert [load_clt(run_dir / r["clt"]).cfg.extra["spec"]["penalty"] for r in rows] == ["l0", "tanh"]
    per_layer = json.loads((run_dir / "report" / "replacement.json").read_text())
    clt_result = rows[0]["replacement"]
    assert clt_result["ce_loss_without"] == pytest.approx(per_layer["ce_loss_without"])  # the same tokens
    assert "ce_recovered" in clt_result and "ce_recovered" in per_layer
    out = capsys.readouterr().out
    assert "CLT clts/width_64" in out and "every MLP replaced" in out
    load_clt(run_dir / rows[0]["clt"])
    assert main(argv) == 0  # resumed: nothing trains again
    assert "train/clt" not in capsys.readouterr().out
    bad = ["suite", str(tmp_path / "r2"), "--model", "tiny-gemma3", "--clt", "--layers", "1", "--l0", "8"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "a cross-layer transcoder spans every layer" in err and "Traceback" not in err
    assert not (tmp_path / "r2" / "run.json").exists()
    assert main([*bad[:-4], "--layers", "all", "--clt-penalty", "l0,l1"]) == 2
    err = capsys.readouterr().err
    assert "CLT penalties ['l0', 'l1']: expected some of l0, tanh" in err and "Traceback" not in err
    assert not (tmp_path / "r2" / "run.json").exists()


def test_a_float32_clt_step_keeps_the_run_key_clts_had_before_the_step_dtype() -> None:
    import gemmascope.train.clt as training

    class Store:  # what the key reads of a store: each site's shard digests
        def manifest(self, site: Site) -> dict[str, Any]:
            return {"shards": [{"sha256": f"digest of {site}"}]}

    sites = [Site("mlp_in", 0), Site("mlp_out", 0)]
    keys = {
        dtype: json.loads(training._run_key(Store(), sites, CLTSpec(step_dtype=dtype)))  # type: ignore[arg-type]
        for dtype in ("float32", "bfloat16")
    }
    assert "step_dtype" not in keys["float32"]["config"]
    assert keys["bfloat16"]["config"].pop("step_dtype") == "bfloat16"
    assert keys["bfloat16"] == keys["float32"]
