"""Training-step benchmark: tokens/s of the plain reference JumpReLU step (`train.jumprelu_terms`) and
of the fast sparse step (`sparse_step.jumprelu_terms_sparse`), measured in the same run, at d_in 640,
batch 4,096 and L0 ≈ 50, against the limit set by the one dense product the fast step cannot avoid
(the encoder's, 2·d_in·width FLOPs per token, at this machine's measured dense matmul rate); and the
peak memory of one step of each at the widest width.

    python benchmarks/train_step.py                                  # CPU: widths 4k, 16k, 65k; memory at 262k
    python benchmarks/train_step.py --device cuda --widths 4096 16384 65536 262144

A step is what the trainer does per SAE and batch: the loss terms, backward, removing the decoder
gradient's parallel part, Adam (β1 = 0, β2 = 0.999), renormalising decoder rows, clamping θ > 0.
The SAE starts from the recipe's init; θ is set per latent to the pre-activation quantile that makes
L0 ≈ 50 on the benchmark batch (one batch of Gaussian activations with E‖x‖² = 1: the step's cost
depends on the shapes and the number of active pairs, not on where the activations came from).
At each width the two steps alternate, after one untimed warm-up step each, and the fastest
repetition counts (the CPU may be shared). Peak memory is the process's peak resident set during
the step (CPU: VmHWM, reset through /proc/self/clear_refs) or the CUDA allocator's peak.
Prints a table and writes benchmarks/results/train_step[_cuda].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

from gemmascope.sae import JumpReLUSAE, SAEConfig
from gemmascope.sparse_step import BLOCK_ELEMENTS, jumprelu_terms_sparse, latent_major_encoder
from gemmascope.train import (
    ADAM_BETAS,
    ADAM_EPS,
    BANDWIDTH,
    THRESHOLD_FLOOR,
    init_sae,
    jumprelu_terms,
    remove_parallel_grad,
)

RESULTS = Path(__file__).parent / "results"
STEPS: dict[str, Callable[[JumpReLUSAE, Tensor, float], tuple[Tensor, Tensor, Tensor]]] = {
    "reference": jumprelu_terms,
    "fast": jumprelu_terms_sparse,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dense_rate(batch: int, d_in: int, width: int, device: torch.device, repeats: int) -> float:
    """FLOP/s of the encoder-shaped product `[batch, d_in] @ [d_in, width]`, fastest of `repeats`."""
    a = torch.randn(batch, d_in, device=device)
    b = torch.randn(d_in, width, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * batch * d_in * width / best


def make_sae(d_in: int, width: int, x: Tensor, l0: float) -> JumpReLUSAE:
    """Recipe init, then θ per latent so that the batch's L0 is `l0`: latent i fires on c_i of the
    tokens of `x`, c_i the floor or ceiling of l0·batch/width (at random, in proportion), by setting
    θ_i to its (c_i + 1)-th largest pre-activation (in column blocks)."""
    sae = init_sae(
        JumpReLUSAE(SAEConfig("jumprelu", d_in=d_in, d_sae=width)), torch.Generator().manual_seed(0)
    )
    sae = sae.to(x.device)
    per_latent = l0 * x.shape[0] / width
    gen = torch.Generator().manual_seed(2)
    counts = (
        (per_latent + torch.rand(width, generator=gen)).floor().long().clamp(0, x.shape[0] - 1).to(x.device)
    )
    block = max(1, 2**26 // x.shape[0])
    with torch.no_grad():
        for start in range(0, width, block):
            cols = slice(start, start + block)
            pre_acts = (x - sae.b_dec) @ sae.W_enc[:, cols] + sae.b_enc[cols]  # [batch, block]
            top = pre_acts.topk(int(counts[cols].max()) + 1, dim=0).values  # [c_max + 1, block], descending
            theta = top.gather(0, counts[cols].view(1, -1)).squeeze(0)
            sae.threshold[cols] = theta.clamp_min(THRESHOLD_FLOOR)
    return sae


def train_step(
    sae: JumpReLUSAE, opt: torch.optim.Adam, x: Tensor, terms: Callable[..., Any], coeff: float
) -> float:
    """One trainer step on `x`; returns the batch's L0."""
    opt.zero_grad(set_to_none=True)
    recon, rate, _, _ = terms(sae, x, BANDWIDTH)
    l0 = rate.sum()
    (recon + coeff * l0).backward()
    remove_parallel_grad(sae.W_dec)
    opt.step()
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        sae.threshold.clamp_(min=THRESHOLD_FLOOR)
    return float(l0.detach())


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Memory (MiB) around a block: `start_mib` resident before it, `rise_mib` how far the peak rose
    above that during it. CPU: the resident set (VmHWM, reset through /proc/self/clear_refs); CUDA:
    the caching allocator's allocated bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_mib = self.rise_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.start_mib = _status_mib("VmRSS")
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _status_mib("VmHWM")
        self.rise_mib = peak - self.start_mib


