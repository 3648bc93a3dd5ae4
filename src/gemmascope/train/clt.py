"""Training a cross-layer transcoder (`clt.CrossLayerTranscoder`) from ONE harvest of every layer's
MLP input and output (the suite's transcoder harvest, `mlp_in.L` and `mlp_out.L` for every L):
`CLTSpec` (what to train), `train_clt` (the run: batches of all 2·n_layers sites at the same tokens,
each divided by its own scale C; the recipe of our transcoders where it carries over, measured the
same way on held-out tokens; the saved, folded CLT under `clts/` of the run folder).

The recipe (RECIPE.md, "SAEs worth reading", carried over to a CLT): sign descent with schedule-free
averaging (`optim.ScheduleFreeSign`: encoders and decoders at lr, every latent's decoders over all the
layers it writes kept at unit norm as one row, each decoder column started and stepped in proportion
to the spread of the output dimension it writes, `_column_scales`, and the decoders into later
layers started at 0; thresholds at a tenth of lr over a floor), b_enc
fixed at 0, b_in and b_dec at the data means, the affine skip per layer fitted by ridge regression
on the first batch and then fixed, thresholds started where each layer fires `target_l0` latents per
token, Gemma Scope 2's quadratic target-L0 penalty on each layer's L0 (the L0 counts a latent once
however many layers it writes: a JumpReLU L0 is blind to decoder norms, so the decoder-norm weighting
an L1-type CLT penalty needs does not arise; `CLTSpec.penalty="tanh"`: Anthropic's tanh penalty instead,
`_Tanh`), and the pre-activation loss on latents silent for the
dead window, and at the end the decoder refit (`refit_clt`: each layer's own decoder, skip and bias
re-solved by least squares given the earlier layers' writes). A checkpoint every
`CLTSpec.checkpoint_every` steps and at the end (`train.checkpoint.Checkpoint`, under
`checkpoints/clt_width_W_target_T[_tanh]/`): the same call resumes a killed run to the same weights, and
returns a finished one's folder without training. Not (yet) carried over: the dense penalty.

Knows nothing of files beyond `formats.clt`, the activation store and its own checkpoints (and the
`clt.json` of a folder it may have saved before it was killed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.activations import ActivationStore
from gemmascope.architectures.jumprelu import THRESHOLD_FLOOR
from gemmascope.clt import CLTConfig, CLTTerms, CrossLayerTranscoder, clt_terms, fold_scales, stack_sites
from gemmascope.errors import ConfigError, StoreError
from gemmascope.formats.clt import CLT_JSON, save_clt
from gemmascope.models import MODEL_DTYPES, reading_dtype
from gemmascope.runs import CHECKPOINTS, CLTS, HELDOUT, free_folder
from gemmascope.sites import Site
from gemmascope.train.checkpoint import Checkpoint
from gemmascope.train.init import fit_skip
from gemmascope.train.optim import ScheduleFreeSign
from gemmascope.train.recipe import HELDOUT_TOKENS, SHORT_RUN
from gemmascope.train.refit import refit_clt

CLT_PENALTIES = ("l0", "tanh")
TANH_START, TANH_STEER = 1e-6, 0.5  # the tanh penalty's λ at first, and its step towards the target L0


@dataclass(frozen=True)
class CLTSpec:
    """One CLT to train: `width` latents per layer, `target_l0` active latents per token per layer,
    on `tokens` training tokens (None: one epoch of the store), with the per-layer affine skip."""

    width: int = 2048
    target_l0: float = 45.0
    tokens: int | None = None
    affine_skip: bool = True
    batch_size: int = 1024
    lr: float = SHORT_RUN.lr_signum_transcoder
    threshold_lr_ratio: float = SHORT_RUN.threshold_lr_ratio
    bandwidth: float = SHORT_RUN.bandwidth
    target_l0_coeff: float = SHORT_RUN.target_l0_coeff
    dead_preact_coeff: float = SHORT_RUN.dead_preact_coeff
    dead_window_tokens: int = SHORT_RUN.dead_window_tokens
    buffer_tokens: int = 2**14  # shuffling buffer, per site (36 sites: 1.5 GB at d_model 640)
    refit_tokens: int = SHORT_RUN.refit_tokens  # the decoder refit after training (`refit_clt`; 0: off)
    seed: int = 0
    # "l0": Gemma Scope 2's quadratic target-L0 penalty per layer; "tanh": Anthropic's λ Σ tanh(c·‖W_dec‖·a)
    # per layer, λ steered to the target L0 (`_Tanh`)
    penalty: str = "l0"
    step_dtype: str = "auto"  # the steps' encoder products, as `TrainConfig.step_dtype`
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end), for resume

    def check(self) -> None:
        """A ConfigError naming the first value out of range."""
        if not isinstance(self.width, int) or self.width < 1:
            raise ConfigError(f"CLT width {self.width!r} must be a positive integer")
        if not 0 < self.target_l0 < self.width:
            raise ConfigError(
                f"CLT target L0 {self.target_l0!r} must be > 0 and below the width {self.width}"
            )
        if not isinstance(self.refit_tokens, int) or self.refit_tokens < 0:
            raise ConfigError(
                f"CLT refit_tokens {self.refit_tokens!r} must be 0 (no refit) or a number of tokens"
            )
        for name in ("batch_size", "buffer_tokens", "dead_window_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CLT {name} {getattr(self, name)!r} must be at least 1")
        if self.tokens is not None and self.tokens < self.batch_size:
            raise ConfigError(f"CLT tokens {self.tokens} must be at least one batch ({self.batch_size})")
        if self.step_dtype not in MODEL_DTYPES:
            raise ConfigError(
                f"CLT step_dtype {self.step_dtype!r}: expected one of {', '.join(MODEL_DTYPES)}"
            )
        if self.penalty not in CLT_PENALTIES:
            raise ConfigError(f"CLT penalty {self.penalty!r}: expected one of {', '.join(CLT_PENALTIES)}")
        for name in ("lr", "threshold_lr_ratio", "bandwidth"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CLT {name} {getattr(self, name)!r} must be > 0")

    def checkpoint_name(self) -> str:
        """Its checkpoint's folder under `checkpoints/` (one unfinished CLT per width, target and penalty)."""
        return f"clt_width_{self.width}_target_{self.target_l0:g}" + (
            "" if self.penalty == "l0" else f"_{self.penalty}"
        )

    def folder(self, l0: float) -> str:
        """The CLT's folder in the run, named by its held-out L0 per layer as SAEs are."""
        suffix = ("_skip" if self.affine_skip else "") + ("" if self.penalty == "l0" else f"_{self.penalty}")
        return f"{CLTS}/width_{self.width}/l0_{round(l0)}{suffix}"


