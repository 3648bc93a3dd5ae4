"""Tests of steer.py: additive steering, clamp and ablate spliced with the error term, exactness of an
empty edit, hook removal on errors, paired generation with one seed, and the effect measures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gemmascope.errors import ConfigError, GemmaScopeError, ModelError
from gemmascope.models import MAX_PROMPT_TOKENS, LanguageModel
from gemmascope.sae import JumpReLUSAE, SAEConfig
from gemmascope.sites import Site, capture
from gemmascope.steer import (
    Intervention,
    SamplingSettings,
    _next_token,
    fill_strengths,
    generate_pair,
    latent_shift,
    logprob_shift,
    sample,
    steering,
)

PROMPT = "The quick brown fox jumps over the lazy dog."
CONST = 5  # latent that is 5.0 at every position (zero encoder column, bias 5)
DEAD = 6  # latent that never fires


def random_sae(site: str, d_in: int = 64, d_sae: int = 128, seed: int = 0) -> JumpReLUSAE:
    cfg = SAEConfig("jumprelu", d_in=d_in, d_sae=d_sae, site=site, model_name="tiny-gemma3")
    sae = JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W_dec = torch.randn(d_sae, d_in, generator=g)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T * 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.threshold.copy_(torch.full((d_sae,), 0.05))
        sae.W_enc[:, CONST] = 0.0
        sae.b_enc[CONST] = 5.0
        sae.W_enc[:, DEAD] = 0.0
        sae.b_enc[DEAD] = -100.0
    return sae


@pytest.fixture(scope="module")
def sae2() -> JumpReLUSAE:
    return random_sae("resid_post.2")


@pytest.fixture(scope="module")
def sae1() -> JumpReLUSAE:
    return random_sae("resid_post.1", seed=1)


def logits(model: LanguageModel, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=model.to_tokens(text), use_cache=False).logits


def hook_count(model: LanguageModel) -> int:
    """Hooks on the model but transformers' own output recorders, which a pass with
    `output_hidden_states=True` (another test's) installs for good: they edit nothing."""
    hooks = [
        h for m in model.hf.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    ]
    return sum(not getattr(h, "__module__", "").startswith("transformers.") for h in hooks)


# ---------------------------------------------------------------------------------------------
# Exactness of empty edits


def test_no_edit_and_zero_strength_are_bitwise_clean(tiny_model, sae2, sae1):
    clean = logits(tiny_model)
    with steering(tiny_model, []):
        assert torch.equal(logits(tiny_model), clean)
    zero = [Intervention(sae2, 3, "add", 0.0), Intervention(sae1, 7, "add", 0.0, normalize=True)]
    with steering(tiny_model, zero):
        assert torch.equal(logits(tiny_model), clean)
    with steering(tiny_model, [Intervention(sae2, 3, "add", 40.0)]):
        assert not torch.allclose(logits(tiny_model), clean)
    assert hook_count(tiny_model) == 0


def test_clamp_to_own_value_and_ablate_dead_latent_change_nothing(tiny_model, sae2):
    clean = logits(tiny_model)
    x = capture(tiny_model, tiny_model.to_tokens(PROMPT), [Site("resid_post", 2)])[Site("resid_post", 2)]
    assert torch.all(sae2.encode(x)[..., CONST] == 5.0)
    assert torch.all(sae2.encode(x)[..., DEAD] == 0.0)
    with steering(tiny_model, [Intervention(sae2, CONST, "clamp", 5.0), Intervention(sae2, DEAD, "ablate")]):
        assert torch.equal(logits(tiny_model), clean)
    with steering(tiny_model, [Intervention(sae2, CONST, "clamp", 6.0)]):
        assert not torch.allclose(logits(tiny_model), clean)


# ---------------------------------------------------------------------------------------------
# What each mode does at the site, against plain references


def edited_site(model: LanguageModel, interventions, site: Site, text: str = PROMPT) -> torch.Tensor:
    ids = model.to_tokens(text)
    with steering(model, interventions):
        return capture(model, ids, [site])[site]


def test_add_is_strength_times_decoder_row(tiny_model, sae2):
    site = Site("resid_post", 2)
    x = capture(tiny_model, tiny_model.to_tokens(PROMPT), [site])[site]
    got = edited_site(tiny_model, [Intervention(sae2, 3, "add", 12.5)], site)
    assert torch.equal(got, x + 12.5 * sae2.W_dec[3].detach())
    # unit-norm direction when asked, even for a decoder row that is not unit norm
    sae = random_sae("resid_post.2", seed=3)
    with torch.no_grad():
        sae.W_dec[9] *= 4.0
    got = edited_site(tiny_model, [Intervention(sae, 9, "add", 2.0, normalize=True)], site)
    direction = sae.W_dec[9].detach() / sae.W_dec[9].detach().norm()
    torch.testing.assert_close(got, x + 2.0 * direction)
    got = edited_site(tiny_model, [Intervention(sae, 9, "add", 2.0)], site)
    torch.testing.assert_close(got, x + 8.0 * direction)


@pytest.mark.parametrize("mode", ["clamp", "ablate"])
def test_clamp_and_ablate_match_the_error_term_splice(tiny_model, sae2, mode):
    site = Site("resid_post", 2)
    x = capture(tiny_model, tiny_model.to_tokens(PROMPT), [site])[site]
    f = sae2.encode(x).detach()
    latents = [int(i) for i in f[0].sum(0).topk(3).indices]  # latents that fire on this prompt
    value = 0.0 if mode == "ablate" else 7.0
    f_edit = f.clone()
    f_edit[..., latents] = value
    reference = sae2.decode(f_edit) + (x - sae2.decode(f))  # encode -> edit -> decode + error
    got = edited_site(tiny_model, [Intervention(sae2, i, mode, value) for i in latents], site)
    torch.testing.assert_close(got, reference.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, x)


@pytest.mark.parametrize("mode", ["add", "clamp", "ablate"])
def test_positions_restrict_the_edit_to_those_tokens(tiny_model, sae2, mode):
    site = Site("resid_post", 2)
    x = capture(tiny_model, tiny_model.to_tokens(PROMPT), [site])[site]
    latent = int(sae2.encode(x).detach()[0, 2:5].sum(0).argmax())  # fires at positions 2..4
    value = {"add": 3.0, "clamp": 9.0, "ablate": None}[mode]
    everywhere = edited_site(tiny_model, [Intervention(sae2, latent, mode, value)], site)
    got = edited_site(tiny_model, [Intervention(sae2, latent, mode, value, positions=(2, 4, 99))], site)
    for pos in range(x.shape[1]):
        expected = everywhere[0, pos] if pos in (2, 4) else x[0, pos]
        torch.testing.assert_close(got[0, pos], expected, msg=f"position {pos}")
    assert not torch.equal(got[0, 2], x[0, 2])


def test_positions_count_on_over_generated_tokens(sae2):
    from gemmascope.steer import _site_edit

    edit = _site_edit(sae2, [Intervention(sae2, 3, "add", 1.0, positions=(1, 5))], sae2.W_dec)
    prompt, step = torch.zeros(1, 4, 64), torch.zeros(1, 1, 64)
    changed = lambda out: [bool(v) for v in (out.abs().sum(-1) > 0)[0]]  # noqa: E731
    assert changed(edit(prompt, prompt)) == [False, True, False, False]  # positions 0..3
    assert [changed(edit(step, step))[0] for _ in range(3)] == [False, True, False]  # generated 4, 5, 6
    assert changed(edit(prompt, prompt)) == [False, True, False, False]  # a new prompt counts from 0 again


@pytest.mark.parametrize("positions", [(), (-1,), (1.5,), (True,)])
def test_bad_positions_are_clear_errors(tiny_model, sae2, positions):
    with pytest.raises(ConfigError, match="positions"):
        with steering(tiny_model, [Intervention(sae2, 3, "add", 1.0, positions=positions)]):
            pass


def test_several_saes_and_sites_at_once(tiny_model, sae1, sae2):
    other = random_sae("resid_post.2", seed=2)  # a second SAE on the same site
    site = Site("resid_post", 2)
    x = capture(tiny_model, tiny_model.to_tokens(PROMPT), [site])[site]
    both = [Intervention(sae2, 3, "add", 4.0), Intervention(other, 8, "add", -3.0)]
    torch.testing.assert_close(
        edited_site(tiny_model, both, site), x + 4.0 * sae2.W_dec[3].detach() - 3.0 * other.W_dec[8].detach()
    )
    clean = logits(tiny_model)
    with steering(tiny_model, [Intervention(sae1, 1, "add", 20.0)]):
        only_1 = logits(tiny_model)
    with steering(tiny_model, [Intervention(sae1, 1, "add", 20.0), Intervention(sae2, 3, "clamp", 30.0)]):
        both_sites = logits(tiny_model)
    assert not torch.allclose(only_1, clean)
    assert not torch.allclose(both_sites, only_1)
    assert hook_count(tiny_model) == 0


# ---------------------------------------------------------------------------------------------
# Hooks and bad input


def test_hooks_removed_after_an_exception(tiny_model, sae2):
    clean = logits(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(tiny_model, [Intervention(sae2, 3, "add", 40.0), Intervention(sae2, 4, "clamp", 1.0)]):
            assert hook_count(tiny_model) == 1
            raise RuntimeError("boom")
    assert hook_count(tiny_model) == 0
    assert torch.equal(logits(tiny_model), clean)


class FailingSAE(JumpReLUSAE):
    """Raises on its n-th encode, to fail in the middle of a generation."""

    calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        FailingSAE.calls += 1
        if FailingSAE.calls == 4:
            raise RuntimeError("encode failed")
        return super().encode(x)


def test_model_unhooked_when_generation_raises(tiny_model, sae2):
    sae = FailingSAE(sae2.cfg)
    sae.load_state_dict(sae2.state_dict())
    with pytest.raises(RuntimeError, match="encode failed"):
        generate_pair(
            tiny_model, PROMPT, [Intervention(sae, 3, "clamp", 2.0)], max_new_tokens=8, temperature=0
        )
    assert FailingSAE.calls == 4
    assert hook_count(tiny_model) == 0


@pytest.mark.parametrize(
    "latent, mode, value, message",
    [
        (128, "add", 1.0, "out of range"),
        (-1, "add", 1.0, "out of range"),
        (1.5, "add", 1.0, "out of range"),
        (3, "add", math.nan, "not finite"),
        (3, "clamp", math.inf, "not finite"),
        (3, "clamp", 1e39, "out of range: expected a finite number within"),  # inf in float32: a crash
        (3, "add", -1e39, "out of range: expected a finite number within"),  # inf in float32: NaN
        (3, "add", None, "no strength"),
        (3, "clamp", None, "no value"),
        (3, "scale", 1.0, "unknown steering mode"),
    ],
)
def test_bad_interventions_are_clear_errors(tiny_model, sae2, latent, mode, value, message):
    good = Intervention(sae2, 2, "add", 5.0)
    with pytest.raises(ConfigError, match=message):
        with steering(tiny_model, [good, Intervention(sae2, latent, mode, value)]):
            pass
    with pytest.raises(ConfigError, match=message):
        generate_pair(tiny_model, PROMPT, [good, Intervention(sae2, latent, mode, value)], max_new_tokens=2)
    assert hook_count(tiny_model) == 0


def test_sae_for_a_site_the_model_lacks(tiny_model):
    with pytest.raises(ModelError, match="no site 'resid_post.9'"):
        with steering(tiny_model, [Intervention(random_sae("resid_post.9"), 0, "add", 1.0)]):
            pass
    with pytest.raises(ModelError, match="d_in=32"):
        with steering(tiny_model, [Intervention(random_sae("mlp_out.1", d_in=32), 0, "add", 1.0)]):
            pass
    with pytest.raises(ConfigError, match="names no site"):
        with steering(tiny_model, [Intervention(random_sae(""), 0, "add", 1.0)]):
            pass
    assert hook_count(tiny_model) == 0


def test_bad_prompts_and_settings(tiny_model, sae2):
    ivs = [Intervention(sae2, 3, "add", 1.0)]
    for prompt in ["", "   \n"]:
        with pytest.raises(ConfigError, match="empty"):
            generate_pair(tiny_model, prompt, ivs)
    with pytest.raises(ConfigError, match=f"at most {MAX_PROMPT_TOKENS}"):
        logprob_shift(tiny_model, "word " * (MAX_PROMPT_TOKENS + 5), ivs)
    for kwargs, message in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 100_000}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"freq_penalty": 5.0}, "freq_penalty"),
        ({"top_p": 0.0}, "top_p"),
    ]:
        with pytest.raises(ConfigError, match=message):
            generate_pair(tiny_model, PROMPT, ivs, **kwargs)
    assert issubclass(ConfigError, GemmaScopeError) and hook_count(tiny_model) == 0


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_sampling_with_cache_matches_full_recompute(tiny_model):
    ids = tiny_model.to_tokens(PROMPT)
    new = sample(tiny_model, ids, SamplingSettings(max_new_tokens=5, temperature=0, freq_penalty=0.0))
    seq = ids
    for token in new:
        with torch.no_grad():
            expected = int(tiny_model.hf(input_ids=seq, use_cache=False).logits[0, -1].argmax())
        assert token == expected
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)