def measure(
    methods: list[str],
    d_in: int,
    width: int,
    batch: int,
    l0_target: float,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, Any]]:
    """Time `repeats` steps of each method, alternating, after `warmup` steps each; each method trains
    its own copy of the same SAE. `peak_mib` is the rise of peak memory over what was resident
    before the step (the step's working memory), and `resident_mib` what was resident."""
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1)).to(device) / d_in**0.5
    saes = {m: make_sae(d_in, width, x, l0_target) for m in methods}
    if "fast" in saes:
        latent_major_encoder(saes["fast"])  # as the trainer lays it out for the sparse step
    opts = {
        m: torch.optim.Adam(saes[m].parameters(), lr=7e-5, betas=ADAM_BETAS, eps=ADAM_EPS) for m in methods
    }
    for m in methods:
        for _ in range(warmup):
            train_step(saes[m], opts[m], x, STEPS[m], 1e-4)
    out: dict[str, dict[str, Any]] = {m: {"all_seconds": []} for m in methods}
    dense_a, dense_b = torch.randn(batch, d_in, device=device), torch.randn(d_in, width, device=device)
    dense_seconds = []
    for i in range(repeats):
        sync(device)  # the encoder-shaped dense product, in the same rotation (the CPU may be shared)
        start = time.perf_counter()
        dense_a @ dense_b
        sync(device)
        dense_seconds.append(time.perf_counter() - start)
        for m in methods:
            sync(device)
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                l0 = train_step(saes[m], opts[m], x, STEPS[m], 1e-4)
                sync(device)
                out[m]["all_seconds"].append(time.perf_counter() - start)
            out[m]["l0"] = l0
            if i == 0:
                out[m]["peak_mib"] = mem.rise_mib
                out[m]["resident_mib"] = mem.start_mib
    for m in methods:
        out[m]["seconds"] = min(out[m]["all_seconds"])
        out[m]["tokens_per_s"] = batch / out[m]["seconds"]
    out["dense"] = {"all_seconds": dense_seconds, "flops": 2 * batch * d_in * width / min(dense_seconds)}
    return out


def memory_child(method: str, d_in: int, width: int, batch: int, l0: float, device: torch.device) -> None:
    """In a fresh process: one step of `method`; prints its peak memory (whole process: CPU peak
    resident set; CUDA: allocator peak) and what was held just before the step, as JSON."""
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1)).to(device) / d_in**0.5
    sae = make_sae(d_in, width, x, l0)
    if method == "fast":
        latent_major_encoder(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=7e-5, betas=ADAM_BETAS, eps=ADAM_EPS)
    sync(device)
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        l0_batch = train_step(sae, opt, x, STEPS[method], 1e-4)
        sync(device)
        seconds = time.perf_counter() - start
    peak = mem.start_mib + mem.rise_mib
    print(
        json.dumps({"peak_mib": peak, "before_step_mib": mem.start_mib, "seconds": seconds, "l0": l0_batch})
    )


