"""EleutherAI sparsify's TopK SAE as a baseline for `benchmarks/quality.py`, trained by sparsify's own
`Trainer` with its own defaults on activations we harvested, and handed back in our TopK layout.

    from sparsify_baseline import train_sparsify_topk
    state, info = train_sparsify_topk(x, k=45, width=4096)     # x [n_tokens, d_in], raw, shuffled
    sae = TopKSAE(SAEConfig("topk", d_in, 4096, k=45)); sae.load_state_dict(state)

    python benchmarks/sparsify_baseline.py      # self-check, then a small run on synthetic data

How sparsify is driven (nothing of it is copied or re-implemented here): its `Trainer` takes a model
and a dataset of token ids and trains on what a hooked module outputs. We give it a stand-in model
whose one submodule, `feed`, returns the rows of `x` named by the "token ids" it is given (the
dataset is the row indices 0..n-1, one row per "sequence", so sparsify's batch of `batch_size`
sequences is `batch_size` tokens). Everything else is sparsify's unchanged code path for
`loss_fn="fvu"`: `SparseCoder` init, b_dec set to the mean of the first batch at step 0, unit-norm
decoder rows and removal of the decoder gradient's parallel part, the FVU loss (plus AuxK when
`auxk_alpha > 0`, with its dead-latent counter), SignSGD inside schedulefree's `ScheduleFreeWrapper`
(momentum 0.95) at its default lr `5e-3 / sqrt(width / 2**14)`. The weights returned are the ones
sparsify itself saves at the end of training (the schedule-free average, read back from its
checkpoint with `SparseCoder.load_from_disk`), not the optimiser's in-flight iterate.

Defaults of eai-sparsify 1.3.3 worth knowing: `auxk_alpha` is 0.0 (AuxK off) and
`dead_feature_threshold` is 10M tokens, so AuxK could not act within a run shorter than 10M tokens
even if switched on; its CLI's batch is 32 sequences x 2,048 tokens = 65,536 tokens, where this
module uses 4,096 tokens (`batch_size`). As in sparsify (its DataLoader keeps a last partial
batch), `n % batch_size` tokens make one last, smaller step; only a last batch of a single token is
left out, since its variance, sparsify's FVU denominator, is zero (its tqdm total, `n // batch_size`,
then reads one short).

Conversion: sparsify encodes `relu((x - b_dec) @ encoder.weight.T + encoder.bias)`, keeps the top k,
and decodes `acts @ W_dec + b_dec`. Our `TopKSAE` takes raw x with no b_dec subtraction, so
`W_enc = encoder.weight.T`, `b_enc = encoder.bias - b_dec @ encoder.weight.T`, `W_dec`, `b_dec`
as they are. CPU only, 2 threads (restored afterwards), no wandb, no network; the caller's torch RNG
state and float32 matmul precision are restored too. Prints nothing but sparsify's tqdm bar.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_HOOK = "feed"
_RUN_NAME = "sparsify_baseline"


@contextlib.contextmanager
def _quiet(progress: bool):
    """Swallow sparsify's prints (stdout); keep stderr (its tqdm bar) only if `progress`."""
    with contextlib.redirect_stdout(io.StringIO()):
        if progress:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield


def _import_sparsify() -> Any:
    with contextlib.redirect_stdout(io.StringIO()):  # "Triton not installed, ..." on import
        import sparsify
        import sparsify.trainer
    return sparsify


class _Feed(nn.Module):
    """The hooked module: maps "token ids" (row indices) `[B, L]` to the rows of x, `[B, L, d_in]`."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = x  # a plain attribute, not a parameter or buffer

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.x[input_ids]


class _StandInModel(nn.Module):
    """The least of a `PreTrainedModel` that sparsify's Trainer touches for `loss_fn="fvu"`."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.feed = _Feed(x)

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.feed.x.device

    @property
    def dummy_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.feed(input_ids)


class _RowIds(torch.utils.data.Dataset):
    """Sparsify's dataset: item i is `{"input_ids": [...]}`, a "sequence" naming `sequence_len` rows of
    x. One-token sequences (rows already shuffled) keep x's order; longer ones are consecutive rows
    (x in document order), served in an order shuffled by `seed`, as sparsify's CLI shuffles its
    chunked dataset before its Trainer reads it in order."""

    def __init__(self, n: int, sequence_len: int = 1, seed: int = 0) -> None:
        ids = torch.arange(n // sequence_len * sequence_len).view(-1, sequence_len)
        if sequence_len > 1:
            ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i]}