def plain_completion(model: LanguageModel, settings: SamplingSettings) -> str:
    """The completion of PROMPT sampled without any intervention."""
    new = sample(model, model.to_tokens(PROMPT), settings)
    return str(model.tokenizer.decode(new, skip_special_tokens=True))


def test_generate_pair_shares_seed_and_settings(tiny_model, sae2):
    kwargs = dict(max_new_tokens=8, temperature=1.0, seed=3, freq_penalty=0.5)
    zero = generate_pair(tiny_model, PROMPT, [Intervention(sae2, 3, "add", 0.0)], **kwargs)
    assert zero.default_ids == zero.steered_ids and zero.default == zero.steered
    plain = plain_completion(tiny_model, SamplingSettings(8, 1.0, 1.0, 0.5, 3))
    assert plain == zero.default
    other_seed = plain_completion(tiny_model, SamplingSettings(8, 1.0, 1.0, 0.5, 4))
    assert other_seed != zero.default
    pair = generate_pair(tiny_model, PROMPT, [Intervention(sae2, 3, "add", 80.0)], **kwargs)
    assert pair.default == zero.default
    assert pair.steered_ids != pair.default_ids
    assert pair.interventions == ["add resid_post.2#3 by 80"]
    assert pair.to_dict()["settings"]["seed"] == 3
    assert hook_count(tiny_model) == 0


