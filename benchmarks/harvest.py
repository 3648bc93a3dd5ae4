"""Harvest benchmark: throughput of `gemmascope.activations.harvest` at 1 and at 3 sites of one layer,
as a ratio to a bare transformers forward pass that stops after that layer, on the same rows in the
same process; peak memory of each phase; and the model's first-conversion and cached-load times.

    python benchmarks/harvest.py                 # 4,096 tokens at layer 6 of Gemma 3 270M
    python benchmarks/harvest.py --tokens 65536 --repeats 3

Harvest times are end to end (corpus packing, forward passes, writing and hashing shards, manifests),
so the ratio is conservative. Each phase runs `--repeats` times, interleaved, and the fastest run
counts. On a machine shared with other work the wall-clock ratio is noisy, so the benchmark also
reports the ratio of CPU times and the share of each harvest's own wall time spent inside its forward
passes (measured in the same run, so load from elsewhere cancels out). Prints the figures and writes benchmarks/results/harvest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

RESULTS = Path(__file__).parent / "results" / "harvest.json"


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak_mb` is the maximum seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.process.memory_info().rss / 2**20
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def timed(fn: Callable[[], Any]) -> tuple[float, float, float, float]:
    """Run fn; return (wall seconds, CPU seconds of this process, peak RSS MB, peak RSS MB above the
    RSS at the start)."""
    with PeakRSS() as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, rss.peak_mb, rss.peak_mb - rss.start_mb


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-conversion", action="store_true", help="do not time the first conversion")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from gemmascope import sites
    from gemmascope.activations import harvest
    from gemmascope.corpus import load_corpus, pack
    from gemmascope.models import BUNDLED_MODEL, convert_bundled_gemma, load_model
    from gemmascope.sites import Site

    results: dict[str, Any] = {
        "model": BUNDLED_MODEL,
        "layer": args.layer,
        "context_len": args.context_len,
        "batch_rows": args.batch_rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": psutil.cpu_count(),
    }

    # Cached load first, so it pays the cold imports a command-line user pays.
    model_box: dict[str, Any] = {}
    seconds, _, peak, _ = timed(lambda: model_box.setdefault("model", load_model(BUNDLED_MODEL)))
    model = model_box["model"]
    results["cached_load_s"] = round(seconds, 2)
    print(f"cached load of {BUNDLED_MODEL}: {seconds:.2f} s")

    if not args.skip_conversion:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, _, peak, _ = timed(lambda: convert_bundled_gemma(Path(tmp) / "gemma"))
        results["first_conversion_s"] = round(seconds, 1)
        results["first_conversion_peak_rss_mb"] = round(peak)
        print(f"first conversion (GGUF -> fp32 safetensors): {seconds:.1f} s, peak RSS {peak:.0f} MB")

    layer = args.layer
    n_rows = -(-args.tokens // args.context_len)
    n_tokens = n_rows * args.context_len
    rows = pack(model.tokenizer, load_corpus("wiki", "train"), args.context_len, max_rows=n_rows)
    sites_by_count = {
        1: [Site("resid_post", layer)],
        3: [Site("resid_post", layer), Site("attn_out", layer), Site("mlp_out", layer)],
    }

    class Stop(Exception):
        pass

    def raise_stop(*_: Any) -> None:
        raise Stop

    def bare_forward() -> None:
        handle = model.layers[layer].register_forward_hook(raise_stop)
        try:
            with torch.no_grad():
                for start in range(0, n_rows, args.batch_rows):
                    try:
                        model.hf(input_ids=rows[start : start + args.batch_rows], use_cache=False)
                    except Stop:
                        pass
        finally:
            handle.remove()

    def harvest_sites(count: int) -> Callable[[], Any]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                harvest(
                    model,
                    sites_by_count[count],
                    Path(tmp),
                    n_tokens,
                    context_len=args.context_len,
                    batch_rows=args.batch_rows,
                    progress=False,
                )

        return run

    # Time spent inside the forward passes of a harvest, measured in the same run as the harvest
    # itself: their ratio is the model's share of harvest time, robust to a machine shared with others.
    in_forward = [0.0]
    plain_capture = sites.capture  # harvest's batches (sites.capture_batches) call it

    def timed_capture(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return plain_capture(*a, **kw)
        finally:
            in_forward[0] += time.perf_counter() - start

    sites.capture = timed_capture  # type: ignore[assignment]
    forward_share: dict[str, list[float]] = {"harvest_1_site": [], "harvest_3_sites": []}

    bare_forward()  # warm-up: first-call allocations and lazy inits
    phases: dict[str, Callable[[], Any]] = {"bare_forward": bare_forward, "harvest_1_site": harvest_sites(1)}
    phases["harvest_3_sites"] = harvest_sites(3)
    runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in phases}
    for _ in range(args.repeats):
        for name, fn in phases.items():
            in_forward[0] = 0.0
            runs[name].append(timed(fn))
            if name in forward_share:
                forward_share[name].append(in_forward[0] / runs[name][-1][0])

    results["n_tokens"] = n_tokens
    bare = min(r[0] for r in runs["bare_forward"])
    bare_cpu = min(r[1] for r in runs["bare_forward"])
    for name, measured in runs.items():
        best = min(measured)
        entry: dict[str, Any] = {
            "seconds": round(best[0], 3),
            "all_seconds": [round(r[0], 3) for r in measured],
            "cpu_seconds": round(min(r[1] for r in measured), 3),
            "tokens_per_s": round(n_tokens / best[0], 1),
            "peak_rss_mb": round(max(r[2] for r in measured)),
            "peak_rss_above_start_mb": round(max(r[3] for r in measured)),
        }
        line = f"{name:16s} {entry['tokens_per_s']:7.0f} tok/s ({best[0]:.2f} s wall, {entry['cpu_seconds']:.2f} s CPU"
        if name != "bare_forward":
            entry["ratio_to_bare_forward"] = round(bare / best[0], 3)
            entry["cpu_ratio_to_bare_forward"] = round(bare_cpu / entry["cpu_seconds"], 3)
            entry["forward_share_of_harvest"] = round(max(forward_share[name]), 3)
            line += (
                f"; ratio to bare forward {entry['ratio_to_bare_forward']:.2f} wall, "
                f"{entry['cpu_ratio_to_bare_forward']:.2f} CPU; forward passes are "
                f"{entry['forward_share_of_harvest']:.1%} of the harvest"
            )
        results[name] = entry
        print(f"{line}), peak RSS {entry['peak_rss_mb']} MB (+{entry['peak_rss_above_start_mb']} MB)")
    results["target_ratio"] = 0.9
    results["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
