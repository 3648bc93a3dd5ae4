"""Measured interventions (effects.py) on the tiny model with the steering tests' SAEs: watched
tokens, probability-mass shifts, the side-effect cost on held-out text, sweeps; bad input; the CLI."""

from __future__ import annotations

import json

import pytest
from test_steer import PROMPT, cli_model, run_with_sae, sae1, sae2  # noqa: F401  (fixtures)

from gemmascope.effects import measure, side_effects, sweep, watch_ids
from gemmascope.errors import ConfigError
from gemmascope.steer import Intervention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_watch_ids_are_single_tokens_or_a_clear_error(tiny_model) -> None:
    [he] = watch_ids(tiny_model, [" he"])
    assert tiny_model.tokenizer.decode([he]) == " he"
    with pytest.raises(ConfigError, match=r"' unbelievably sideways' is \d+ tokens \["):
        watch_ids(tiny_model, [" unbelievably sideways"])
    with pytest.raises(ConfigError, match="watch 1"):
        watch_ids(tiny_model, [])


def test_measure_reports_watched_probabilities_mass_shifts_and_cost(tiny_model, sae2) -> None:  # noqa: F811
    prompts = [PROMPT, "The cat sat on the"]
    none = measure(tiny_model, [], prompts, [" the", " a"], side_effect_tokens=256)
    for w in none["watch"]:  # no intervention: nothing moves and nothing costs
        assert w["p_clean"] == w["p_intervened"] and len(w["per_prompt"]) == 2
    assert none["side_effects"]["delta_lm_loss"] == 0 and none["side_effects"]["kl"] == pytest.approx(
        0, abs=1e-6
    )
    push = [Intervention(sae2, 3, "add", 40.0)]
    got = measure(tiny_model, push, prompts, [" the", " a"], side_effect_tokens=256)
    assert any(w["p_clean"] != w["p_intervened"] for w in got["watch"])
    rose = [r["delta"] for r in got["rose"]]
    assert rose == sorted(rose, reverse=True) and rose[0] > 0 and got["fell"][0]["delta"] < 0
    # by mass: the mean probability change, and the listed p's agree with it
    top = got["rose"][0]
    assert top["p_intervened"] - top["p_clean"] == pytest.approx(top["delta"], abs=1e-6)
    cost = got["side_effects"]
    assert cost["kl"] > 0 and cost["n_predictions"] > 100
    assert cost["delta_lm_loss"] == pytest.approx(cost["lm_loss_intervened"] - cost["lm_loss"])
    with pytest.raises(ConfigError, match="empty"):
        measure(tiny_model, push, [PROMPT, " "], [" the"])
    with pytest.raises(ConfigError, match="at least 128"):
        side_effects(tiny_model, push, 10)


def test_side_effects_are_a_plain_computation_whatever_the_batch(tiny_model, sae2) -> None:  # noqa: F811
    """The cost over every prediction between text tokens (a steer edits every position, so none is
    left out), the same in batches of 1, 3 or 4 rows, and equal to a direct computation."""
    import torch

    from gemmascope.corpus import special_mask
    from gemmascope.evals import eval_token_ids
    from gemmascope.steer import steering

    push = [Intervention(sae2, 3, "add", 40.0)]
    costs = [side_effects(tiny_model, push, 256, context_len=32, batch_rows=rows) for rows in (1, 3, 4)]
    for cost in costs[1:]:
        assert cost["n_predictions"] == costs[0]["n_predictions"]
        assert cost == pytest.approx(costs[0], rel=1e-5, abs=1e-6)
    ids = eval_token_ids(tiny_model, 256, context_len=32)
    keep = ~special_mask(ids, tiny_model.special_token_ids)
    predict = keep[:, :-1] & keep[:, 1:]
    with torch.no_grad():
        clean = tiny_model.hf(input_ids=ids).logits[:, :-1][predict].log_softmax(-1)
        with steering(tiny_model, push):
            steered = tiny_model.hf(input_ids=ids).logits[:, :-1][predict].log_softmax(-1)
    targets = ids[:, 1:][predict]
    ce = float(-steered.gather(-1, targets[:, None]).mean())
    kl = float((clean.exp() * (clean - steered)).sum(-1).mean())
    assert costs[0]["n_predictions"] == int(predict.sum())
    assert costs[0]["lm_loss_intervened"] == pytest.approx(ce, rel=1e-4)
    assert costs[0]["kl"] == pytest.approx(kl, rel=1e-3)