def test_next_token_penalty_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([3.0, 2.5, 0.0, -1.0])
    counts = torch.tensor([1.0, 0.0, 0.0, 0.0])
    greedy = SamplingSettings(temperature=0, freq_penalty=0.0)
    assert _next_token(logits, torch.zeros(4), greedy, g) == 0
    assert _next_token(logits, counts, SamplingSettings(temperature=0, freq_penalty=1.0), g) == 1
    assert _next_token(logits, counts, SamplingSettings(temperature=0, freq_penalty=-1.0), g) == 0
    # top_p small enough keeps only the most likely token, whatever the draw
    assert {
        _next_token(logits, counts, SamplingSettings(temperature=5.0, top_p=0.1, freq_penalty=0.0), g)
        for _ in range(50)
    } == {0}
    assert (
        len(
            {
                _next_token(logits, counts, SamplingSettings(temperature=5.0, freq_penalty=0.0), g)
                for _ in range(200)
            }
        )
        > 2
    )


# ---------------------------------------------------------------------------------------------
# Effect measures and defaults


def test_logprob_shift(tiny_model, sae2):
    none = logprob_shift(tiny_model, PROMPT, [Intervention(sae2, 3, "add", 0.0)], k=5)
    assert none["kl"] == 0.0 and all(row["delta"] == 0.0 for row in none["rose"] + none["fell"])
    shift = logprob_shift(tiny_model, PROMPT, [Intervention(sae2, 3, "add", 60.0)], k=5)
    rose = [row["delta"] for row in shift["rose"]]
    fell = [row["delta"] for row in shift["fell"]]
    assert rose == sorted(rose, reverse=True) and fell == sorted(fell)
    assert rose[0] > 0 > fell[0] and shift["kl"] > 0
    row = shift["rose"][0]
    assert row["delta"] == pytest.approx(row["steered_logprob"] - row["clean_logprob"])
    assert isinstance(row["token"], str) and 0 <= row["token_id"] < len(tiny_model.tokenizer)


