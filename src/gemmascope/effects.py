"""Measured interventions (the articles' experiments): what a steer, clamp or ablation does to
chosen next tokens over a set of prompts, which tokens gain and lose probability mass, what it
costs on held-out text (ΔLM loss and KL of the intervened model), and all of that along a sweep
of strengths. Owns `watch_ids` (watched strings as single tokens, or a clear error saying how they
tokenise), `measure`, `sweep`, `output_effects` (what turning one latent up does to the next token
over neutral prompts: a feature page's measured counterpart of the logit lens) and `bias_experiment`
(pick latents by contrast, ablate them, and measure the watched-token gap between two held-out
prompt sets next to the cost).

Knows nothing of HTTP or files; the interventions are `steer.Intervention`s applied with
`steer.steering`, the held-out rows and the loss arithmetic are `evals`'.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.evals import NextTokenStats, edited_batches, eval_token_ids
from gemmascope.features.prompt import HIDE_DENSE
from gemmascope.limits import MAX_MEASURE_PROMPTS, MAX_SWEEP, MAX_TOP, MAX_WATCH, MIN_SIDE_EFFECT_TOKENS
from gemmascope.models import LanguageModel, prompt_tokens, token_texts
from gemmascope.sae import SAE
from gemmascope.steer import Intervention, check_intervention, generate_pair, steering

DEFAULT_SIDE_EFFECT_TOKENS = 2048  # held-out tokens the cost is measured on
PROMPT_BATCH = 16  # prompts in one forward pass
MIN_BIAS = 0.01  # a gap difference below this (one point of probability) leaves nothing to remove


def watch_ids(model: LanguageModel, watch: Sequence[str]) -> list[int]:
    """The token id of each watched string; a ConfigError for one that is not a single token,
    saying how it tokenises (`" hello world" -> [" hello", " world"]`), or for none at all."""
    if not watch or len(watch) > MAX_WATCH:
        raise ConfigError(f"watch 1..{MAX_WATCH} tokens, e.g. ' he', ' she'; got {len(watch)}")
    out = []
    for text in watch:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = token_texts(model.tokenizer, ids)
            raise ConfigError(
                f"watched string {text!r} is {len(ids)} tokens {pieces!r}, not one: watch a single token "
                "(mind the leading space: ' he' and 'he' are different tokens)"
            )
        out.append(int(ids[0]))
    return out


def _check_prompts(prompts: Sequence[str]) -> None:
    if not prompts or len(prompts) > MAX_MEASURE_PROMPTS:
        raise ConfigError(f"give 1..{MAX_MEASURE_PROMPTS} prompts to measure on, got {len(prompts)}")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ConfigError(f"prompt {empty[0] + 1} of the set is empty: expected text")


@torch.no_grad()
def _next_probs(
    model: LanguageModel, prompts: Sequence[str], interventions: Sequence[Intervention]
) -> Tensor:
    """`[n_prompts, vocab]` next-token probabilities after each prompt, with the interventions: one
    forward pass per `PROMPT_BATCH` prompts, right-padded (under the causal mask no token sees the
    padding after it, so each prompt's tokens are computed as alone) and unembedded at each prompt's
    last token only (the unembedding of a 262k vocabulary is most of the cost)."""
    rows = [prompt_tokens(model, prompt)[0] for prompt in prompts]
    pad = model.tokenizer.pad_token_id or 0
    out = []
    with steering(model, interventions):
        for start in range(0, len(rows), PROMPT_BATCH):
            batch = rows[start : start + PROMPT_BATCH]
            ids = torch.full((len(batch), max(len(r) for r in batch)), pad, dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, : len(r)] = r
            last = torch.tensor([len(r) - 1 for r in batch])
            kept = last.unique()  # sorted: the positions unembedded
            logits = model.hf(
                input_ids=ids.to(model.device), use_cache=False, logits_to_keep=kept.to(model.device)
            ).logits  # [batch, len(kept), vocab]
            at = logits[torch.arange(len(batch)), torch.searchsorted(kept, last).to(logits.device)]
            out.append(torch.softmax(at.float(), -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def side_effects(
    model: LanguageModel,
    interventions: Sequence[Intervention],
    n_tokens: int = DEFAULT_SIDE_EFFECT_TOKENS,
    context_len: int = 128,
    batch_rows: int = 4,
) -> dict[str, float]:
    """The cost of the interventions on about `n_tokens` held-out tokens (`evals.edited_batches`,
    `batch_rows` rows a pass): LM loss without and with them, their difference (ΔLM loss) and
    KL(clean ‖ intervened), per predicted token. Every prediction between text tokens counts: a
    steer edits every position, massive ones too (`steer.steering`), so none is left out for it."""
    if n_tokens < MIN_SIDE_EFFECT_TOKENS:
        raise ConfigError(
            f"side effects need at least {MIN_SIDE_EFFECT_TOKENS} held-out tokens, got {n_tokens}"
        )
    token_ids = eval_token_ids(model, n_tokens, context_len=context_len)
    clean, steered = NextTokenStats(), NextTokenStats()
    for batch in edited_batches(model, token_ids, (), batch_rows, min_tokens=1):
        clean.update(*batch.unedited)
        steered.update(*batch.under(steering(model, interventions)))
    return {
        "lm_loss": clean.ce,
        "lm_loss_intervened": steered.ce,
        "delta_lm_loss": steered.ce - clean.ce,
        "kl": steered.kl,
        "n_predictions": clean.n,
    }


def measure(
    model: LanguageModel,
    interventions: Sequence[Intervention],
    prompts: Sequence[str],
    watch: Sequence[str],
    *,
    top: int = 10,
    side_effect_tokens: int | None = DEFAULT_SIDE_EFFECT_TOKENS,
) -> dict[str, Any]:
    """What the interventions do: per prompt and on average, the next-token probability of each
    watched token without and with them; the `top` tokens whose probability rose and fell most
    (by mass, averaged over the prompts, so rare junk tokens with large log-prob changes do not
    lead); and, unless `side_effect_tokens` is None, the cost on held-out text (`side_effects`)."""
    _check_prompts(prompts)
    ids = watch_ids(model, watch)
    for iv in interventions:
        check_intervention(model, iv)
    clean = _next_probs(model, prompts, [])
    steered = _next_probs(model, prompts, interventions)
    shift = (steered - clean).mean(0)  # [vocab] mean change of probability mass

    def tokens(order: Tensor) -> list[dict[str, Any]]:
        return [
            {
                "token": model.tokenizer.decode([int(i)]),
                "p_clean": float(clean[:, i].mean()),
                "p_intervened": float(steered[:, i].mean()),
                "delta": float(shift[i]),
            }
            for i in order
        ]

    out: dict[str, Any] = {
        "interventions": [iv.describe() for iv in interventions],
        "watch": [
            {
                "token": text,
                "p_clean": float(clean[:, i].mean()),
                "p_intervened": float(steered[:, i].mean()),
                "per_prompt": [
                    {"prompt": p, "p_clean": float(clean[k, i]), "p_intervened": float(steered[k, i])}
                    for k, p in enumerate(prompts)
                ],
            }
            for text, i in zip(watch, ids, strict=True)
        ],
        "rose": tokens(shift.topk(top).indices),
        "fell": tokens((-shift).topk(top).indices),
        "n_prompts": len(prompts),
    }
    if side_effect_tokens is not None:
        out["side_effects"] = side_effects(model, interventions, side_effect_tokens)
    return out


# Neutral contexts for `output_effects`: short, on no topic, each ending where a content word may follow.
OUTPUT_PROMPTS = (
    "When I opened the door, I saw a",
    "In the morning I went outside and saw a",
    "My neighbour told me about the",
    "The next thing to know is that",
    "It was one of the",
    "According to the report, the",
    "She picked up the",
    "We talked for hours about",
)
OUTPUT_FLOOR = (
    1e-6  # probability added to both sides of a ratio: a token that stays rarer than this never leads
)


def output_effects(
    model: LanguageModel,
    sae: SAE,
    latent: int,
    strength: float,
    prompts: Sequence[str] = OUTPUT_PROMPTS,
    *,
    top: int = 10,
) -> dict[str, Any]:
    """What turning latent `latent` up does to the output, measured: its decoder direction added at
    its site with `strength` (`steer`'s `add`, at every position) after each of `prompts`, and the
    `top` next tokens whose mean probability over the prompts rose most and fell most by ratio,
    `log((p_steered + OUTPUT_FLOOR) / (p_clean + OUTPUT_FLOOR))` (by ratio, so the tokens the latent
    is about lead, not those already likely; the floor keeps tokens that stay negligible out).
    Returns `{latent, strength, prompts, rose: [{token, token_id, p_clean, p_steered, log_ratio}],
    fell: [...], kl}` (kl: the mean KL(clean ‖ steered) of the next token, nats)."""
    _check_prompts(prompts)
    if not 1 <= top <= MAX_TOP:
        raise ConfigError(f"top={top} is out of range: expected 1..{MAX_TOP}")
    turned_up = [Intervention(sae, latent, "add", float(strength))]
    check_intervention(model, turned_up[0])
    clean = _next_probs(model, prompts, [])
    steered = _next_probs(model, prompts, turned_up)
    p_clean, p_steered = clean.mean(0), steered.mean(0)  # [vocab]
    ratio = (p_steered + OUTPUT_FLOOR).log() - (p_clean + OUTPUT_FLOOR).log()

    def rows(order: Tensor) -> list[dict[str, Any]]:
        return [
            {
                "token": model.tokenizer.decode([int(i)]),
                "token_id": int(i),
                "p_clean": float(p_clean[i]),
                "p_steered": float(p_steered[i]),
                "log_ratio": float(ratio[i]),
            }
            for i in order
        ]

    kl = (clean * (clean.clamp_min(1e-30).log() - steered.clamp_min(1e-30).log())).sum(1).mean()
    return {
        "latent": int(latent),
        "strength": float(strength),
        "prompts": list(prompts),
        "rose": rows(ratio.topk(top).indices),
        "fell": rows((-ratio).topk(top).indices),
        "kl": float(kl),
    }


def sweep(
    model: LanguageModel,
    at_strength: Callable[[float], Sequence[Intervention]],
    strengths: Sequence[float],
    prompts: Sequence[str],
    watch: Sequence[str],
    *,
    side_effect_tokens: int = DEFAULT_SIDE_EFFECT_TOKENS,
    completion_prompt: str | None = None,
    max_new_tokens: int = 24,
) -> list[dict[str, Any]]:
    """`measure` at each strength (`at_strength(s)` gives the interventions), with a greedy
    completion of `completion_prompt` (default the first prompt) per strength: one row per
    strength with the watched tokens' mean probabilities, ΔLM loss, KL and the completion."""
    if not strengths or len(strengths) > MAX_SWEEP:
        raise ConfigError(f"a sweep takes 1..{MAX_SWEEP} strengths, got {len(strengths)}")
    rows = []
    for s in strengths:
        interventions = at_strength(float(s))
        got = measure(model, interventions, prompts, watch, top=5, side_effect_tokens=side_effect_tokens)
        pair = generate_pair(
            model,
            completion_prompt or prompts[0],
            interventions,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
        )
        rows.append(
            {
                "strength": float(s),
                "watch": {w["token"]: w["p_intervened"] for w in got["watch"]},
                "delta_lm_loss": got["side_effects"]["delta_lm_loss"],
                "kl": got["side_effects"]["kl"],
                "completion": pair.steered,
            }
        )
    return rows


def _gap(
    model: LanguageModel, prompts: Sequence[str], ids: Sequence[int], ivs: Sequence[Intervention]
) -> float:
    """Mean over the prompts of p(first watched token) - p(second) as the next token."""
    probs = _next_probs(model, prompts, ivs)
    return float((probs[:, ids[0]] - probs[:, ids[1]]).mean())


def _separating_latents(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    top: int,
    pool: str,
    densities: Mapping[str, Tensor] | None,
    hide_dense: float | None,
) -> list[dict[str, Any]]:
    """The `top` latents of `features.contrast.contrast` that separate A from B in either direction,
    by effect size, each with "side" (the set it fires more on) and A's numbers under `_a`; a
    ConfigError when none does."""
    from gemmascope.features.contrast import contrast

    def hits(a: Sequence[str], b: Sequence[str]) -> list[dict[str, Any]]:
        found = contrast(model, saes, a, b, pool=pool, top=top, densities=densities, hide_dense=hide_dense)
        return list(found["results"])

    found = [{**hit, "side": "A"} for hit in hits(prompts_a, prompts_b)]
    for hit in hits(prompts_b, prompts_a):  # firing more on B: the same columns, A's numbers under _a
        swapped = {
            "mean_a": hit["mean_b"],
            "mean_b": hit["mean_a"],
            "fired_a": hit["fired_b"],
            "fired_b": hit["fired_a"],
        }
        found.append({**hit, **swapped, "side": "B"})
    picked = sorted(found, key=lambda h: h["effect"], reverse=True)[:top]
    if not picked:
        raise ConfigError("no latent separates the two prompt sets: nothing to ablate")
    return picked


def bias_experiment(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    heldout_a: Sequence[str],
    heldout_b: Sequence[str],
    watch: Sequence[str],
    *,
    ablate: Sequence[int] = (1, 2, 4, 8),
    pool: str = "max",
    densities: Mapping[str, Tensor] | None = None,
    hide_dense: float | None = HIDE_DENSE,
    side_effect_tokens: int | None = DEFAULT_SIDE_EFFECT_TOKENS,
) -> dict[str, Any]:
    """The articles' bias experiment. The model's bias is how differently it prefers `watch[0]`
    over `watch[1]` (e.g. " she" over " he") after prompts of kind A and of kind B: the gap
    g = mean p(watch[0]) - p(watch[1]) over a prompt set, and the bias = g(A) - g(B). The latents
    are picked by `features.contrast.contrast` on `prompts_a` against `prompts_b`, both directions,
    ranked by effect size; for each k in `ablate` the top k are ablated (every position, every SAE
    of `saes` at once) and the bias is measured on the held-out sets `heldout_a`, `heldout_b` (not
    the ones the latents were picked on), next to the cost on held-out text (`side_effects`; None
    or 0 tokens: not measured). `bias_removed` is None when the model shows less than
    MIN_BIAS of bias to begin with (nothing to remove).

    Returns `{"watch", "picked": [contrast rows (effect size, A's and B's mean and firing count),
    with "side": the set a latent fires more on], "rows": [{"n_latents",
    "gap_a", "gap_b", "bias", "bias_removed", "delta_lm_loss", "kl"}]}`, the first row (k = 0)
    being the model as it is."""
    if len(watch) != 2 or watch[0] == watch[1]:
        raise ConfigError(
            f"a bias experiment watches two different tokens (e.g. ' she', ' he'), got {list(watch)}"
        )
    if not ablate or any(k < 1 for k in ablate) or len(ablate) > 16:
        raise ConfigError(f"ablate takes 1..16 counts of latents, each at least 1; got {list(ablate)}")
    for name, prompts in (("A", heldout_a), ("B", heldout_b)):
        if not prompts:
            raise ConfigError(f"held-out set {name} has no prompt: the bias is measured on it")
        _check_prompts(prompts)
    if side_effect_tokens and side_effect_tokens < MIN_SIDE_EFFECT_TOKENS:
        raise ConfigError(
            f"side effects need at least {MIN_SIDE_EFFECT_TOKENS} held-out tokens (0: not measured), "
            f"got {side_effect_tokens}"
        )
    ids = watch_ids(model, watch)
    top = max(ablate)
    picked = _separating_latents(model, saes, prompts_a, prompts_b, top, pool, densities, hide_dense)
    rows = []
    clean_bias = None
    for k in (0, *sorted(set(ablate))):
        ivs = [Intervention(saes[h["sae_id"]], h["index"], "ablate") for h in picked[:k]]
        gap_a, gap_b = _gap(model, heldout_a, ids, ivs), _gap(model, heldout_b, ids, ivs)
        bias = gap_a - gap_b
        clean_bias = bias if clean_bias is None else clean_bias
        cost: dict[str, float | None] = {"delta_lm_loss": 0.0, "kl": 0.0} if not ivs else {}
        if ivs and side_effect_tokens:
            cost = dict(side_effects(model, ivs, side_effect_tokens))
        rows.append(
            {
                "n_latents": min(k, len(picked)),
                "gap_a": gap_a,
                "gap_b": gap_b,
                "bias": bias,
                "bias_removed": 1 - bias / clean_bias if abs(clean_bias) >= MIN_BIAS else None,
                "delta_lm_loss": cost.get("delta_lm_loss"),
                "kl": cost.get("kl"),
            }
        )
        if k >= len(picked):
            break
    return {"watch": list(watch), "pool": pool, "picked": picked, "rows": rows}


def measure_and_sweep(
    model: LanguageModel,
    interventions: Sequence[Intervention],
    prompts: Sequence[str],
    watch: Sequence[str],
    *,
    strengths: Sequence[float] | None = None,
    side_effect_tokens: int | None = DEFAULT_SIDE_EFFECT_TOKENS,
    sweep_side_effect_tokens: int = DEFAULT_SIDE_EFFECT_TOKENS,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """`measure`, and with `strengths` a `sweep` of them under "sweep" (each strength given to every
    add or clamp intervention; ablations stay as they are): what `gemmascope steer --watch … --sweep`
    and `POST /v1/steer/measure` run. A sweep always reports its cost: on `side_effect_tokens`
    held-out tokens, or `sweep_side_effect_tokens` when the cost is not measured otherwise (None)."""
    from dataclasses import replace

    if strengths is not None and all(iv.mode == "ablate" for iv in interventions):
        raise ConfigError("a sweep varies the strength of add or clamp features; these are all ablations")
    out = measure(model, interventions, prompts, watch, side_effect_tokens=side_effect_tokens)
    if strengths is not None:
        out["sweep"] = sweep(
            model, lambda s: [iv if iv.mode == "ablate" else replace(iv, value=s) for iv in interventions],
            strengths, prompts, watch, side_effect_tokens=side_effect_tokens or sweep_side_effect_tokens,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
    return out
