"""Steering over HTTP: `POST /v1/steer/completion` (a default and a steered completion of one prompt,
same seed and sampling settings, with up to `limits.MAX_STEER_FEATURES` interventions) and `POST
/v1/steer/measure` (watched tokens, the cost, a sweep), with their request bodies, and `GET
/v1/feature/{sae_id}/{index}/outputs` (what turning a feature up does to the output, measured). A feature's
strength defaults to its max activation in the feature index and is bounded by `limits.strength_limit`;
the sampling defaults are `steer`'s, the bounds `limits`'. The model work waits in the model queue.

Knows nothing of how steering works: it calls `steer.fill_strengths`, `steer.generate_pair`,
`effects.measure_and_sweep` and `outputs.latent_outputs`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from gemmascope.limits import (
    MAX_FREQ_PENALTY,
    MAX_STEER_FEATURES,
    MAX_TEMPERATURE,
    MAX_WATCH,
    REQUEST_MEASURE_PROMPTS,
    REQUEST_NEW_TOKENS,
    REQUEST_PROMPT_CHARS,
    REQUEST_PROMPT_TOKENS,
    REQUEST_SIDE_EFFECT_TOKENS,
    REQUEST_SWEEP,
    strength_limit,
)
from gemmascope.server.errors import ApiError, public_message
from gemmascope.server.lookup import Body, Number, QueueDep, RunDep, feature_or_4xx, sae_or_404
from gemmascope.server.run import Run
from gemmascope.steer import (
    DEFAULT_FREQ_PENALTY,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SEED,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Intervention,
    SteeredPair,
    fill_strengths,
    generate_pair,
)

SIDE_EFFECT_TOKENS = 1024  # held-out tokens a measure request's cost is taken on by default
SWEEP_SIDE_EFFECT_TOKENS = 512  # ... and a sweep's, when the request asks for no cost
SWEEP_NEW_TOKENS = 16  # the greedy completion of each strength of a sweep

router = APIRouter()


class SteerFeature(Body):
    sae_id: str
    index: int
    strength: Number | None = None  # default: the feature's max activation
    mode: Literal["add", "clamp", "ablate"] = "add"
    # token positions to edit (0 = BOS; generated tokens count on); None: every position
    positions: list[int] | None = Field(
        None, min_length=1, max_length=REQUEST_PROMPT_TOKENS + REQUEST_NEW_TOKENS
    )


class SteerRequest(Body):
    prompt: str = Field(max_length=REQUEST_PROMPT_CHARS)
    features: list[SteerFeature] = Field(min_length=1, max_length=MAX_STEER_FEATURES)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=REQUEST_NEW_TOKENS)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0)
    seed: int = Field(DEFAULT_SEED, ge=0, le=2**31 - 1)
    freq_penalty: float = Field(DEFAULT_FREQ_PENALTY, ge=-MAX_FREQ_PENALTY, le=MAX_FREQ_PENALTY)
    normalize: bool = False  # add unit-norm decoder directions


@router.post("/v1/steer/completion")
async def steer_completion(body: SteerRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    run.check_text(body.prompt)
    interventions = [_intervention(run, feat, body.normalize) for feat in body.features]

    def work() -> SteeredPair:
        run.prompt_ids(body.prompt)
        return generate_pair(
            run.model,
            body.prompt,
            interventions,
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            seed=body.seed,
            freq_penalty=body.freq_penalty,
            top_p=body.top_p,
        )

    pair = await queue.run(work)
    return {
        "prompt": body.prompt,
        "features": [
            {
                "sae_id": feat.sae_id,
                "index": iv.latent,
                "mode": iv.mode,
                "strength": iv.value,
                "positions": feat.positions,
            }
            for feat, iv in zip(body.features, interventions, strict=True)
        ],
        "settings": body.model_dump(
            include={"max_new_tokens", "temperature", "top_p", "seed", "freq_penalty", "normalize"}
        ),
        "default": pair.default,
        "steered": pair.steered,
        "outputs": [
            {"type": "DEFAULT", "output": pair.default},
            {"type": "STEERED", "output": pair.steered},
        ],
    }


class MeasureRequest(Body):
    prompts: list[str] = Field(min_length=1, max_length=REQUEST_MEASURE_PROMPTS)
    features: list[SteerFeature] = Field(min_length=1, max_length=MAX_STEER_FEATURES)
    watch: list[str] = Field(min_length=1, max_length=MAX_WATCH)
    side_effect_tokens: int = Field(SIDE_EFFECT_TOKENS, ge=0, le=REQUEST_SIDE_EFFECT_TOKENS)  # 0: no cost
    strengths: list[Number] | None = Field(None, min_length=1, max_length=REQUEST_SWEEP)
    normalize: bool = False


@router.post("/v1/steer/measure")
async def steer_measure(body: MeasureRequest, run: RunDep, queue: QueueDep) -> dict[str, Any]:
    """Watched tokens' next-token probabilities without and with the features' interventions over
    a prompt set, the tokens gaining and losing most probability, the cost on held-out text, and
    with `strengths` a sweep (each strength applied to every add/clamp feature):
    `effects.measure_and_sweep`, as `gemmascope steer --watch`."""
    from gemmascope.effects import measure_and_sweep, watch_ids

    for prompt in body.prompts:
        run.check_text(prompt)
    interventions = [_intervention(run, feat, body.normalize) for feat in body.features]
    if body.strengths is not None:
        bad = [s for s in body.strengths if not math.isfinite(s) or abs(s) > strength_limit(None)]
        if bad:
            raise ApiError(
                400,
                f"sweep strengths {bad} are out of range: expected numbers within ±{strength_limit(None):g}",
            )

    def work() -> dict[str, Any]:
        for prompt in body.prompts:
            run.prompt_ids(prompt)
        watch_ids(run.model, body.watch)  # 400 naming a watched string that is not one token
        return measure_and_sweep(
            run.model, interventions, body.prompts, body.watch, strengths=body.strengths,
            side_effect_tokens=body.side_effect_tokens or None, sweep_side_effect_tokens=SWEEP_SIDE_EFFECT_TOKENS,
            max_new_tokens=SWEEP_NEW_TOKENS,
        )  # fmt: skip

    return await queue.run(work)


@router.get("/v1/feature/{sae_id}/{index}/outputs")
async def feature_outputs(run: RunDep, queue: QueueDep, sae_id: str, index: str) -> dict[str, Any]:
    """What turning the feature up does to the next token over neutral prompts, measured
    (`outputs.latent_outputs`: cached in the run folder after the first request; 404 when the
    index does not describe the SAE, whose max activation is the strength)."""
    from gemmascope.outputs import latent_outputs

    entry = sae_or_404(run, sae_id)
    i = feature_or_4xx(entry, index)
    reason = run.not_indexed(entry)
    if reason:
        raise ApiError(404, reason)
    out = await queue.run(lambda: latent_outputs(run.opened, entry.key, i))
    if out.get("not_cached"):
        out["not_cached"] = public_message(out["not_cached"], run.run_dir)
    return out


def _intervention(run: Run, feat: SteerFeature, normalize: bool) -> Intervention:
    """The intervention a requested feature asks for, its strength defaulted to the feature's max
    activation (400 when that is unknown) and bounded by `limits.strength_limit` (400 beyond it)."""
    entry = sae_or_404(run, feat.sae_id)
    i = feature_or_4xx(entry, feat.index)
    max_acts = run.column(entry, "max_act")
    max_act = float(max_acts[i]) if max_acts is not None else None
    positions = None if feat.positions is None else tuple(feat.positions)
    if positions is not None and any(p < 0 for p in positions):
        raise ApiError(
            400, f"positions {feat.positions} of {entry.id}#{i}: expected token indices >= 0 (0 is BOS)"
        )
    asked = Intervention(entry.sae, i, feat.mode, feat.strength, normalize, positions)
    [iv] = fill_strengths([asked], lambda _: max_act or None)
    if iv.value is None and iv.mode != "ablate":
        raise ApiError(
            400, f"give a strength for {entry.id}#{i}: its max activation (the default) is unknown"
        )
    if iv.value is not None:
        limit = strength_limit(max_act)
        if not math.isfinite(iv.value) or abs(iv.value) > limit:
            raise ApiError(
                400,
                f"strength {iv.value:g} for {entry.id}#{i} is out of range: expected a number in "
                f"-{limit:g}..{limit:g}",
            )
    return iv