def test_latent_shift_downstream(tiny_model, sae1, sae2):
    ids = tiny_model.to_tokens(PROMPT)
    x = capture(tiny_model, ids, [Site("resid_post", 2)])[Site("resid_post", 2)]
    f = sae2.encode(x)[0].detach()
    f[:, CONST] = 0
    latent = int(f[1:].sum(0).argmax())
    # same site: adding 10 x W_dec[latent] raises its pre-activation by 10 * (W_enc[:, i] . W_dec[i]) = 5
    up = latent_shift(tiny_model, PROMPT, [Intervention(sae2, latent, "add", 10.0)], sae2, latent)
    f[0] = 0  # BOS is left out, as everywhere latents are read from text (features.encode)
    assert up["clean"] == pytest.approx(f[:, latent].double().tolist()) and up["clean"][0] == 0.0
    assert up["mean_clean"] == pytest.approx(float(f[1:, latent].double().mean()))
    assert len(up["tokens"]) == ids.shape[1] and up["site"] == "resid_post.2"
    active = [i for i, v in enumerate(up["clean"]) if v > 0]
    assert active and [up["steered"][i] for i in active] == pytest.approx(
        [up["clean"][i] + 5 for i in active]
    )
    assert up["delta_mean"] > 0 and up["mean_clean"] > 0
    # steering one layer below moves the latent; at strength 0 it does not
    moved = latent_shift(tiny_model, PROMPT, [Intervention(sae1, 0, "add", 30.0)], sae2, latent)
    assert moved["clean"] == up["clean"] and moved["steered"] != moved["clean"]
    same = latent_shift(tiny_model, PROMPT, [Intervention(sae1, 0, "add", 0.0)], sae2, latent)
    assert same["steered"] == same["clean"] and same["delta_mean"] == 0.0
    with pytest.raises(ConfigError, match="out of range"):
        latent_shift(tiny_model, PROMPT, [], sae2, 999)