def mlp_sites(store: ActivationStore) -> tuple[list[Site], list[Site]]:
    """Every layer's `mlp_in` and `mlp_out` sites of the store, or a StoreError naming what is missing:
    a CLT needs both at every layer from 0 to the deepest harvested."""
    have = set(store.sites)
    layers = [s.layer for s in store.sites if s.kind in ("mlp_in", "mlp_out")]
    if not layers:
        raise StoreError(
            f"store {str(store.root)!r} holds no MLP sites: a CLT trains on mlp_in.L and mlp_out.L of every "
            "layer (harvest them with `gemmascope suite RUN --clt` or `harvest --sites mlp_in,mlp_out`)"
        )
    n = max(layers) + 1
    ins = [Site("mlp_in", layer) for layer in range(n)]
    outs = [Site("mlp_out", layer) for layer in range(n)]
    missing = [str(s) for s in ins + outs if s not in have]
    if missing:
        raise StoreError(
            f"store {str(store.root)!r} lacks {', '.join(missing)}: a CLT needs every layer's MLP input and output"
        )
    return ins, outs


def train_clt(
    run_dir: Path | str, spec: CLTSpec, device: str = "cpu", progress: bool = True, restart: bool = False
) -> Path:
    """Train one CLT on the run's harvest of every layer's MLP input and output, measure it on the
    run's held-out harvest (FVU of each layer's MLP output, L0 and dead per layer), fold the input
    scales in and save it (Gemma Scope 2's per-layer files and circuit-tracer's, `formats.clt`).
    Returns its folder. Called again after a kill it resumes from its last checkpoint (the weights
    of an uninterrupted run); a finished run returns its folder; an unfinished checkpoint of another
    spec or harvest is an error unless `restart` discards it."""
    spec.check()
    run_dir = Path(run_dir)
    store = ActivationStore(run_dir)
    ins, outs = mlp_sites(store)
    n = len(ins)
    available = min(int(store.manifest(s)["n_tokens_non_special"]) for s in ins + outs)
    per_epoch = available // spec.batch_size
    if per_epoch < 1:
        raise StoreError(
            f"the store holds {available} usable tokens, less than one batch ({spec.batch_size})"
        )
    spec = _resolved(spec, device)  # its step_dtype for the device (auto: bfloat16 where native)
    key = _run_key(store, ins + outs, spec)
    ckpt = Checkpoint(run_dir / CHECKPOINTS / spec.checkpoint_name(), key, CLT_JSON)
    done = ckpt.finished_outputs()
    if done is not None:
        return done[0]
    resumed = ckpt.load(restart)
    steps = (available if spec.tokens is None else spec.tokens) // spec.batch_size
    epochs = -(-steps // per_epoch)
    batches = store.batches(ins + outs, spec.batch_size, spec.seed, spec.buffer_tokens, epochs, scaled=True)

    torch.manual_seed(spec.seed)
    d_model = int(store.manifest(ins[0])["d_in"])
    clt = CrossLayerTranscoder(CLTConfig(n, d_model, spec.width, store.model_name, spec.affine_skip))
    clt = clt.to(device)
    first = next(batches)
    xs, ys = stack_sites(first, ins, device), stack_sites(first, outs, device)
    _init(clt, xs, ys, spec)
    tanh = _Tanh.start(clt, xs) if spec.penalty == "tanh" else None  # c from the start, as the run began
    opt = _optimizer(clt, spec, ys)
    last_fired = torch.zeros(n, spec.width, dtype=torch.long, device=device)
    start, log = _restore(resumed, clt, opt, last_fired, tanh)
    del resumed  # its copy of the weights
    for _ in range(start - 1 if start < steps else 0):  # batches 1..start-1 were stepped on (0 started it)
        next(batches)
    started = time.perf_counter()
    bar = tqdm(
        total=steps, initial=start, desc=f"train CLT ({n} layers x {spec.width})", disable=not progress
    )
    for step_index in range(start, steps):
        if step_index > 0:
            batch = next(batches, None)
            if batch is None:
                raise StoreError(
                    f"the activation store gave {step_index} batches, fewer than the {steps} planned"
                )
            xs, ys = stack_sites(batch, ins, device), stack_sites(batch, outs, device)
        row = _step(clt, opt, xs, ys, spec, last_fired, step_index, tanh, getattr(torch, spec.step_dtype))
        if step_index % 10 == 0 or step_index == steps - 1:
            log.append(row)
            bar.set_postfix_str(f"L0 {row['l0_mean']:.0f} FVU {row['fvu_mean']:.3f}")
        bar.update(1)
        if (step_index + 1) % spec.checkpoint_every == 0 or step_index + 1 == steps:
            state = {"clt": clt.state_dict(), "optimizer": opt.state_dict(), "last_fired": last_fired}
            ckpt.save(step_index + 1, [{**state, "log": log, **({"tanh_lambda": tanh.lam} if tanh else {})}])
    bar.close()
    trained = {"steps": steps, "train_seconds": round(time.perf_counter() - started, 1)}
    trained |= {"l0_last_step": log[-1]["l0_mean"]} | ({"resumed_at_step": start} if start else {})
    # training is over: the average goes into the parameters for good and the optimiser's copies
    # (three more of every weight) are freed before the held-out pass
    opt.zero_grad(set_to_none=True)
    opt.swap_in_average()
    opt.state.clear()
    del opt
    del batches, first, xs, ys  # the training reader's shuffle buffer and shards (GBs at 36 sites) too
    folded = fold_scales(clt, [store.scale(s) for s in ins], [store.scale(s) for s in outs])
    folder = _save(folded, store, spec, ckpt.key, trained, progress)
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    ckpt.finish([folder])
    return folder


def _restore(
    resumed: dict[str, Any] | None,
    clt: CrossLayerTranscoder,
    opt: ScheduleFreeSign,
    last_fired: Tensor,
    tanh: _Tanh | None,
) -> tuple[int, list[dict[str, Any]]]:
    """The training state of a checkpoint put back in place (weights, optimiser, firing record, the
    tanh penalty's λ, the RNG); returns the steps it had done and its log (0 and [] without one)."""
    if resumed is None:
        return 0, []
    [state] = resumed["trainees"]
    clt.load_state_dict(state["clt"])
    opt.load_state_dict(state["optimizer"])
    last_fired.copy_(state["last_fired"])
    if tanh is not None:
        tanh.lam.copy_(state["tanh_lambda"])
    torch.set_rng_state(resumed["torch_rng"])
    return int(resumed["step"]), list(state["log"])


def _save(
    folded: CrossLayerTranscoder,
    store: ActivationStore,
    spec: CLTSpec,
    key: str,
    trained: dict[str, Any],
    progress: bool = True,
) -> Path:
    """Measure the trained, folded CLT on the held-out harvest, save it (named by its held-out L0),
    then refit its decoders, measure and save it again; returns its folder."""
    run_dir, (ins, outs) = store.run_dir, mlp_sites(store)
    before = measure_heldout(folded, run_dir, ins, outs)
    l0 = float(sum(before["l0"]) / len(ins)) if before else trained["l0_last_step"]  # the refit keeps codes
    folder, ours = free_folder(run_dir / spec.folder(l0), lambda f: _saved_by(f, key))
    folded.cfg.extra = {
        "spec": asdict(spec), **trained, "train_tokens": trained["steps"] * spec.batch_size,
        "heldout": before, "store": str(store.root), "decoder_refit_tokens": 0, "train_key": _digest(key),
    }  # fmt: skip
    save_clt(folded, folder, replace=ours)  # saved as trained first: a refit that fails loses nothing
    if spec.refit_tokens:  # on the raw activations the folded CLT reads
        started = time.perf_counter()
        refit = refit_clt(
            folded, lambda: store.batches(ins + outs, 4096, spec.seed, spec.buffer_tokens),
            min(spec.refit_tokens, trained["steps"] * spec.batch_size), progress,
        )  # fmt: skip
        if refit:
            folded.cfg.extra.update(
                heldout=measure_heldout(folded, run_dir, ins, outs), heldout_before_refit=before,
                decoder_refit_tokens=refit, refit_seconds=round(time.perf_counter() - started, 1),
            )  # fmt: skip
            save_clt(folded, folder, replace=True)
    return folder


def _digest(key: str) -> str:
    """A run key's short fingerprint, kept in the CLT it saves (`_saved_by`)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _saved_by(folder: Path, key: str) -> bool:
    """Whether `folder` holds the CLT this very run saved before it was killed (its run key's digest)."""
    try:
        return bool(json.loads((folder / CLT_JSON).read_text())["extra"]["train_key"] == _digest(key))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or not a CLT we can read: left alone


def _resolved(spec: CLTSpec, device: str) -> CLTSpec:
    """`spec` with its `step_dtype` as the device takes it (`models.reading_dtype`)."""
    return dataclasses.replace(
        spec, step_dtype=str(reading_dtype(spec.step_dtype, device)).removeprefix("torch.")
    )


def _run_key(store: ActivationStore, sites: list[Site], spec: CLTSpec) -> str:
    """What makes two CLT runs the same run: the spec (not how often it checkpoints; its step_dtype
    as resolved, float32 left out as runs before it keep their key) and the data."""
    settings = {k: v for k, v in asdict(spec).items() if k != "checkpoint_every"}
    if settings["step_dtype"] == "float32":
        del settings["step_dtype"]
    data = {str(s): [e["sha256"] for e in store.manifest(s)["shards"]] for s in sites}
    return json.dumps({"config": settings, "data": data}, sort_keys=True)


def _init(clt: CrossLayerTranscoder, xs: Tensor, ys: Tensor, spec: CLTSpec) -> None:
    """The recipe's start on a first batch `xs`, `ys [n, B, d]` (already / C): unit decoder rows,
    random into the latent's own layer (each dimension by its spread, `_column_scales`) and 0 into
    later layers, encoder columns at the sign optimiser's norm, b_in and b_dec at the means, the skip by
    ridge regression, each layer's thresholds where `target_l0` of its latents fire per token."""
    scales = _column_scales(ys)
    with torch.no_grad():
        for s in range(clt.n_layers):
            w_dec = torch.randn_like(clt.W_dec[s]) * scales[s:].flatten()
            w_dec[:, clt.cfg.d_model :] = 0  # later layers are written where training finds it pays
            clt.W_dec[s].copy_(w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            w_enc = torch.randn_like(clt.W_enc[s])
            clt.W_enc[s].copy_(w_enc / w_enc.norm(dim=0) * SHORT_RUN.signum_enc_init_norm)
            clt.b_in[s].copy_(xs[s].mean(0))
            clt.b_dec[s].copy_(ys[s].mean(0))
            if clt.W_skip is not None:
                w_skip, bias = fit_skip(xs[s], ys[s])
                clt.W_skip[s].copy_(w_skip)
                clt.b_dec[s].copy_(bias)
            pre = clt.pre_acts(s, xs[s])  # [B, width]
            k = min(pre.shape[0] - 1, max(1, round(spec.target_l0 / clt.width * pre.shape[0])))
            top = pre.topk(k + 1, dim=0).values
            clt.threshold[s].copy_((0.5 * (top[k - 1] + top[k])).clamp_min(THRESHOLD_FLOOR))


def _optimizer(clt: CrossLayerTranscoder, spec: CLTSpec, ys: Tensor) -> ScheduleFreeSign:
    """Sign descent over the encoders, the decoders (unit rows) and the thresholds (a tenth of lr,
    kept over the floor); b_enc, b_dec and the skip fixed. Each decoder column steps by the spread
    of the output dimension it writes on the first batch `ys [n, B, d]`, over its layer's mean
    spread (`_column_scales`)."""
    for p in [*clt.b_enc, clt.b_dec] + ([clt.W_skip] if clt.W_skip is not None else []):
        p.requires_grad_(False)
    threshold_lr = spec.lr * spec.threshold_lr_ratio
    scales = _column_scales(ys)
    groups: list[dict[str, Any]] = [
        {"params": list(clt.W_enc), "lr": spec.lr},
        # a sign step moves each of a row's (n − s)·d elements by lr times its column's scale (mean 1
        # over a layer): at lr / √(n − s) the row of a latent writing n − s layers moves about as
        # far per step as a one-layer transcoder's does
        *(
            {
                "params": [w],
                "lr": spec.lr / (clt.n_layers - s) ** 0.5,
                "unit_rows": True,
                "scale": scales[s:].flatten(),
            }
            for s, w in enumerate(clt.W_dec)
        ),
        {"params": list(clt.threshold), "lr": threshold_lr, "floor": THRESHOLD_FLOOR},
    ]
    return ScheduleFreeSign(groups, lr=spec.lr)


def _column_scales(ys: Tensor) -> Tensor:
    """`[n, d]`: each layer's MLP-output dimensions' standard deviations on `ys [n, B, d]`, over
    their layer's mean. Plain sign descent moves every decoder element alike, so the decoders into
    later layers (which the decoder refit leaves as trained) carried the same noise into every
    dimension: where the output barely varies that noise was 100 times the signal, and in Gemma 3
    those are the dimensions the final norm multiplies by up to 300 (BENCHMARKS, "The CLT's
    decoder noise")."""
    spread = ys.float().std(1, unbiased=False)  # [n, d]
    mean = spread.mean(1, keepdim=True)
    # a layer that does not vary at all on the batch (or a batch of one token): plain steps
    return torch.where(mean > 0, spread / mean.clamp_min(1e-30), torch.ones_like(spread))


def _step(
    clt: CrossLayerTranscoder,
    opt: ScheduleFreeSign,
    xs: Tensor,
    ys: Tensor,
    spec: CLTSpec,
    last_fired: Tensor,
    step_index: int,
    tanh: _Tanh | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """One optimiser step (the `tanh` penalty's, else the quadratic target-L0's) with the encoder
    products in `dtype`; updates `last_fired [n, width]` (the last step each latent fired)."""
    terms = clt_terms(clt, xs, ys, spec.bandwidth, tanh.c if tanh else None, dtype)
    if tanh is None:
        sparsity = spec.target_l0_coeff * (terms.l0 / spec.target_l0 - 1).pow(2).sum()
    else:
        sparsity = tanh.loss(terms, spec.target_l0)
    last_fired[terms.fired > 0] = step_index
    dead = (step_index - last_fired) * xs.shape[1] >= spec.dead_window_tokens  # [n, width]
    extra: Tensor | float = 0.0
    if spec.dead_preact_coeff and bool(dead.any()):
        extra = spec.dead_preact_coeff * _dead_preact_loss(clt, xs, dead)
    loss = terms.recon + sparsity + extra
    if not torch.isfinite(loss):
        raise FloatingPointError(f"CLT training diverged at step {step_index}: loss {float(loss)}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    variance = (ys - ys.mean(1, keepdim=True)).pow(2).sum(-1).mean(1)  # [n]
    fvu = terms.errors / variance
    return {
        "step": step_index, "loss": loss.item(), "l0_mean": terms.l0.mean().item(),
        "fvu_mean": float(fvu.mean()), "fvu": [round(float(v), 4) for v in fvu],
        "dead": int(dead.sum()),
    }  # fmt: skip


@dataclass
class _Tanh:
    """Anthropic's CLT sparsity penalty, Σₗ λₗ Σᵢ tanh(cₗ ‖W_dec,ᵢ‖ aᵢ) (decoder rows are unit
    norm here, so ‖W_dec,ᵢ‖ = 1): cₗ = 1 / layer l's median active value on the first batch (tanh
    neither flat nor saturated), λₗ steered each step by exp(TANH_STEER (L0ₗ / target − 1)), so the
    run ends at the target L0 as the quadratic penalty's does and the two compare at one L0."""

    c: Tensor  # [n_layers]
    lam: Tensor  # [n_layers]

    @classmethod
    @torch.no_grad()
    def start(cls, clt: CrossLayerTranscoder, xs: Tensor) -> _Tanh:
        scales = []
        for s in range(clt.n_layers):
            acts = clt.encode(s, xs[s])
            scales.append(1 / acts[acts > 0].median().clamp_min(1e-6))
        return cls(torch.stack(scales), torch.full((clt.n_layers,), TANH_START, device=xs.device))

    def loss(self, terms: CLTTerms, target_l0: float) -> Tensor:
        out = (self.lam.clone() * terms.tanh).sum()  # λ moves below, after its use
        self.lam.mul_(torch.exp(TANH_STEER * (terms.l0.detach() / target_l0 - 1)))
        return out


def _dead_preact_loss(clt: CrossLayerTranscoder, xs: Tensor, dead: Tensor) -> Tensor:
    """Σ over layers of the batch mean of Σᵢ ReLU(θᵢ − preᵢ) over that layer's `dead [n, width]`
    latents (Anthropic's pre-activation loss): pulls silent latents back until they fire."""
    total: Tensor | float = 0.0
    for s in range(clt.n_layers):
        index = dead[s].nonzero().squeeze(1)
        if index.numel():
            pre = (xs[s] - clt.b_in[s]) @ clt.W_enc[s][:, index] + clt.b_enc[s][index]
            total = total + torch.relu(clt.threshold[s][index] - pre).sum(-1).mean()
    assert isinstance(total, Tensor)
    return total


@torch.no_grad()
def measure_heldout(
    clt: CrossLayerTranscoder, run_dir: Path, ins: list[Site], outs: list[Site], tokens: int = HELDOUT_TOKENS
) -> dict[str, Any] | None:
    """Per layer on up to `tokens` held-out tokens of `run_dir/heldout` (raw activations: `clt` is the
    folded CLT as saved): the FVU of the MLP output, the L0 and the share of latents that never
    fired; None without a held-out harvest of every site."""
    try:
        store = ActivationStore(run_dir / HELDOUT)
        store.manifest(ins[0])
        for s in ins + outs:
            store.manifest(s)
    except (StoreError, KeyError):
        return None
    n = clt.n_layers
    sq_err, sq_dev, l0 = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    fired = torch.zeros(n, clt.width, dtype=torch.bool)
    seen = 0
    for batch in store.batches(ins + outs, 1024, seed=0, buffer_tokens=2**13):
        xs, ys = (
            stack_sites(batch, ins, str(clt.b_dec.device)),
            stack_sites(batch, outs, str(clt.b_dec.device)),
        )
        acts = [clt.encode(s, xs[s]) for s in range(n)]
        for t in range(n):
            y_hat = clt.decode(t, acts) + clt.skip(t, xs[t])
            sq_err[t] += float((ys[t] - y_hat).pow(2).sum())
            sq_dev[t] += float((ys[t] - ys[t].mean(0)).pow(2).sum())
            l0[t] += float((acts[t] > 0).sum())
            fired[t] |= (acts[t] > 0).any(0).cpu()
        seen += xs.shape[1]
        if seen >= tokens:
            break
    if seen == 0:
        return None
    return {
        "tokens": seen,
        "fvu": [round(float(v), 5) for v in sq_err / sq_dev],
        "l0": [round(float(v), 2) for v in l0 / seen],
        "dead": [round(float(v), 4) for v in 1 - fired.float().mean(1)],
    }
