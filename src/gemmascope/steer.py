"""Steering and interventions. Owns editing SAE latents inside a running model (RECIPE.md section 6):
adding a latent's decoder direction at every position (Neuronpedia's additive steering), clamping
latents to a value and ablating them (both spliced as encode -> edit -> decode plus the SAE's error
term, so an empty edit leaves the activation bitwise unchanged), generation of a default and a steered
completion with one seed and one set of sampling settings, and the effect measures: the shift in
next-token log-probabilities and the shift of a chosen latent downstream.

Knows nothing of HTTP, of files or of the feature index: a default strength (the latent's max
activation) is handed in by the caller (`fill_strengths`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError
from gemmascope.features.encode import encode, pool_latents
from gemmascope.limits import MAX_FREQ_PENALTY, MAX_NEW_TOKENS
from gemmascope.models import LanguageModel, prompt_tokens
from gemmascope.sae import SAE, sae_site
from gemmascope.sites import Site, edit_from, edit_site, parse_site
from gemmascope.values import finite32

MODES = ("add", "clamp", "ablate")
# Sampling defaults, the one place for them (the CLI and the server take theirs from here): a little
# randomness, a mild frequency penalty against loops (Neuronpedia's steer page defaults to
# temperature 0.5, penalty 2), no nucleus cut.
DEFAULT_MAX_NEW_TOKENS = 40
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 1.0
DEFAULT_FREQ_PENALTY = 1.0
DEFAULT_SEED = 0


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit of one latent of one SAE, at the SAE's site, at every position or at `positions`.

    - `add`: `act += value * W_dec[latent]` (unit-norm direction when `normalize`), the residual
      steering of Neuronpedia; `value` is the strength (None: fill it with `fill_strengths`).
    - `clamp`: set the latent's activation to `value` and splice with the error term.
    - `ablate`: set the latent's activation to 0 and splice with the error term (`value` ignored).

    `positions` (token indices of the prompt, 0 = BOS; None = every position, generated tokens
    included) restricts the edit to those tokens, as an attribution graph's nodes are: a forward
    pass over several tokens starts counting at 0, and each later one-token pass of a generation
    continues the count, so positions past the prompt reach generated tokens too.
    """

    sae: SAE
    latent: int
    mode: str = "add"
    value: float | None = None
    normalize: bool = False
    positions: tuple[int, ...] | None = None

    def describe(self) -> str:
        where = self.sae.cfg.site or "?"
        at = "" if self.positions is None else f" at positions {','.join(map(str, self.positions))}"
        if self.mode == "ablate":
            return f"ablate {where}#{self.latent}{at}"
        verb = "add" if self.mode == "add" else "clamp"
        return f"{verb} {where}#{self.latent} {'by' if self.mode == 'add' else 'to'} {self.value:g}{at}"


def fill_strengths(
    interventions: Sequence[Intervention], default_strength: Callable[[Intervention], float | None]
) -> list[Intervention]:
    """Give every `add` or `clamp` intervention without a value the one `default_strength` returns
    for it (the CLI and server pass the latent's max activation from the feature index). Those the
    callable has no value for are left as they are; `steering` then names them."""
    filled = []
    for iv in interventions:
        if iv.value is None and iv.mode in ("add", "clamp"):
            value = default_strength(iv)
            if value is not None:
                iv = replace(iv, value=float(value))
        filled.append(iv)
    return filled


def check_intervention(model: LanguageModel, iv: Intervention) -> Site:
    """Validate one intervention against the model; return its site. Raises ConfigError (a
    `SiteError`, also a ModelError, when the SAE's site does not fit the model)."""
    if iv.mode not in MODES:
        raise ConfigError(f"unknown steering mode {iv.mode!r}: expected one of {', '.join(MODES)}")
    try:
        latent = operator.index(iv.latent)
    except TypeError:
        latent = -1
    if isinstance(iv.latent, bool) or not 0 <= latent < iv.sae.d_sae:
        raise ConfigError(
            f"latent {iv.latent!r} is out of range for the SAE at {iv.sae.cfg.site or '?'}: "
            f"expected an integer in 0..{iv.sae.d_sae - 1}"
        )
    if iv.positions is not None:
        bad = [p for p in iv.positions if isinstance(p, bool) or not isinstance(p, int) or p < 0]
        if bad or not iv.positions:
            raise ConfigError(
                f"positions {list(iv.positions)!r} of latent {iv.latent}: expected one or more token "
                "indices >= 0 (0 is BOS), or none for every position"
            )
    if iv.mode != "ablate":
        if iv.value is None:
            raise ConfigError(
                f"no {'strength' if iv.mode == 'add' else 'value'} for latent {iv.latent} at "
                f"{iv.sae.cfg.site or '?'}: give one (or a feature index, whose max activation is the default)"
            )
        finite32(iv.value, f"steering value for latent {iv.latent}")  # 1e39 is inf in a tensor
    return sae_site(model, iv.sae)