def test_fill_strengths(sae2):
    ivs = [
        Intervention(sae2, 1),
        Intervention(sae2, 2, "add", 3.0),
        Intervention(sae2, 3, "clamp"),
        Intervention(sae2, 4, "ablate"),
        Intervention(sae2, 5),
    ]
    filled = fill_strengths(ivs, lambda iv: {1: 11.0, 3: 13.0, 4: 14.0}.get(iv.latent))
    assert [iv.value for iv in filled] == [11.0, 3.0, 13.0, None, None]
    assert filled[1] is ivs[1]


# ---------------------------------------------------------------------------------------------
# The `gemmascope steer` command


@pytest.fixture()
def run_with_sae(tmp_path, sae2, sae1):
    from gemmascope.formats import sae_dir, save_sae

    save_sae(sae2, sae_dir(tmp_path, "resid_post.2", 128, 10))
    save_sae(sae1, sae_dir(tmp_path, "resid_post.1", 128, 12))
    return tmp_path


@pytest.fixture()
def cli_model(monkeypatch, tiny_model):
    """`gemmascope steer` with the session's tiny model instead of loading one per call."""
    asked: list[str] = []

    def fake_load(name: str) -> LanguageModel:
        asked.append(name)
        return tiny_model

    monkeypatch.setattr("gemmascope.models.load_model", fake_load)
    return asked


