"""Measured interventions (the articles' experiments): what a steer, clamp or ablation does to
chosen next tokens over a set of prompts, which tokens gain and lose probability mass, what it
costs on held-out text (ΔLM loss and KL of the intervened model), and all of that along a sweep
of strengths. Owns `watch_ids` (watched strings as single tokens, or a clear error saying how they
tokenise), `measure`, `sweep` and `output_effects` (what turning one latent up does to the next
token over neutral prompts: a feature page's measured counterpart of the logit lens); the bias
experiment built on them is `bias`'s.

Knows nothing of HTTP or files; the interventions are `steer.Intervention`s applied with
`steer.steering`, the held-out rows and the loss arithmetic are `evals`'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.evals import NextTokenStats, edited_batches, eval_token_ids
from gemmascope.limits import MAX_MEASURE_PROMPTS, MAX_SWEEP, MAX_TOP, MAX_WATCH, MIN_SIDE_EFFECT_TOKENS
from gemmascope.models import LanguageModel, prompt_tokens, token_texts
from gemmascope.sae import SAE
from gemmascope.steer import Intervention, check_intervention, generate_pair, steering

DEFAULT_SIDE_EFFECT_TOKENS = 2048  # held-out tokens the cost is measured on
PROMPT_BATCH = 16  # prompts in one forward pass


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


def check_prompts(prompts: Sequence[str]) -> None:
    if not prompts or len(prompts) > MAX_MEASURE_PROMPTS:
        raise ConfigError(f"give 1..{MAX_MEASURE_PROMPTS} prompts to measure on, got {len(prompts)}")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ConfigError(f"prompt {empty[0] + 1} of the set is empty: expected text")


def prompt_batches(model: LanguageModel, prompts: Sequence[str]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The prompts `PROMPT_BATCH` at a time, right-padded (under the causal mask no token sees the
    padding after it, so each prompt's tokens are computed as alone): `(ids [batch, T], last [batch],
    kept [n])`, each prompt's last position and the sorted positions to unembed (`logits_to_keep`;
    the unembedding of a 262k vocabulary is most of the cost). Pick a prompt's logits from
    `logits [batch, n, vocab]` with `last_logits`."""
    rows = [prompt_tokens(model, prompt)[0] for prompt in prompts]
    pad = model.tokenizer.pad_token_id or 0
    for start in range(0, len(rows), PROMPT_BATCH):
        batch = rows[start : start + PROMPT_BATCH]
        ids = torch.full((len(batch), max(len(r) for r in batch)), pad, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = r
        last = torch.tensor([len(r) - 1 for r in batch])
        yield ids.to(model.device), last, last.unique().to(model.device)


def last_logits(logits: Tensor, last: Tensor, kept: Tensor) -> Tensor:
    """`[batch, vocab]`: each prompt's logits at its last position, of `logits [batch, n, vocab]`
    unembedded at `kept` (`prompt_batches`)."""
    at = torch.searchsorted(kept.cpu(), last).to(logits.device)
    return logits[torch.arange(len(last), device=logits.device), at]


@torch.no_grad()
def next_probs(model: LanguageModel, prompts: Sequence[str], interventions: Sequence[Intervention]) -> Tensor:
    """`[n_prompts, vocab]` next-token probabilities after each prompt, with the interventions: one
    forward pass per `PROMPT_BATCH` prompts (`prompt_batches`), unembedded at each prompt's last
    token only."""
    out = []
    with steering(model, interventions):
        for ids, last, kept in prompt_batches(model, prompts):
            logits = model.hf(input_ids=ids, use_cache=False, logits_to_keep=kept).logits
            out.append(torch.softmax(last_logits(logits, last, kept).float(), -1).cpu())
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
    check_prompts(prompts)
    ids = watch_ids(model, watch)
    for iv in interventions:
        check_intervention(model, iv)
    clean = next_probs(model, prompts, [])
    steered = next_probs(model, prompts, interventions)
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
    check_prompts(prompts)
    if not 1 <= top <= MAX_TOP:
        raise ConfigError(f"top={top} is out of range: expected 1..{MAX_TOP}")
    turned_up = [Intervention(sae, latent, "add", float(strength))]
    check_intervention(model, turned_up[0])
    clean = next_probs(model, prompts, [])
    steered = next_probs(model, prompts, turned_up)
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
