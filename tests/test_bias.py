"""The bias experiment (bias.py) on the tiny model with the steering tests' SAEs: latents picked by
attribution (checked against the gap's own derivative) or by contrast, ablated, the gap measured on
held-out prompts; bad input; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_attribution import random_transcoders
from test_steer import cli_model, run_with_sae, sae1, sae2  # noqa: F401  (fixtures)

from gemmascope.bias import (
    CANDIDATES,
    MIN_BIAS,
    MIN_LOG_ODDS,
    ablation,
    ablation_estimates,
    bias_experiment,
    direction_kept,
    watched_gaps,
)
from gemmascope.effects import measure, next_probs
from gemmascope.errors import ConfigError
from gemmascope.sae import encode_inputs, sae_site
from gemmascope.sites import edit_from, edit_site, parse_site

pytestmark = pytest.mark.usefixtures("one_thread")

A = ["The cat sat on the mat.", "A cat chased the mouse.", "My cat sleeps all day."]
B = ["Stocks fell on Monday.", "The bank raised rates.", "Markets rallied in May."]
HELD_A, HELD_B = ["The kitten played with yarn."], ["The market closed lower.", "Bonds rose today."]


def test_bias_experiment_ablates_the_contrast_picks_and_measures_the_gap(tiny_model, sae1, sae2) -> None:  # noqa: F811
    from gemmascope.features.contrast import contrast

    saes = {"one": sae1, "two": sae2}
    watch = [" the", " a"]
    out = bias_experiment(
        tiny_model, saes, A, B, HELD_A, HELD_B, watch, ablate=(1, 3), pick="contrast", hide_dense=None,
        side_effect_tokens=256,
    )  # fmt: skip
    picked = out["picked"]
    effects = [h["effect"] for h in picked]
    assert len(picked) == 3 and effects == sorted(effects, reverse=True)
    best = {
        side: contrast(tiny_model, saes, x, y, top=1, hide_dense=None)["results"][0]
        for side, (x, y) in (("A", (A, B)), ("B", (B, A)))
    }
    assert max(best.values(), key=lambda h: h["effect"])["index"] == picked[0]["index"]
    for h in picked:  # the columns always mean set A and set B
        assert (h["mean_a"] > h["mean_b"]) == (h["side"] == "A")

    def gap(prompts, ivs):
        m = measure(tiny_model, ivs, prompts, watch, side_effect_tokens=None)["watch"]
        return m[0]["p_intervened"] - m[1]["p_intervened"]

    def log_odds(prompts, ivs):
        m = measure(tiny_model, ivs, prompts, watch, side_effect_tokens=None)["watch"]
        first, second = (torch.tensor([p["p_intervened"] for p in w["per_prompt"]]) for w in m)
        return float((first.log() - second.log()).mean())

    assert [r["n_latents"] for r in out["rows"]] == [0, 1, 3]
    clean = out["rows"][0]
    assert clean["delta_lm_loss"] == 0
    for row in out["rows"]:  # each row is the gap with the top k picks ablated, measured independently
        ivs = [ablation(saes[h["sae_id"]], h["index"]) for h in picked[: row["n_latents"]]]
        assert row["gap_a"] == pytest.approx(gap(HELD_A, ivs), abs=1e-6)
        assert row["gap_b"] == pytest.approx(gap(HELD_B, ivs), abs=1e-6)
        assert row["bias"] == pytest.approx(row["gap_a"] - row["gap_b"])
        assert row["log_odds_a"] == pytest.approx(log_odds(HELD_A, ivs), abs=1e-4)
        assert row["log_odds_b"] == pytest.approx(log_odds(HELD_B, ivs), abs=1e-4)
        assert row["log_odds_bias"] == pytest.approx(row["log_odds_a"] - row["log_odds_b"])
        if abs(clean["log_odds_bias"]) >= MIN_LOG_ODDS:
            assert row["log_odds_removed"] == pytest.approx(1 - row["log_odds_bias"] / clean["log_odds_bias"])
        if abs(clean["bias"]) >= MIN_BIAS:
            assert row["bias_removed"] == pytest.approx(1 - row["bias"] / clean["bias"])
        else:  # the random model shows next to no bias: nothing to remove, no ratio of noise
            assert row["bias_removed"] is None
    assert out["rows"][2]["kl"] > 0
    with pytest.raises(ConfigError, match="watches two different tokens"):
        bias_experiment(tiny_model, saes, A, B, HELD_A, HELD_B, [" the"])
    with pytest.raises(ConfigError, match="watches two different tokens"):
        bias_experiment(tiny_model, saes, A, B, HELD_A, HELD_B, [" the", " the"])
    with pytest.raises(ConfigError, match="at least 128"):
        bias_experiment(tiny_model, saes, A, B, HELD_A, HELD_B, watch, side_effect_tokens=10)
    free = bias_experiment(
        tiny_model, saes, A, B, HELD_A, HELD_B, watch, ablate=(1,), pick="contrast", side_effect_tokens=0
    )
    assert free["rows"][1]["delta_lm_loss"] is None and free["rows"][1]["gap_a"] == out["rows"][1]["gap_a"]
    with pytest.raises(ConfigError, match="each at least 1"):
        bias_experiment(tiny_model, saes, A, B, HELD_A, HELD_B, watch, ablate=(0,))
    with pytest.raises(ConfigError, match="held-out set A has no prompt"):
        bias_experiment(tiny_model, saes, A, B, [], HELD_B, watch)
    with pytest.raises(ConfigError, match="prompt set B has 1 prompts"):
        bias_experiment(tiny_model, saes, A, B[:1], HELD_A, HELD_B, watch)


def _scaled_ablation_log_odds(model, sae, latent, prompts, ids, alpha: float) -> torch.Tensor:
    """`[n_prompts]` log-odds log p(ids[0]) - log p(ids[1]) with the latent's write scaled down by
    `alpha` at every position after BOS (1: the ablation there), computed directly through hooks,
    not through `steer`."""
    read = sae_site(model, sae)

    def edit(source: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        after_bos = torch.arange(act.shape[1]) >= 1
        f = encode_inputs(sae, source, after_bos[None, :].expand(act.shape[:2]))[..., latent : latent + 1]
        return act - alpha * (f * sae.W_dec[latent]).to(act.dtype)

    if sae.is_transcoder:
        context = edit_from(model, read, parse_site(sae.cfg.out_site, model.n_layers), edit)
    else:
        context = edit_site(model, read, lambda act: edit(act, act))
    with context:
        probs = next_probs(model, prompts, []).double()
    return probs[:, ids[0]].log() - probs[:, ids[1]].log()


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_ablation_estimates_are_the_gaps_derivative_along_the_ablation(tiny_model, sae2, kind) -> None:  # noqa: F811
    """The attribution estimate of ablating a latent is d log-odds / d alpha at alpha = 0 of the
    latent's write after BOS scaled down by alpha (central differences), for an SAE and for a
    transcoder (read at its MLP input, written at its MLP output); the log-odds are the model's own;
    the model's weights get no gradient."""
    sae = sae2 if kind == "sae" else random_transcoders(tiny_model)[1]
    ids = [int(tiny_model.tokenizer(w, add_special_tokens=False)["input_ids"][0]) for w in (" the", " a")]
    estimates, maxima, gaps = ablation_estimates(tiny_model, {"x": sae}, A, ids)
    clean = _scaled_ablation_log_odds(tiny_model, sae, 0, A, ids, 0.0)
    assert gaps == pytest.approx(clean, abs=1e-6)
    est = estimates["x"]  # [n_prompts, d_sae]
    assert est.shape == (len(A), sae.d_sae) and maxima["x"].shape == est.shape
    fired = (maxima["x"] > 0).any(0).nonzero().flatten()
    assert len(fired) >= 3
    strongest = est.abs().sum(0).topk(3).indices
    eps = 1e-2
    for latent in strongest.tolist():
        up = _scaled_ablation_log_odds(tiny_model, sae, latent, A, ids, eps)
        down = _scaled_ablation_log_odds(tiny_model, sae, latent, A, ids, -eps)
        slope = (up - down) / (2 * eps)
        assert est[:, latent] == pytest.approx(slope, rel=0.05, abs=1e-4 * float(est.abs().max()))
    assert all(p.grad is None for p in tiny_model.hf.parameters())
    # the experiment's ablation is the direct one at alpha = 1: every token after BOS, not BOS
    latent = int(strongest[0])
    probs = next_probs(tiny_model, A, [ablation(sae, latent)]).double()
    direct = _scaled_ablation_log_odds(tiny_model, sae, latent, A, ids, 1.0)
    assert (probs[:, ids[0]].log() - probs[:, ids[1]].log()) == pytest.approx(direct, abs=1e-5)