def needed_gib(methods: list[str], d_in: int, width: int, batch: int) -> float:
    """Rough memory a measurement needs: each method's SAE with gradients and Adam's moments, plus the
    biggest step's working set (reference: about 8 [batch, width] fp32 tensors, as measured at 16k;
    fast: one block of the encoder product and its mask), plus the interpreter."""
    sae = 4 * 4 * (2 * d_in * width + 2 * width + d_in)
    block_rows = min(batch, max(1, BLOCK_ELEMENTS // width))
    working = {"reference": 8 * 4 * batch * width, "fast": 5 * block_rows * width + 64 * 2**20}
    return (len(methods) * sae + max(working[m] for m in methods) + 2**29) / 2**30


def available_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    return psutil.virtual_memory().available / 2**30


def merge_results(path: Path, results: dict[str, Any]) -> None:
    """Write `results` into `path`, keeping rows of other widths from earlier runs (each row records
    when it was measured and the machine's load then)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("d_in") == results["d_in"] and old.get("batch") == results["batch"]:
        kept = [r for r in old.get("widths", []) if r["width"] not in {w["width"] for w in results["widths"]}]
        results = {**old, **results, "widths": sorted(kept + results["widths"], key=lambda r: r["width"])}
        if "memory" not in results and "memory" in old:
            results["memory"] = old["memory"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=50)
    ap.add_argument("--widths", type=int, nargs="*", default=None, help="timed widths (CPU: 4k 16k 65k)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per method at widths up to 16,384")
    ap.add_argument("--wide-repeats", type=int, default=1, help="timed steps per method above 16,384")
    ap.add_argument(
        "--memory-width", type=int, default=262144, help="width of the peak-memory measurement (0: none)"
    )
    ap.add_argument(
        "--memory-reference-batch",
        type=int,
        default=None,
        help="batch for the reference's memory at --memory-width (CPU default 512: at 4,096 it needs ~40 GiB)",
    )
    ap.add_argument("--memory-child", choices=list(STEPS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.memory_child:
        memory_child(args.memory_child, args.d_in, args.memory_width, args.batch, args.l0, device)
        return
    cuda = device.type == "cuda"
    widths = (
        args.widths
        if args.widths is not None
        else ([4096, 16384, 65536, 262144] if cuda else [4096, 16384, 65536])
    )
    out = RESULTS / ("train_step_cuda.json" if cuda else "train_step.json")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or 'cpu'}",
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "d_in": args.d_in,
        "batch": args.batch,
        "l0_target": args.l0,
        "widths": [],
    }
    print(f"device {results['device']}, {results['threads']} threads, torch {torch.__version__}")
    print(
        f"{'width':>7} {'dense GFLOP/s':>13} {'limit tok/s':>11} | {'method':>9} {'tok/s':>9} {'of limit':>8}"
        f" {'s/step':>7} {'L0':>5} {'step MiB':>8} | speed-up"
    )
    for width in widths:
        need, free = needed_gib(["fast", "reference"], args.d_in, width, args.batch), available_gib(device)
        if need > 0.9 * free:
            print(f"{width:>7} skipped: needs about {need:.1f} GiB, {free:.1f} GiB available now", flush=True)
            continue
        repeats = args.repeats if width <= 16384 else args.wide_repeats
        load_before = os.getloadavg()[0]
        rate = dense_rate(args.batch, args.d_in, width, device, repeats=3)
        row: dict[str, Any] = {"width": width, "repeats": repeats}
        row.update(
            measure(["fast", "reference"], args.d_in, width, args.batch, args.l0, device, repeats, warmup=1)
        )
        # the machine's dense rate: the best of the products timed before and between the steps
        rate = max(rate, row.pop("dense")["flops"])
        limit = rate / (2 * args.d_in * width)
        row.update({"dense_flops": rate, "limit_tokens_per_s": limit})
        for method in ("fast", "reference"):
            row[method]["fraction_of_limit"] = row[method]["tokens_per_s"] / limit
        row["speedup"] = row["fast"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
        row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        row["load_average"] = [load_before, os.getloadavg()[0]]  # the machine may be shared
        results["widths"].append(row)
        merge_results(out, {**results, "widths": [row]})
        for method in ("fast", "reference"):
            m = row[method]
            lead = f"{width:>7} {rate / 1e9:>13.1f} {limit:>11.0f}" if method == "fast" else " " * 33
            tail = f"{row['speedup']:.2f}x" if method == "fast" else ""
            print(
                f"{lead} | {method:>9} {m['tokens_per_s']:>9.0f} {m['fraction_of_limit']:>8.1%} {m['seconds']:>7.2f}"
                f" {m['l0']:>5.1f} {m['peak_mib']:>8.0f} | {tail}",
                flush=True,
            )
    print(f"(load average during the runs: {[r['load_average'] for r in results['widths']]})")

    if args.memory_width:
        ref_batch = args.memory_reference_batch or (args.batch if cuda else 512)
        memory: dict[str, Any] = {
            "width": args.memory_width,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for method, batch in (("fast", args.batch), ("reference", ref_batch)):
            need, free = needed_gib([method], args.d_in, args.memory_width, batch), available_gib(device)
            if need > 0.9 * free:
                memory[method] = {
                    "batch": batch,
                    "skipped": f"needs about {need:.1f} GiB, {free:.1f} available",
                }
                print(
                    f"width {args.memory_width}, batch {batch}, {method}: skipped, {memory[method]['skipped']}"
                )
                continue
            # a fresh process per method, so the peak is that one step's and nothing earlier's
            child = [sys.executable, __file__, "--memory-child", method, "--device", args.device]
            child += ["--d-in", str(args.d_in), "--batch", str(batch), "--l0", str(args.l0)]
            child += ["--memory-width", str(args.memory_width)]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode != 0:
                memory[method] = {"batch": batch, "error": done.stderr.strip().splitlines()[-1:]}
                print(f"width {args.memory_width}, batch {batch}, {method}: failed {memory[method]['error']}")
                continue
            m = json.loads(done.stdout.strip().splitlines()[-1])
            memory[method] = {"batch": batch, **m}
            print(
                f"width {args.memory_width}, batch {batch}, {method}: peak {m['peak_mib']:.0f} MiB"
                f" ({m['peak_mib'] - m['before_step_mib']:.0f} above the {m['before_step_mib']:.0f} MiB held"
                f" before the step; {m['seconds']:.1f} s, L0 {m['l0']:.1f}, first step)",
                flush=True,
            )
        params = 2 * args.d_in * args.memory_width + args.memory_width * 2 + args.d_in
        memory["parameters_mib"] = params * 4 / 2**20
        print(
            f"(parameters {memory['parameters_mib']:.0f} MiB; with their gradients and Adam's two moments"
            f" {4 * memory['parameters_mib']:.0f} MiB)"
        )
        merge_results(out, {**results, "widths": [], "memory": memory})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
