"""Web server under load: serve a run folder with uvicorn and measure what a user waits for.

    python benchmarks/server_load.py runs/demo [--concurrent 20]

Prints and writes benchmarks/results/server_load.json: the latency of one microscope request
(prompt of ~20 and ~250 tokens), of a feature page's JSON and of a steering request (32 new
tokens); then `--concurrent` microscope requests at once (all answered? all equal to the answers
given one at a time? wall time, slowest answer) and how long a feature lookup takes while they run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from gemmascope.server import create_app, serving

SHORT = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair."
LONG = " ".join([SHORT] * 8)  # 224 tokens, near the 256 limit


def timed(fn: Any, repeats: int = 5) -> tuple[float, Any]:
    """Median seconds of `repeats` calls, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--concurrent", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    app = create_app(args.run_dir)
    figures: dict[str, Any] = {"run_dir": str(args.run_dir), "load_s": time.perf_counter() - start}
    run = app.state.run
    sae = run.first_sae
    figures.update(model=run.model_name, sae_id=sae.id, width=sae.d_sae)
    with serving(app) as url, httpx.Client(base_url=url, timeout=600) as http:

        def micro(prompt: str) -> httpx.Response:
            return http.post("/v1/activation/topk-by-token", json={"prompt": prompt, "sae_id": sae.id})

        figures["microscope_short_s"], r = timed(lambda: micro(SHORT))
        figures["short_tokens"] = len(r.json()["tokens"]) - 1
        figures["microscope_long_s"], r = timed(lambda: micro(LONG), repeats=3)
        figures["long_tokens"] = len(r.json()["tokens"]) - 1
        figures["feature_json_s"], r = timed(lambda: http.get(f"/v1/feature/{sae.id}/0"))
        assert r.status_code == 200, r.text
        density = run.column(sae, "density")
        live = int(((density > 1e-4) & (density < 1e-2)).nonzero()[0]) if density is not None else 0
        steer = {
            "prompt": "My favourite place to visit is",
            "features": [{"sae_id": sae.id, "index": live}],
            "max_new_tokens": 32,
            "temperature": 0.7,
        }
        figures["steer_32_tokens_s"], r = timed(
            lambda: http.post("/v1/steer/completion", json=steer), repeats=2
        )
        assert r.status_code == 200, r.text

        prompts = [f"{SHORT} Question {n}: what happened in {1800 + n * 7}?" for n in range(args.concurrent)]
        alone = [micro(p).json() for p in prompts]
        latencies: list[float] = []
        lookups: list[float] = []

        def ask(n: int) -> httpx.Response:
            t0 = time.perf_counter()
            resp = micro(prompts[n])
            latencies.append(time.perf_counter() - t0)
            return resp

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrent) as pool:
            futures = [pool.submit(ask, n) for n in range(args.concurrent)]
            while not all(f.done() for f in futures):
                t0 = time.perf_counter()
                assert http.get(f"/v1/feature/{sae.id}/1").status_code == 200
                lookups.append(time.perf_counter() - t0)
            answers = [f.result() for f in futures]
        figures["concurrent"] = {
            "requests": args.concurrent,
            "all_200": all(a.status_code == 200 for a in answers),
            "all_equal_to_serial": all(a.json() == b for a, b in zip(answers, alone, strict=True)),
            "wall_s": time.perf_counter() - start,
            "slowest_s": max(latencies),
            "feature_lookups_meanwhile": len(lookups),
            "feature_lookup_median_s": statistics.median(lookups) if lookups else None,
            "health_after": http.get("/health").json()["status"],
        }
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / "server_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