def _site_edit(
    sae: SAE, interventions: Sequence[Intervention], W_dec: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """The function `edit(source, act)` of the SAE's input `source` and the activation `act`
    `[batch, pos, d_in]` it edits (the same tensor for an SAE; for a transcoder its input site's and
    its output site's of one pass) that applies one SAE's interventions through the decoder
    `W_dec [d_sae, d_in]` of that output site (`SAE.writes`).

    Clamp/ablate: with latents `f = encode(x)` and edited latents `f'`, the spliced activation is
    `decode(f') + (x - decode(f))`. We compute it as `x + (f' - f)[:, :, idx] @ W_dec[idx]` over the
    edited latents `idx` only: equal in exact arithmetic, cheaper for wide SAEs, and a position whose
    latents did not change gets exactly `x` back (no rounding from subtracting and re-adding x̂).
    Then the additive steering vectors are added (to the spliced activation). Each intervention acts
    at its `positions` only (all when None); the count of positions starts again at every forward
    pass over more than one token (a new prompt) and runs on over one-token passes (generation).
    """
    W_dec = W_dec.detach()
    splice = [iv for iv in interventions if iv.mode in ("clamp", "ablate")]
    adds = [iv for iv in interventions if iv.mode == "add"]
    idx = sorted({iv.latent for iv in splice})
    column = {latent: j for j, latent in enumerate(idx)}
    idx_t = torch.tensor(idx, dtype=torch.long, device=W_dec.device)
    offset = [0]  # the absolute position of this pass's first token

    def where(iv: Intervention, start: int, length: int) -> Tensor:
        """`[length]` bool: which of this pass's positions the intervention edits."""
        if iv.positions is None:
            return torch.ones(length, dtype=torch.bool, device=W_dec.device)
        at = torch.tensor([p - start for p in iv.positions if start <= p < start + length], dtype=torch.long)
        return torch.zeros(length, dtype=torch.bool, device=W_dec.device).index_fill(
            0, at.to(W_dec.device), True
        )

    def edit(source: Tensor, act: Tensor) -> Tensor:
        length = act.shape[1]
        if length > 1:
            offset[0] = 0
        start = offset[0]
        offset[0] += length
        out = act
        if splice:
            # Later edits of the same latent win where they overlap, as if applied one after the other.
            target = torch.full((length, len(idx)), math.nan, dtype=W_dec.dtype, device=W_dec.device)
            for iv in splice:
                value = 0.0 if iv.mode == "ablate" else float(iv.value or 0.0)
                target[where(iv, start, length), column[iv.latent]] = value
            with torch.no_grad():
                # every position is edited (BOS too): the splice is exact, so no mask (encode_inputs) here
                f_old = sae.encode(source.to(W_dec.dtype))[..., idx_t]  # [batch, pos, n_edit]
                change = torch.where(target.isnan(), torch.zeros_like(f_old), target - f_old)
                out = out + (change @ W_dec[idx_t]).to(act.dtype)
        if adds:
            steer = torch.zeros(length, W_dec.shape[1], dtype=W_dec.dtype, device=W_dec.device)  # [pos, d_in]
            for iv in adds:
                direction = W_dec[iv.latent]
                if iv.normalize:  # by the latent's whole write (a CLT layer's parts: their sum, `W_dec`)
                    direction = direction / sae.W_dec[iv.latent].detach().norm().clamp_min(1e-12)
                steer += where(iv, start, length)[:, None] * (float(iv.value or 0.0) * direction)
            out = out + steer.to(act.dtype)
        return out

    return edit


def _on_itself(edit: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """An SAE's edit reads the activation it edits."""
    return lambda act: edit(act, act)


@contextmanager
def steering(model: LanguageModel, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Within the block, every forward pass of `model` (prompt and generated tokens alike) runs with
    the interventions applied at their SAEs' sites. Several latents and several SAEs may be given;
    one hook per SAE, stacked in the order the SAEs first appear. All are validated before any hook
    is placed, and every hook is removed on exit, also when the body raises. A transcoder's latents
    are read at its input site and edited where it writes (its layer's MLP output; a CLT layer's,
    every later layer's MLP output by its part: `SAE.writes`)."""
    groups: dict[int, tuple[SAE, Site, list[Intervention]]] = {}
    for iv in interventions:
        site = check_intervention(model, iv)
        groups.setdefault(id(iv.sae), (iv.sae, site, []))[2].append(iv)
    with ExitStack() as stack:
        for sae, site, ivs in groups.values():
            if not sae.is_transcoder:
                stack.enter_context(edit_site(model, site, _on_itself(_site_edit(sae, ivs, sae.W_dec))))
                continue
            for out_site, W_dec in sae.writes():
                edit = _site_edit(sae, ivs, W_dec)
                stack.enter_context(edit_from(model, site, parse_site(out_site, model.n_layers), edit))
        yield


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass
class SamplingSettings:
    """How completions are sampled; the default and the steered run share one."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = DEFAULT_TOP_P
    freq_penalty: float = DEFAULT_FREQ_PENALTY  # subtracted from a token's logit once per earlier occurrence
    seed: int = DEFAULT_SEED

    def check(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS:
            raise ConfigError(
                f"max_new_tokens={self.max_new_tokens!r} is out of range: expected 1..{MAX_NEW_TOKENS}"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(
                f"temperature={self.temperature!r} is invalid: expected a finite number >= 0 (0 = greedy)"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p!r} is invalid: expected 0 < top_p <= 1")
        if not (math.isfinite(self.freq_penalty) and abs(self.freq_penalty) <= MAX_FREQ_PENALTY):
            raise ConfigError(
                f"freq_penalty={self.freq_penalty!r} is invalid: expected a number in "
                f"-{MAX_FREQ_PENALTY:g}..{MAX_FREQ_PENALTY:g}"
            )


@dataclass
class SteeredPair:
    """A prompt's default and steered completions, sampled with the same settings and seed."""

    prompt: str
    default: str
    steered: str
    interventions: list[str]
    settings: SamplingSettings
    default_ids: list[int] = field(default_factory=list)
    steered_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stop_ids(model: LanguageModel) -> set[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    for value in (model.tokenizer.eos_token_id, eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _next_token(
    logits: Tensor, counts: Tensor, settings: SamplingSettings, generator: torch.Generator
) -> int:
    """Pick the next token from `logits [vocab]` given `counts [vocab]` of the tokens so far."""
    logits = logits.double()
    if settings.freq_penalty:
        logits = logits - settings.freq_penalty * counts
    if settings.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the most likely token)
        keep = (sorted_probs.cumsum(0) - sorted_probs) < settings.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    # inverse-CDF draw: one uniform number per step (cheaper than multinomial over a 262k vocabulary)
    cdf = probs.cumsum(0)
    u = (1 - torch.rand(1, generator=generator, dtype=cdf.dtype)) * cdf[
        -1
    ]  # in (0, total]: never a p=0 token
    return int(torch.searchsorted(cdf, u).clamp_max(cdf.shape[0] - 1))


@torch.no_grad()
def sample(model: LanguageModel, input_ids: Tensor, settings: SamplingSettings) -> list[int]:
    """Sample up to `settings.max_new_tokens` after `input_ids [1, T]` with a KV cache, stopping
    at EOS; the random draws come from a generator seeded with `settings.seed` alone, so two runs
    with the same settings draw the same numbers. The frequency penalty counts every token of the
    sequence so far, prompt included (as TransformerLens, which Neuronpedia uses, does)."""
    settings.check()
    if input_ids.shape[1] + settings.max_new_tokens > model.max_context:
        raise ConfigError(
            f"prompt ({input_ids.shape[1]} tokens) plus max_new_tokens={settings.max_new_tokens} exceeds "
            f"the model's context of {model.max_context} tokens"
        )
    generator = torch.Generator(device="cpu").manual_seed(int(settings.seed))
    stop = _stop_ids(model)
    out = model.hf(input_ids=input_ids, use_cache=True)
    counts = torch.bincount(input_ids[0].cpu(), minlength=out.logits.shape[-1]).double()  # [vocab]
    new: list[int] = []
    for _ in range(settings.max_new_tokens):
        token = _next_token(out.logits[0, -1].cpu(), counts, settings, generator)
        new.append(token)
        if token in stop:
            break
        counts[token] += 1
        next_ids = torch.tensor([[token]], dtype=torch.long, device=input_ids.device)
        out = model.hf(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
    return new


def _decode(model: LanguageModel, ids: list[int]) -> str:
    return str(model.tokenizer.decode(ids, skip_special_tokens=True))


def generate_pair(
    model: LanguageModel,
    prompt: str,
    interventions: Sequence[Intervention],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = DEFAULT_SEED,
    freq_penalty: float = DEFAULT_FREQ_PENALTY,
    top_p: float = DEFAULT_TOP_P,
) -> SteeredPair:
    """The default and the steered completion of one prompt, same seed and sampling settings,
    side by side. Interventions are validated before anything runs."""
    settings = SamplingSettings(max_new_tokens, temperature, top_p, freq_penalty, seed)
    settings.check()
    for iv in interventions:
        check_intervention(model, iv)
    ids = prompt_tokens(model, prompt)
    default_ids = sample(model, ids, settings)
    with steering(model, interventions):
        steered_ids = sample(model, ids, settings)
    return SteeredPair(
        prompt=prompt,
        default=_decode(model, default_ids),
        steered=_decode(model, steered_ids),
        interventions=[iv.describe() for iv in interventions],
        settings=settings,
        default_ids=default_ids,
        steered_ids=steered_ids,
    )


# ---------------------------------------------------------------------------------------------
# Effect measures


@torch.no_grad()
def next_token_logprobs(
    model: LanguageModel, prompt: str, interventions: Sequence[Intervention] = ()
) -> Tensor:
    """Log-probabilities `[vocab]` of the token after `prompt`, with the interventions applied."""
    ids = prompt_tokens(model, prompt)
    with steering(model, interventions):
        logits = model.hf(input_ids=ids, use_cache=False).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def logprob_shift(
    model: LanguageModel, prompt: str, interventions: Sequence[Intervention], k: int = 10
) -> dict[str, Any]:
    """How the interventions move the next-token distribution after `prompt`: the `k` tokens whose
    log-probability rose most and the `k` that fell most (each with clean and steered log-prob and
    the change), the KL divergence KL(clean ‖ steered) in nats, and the top token before and after."""
    if isinstance(k, bool) or not 1 <= k <= 1000:
        raise ConfigError(f"k={k!r} is out of range: expected 1..1000")
    for iv in interventions:
        check_intervention(model, iv)
    clean = next_token_logprobs(model, prompt)
    steered = next_token_logprobs(model, prompt, interventions)
    diff = steered - clean

    def rows(order: Tensor) -> list[dict[str, Any]]:
        return [
            {
                "token": model.tokenizer.decode([int(i)]),
                "token_id": int(i),
                "clean_logprob": float(clean[i]),
                "steered_logprob": float(steered[i]),
                "delta": float(diff[i]),
            }
            for i in order
        ]

    kl = float((clean.exp() * (clean - steered)).sum())
    return {
        "prompt": prompt,
        "interventions": [iv.describe() for iv in interventions],
        "rose": rows(diff.topk(k).indices),
        "fell": rows((-diff).topk(k).indices),
        "kl": kl,
        "top_clean": rows(clean.topk(1).indices)[0],
        "top_steered": rows(steered.topk(1).indices)[0],
    }


@torch.no_grad()
def latent_shift(
    model: LanguageModel, prompt: str, interventions: Sequence[Intervention], sae: SAE, latent: int
) -> dict[str, Any]:
    """How the interventions change latent `latent` of `sae` (usually one at a later site) on each
    token of `prompt`: clean and steered activations per token `[T]` (read as `features.encode`
    reads them: zero at BOS and where the input is massive) and their means over the positions kept."""
    site = check_intervention(model, Intervention(sae, latent, "ablate"))
    for iv in interventions:
        check_intervention(model, iv)

    def acts() -> tuple[list[int], Tensor, Tensor]:
        enc = encode(model, {"sae": sae}, [prompt])
        return enc.ids[0], enc.latents["sae"][0][:, latent : latent + 1].double(), enc.keep["sae"][0]

    ids, clean, keep = acts()
    with steering(model, interventions):
        _, steered, _ = acts()
    mean_clean, mean_steered = (float(pool_latents(f, keep, "mean")[0]) for f in (clean, steered))
    return {
        "prompt": prompt,
        "site": str(site),
        "latent": latent,
        "interventions": [iv.describe() for iv in interventions],
        "tokens": [model.tokenizer.decode([t]) for t in ids],
        "clean": clean[:, 0].tolist(),
        "steered": steered[:, 0].tolist(),
        "mean_clean": mean_clean,
        "mean_steered": mean_steered,
        "delta_mean": mean_steered - mean_clean,
    }
