"""The articles' bias experiment: a model prefers one next token over another (" she" over " he")
differently after two kinds of prompt (female- and male-stereotyped professions); which latents carry
that difference, and what ablating them does to it on held-out prompts, next to the cost.

The bias is measured two ways: in probability (the gap p(" she") - p(" he") on one kind of prompt
minus the other's) and in log-odds (log p(" she") - log p(" he"), the same difference, in nats),
which an ablation that only makes both tokens rarer does not shrink.

Owns picking the latents, two ways: by `attribution` (the default: each latent's first-order effect
on the log-odds bias if it were ablated, its activation times the gradient of the log-odds along
its decoder direction, summed over the prompt's tokens after BOS: the attribution patching of Marks
et al.'s "Sparse Feature Circuits", whose SHIFT experiment ablates gender features found this way),
or by `contrast` (the latents that fire most differently on the two sets, `features.contrast`); and
`bias_experiment`, which ablates the top k and measures both biases on held-out prompts.

Knows the model and the SAEs; the forward passes and the cost are `effects`'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from gemmascope.effects import (
    DEFAULT_SIDE_EFFECT_TOKENS,
    check_prompts,
    last_logits,
    next_probs,
    prompt_batches,
    side_effects,
    watch_ids,
)
from gemmascope.errors import ConfigError
from gemmascope.features.encode import dense_latents
from gemmascope.features.prompt import HIDE_DENSE
from gemmascope.limits import MAX_PROMPT_TOKENS, MIN_SIDE_EFFECT_TOKENS
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE, encode_inputs, sae_site
from gemmascope.sites import Site, capture, edit_site, parse_site
from gemmascope.steer import Intervention

MIN_BIAS = 0.01  # a gap difference below this (one point of probability) leaves nothing to remove
MIN_LOG_ODDS = 0.05  # nor a log-odds difference below this (nats)
PICKS = ("attribution", "contrast")
AFTER_BOS = tuple(range(1, MAX_PROMPT_TOKENS + 1))  # every prompt token but BOS
TOP_CARRIERS = 8  # latents listed as carrying the A-B direction
CANDIDATES = 4  # attribution proposes this many latents per one picked; each is then measured


def ablation(sae: SAE, latent: int) -> Intervention:
    """The experiment's ablation of one latent: at every token after BOS (where features are read;
    the SAE's latents at BOS's massive activation are not features, and ablating them there moves
    every later token through attention)."""
    return Intervention(sae, latent, "ablate", positions=AFTER_BOS)


def watched_gaps(
    model: LanguageModel, prompts: Sequence[str], ids: Sequence[int], ivs: Sequence[Intervention]
) -> tuple[float, float]:
    """Means over the prompts of p(first watched token) - p(second) as the next token, and of the
    log-odds log p(first) - log p(second)."""
    probs = next_probs(model, prompts, ivs).double()
    first, second = probs[:, ids[0]], probs[:, ids[1]]
    return float((first - second).mean()), float((first.log() - second.log()).mean())


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
    by effect size, each with "side" (the set it fires more on) and A's numbers under `_a`."""
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
    return sorted(found, key=lambda h: h["effect"], reverse=True)[:top]