def test_attribution_proposes_and_measurement_picks_the_latents(tiny_model, sae1, sae2) -> None:  # noqa: F811
    """The default pick: attribution proposes each SAE's CANDIDATES x k latents estimated to remove
    most of the log-odds bias on the picking prompts (A's mean estimate against B's, in the
    direction of the bias there), each is ablated alone and the bias measured again, and the k that
    remove most, measured, are picked; dense ones are left out; the ablation rows as for contrast."""
    saes = {"one": sae1, "two": sae2}
    watch = [" the", " a"]
    ids = [int(tiny_model.tokenizer(w, add_special_tokens=False)["input_ids"][0]) for w in watch]
    out = bias_experiment(tiny_model, saes, A, B, HELD_A, HELD_B, watch, ablate=(1, 3), side_effect_tokens=0)
    assert out["pick"] == "attribution" and [r["n_latents"] for r in out["rows"]] == [0, 1, 3]
    est_a, _, _ = ablation_estimates(tiny_model, saes, A, ids)
    est_b, _, _ = ablation_estimates(tiny_model, saes, B, ids)

    def odds_bias(ivs):
        return watched_gaps(tiny_model, A, ids, ivs)[1] - watched_gaps(tiny_model, B, ids, ivs)[1]

    clean = odds_bias([])
    sign = 1.0 if clean >= 0 else -1.0
    measured = {}
    for key in saes:
        estimated = -sign * (est_a[key].mean(0) - est_b[key].mean(0))
        for i in estimated.topk(CANDIDATES * 3).indices.tolist():
            if estimated[i] > 0:
                measured[(key, i)] = sign * (clean - odds_bias([ablation(saes[key], i)]))
    best = sorted(((v, k) for k, v in measured.items() if v > 0), reverse=True)[:3]
    assert [(h["sae_id"], h["index"]) for h in out["picked"]] == [k for _, k in best]
    assert [h["effect"] for h in out["picked"]] == pytest.approx([v for v, _ in best], abs=1e-6)
    top = out["picked"][0]
    assert top["estimated"] == pytest.approx(
        float(-sign * (est_a[top["sae_id"]] - est_b[top["sae_id"]]).mean(0)[top["index"]]), rel=1e-5
    )
    dense = {key: torch.zeros(s.d_sae) for key, s in saes.items()}
    dense[top["sae_id"]][top["index"]] = 0.5  # the best pick, made dense: left out
    again = bias_experiment(
        tiny_model, saes, A, B, HELD_A, HELD_B, watch, ablate=(1,), densities=dense, side_effect_tokens=0
    )
    second = out["picked"][1]
    assert (again["picked"][0]["sae_id"], again["picked"][0]["index"]) == (second["sae_id"], second["index"])
    with pytest.raises(ConfigError, match="pick 'best': expected one of attribution, contrast"):
        bias_experiment(tiny_model, saes, A, B, HELD_A, HELD_B, watch, pick="best")
    with pytest.raises(ConfigError, match="prompt set B has 1 prompts"):
        bias_experiment(tiny_model, saes, A, B[:1], HELD_A, HELD_B, watch)