def test_a_sweep_gives_a_curve_and_a_completion_per_strength(tiny_model, sae2) -> None:  # noqa: F811
    rows = sweep(
        tiny_model, lambda s: [Intervention(sae2, 3, "add", s)], [0.0, 20.0, 60.0], [PROMPT], [" the"],
        side_effect_tokens=256, max_new_tokens=4,
    )  # fmt: skip
    assert [r["strength"] for r in rows] == [0.0, 20.0, 60.0]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6) and rows[2]["kl"] > rows[1]["kl"] > 0
    assert all(isinstance(r["completion"], str) for r in rows)
    with pytest.raises(ConfigError, match="1..16 strengths"):
        sweep(tiny_model, lambda s: [], [], [PROMPT], [" the"])


def test_cli_steer_watch_and_sweep(run_with_sae, cli_model, capsys) -> None:  # noqa: F811
    from gemmascope.cli import main

    folder = run_with_sae / "saes/resid_post/layer_2/width_128/l0_10"
    base = [
        "steer",
        PROMPT,
        "--sae",
        str(folder),
        "--feature",
        "3",
        "--strength",
        "40",
        "--max-new-tokens",
        "3",
    ]
    assert main([*base, "--watch", " the", "--watch", " a", "--side-effects", "256", "--sweep", "0,40"]) == 0
    out = capsys.readouterr().out
    assert "watched next tokens over 1 prompt(s)" in out and "gained most probability" in out
    assert "held-out predictions" in out and "strength       40:" in out
    assert main([*base, "--watch", " the", "--side-effects", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "side_effects" not in data["measured"] and data["measured"]["watch"][0]["token"] == " the"
    assert main([*base, "--watch", " two words"]) == 2
    assert "not one" in capsys.readouterr().err
    assert main([*base, "--sweep", "1,2"]) == 2
    assert "--watch" in capsys.readouterr().err


def test_next_token_probabilities_of_a_batch_of_prompts_are_each_prompt_alone(tiny_model, sae2) -> None:  # noqa: F811
    """Prompts of different lengths in one right-padded forward pass, unembedded at each one's last
    token, give what each gives alone (steered too)."""
    from gemmascope.effects import next_probs
    from gemmascope.steer import next_token_logprobs

    prompts = [PROMPT, "A cat", "The cat sat on the mat and looked at the"]
    for ivs in ([], [Intervention(sae2, 3, "add", 40.0)]):
        batched = next_probs(tiny_model, prompts, ivs)
        for k, prompt in enumerate(prompts):
            alone = next_token_logprobs(tiny_model, prompt, ivs).exp().float()
            assert batched[k] == pytest.approx(alone, abs=1e-6)


def test_output_effects_rank_tokens_by_their_probability_ratio(tiny_model, sae2) -> None:  # noqa: F811
    """What turning a latent up does to the next token over the neutral prompts: the tokens whose
    mean probability rose and fell most by ratio, with the probabilities they rest on; nothing moves
    at strength 0."""
    import math

    from gemmascope.effects import OUTPUT_FLOOR, OUTPUT_PROMPTS, output_effects

    got = output_effects(tiny_model, sae2, 3, 40.0, top=5)
    assert got["latent"] == 3 and got["strength"] == 40.0 and got["prompts"] == list(OUTPUT_PROMPTS)
    rose, fell = [r["log_ratio"] for r in got["rose"]], [r["log_ratio"] for r in got["fell"]]
    assert len(rose) == 5 and rose == sorted(rose, reverse=True) and rose[0] > 0
    assert fell == sorted(fell) and fell[0] < 0 and got["kl"] > 0
    for r in got["rose"] + got["fell"]:
        ratio = math.log((r["p_steered"] + OUTPUT_FLOOR) / (r["p_clean"] + OUTPUT_FLOOR))
        assert r["log_ratio"] == pytest.approx(ratio, abs=1e-4)
        assert tiny_model.tokenizer.decode([r["token_id"]]) == r["token"]
    # by ratio, not by mass: the top token is not simply the one that gained most probability
    assert got["rose"][0]["p_steered"] / (got["rose"][0]["p_clean"] + OUTPUT_FLOOR) >= max(
        r["p_steered"] / (r["p_clean"] + OUTPUT_FLOOR) for r in got["rose"]
    ) * (1 - 1e-3)
    still = output_effects(tiny_model, sae2, 3, 0.0, prompts=[PROMPT], top=3)
    assert still["kl"] == pytest.approx(0, abs=1e-6)
    assert all(abs(r["log_ratio"]) < 1e-4 for r in still["rose"] + still["fell"])
    with pytest.raises(ConfigError, match="out of range"):
        output_effects(tiny_model, sae2, 10_000, 1.0)
    with pytest.raises(ConfigError, match="top=0"):
        output_effects(tiny_model, sae2, 3, 1.0, top=0)