def sparse_coder_to_topk_state(coder: Any) -> dict[str, Tensor]:
    """A sparsify `SparseCoder` (topk, autoencoding, no skip connection) as our `TopKSAE` state dict:
    `W_enc [d_in, d_sae]`, `b_enc [d_sae]` (b_dec folded in), `W_dec [d_sae, d_in]`, `b_dec [d_in]`."""
    if coder.cfg.activation != "topk" or coder.cfg.transcode or coder.W_skip is not None:
        raise ValueError("only a plain TopK sparse autoencoder converts to our TopKSAE")
    with torch.no_grad():
        w = coder.encoder.weight.detach().float().cpu()  # [d_sae, d_in]
        b_dec = coder.b_dec.detach().float().cpu()
        return {
            "W_enc": w.T.contiguous(),
            "b_enc": coder.encoder.bias.detach().float().cpu() - b_dec @ w.T,
            "W_dec": coder.W_dec.detach().float().cpu().contiguous(),
            "b_dec": b_dec.clone(),
        }


def _train(
    x: Tensor,
    k: int,
    width: int,
    batch_size: int,
    seed: int,
    progress: bool,
    overrides: dict[str, Any] | None,
    sequence_len: int = 1,
) -> tuple[Any, dict]:
    """Sparsify's Trainer on x; returns the SparseCoder sparsify saved at the end, and the info dict."""
    sparsify = _import_sparsify()
    from sparsify.sparse_coder import SparseCoder

    if x.ndim != 2:
        raise ValueError(f"x must be [n_tokens, d_in], got shape {tuple(x.shape)}")
    if sequence_len > 1:  # whole sequences, whole batches of them
        if batch_size % sequence_len:
            raise ValueError(f"batch_size {batch_size} must be a multiple of sequence_len {sequence_len}")
        n_used = x.shape[0] // sequence_len * sequence_len
    else:
        n_used = x.shape[0] - 1 if x.shape[0] % batch_size == 1 else x.shape[0]
    if n_used < 2:
        raise ValueError(f"need at least 2 tokens, got {x.shape[0]}")
    acts = x[:n_used].detach().to("cpu", torch.float32)
    d_in = acts.shape[1]

    overrides = dict(overrides or {})
    sae_cfg = sparsify.SaeConfig(num_latents=width, k=k)  # every other field: sparsify's default
    cfg_kwargs: dict[str, Any] = dict(
        batch_size=batch_size // sequence_len,  # sequences of sequence_len tokens each
        hookpoints=[_HOOK],
        init_seeds=[seed],
        log_to_wandb=False,
        run_name=_RUN_NAME,
    )
    cfg_kwargs.update(overrides)

    threads = torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    train_fvu: list[float] = []
    seen: dict[str, Any] = {}

    def record_first_batch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "b_dec_step0" not in seen:
            seen["b_dec_step0"] = module.b_dec.detach().clone()
            seen["mean_step0"] = kwargs["y"].detach().mean(0)

    def record_fvu(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        train_fvu.append(float(out.fvu.detach()))

    try:
        torch.set_num_threads(2)
        with (
            tempfile.TemporaryDirectory(prefix="sparsify_baseline_") as tmp,
            torch.random.fork_rng(devices=[]),
            _quiet(progress),
        ):
            cfg = sparsify.TrainConfig(sae_cfg, save_dir=tmp, **cfg_kwargs)
            t0 = time.perf_counter()
            trainer = sparsify.Trainer(cfg, _RowIds(n_used, sequence_len, seed), _StandInModel(acts))
            coder_live = trainer.saes[_HOOK]
            coder_live.register_forward_pre_hook(record_first_batch, with_kwargs=True)
            coder_live.register_forward_hook(record_fvu, with_kwargs=True)
            trainer.fit()
            wall = time.perf_counter() - t0
            coder = SparseCoder.load_from_disk(Path(tmp) / _RUN_NAME / _HOOK, device="cpu")
            opt = trainer.optimizers[0]
            base = getattr(opt, "base", opt)
            dead = trainer.num_tokens_since_fired[_HOOK] > cfg.dead_feature_threshold
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)

    b_dec_dev = float((seen["b_dec_step0"] - seen["mean_step0"]).abs().max())
    info = {
        "library": "eai-sparsify",
        "sparsify_version": importlib.metadata.version("eai-sparsify"),
        "schedulefree_version": importlib.metadata.version("schedulefree"),
        "architecture": f"SparseCoder(activation={coder.cfg.activation!r})",
        "d_in": d_in,
        "width": coder.num_latents,
        "k": coder.cfg.k,
        "optimizer": f"{cfg.optimizer}: {type(base).__name__} in {type(opt).__name__}"
        + (f"(momentum={opt.momentum})" if hasattr(opt, "momentum") else ""),
        "lr": float(base.param_groups[0]["lr"]),
        "lr_rule": "sparsify default for signum when lr is None: 5e-3 / sqrt(width / 2**14)"
        if cfg.lr is None
        else "set by overrides",
        "lr_schedule": "none (schedule-free)" if not trainer.lr_schedulers else "linear warmup/decay",
        "batch_tokens": batch_size,
        "feeding": "shuffled single tokens"
        if sequence_len == 1
        else f"sequences of {sequence_len} consecutive tokens, in shuffled order",
        "steps": trainer.global_step,
        "tokens_seen": n_used,
        "last_batch_tokens": n_used - (trainer.global_step - 1) * (batch_size // sequence_len * sequence_len),
        "tokens_dropped": int(x.shape[0] - n_used),
        "auxk_alpha": cfg.auxk_alpha,
        "dead_feature_threshold_tokens": cfg.dead_feature_threshold,
        "dead_at_end_by_sparsify": float(dead.float().mean()),
        "normalize_decoder": coder.cfg.normalize_decoder,
        "multi_topk": coder.cfg.multi_topk,
        "loss_fn": cfg.loss_fn,
        "b_dec_init": "mean of the first batch (sparsify Trainer, step 0)",
        "b_dec_step0_max_abs_dev_from_batch_mean": b_dec_dev,
        "weights": "schedule-free average, as sparsify saved it (SparseCoder.load_from_disk)",
        "train_fvu": train_fvu,
        "seed": seed,
        "threads": 2,
        "device": "cpu",
        "overrides": overrides,
        "wall_s": wall,
    }
    return coder, info


def train_sparsify_topk(
    x: Tensor,
    k: int,
    width: int,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = True,
    *,
    sequence_len: int = 1,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """Train sparsify's TopK SAE (its Trainer and defaults) for one pass over `x [n_tokens, d_in]`
    (float32, raw, already shuffled) in batches of `batch_size` tokens (a last partial batch is a
    smaller step; a last batch of one token is left out). Returns our TopKSAE's state dict (`W_enc`, `b_enc`, `W_dec`, `b_dec`; b_dec folded
    into b_enc, so it reconstructs raw x exactly as sparsify does) and a dict of what was used.
    `overrides` (keyword only, default none) sets TrainConfig fields, e.g. `{"auxk_alpha": 1 / 32}`.
    With `sequence_len` > 1, x is in document order and sparsify reads it as its users feed it:
    sequences of that many consecutive tokens, in shuffled order, `batch_size / sequence_len` of
    them a batch (what is left over a whole sequence is left out)."""
    coder, info = _train(x, k, width, batch_size, seed, progress, overrides, sequence_len)
    return sparse_coder_to_topk_state(coder), info


# ---------------------------------------------------------------------------------------------


def _our_topk(state: dict[str, Tensor], k: int) -> nn.Module:
    from gemmascope.sae import SAEConfig, TopKSAE

    d_in, d_sae = state["W_enc"].shape
    sae = TopKSAE(SAEConfig("topk", d_in, d_sae, k=k))
    sae.load_state_dict(state)
    return sae.eval()


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fvu(x: Tensor, x_hat: Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _synthetic(n: int, d_in: int, seed: int) -> Tensor:
    """Sparse-dictionary data with a large mean: 512 unit directions, ~6 active per token, plus an
    offset carrying most of E|x|^2 (as a residual stream's mean does) and a little noise."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(512, d_in, generator=g), dim=1)
    codes = (torch.rand(n, 512, generator=g) < 6 / 512) * torch.rand(n, 512, generator=g) * 4
    offset = 8 * torch.nn.functional.normalize(torch.randn(d_in, generator=g), dim=0)
    return codes @ atoms + offset + 0.05 * torch.randn(n, d_in, generator=g)


def _self_check() -> dict[str, float]:
    """(1) A random sparsify SparseCoder (non-zero b_enc and b_dec) and our TopKSAE from the converted
    weights reconstruct the same raw inputs; (2) so does a SparseCoder trained by `_train`, whose
    step-0 b_dec is the first batch's mean and whose lr follows sparsify's rule; its FVU falls."""
    sparsify = _import_sparsify()
    from sparsify.sparse_coder import SparseCoder

    out: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        d_in, width, k = 48, 192, 8
        coder = SparseCoder(d_in, sparsify.SaeConfig(num_latents=width, k=k))
        coder.encoder.bias.normal_(0, 0.3)
        coder.b_dec.normal_(0, 2.0)
        x = 3 * torch.randn(2000, d_in) + 1.5
        ref = coder(x)
        ours = _our_topk(sparse_coder_to_topk_state(coder), k)
        out["random_rel_err"] = _rel_err(ours(x), ref.sae_out)
        out["random_latent_max_abs_diff"] = float(
            (ours.encode(x).gather(-1, ref.latent_indices) - ref.latent_acts).abs().max()
        )
        assert out["random_rel_err"] < 1e-5 and out["random_latent_max_abs_diff"] < 1e-4, out

    x = _synthetic(4 * 4096 + 1000, 32, seed=1)
    coder, info = _train(x, k=4, width=64, batch_size=4096, seed=0, progress=False, overrides=None)
    with torch.no_grad():
        ours = _our_topk(sparse_coder_to_topk_state(coder), 4)
        out["trained_rel_err"] = _rel_err(ours(x), coder(x).sae_out)
    out["trained_lr"] = info["lr"]
    out["b_dec_step0_dev"] = info["b_dec_step0_max_abs_dev_from_batch_mean"]
    out["train_fvu_first"] = info["train_fvu"][0]
    out["train_fvu_last"] = info["train_fvu"][-1]
    assert out["trained_rel_err"] < 1e-5, out
    assert math.isclose(info["lr"], 5e-3 / math.sqrt(64 / 2**14)), info["lr"]
    assert out["b_dec_step0_dev"] < 1e-5, out
    assert info["steps"] == 5 and info["last_batch_tokens"] == 1000 and info["tokens_dropped"] == 0
    assert info["auxk_alpha"] == 0.0 and info["optimizer"].startswith("signum")
    assert out["train_fvu_last"] < out["train_fvu_first"], out
    # sequences: each batch is 4,096 / 64 whole sequences of consecutive rows, every row seen once
    _, info = _train(
        x, k=4, width=64, batch_size=4096, seed=0, progress=False, overrides=None, sequence_len=64
    )
    assert info["steps"] == 5 and info["tokens_seen"] == len(x) // 64 * 64, info
    ids = _RowIds(len(x), 64, seed=0).ids
    assert torch.equal(ids.sort(0).values[:, 0], torch.arange(0, len(x) // 64 * 64, 64))
    assert torch.equal(ids[:, 1:] - ids[:, :-1], torch.ones(len(ids), 63, dtype=torch.long))
    return out


if __name__ == "__main__":
    print("self-check:", _self_check())
    xs = _synthetic(24_000, 64, seed=2)
    train, held = xs[:20_000], xs[20_000:]
    for batch in (4096, 512):  # sparsify's step at this module's batch, then more steps on the same data
        state, info = train_sparsify_topk(train, k=8, width=256, batch_size=batch)
        sae = _our_topk(state, 8)
        with torch.no_grad():
            fvu = _fvu(held, sae(held))
            l0 = float((sae.encode(held) > 0).sum(-1).float().mean())
        curve = info.pop("train_fvu")
        print(info)
        print(f"batch {batch}: train FVU by step {[round(v, 3) for v in curve]}")
        print(f"batch {batch}: held-out FVU {fvu:.4f}, L0 {l0:.2f}, wall {info['wall_s']:.2f} s")