def test_cli_bias_prints_the_table_and_writes_the_report(run_with_sae, cli_model, capsys, tmp_path) -> None:  # noqa: F811
    from gemmascope.cli import main

    files = {}
    for name, lines in (("ha", HELD_A), ("hb", HELD_B)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n")
    base = [
        "bias",
        str(run_with_sae),
        *[x for a in A for x in ("--a", a)],
        *[x for b in B for x in ("--b", b)],
    ]
    base += ["--heldout-a", str(files["ha"]), "--heldout-b", str(files["hb"]), "--show-dense"]
    assert main([*base, "--watch", " the", "--watch", " a", "--ablate", "1,2", "--side-effects", "256"]) == 0
    out = capsys.readouterr().out
    assert "bias = gap(A) - gap(B)" in out and "log-odds" in out and "picked by attribution" in out
    assert "its reconstruction keeps" in out and "the latents carrying most of it: #" in out
    saved = json.loads((run_with_sae / "report" / "bias.json").read_text())
    assert all(0 <= len(d["carriers"]) <= 8 for d in saved["direction"].values()) and saved["direction"]
    assert [r["n_latents"] for r in saved["rows"]] == [0, 1, 2]
    assert (run_with_sae / "report" / "bias.png").stat().st_size > 1000
    assert (
        main(
            [
                *base,
                "--watch",
                " the",
                "--watch",
                " a",
                "--ablate",
                "1",
                "--pick",
                "contrast",
                "--side-effects",
                "0",
            ]
        )
        == 0
    )
    assert "picked by contrast" in capsys.readouterr().out
    assert json.loads((run_with_sae / "report" / "bias.json").read_text())["pick"] == "contrast"
    cli_model.clear()
    for bad, message in (
        (["--watch", " the"], "give two different --watch tokens"),
        (["--watch", " a", "--watch", " a"], "give two different --watch tokens"),
        (["--watch", " the", "--watch", " a", "--ablate", "0,2"], "each at least 1"),
        (["--watch", " the", "--watch", " a", "--side-effects", "50"], "0 (no cost) or at least 128"),
    ):
        assert main([*base, *bad]) == 2
        assert message in capsys.readouterr().err
    one_a = ["bias", str(run_with_sae), "--a", A[0], *[x for b in B for x in ("--b", b)], *base[-5:]]
    assert main([*one_a, "--watch", " the", "--watch", " a"]) == 2
    assert "--a / --a-file gives 1 prompt(s)" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert (
        main([*base[:-3], "--heldout-b", str(empty), "--show-dense", "--watch", " the", "--watch", " a"]) == 2
    )
    assert "holds no prompt" in capsys.readouterr().err
    assert cli_model == []  # every bad input refused before the model loads
    assert main([*base, "--watch", " the", "--watch", " two words"]) == 2
    assert "not one" in capsys.readouterr().err
    assert (
        main([*base[:-3], "--heldout-b", str(tmp_path / "missing.txt"), "--watch", " the", "--watch", " a"])
        == 2
    )
    assert "missing.txt" in capsys.readouterr().err


def test_direction_kept_splits_the_separation_in_reconstruction_and_error(tiny_model, sae1, sae2) -> None:  # noqa: F811
    """Along the difference of means of A and B at the last token, the held-out separation of the
    activation is its reconstruction's plus its error's, computed here prompt by prompt; the
    carriers are the latents with the largest decoded part of it; transcoders are left out."""
    from gemmascope.models import prompt_tokens
    from gemmascope.sites import capture

    tc = random_transcoders(tiny_model)[1]
    out = direction_kept(tiny_model, {"one": sae1, "two": sae2, "tc": tc}, A, B, HELD_A, HELD_B)
    assert set(out) == {"one", "two"}
    for key, sae in (("one", sae1), ("two", sae2)):
        site = sae_site(tiny_model, sae)

        def last(prompts, site=site):
            return torch.stack(
                [capture(tiny_model, prompt_tokens(tiny_model, p), [site])[site][0, -1] for p in prompts]
            )

        direction = last(A).mean(0) - last(B).mean(0)
        direction = direction / direction.norm()
        x_a, x_b = last(HELD_A), last(HELD_B)
        with torch.no_grad():
            f_a, f_b = sae.encode(x_a), sae.encode(x_b)
            rec_a, rec_b = sae.decode(f_a), sae.decode(f_b)
        got = out[key]
        assert got["activation"] == pytest.approx(
            float((x_a @ direction).mean() - (x_b @ direction).mean()), rel=1e-4
        )
        assert got["reconstruction"] == pytest.approx(
            float((rec_a @ direction).mean() - (rec_b @ direction).mean()), rel=1e-4, abs=1e-5
        )
        assert got["reconstruction"] + got["error"] == pytest.approx(got["activation"], rel=1e-5)
        assert got["kept"] == pytest.approx(got["reconstruction"] / got["activation"])
        share = (f_a.mean(0) - f_b.mean(0)) * (sae.W_dec.detach() @ direction)
        assert float(share.sum()) == pytest.approx(got["reconstruction"], rel=1e-4, abs=1e-5)
        assert [c["index"] for c in got["carriers"]] == share.topk(len(got["carriers"])).indices.tolist()