def ablation_estimates(
    model: LanguageModel, saes: Mapping[str, SAE], prompts: Sequence[str], ids: Sequence[int]
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """For each prompt, its log-odds g = log p(ids[0]) - log p(ids[1]) of the next token, and for
    each SAE and latent the first-order change of g if the latent were ablated at the prompt's
    tokens after BOS (as `ablation` does: the activation at the SAE's
    output site moves by `-f · W_dec[latent]`), `-Σ_pos f(pos) · (W_dec[latent] · ∂g/∂act(pos))`,
    with `f` the latent's activation read at the SAE's input site (`encode_inputs`: zero at BOS and
    at massive activations, where features are not read). The log-odds are a difference of logits,
    linear in the last residual stream, so the estimate is close for all but the strongest latents.
    One forward and one backward pass per batch of prompts; the model's weights get no gradient.

    Returns `(estimates {sae_id: [n_prompts, d_sae]}, maxima {sae_id: [n_prompts, d_sae]}` (each
    latent's largest activation over those tokens), `log_odds [n_prompts])`."""
    check_prompts(prompts)
    reads = {key: sae_site(model, sae, key) for key, sae in saes.items()}
    writes = {key: sae.writes() for key, sae in saes.items()}
    sites: dict[str, Site] = {str(site): site for site in reads.values()}
    for parts in writes.values():
        sites.update({name: parse_site(name, model.n_layers) for name, _ in parts})
    estimates: dict[str, list[Tensor]] = {key: [] for key in saes}
    maxima: dict[str, list[Tensor]] = {key: [] for key in saes}
    gaps = []
    held: dict[str, Tensor] = {}  # each site's activation in the pass under way

    def hold(name: str) -> Any:
        def fn(act: Tensor) -> Tensor | None:
            if act.requires_grad:  # the model's own weights carry the graph here: read it
                held[name] = act
                return None
            held[name] = act.detach().requires_grad_(True)  # the first site reached starts it
            return held[name]

        return fn

    for batch_ids, last, kept in prompt_batches(model, prompts):
        held.clear()
        with torch.enable_grad(), ExitStack() as stack:
            for name, site in sites.items():
                stack.enter_context(edit_site(model, site, hold(name)))
            logits = model.hf(input_ids=batch_ids, use_cache=False, logits_to_keep=kept).logits
            at = last_logits(logits, last, kept).float()
            gap = at[:, ids[0]] - at[:, ids[1]]  # [batch]: log p(first) - log p(second)
            names = list(held)
            grads = dict(zip(names, torch.autograd.grad(gap.sum(), [held[n] for n in names]), strict=True))
        gaps.append(gap.detach().cpu())
        after_bos = torch.arange(batch_ids.shape[1], device=last.device)[None, :] <= last[:, None]
        after_bos[:, 0] = False  # [batch, T]: the prompt's own tokens after BOS
        with torch.no_grad():
            for key, sae in saes.items():
                f = encode_inputs(sae, held[str(reads[key])].detach(), after_bos)  # [batch, T, d_sae]
                along = sum(
                    grads[name].to(W_dec.device, W_dec.dtype) @ W_dec.detach().T
                    for name, W_dec in writes[key]
                )  # [batch, T, d_sae]: ∂g/∂f through each decoder the latent writes by
                estimates[key].append(-(f * along).sum(1).float().cpu())
                maxima[key].append(f.amax(1).float().cpu())
    return (
        {key: torch.cat(v) for key, v in estimates.items()},
        {key: torch.cat(v) for key, v in maxima.items()},
        torch.cat(gaps),
    )


def _last_token_acts(
    model: LanguageModel, sites: Sequence[Site], prompts: Sequence[str]
) -> dict[Site, Tensor]:
    """`{site: [n_prompts, d]}`: each site's activation at each prompt's last token (float32)."""
    out: dict[Site, list[Tensor]] = {site: [] for site in sites}
    for batch_ids, last, _ in prompt_batches(model, prompts):
        acts = capture(model, batch_ids, list(sites))
        for site in sites:
            out[site].append(acts[site][torch.arange(len(last)), last.to(acts[site].device)].cpu())
    return {site: torch.cat(v) for site, v in out.items()}


def _separation(a: Tensor, b: Tensor, direction: Tensor) -> float:
    """Mean projection of `a [n_a, d]` on `direction [d]` minus that of `b [n_b, d]`."""
    return float((a.double() @ direction.double()).mean() - (b.double() @ direction.double()).mean())


@torch.no_grad()
def direction_kept(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    heldout_a: Sequence[str],
    heldout_b: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """How much of what tells A from B an SAE can reach at all. Per SAE (transcoders left out): the
    unit difference of means of the activation at its site at the last token, fitted on `prompts_a`
    against `prompts_b`; along it, the held-out separation (mean projection over `heldout_a` minus
    over `heldout_b`) of the activation, of the SAE's reconstruction (`encode_inputs`, decoded) and
    of its error term (the two sum to the first), `kept`, the reconstruction's share, and
    `carriers`, the TOP_CARRIERS latents whose decoded part of it is largest (`{index,
    separation}`: each latent's mean activation difference times its decoder's projection; over
    every latent they sum to the reconstruction's). Ablating latents moves only that part."""
    plain = {key: sae for key, sae in saes.items() if not sae.is_transcoder}
    sites = sorted({sae_site(model, sae, key) for key, sae in plain.items()}, key=str)
    sets = [_last_token_acts(model, sites, p) for p in (prompts_a, prompts_b, heldout_a, heldout_b)]
    out: dict[str, dict[str, Any]] = {}
    for key, sae in plain.items():
        fit_a, fit_b, x_a, x_b = (acts[sae_site(model, sae, key)] for acts in sets)
        direction = fit_a.mean(0) - fit_b.mean(0)
        direction = direction / direction.norm().clamp_min(1e-12)

        f_a, f_b = (encode_inputs(sae, x) for x in (x_a, x_b))  # [n, d_sae]
        rec_a, rec_b = (sae.decode(f).float().cpu() for f in (f_a, f_b))
        total, kept = _separation(x_a, x_b, direction), _separation(rec_a, rec_b, direction)
        along = (sae.W_dec.detach().float() @ direction.to(sae.W_dec.device)).cpu()  # [d_sae]
        per_latent = (f_a.float().mean(0) - f_b.float().mean(0)).cpu() * along  # sums to `kept`
        top = per_latent.topk(min(TOP_CARRIERS, sae.d_sae))
        out[key] = {
            "activation": total,
            "reconstruction": kept,
            "error": _separation(x_a - rec_a, x_b - rec_b, direction),
            "kept": kept / total if abs(total) > 1e-12 else float("nan"),
            "carriers": [{"index": int(i), "separation": float(v)} for v, i in zip(*top, strict=True)],
        }
    return out


def _attributed_latents(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    prompts_a: Sequence[str],
    prompts_b: Sequence[str],
    ids: Sequence[int],
    top: int,
    densities: Mapping[str, Tensor] | None,
    hide_dense: float | None,
) -> list[dict[str, Any]]:
    """The `top` latents whose ablation removes most of the log-odds bias, mean log-odds(A) - mean
    log-odds(B), on the prompts they are picked on: attribution proposes (the CANDIDATES x `top`
    latents of every SAE with the largest removal estimated by `ablation_estimates`), measurement
    decides (each candidate ablated alone, the bias measured again; the estimate misses for a few
    strongly firing latents, some by several times or in sign). Each row: `effect` (the bias
    removed, measured, nats), `estimated`, `side` (the set it fires more on), the max-pooled mean
    activation and firing count on each set, its density."""
    est_a, max_a, _ = ablation_estimates(model, saes, prompts_a, ids)
    est_b, max_b, _ = ablation_estimates(model, saes, prompts_b, ids)
    clean = watched_gaps(model, prompts_a, ids, [])[1] - watched_gaps(model, prompts_b, ids, [])[1]
    sign = 1.0 if clean >= 0 else -1.0
    rows = []
    for key in saes:
        removed = -sign * (est_a[key].mean(0) - est_b[key].mean(0))  # [d_sae]
        density = None if densities is None else densities.get(key)
        dense = dense_latents(density, hide_dense)
        if dense is not None:
            removed = removed.masked_fill(dense.to(removed.device), float("-inf"))
        values, latents = removed.topk(min(CANDIDATES * top, removed.numel()))
        for value, i in zip(values.tolist(), latents.tolist(), strict=True):
            if value <= 0:
                break
            mean_a, mean_b = float(max_a[key][:, i].mean()), float(max_b[key][:, i].mean())
            ablated = [ablation(saes[key], i)]
            after = (
                watched_gaps(model, prompts_a, ids, ablated)[1]
                - watched_gaps(model, prompts_b, ids, ablated)[1]
            )
            rows.append(
                {
                    "sae_id": key,
                    "index": i,
                    "effect": sign * (clean - after),
                    "estimated": value,
                    "mean_a": mean_a,
                    "mean_b": mean_b,
                    "fired_a": int((max_a[key][:, i] > 0).sum()),
                    "fired_b": int((max_b[key][:, i] > 0).sum()),
                    "density": None if density is None else float(density[i]),
                    "side": "A" if mean_a >= mean_b else "B",
                }
            )
    return sorted((h for h in rows if h["effect"] > 0), key=lambda h: h["effect"], reverse=True)[:top]


def _check_experiment(
    watch: Sequence[str],
    pick: str,
    ablate: Sequence[int],
    heldout_a: Sequence[str],
    heldout_b: Sequence[str],
    side_effect_tokens: int | None,
) -> None:
    """A ConfigError naming the first of `bias_experiment`'s settings that cannot be run."""
    if len(watch) != 2 or watch[0] == watch[1]:
        raise ConfigError(
            f"a bias experiment watches two different tokens (e.g. ' she', ' he'), got {list(watch)}"
        )
    if pick not in PICKS:
        raise ConfigError(f"pick {pick!r}: expected one of {', '.join(PICKS)}")
    if not ablate or any(k < 1 for k in ablate) or len(ablate) > 16:
        raise ConfigError(f"ablate takes 1..16 counts of latents, each at least 1; got {list(ablate)}")
    for name, prompts in (("A", heldout_a), ("B", heldout_b)):
        if not prompts:
            raise ConfigError(f"held-out set {name} has no prompt: the bias is measured on it")
        check_prompts(prompts)
    if side_effect_tokens and side_effect_tokens < MIN_SIDE_EFFECT_TOKENS:
        raise ConfigError(
            f"side effects need at least {MIN_SIDE_EFFECT_TOKENS} held-out tokens (0: not measured), "
            f"got {side_effect_tokens}"
        )


def _ablation_rows(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    picked: Sequence[Mapping[str, Any]],
    ablate: Sequence[int],
    heldout_a: Sequence[str],
    heldout_b: Sequence[str],
    ids: Sequence[int],
    side_effect_tokens: int | None,
) -> list[dict[str, Any]]:
    """`bias_experiment`'s rows: for k = 0 and each k of `ablate`, the top k of `picked` ablated,
    both biases on the held-out sets and the cost."""
    rows = []
    clean_bias = clean_odds = 0.0
    for k in (0, *sorted(set(ablate))):
        ivs = [ablation(saes[h["sae_id"]], h["index"]) for h in picked[:k]]
        (gap_a, odds_a), (gap_b, odds_b) = (
            watched_gaps(model, held, ids, ivs) for held in (heldout_a, heldout_b)
        )
        bias, odds_bias = gap_a - gap_b, odds_a - odds_b
        if k == 0:
            clean_bias, clean_odds = bias, odds_bias
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
                "log_odds_a": odds_a,
                "log_odds_b": odds_b,
                "log_odds_bias": odds_bias,
                "log_odds_removed": 1 - odds_bias / clean_odds if abs(clean_odds) >= MIN_LOG_ODDS else None,
                "delta_lm_loss": cost.get("delta_lm_loss"),
                "kl": cost.get("kl"),
            }
        )
        if k >= len(picked):
            break
    return rows


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
    pick: str = "attribution",
    pool: str = "max",
    densities: Mapping[str, Tensor] | None = None,
    hide_dense: float | None = HIDE_DENSE,
    side_effect_tokens: int | None = DEFAULT_SIDE_EFFECT_TOKENS,
) -> dict[str, Any]:
    """The articles' bias experiment. The model's bias is how differently it prefers `watch[0]`
    over `watch[1]` (e.g. " she" over " he") after prompts of kind A and of kind B: the gap
    g = mean p(watch[0]) - p(watch[1]) over a prompt set, and the bias = g(A) - g(B); in log-odds,
    the same with log p(watch[0]) - log p(watch[1]). The latents are picked on `prompts_a` and
    `prompts_b` (`pick`: "attribution", those whose ablation is estimated to remove most of the
    log-odds bias there, `ablation_estimates`; "contrast", those that fire most differently on
    the two sets, `pool`-pooled, by effect size), latents denser than `hide_dense` left out; for
    each k in `ablate` the top k are ablated (`ablation`: every token after BOS, every SAE of `saes` at once) and the
    bias is measured on the held-out sets `heldout_a`, `heldout_b` (not the ones the latents were
    picked on), next to the cost on held-out text (`side_effects`; None or 0 tokens: not measured).
    `bias_removed` is None when the model shows less than MIN_BIAS of bias to begin with,
    `log_odds_removed` when it shows less than MIN_LOG_ODDS.

    Returns `{"watch", "pick", "pool", "picked": [rows with sae_id, index, effect (attribution:
    the log-odds bias removed on the picking prompts, estimated; contrast: effect size), A's and B's
    mean max-pooled activation and firing count, density, "side": the set a latent fires more on],
    "rows": [{"n_latents", "gap_a", "gap_b", "bias", "bias_removed", "log_odds_a", "log_odds_b",
    "log_odds_bias", "log_odds_removed", "delta_lm_loss", "kl"}], "direction": `direction_kept`}`,
    the first row (k = 0) being the model as it is."""
    _check_experiment(watch, pick, ablate, heldout_a, heldout_b, side_effect_tokens)
    ids = watch_ids(model, watch)
    top = max(ablate)
    if pick == "contrast":
        picked = _separating_latents(model, saes, prompts_a, prompts_b, top, pool, densities, hide_dense)
    else:
        from gemmascope.features.contrast import check_sets

        check_sets(prompts_a, prompts_b)
        picked = _attributed_latents(model, saes, prompts_a, prompts_b, ids, top, densities, hide_dense)
    if not picked:
        raise ConfigError(
            f"no latent {'separates' if pick == 'contrast' else 'carries'} the two prompt sets: nothing to ablate"
        )
    rows = _ablation_rows(model, saes, picked, ablate, heldout_a, heldout_b, ids, side_effect_tokens)
    kept = direction_kept(model, saes, prompts_a, prompts_b, heldout_a, heldout_b)
    return {
        "watch": list(watch),
        "pick": pick,
        "pool": pool,
        "picked": picked,
        "rows": rows,
        "direction": kept,
    }