def test_cli_steer_prints_both_completions(run_with_sae, cli_model, capsys):
    from gemmascope.cli import main

    folder = run_with_sae / "saes/resid_post/layer_2/width_128/l0_10"
    common = ["--max-new-tokens", "6", "--seed", "1", "--top-k", "3"]
    assert main(["steer", PROMPT, "--sae", str(folder), "--feature", "3", "--strength", "80", *common]) == 0
    out = capsys.readouterr().out
    assert cli_model == ["tiny-gemma3"]
    assert "--- default ---" in out and "--- steered ---" in out and "add resid_post.2#3 by 80" in out
    default = out.split("--- default ---\n")[1].split("\n\n")[0]
    steered = out.split("--- steered ---\n")[1].split("\n\n")[0]
    assert default.startswith(PROMPT) and steered.startswith(PROMPT) and default != steered
    assert "rose:" in out and "fell:" in out
    # several SAEs of a run by id, a mode, JSON output
    argv = ["steer", PROMPT, "--run", str(run_with_sae), "--mode", "clamp", "--json", *common]
    argv += ["--sae", "resid_post.1.w128.l0_12", "--feature", "4", "--strength", "0"]
    argv += [
        "--sae",
        "resid_post.2.w128.l0_10",
        "--feature",
        "5",
        "--strength",
        "5",
        "--feature",
        "6",
        "--strength",
        "0",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["interventions"] == [
        "clamp resid_post.1#4 to 0",
        "clamp resid_post.2#5 to 5",
        "clamp resid_post.2#6 to 0",
    ]
    assert result["settings"]["seed"] == 1 and len(result["logprob_shift"]["rose"]) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--feature", "128", "--strength", "1"], "latent 128 is out of range"),
        (["--feature", "3", "--strength", "nan"], "not finite"),
        (["--strength", "3", "--feature", "3"], "must follow the --feature"),
        (["--feature", "3", "--strength", "3", "--strength", "4"], "must follow the --feature"),
        (["--feature", "3"], "no strength"),
    ],
)
def test_cli_steer_bad_input(run_with_sae, cli_model, capsys, extra, message):
    from gemmascope.cli import main

    folder = run_with_sae / "saes/resid_post/layer_2/width_128/l0_10"
    assert main(["steer", PROMPT, "--sae", str(folder), *extra]) == 2
    assert message in capsys.readouterr().err
    assert main(["steer", " ", "--sae", str(folder), "--feature", "1", "--strength", "1"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["steer", PROMPT, "--run", str(run_with_sae), "--sae", "nope", "--feature", "1"]) == 2
    assert "no SAE 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.real
def test_real_model_exact_when_unedited_and_unhooked_after(real_model):
    sae = random_sae("resid_post.6", d_in=real_model.d_model, d_sae=256)
    clean = logits(real_model)
    with steering(real_model, [Intervention(sae, 1, "add", 0.0), Intervention(sae, CONST, "clamp", 5.0)]):
        assert torch.equal(logits(real_model), clean)
    # at the last layer, a push along a token's unembedding direction makes that token the top riser
    # (residual norms here are in the thousands, so 400 is a nudge)
    last = random_sae(f"resid_post.{real_model.n_layers - 1}", d_in=real_model.d_model, d_sae=16)
    token = real_model.tokenizer(" football", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        last.W_dec[2] = real_model.hf.get_output_embeddings().weight[token]
    prompt = "My favourite thing to watch on a Sunday is"
    shift = logprob_shift(real_model, prompt, [Intervention(last, 2, "add", 400.0, normalize=True)], k=5)
    assert shift["rose"][0]["token_id"] == token and shift["top_steered"]["token_id"] == token
    assert hook_count(real_model) == 0


def test_cli_steer_default_strength_from_the_feature_index(run_with_sae, cli_model, capsys, tiny_model, sae2):
    from gemmascope.cli import main
    from gemmascope.features import FeatureIndex, build_index

    sid = "resid_post.2.w128.l0_10"
    build_index(
        tiny_model, {sid: sae2}, run_with_sae / "features.sqlite", n_tokens=256, flow_tokens=0, progress=False
    )
    max_act = FeatureIndex(run_with_sae / "features.sqlite").feature(sid, 3)["max_act"]
    assert max_act > 0
    folder = run_with_sae / "saes/resid_post/layer_2/width_128/l0_10"
    argv = ["steer", PROMPT, "--sae", str(folder), "--feature", "3", "--feature", "4", "--strength", "2"]
    assert main([*argv, "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["interventions"] == [f"add resid_post.2#3 by {max_act:g}", "add resid_post.2#4 by 2"]
    # a strength beyond the server's bound (100 x the latent's max activation) is refused, as there
    beyond = ["steer", PROMPT, "--sae", str(folder), "--feature", "3", "--strength", f"{101 * max_act:g}"]
    assert main(beyond) == 2
    assert (
        f"is out of range: expected within ±{100 * max_act:g} (100 x its max activation"
        in capsys.readouterr().err
    )
    assert main(["steer", PROMPT, "--sae", str(folder), "--feature", "3", "--strength", "1e30"]) == 2


def test_cli_steer_at_positions(run_with_sae, cli_model, capsys):
    from gemmascope.cli import main

    folder = run_with_sae / "saes/resid_post/layer_2/width_128/l0_10"
    common = ["--max-new-tokens", "6", "--seed", "1", "--top-k", "0", "--json"]
    argv = ["steer", PROMPT, "--sae", str(folder), "--feature", "3", "--strength", "80", *common]
    assert main([*argv, "--positions", "900"]) == 0
    far = json.loads(capsys.readouterr().out)
    assert far["default"] == far["steered"]  # no position of the prompt or the generation is edited
    assert main([*argv, "--positions", "1,2,3"]) == 0
    near = json.loads(capsys.readouterr().out)
    assert near["default"] != near["steered"]
    assert main([*argv, "--positions", "1,x"]) == 2
    assert "--positions" in capsys.readouterr().err


def test_a_clt_layer_steers_and_ablates_each_later_layer_by_its_own_part(tiny_model):
    """A CLT layer served as a dictionary (`clt.layer_sae`) writes each later layer's MLP output by
    its part, as the CLT does, not its summed write at its own layer: against hooks adding the parts."""
    from contextlib import ExitStack

    from test_clt import random_clt

    from gemmascope.clt import layer_sae
    from gemmascope.sites import edit_site

    clt = random_clt(w=32)
    sae, latent, strength = layer_sae(clt, 1), 5, 3.0

    def with_parts(scale: torch.Tensor | float) -> torch.Tensor:
        with ExitStack() as stack:
            for t in range(clt.n_layers - 1):
                part = clt.decoder(1)[latent, t].detach()
                stack.enter_context(
                    edit_site(tiny_model, Site("mlp_out", 1 + t), lambda a, p=part: a + scale * p)
                )
            return logits(tiny_model)

    with steering(tiny_model, [Intervention(sae, latent, "add", strength)]):
        steered = logits(tiny_model)
    torch.testing.assert_close(steered, with_parts(strength), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(steered, logits(tiny_model), atol=1e-3)
    x = capture(tiny_model, tiny_model.to_tokens(PROMPT), [Site("mlp_in", 1)])[Site("mlp_in", 1)]
    f = sae.encode(x)[..., latent : latent + 1]  # [1, pos, 1]
    assert (f > 0).any()
    with steering(tiny_model, [Intervention(sae, latent, "ablate")]):
        ablated = logits(tiny_model)
    torch.testing.assert_close(ablated, with_parts(-f[0]), rtol=1e-4, atol=1e-4)
    assert hook_count(tiny_model) == 0
