"""Attribution-graph benchmark (issue "Transcoders and attribution graphs"): seconds and peak memory
per graph on this machine against prompt length, the replacement and completeness scores, and the
equality of our graph with circuit-tracer's (the field's reference implementation) on the same
prompt and transcoders.

    python benchmarks/attribute.py RUN                       # RUN: a run with a transcoder per layer
    python benchmarks/attribute.py RUN --ct-python /work/ctenv/bin/python   # + the circuit-tracer check

circuit-tracer 0.5 caps transformers at 4.57.3 (we run 5.x), so it cannot share our environment; it
runs in its own, made once with
    python3 -m venv /work/ctenv && /work/ctenv/bin/pip install torch==2.13.0 \\
        circuit-tracer==0.5.0 nnsight==0.6.3 transformers==4.57.3
and is driven through a subprocess on the same converted model folder and the run's transcoders
exported in Gemma Scope 2's layout (params.safetensors with affine_skip_connection). The check
compares the two adjacency matrices entry by entry (same node order: features by layer, position,
latent; errors; tokens; logits). circuit-tracer's nnsight backend writes token embeddings without
Gemma's √d_model scale (its token edges are √d_model too small; ours are the embedding's real
effect), so token columns are compared after multiplying circuit-tracer's by √d_model, and the
factor found is printed. circuit-tracer has no massive-activation rule (ours: a transcoder has no
feature where its input is over its norm limit, and the MLP output there is all error), so the check
runs on the same transcoders with the norm limit removed (`max_norm` None): the same rule on both
sides; the positions the limit would leave out are counted in `massive_positions`.

Each graph of the timing table runs in a fresh process so that its peak RSS is its own. Writes
benchmarks/results/attribute.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "The opposite of hot is",
    "One cat, two",
    "Is 9 bigger than 7? Answer: yes. Is 3 bigger than 8? Answer:",
]
LENGTH_PROMPT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889 as the "
    "centrepiece of the 1889 World's Fair, and it is now one of the most visited monuments in the world. "
    "Locally nicknamed La dame de fer, it was criticised at first by some of France's leading artists and "
    "intellectuals for its design, but it has become a global cultural icon of France and one of the most "
    "recognisable structures in the world. The tower is 330 metres tall, about the same height as an "
    "81-storey building, and was the tallest man-made structure in the world until the Chrysler Building"
)

_ONE_GRAPH = r"""
import json, resource, sys, time
import torch
from gemmascope.attribution import attribute, prune, scores, transcoder_set
from gemmascope.models import load_model
run, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
model = load_model("gemma-3-270m")
if sys.argv[4] != "-":  # a cross-layer transcoder of the run (its folder holding the SUBSTRING given)
    from gemmascope.attribution.dictionary import run_clt
    tcs = run_clt(run, sys.argv[4] or None)
else:
    tcs = transcoder_set(run, model.n_layers)
ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"][:n]
text = model.tokenizer.decode(ids)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
g = attribute(model, tcs, text, progress=False, max_tokens=max(n, 64))
seconds = time.monotonic() - t
p = prune(g)
r, c = scores(g)
print(json.dumps({"tokens": int(g.n_pos), "features": g.n_features, "nodes": int(g.adjacency.shape[0]),
    "pruned_nodes": int(p.nodes.sum()), "seconds": seconds, "replacement": r, "completeness": c,
    "rss_before_mb": before / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "top": g.logit_tokens[0], "p_top": float(g.logit_probs[0])}))
"""

_CIRCUIT_TRACER = r"""
import os, sys, json, time
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["TRANSFORMERS_OFFLINE"] = "1"
import torch
torch.set_num_threads(2)
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
model_dir, tc_dir, prompt, out, n_layers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
dev = torch.device("cpu")
if sys.argv[6] == "clt":  # our CLT folder is circuit-tracer's own layout: its load_clt reads it as it is
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    tcs = load_clt(tc_dir, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
        device=dev, dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
    from safetensors import safe_open
    with safe_open(f"{tc_dir}/W_enc_0.safetensors", "pt") as f:
        has_skip = "W_skip_0" in f.keys()
    if has_skip and tcs.W_skip is None:  # 0.5.0's loader drops W_skip_i (its main branch reads it): as main does
        skips = []
        for i in range(n_layers):
            with safe_open(f"{tc_dir}/W_enc_{i}.safetensors", "pt") as f:
                skips.append(f.get_tensor(f"W_skip_{i}").float())
        tcs.W_skip = torch.nn.Parameter(torch.stack(skips))
        tcs.skip_connection = True
else:
    paths = {l: f"{tc_dir}/layer_{l}/params.safetensors" for l in range(n_layers)}
    tcs = load_transcoder_set(paths, scan="gemmascope-bench", feature_input_hook="mlp.hook_in",
        feature_output_hook="hook_mlp_out", device=dev, dtype=torch.float32, special_load_fn="gemma-scope-2",
        lazy_encoder=False, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(model_dir, tcs, backend="nnsight", device=dev,
    dtype=torch.float32)
t = time.monotonic()
g = attribute(prompt, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64, max_feature_nodes=None)
seconds = time.monotonic() - t
r, c = compute_graph_scores(g)
torch.save({"adjacency": g.adjacency_matrix, "features": g.active_features[g.selected_features],
    "activations": g.activation_values[g.selected_features], "tokens": g.input_tokens,
    "logits": torch.tensor([t.vocab_idx for t in g.logit_targets]), "probs": g.logit_probabilities,
    "seconds": seconds, "replacement": r, "completeness": c}, out)
"""


def timing(run: str, lengths: list[int], clt: str | None = None) -> list[dict[str, object]]:
    rows = []
    for n in lengths:
        out = subprocess.run(
            [sys.executable, "-c", _ONE_GRAPH, run, LENGTH_PROMPT, str(n), "-" if clt is None else clt],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"graph of {n} tokens failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{row['tokens']:>4} tokens  {row['features']:>6} features  {row['seconds']:>7.1f} s  peak RSS "
            f"{row['peak_rss_mb']:>6.0f} MB  replacement {row['replacement']:.3f}  completeness {row['completeness']:.3f}",
            flush=True,
        )
    return rows


def compare_with_circuit_tracer(
    run: str, ct_python: str, prompt: str, clt: str | None = None
) -> dict[str, object]:
    """Our graph and circuit-tracer's of `prompt` over the run's transcoder per layer, or with `clt`
    (a substring of its folder, "" for the only one) over its cross-layer transcoder."""
    import torch

    from gemmascope.attribution import attribute, scores, transcoder_set
    from gemmascope.attribution.dictionary import Replacing, dictionary_of, run_clt
    from gemmascope.attribution.graph import prompt_ids
    from gemmascope.attribution.replacement import capture_prompt, massive_positions
    from gemmascope.formats import save_params_safetensors
    from gemmascope.models import bundled_gemma_path, load_model

    model = load_model("gemma-3-270m")
    tcs: Replacing = run_clt(run, clt or None) if clt is not None else transcoder_set(run, model.n_layers)
    massive = massive_positions(dictionary_of(model, tcs), capture_prompt(model, prompt_ids(model, prompt)))
    n_massive = [int(m[1:].sum()) for m in massive]  # after BOS, which both leave out
    for tc in [] if clt is not None else tcs:  # circuit-tracer has no norm limit: compare on the same rule
        tc.cfg.max_norm = None
        tc.cfg.extra.pop("max_scaled_norm", None)
    with tempfile.TemporaryDirectory() as tmp:
        if clt is not None:
            folder = str(Path(run) / str(tcs.cfg.extra["folder"]))  # type: ignore[union-attr]
        else:
            folder = tmp
            for layer, tc in enumerate(tcs):  # type: ignore[arg-type]
                save_params_safetensors(tc, Path(tmp) / f"layer_{layer}")
        out = Path(tmp) / "ct.pt"
        t = time.monotonic()
        done = subprocess.run(
            [
                ct_python,
                "-c",
                _CIRCUIT_TRACER,
                str(bundled_gemma_path()),
                folder,
                prompt,
                str(out),
                str(model.n_layers),
                "clt" if clt is not None else "set",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"circuit-tracer failed:\n{done.stderr[-3000:]}")
        ct = torch.load(out)
        ct_wall = time.monotonic() - t
    ours = attribute(model, tcs, prompt, batch_size=64, max_feature_nodes=None, progress=False)
    same_tokens = torch.equal(ours.ids, ct["tokens"].cpu())
    same_features = torch.equal(ours.features, ct["features"].long())
    same_logits = torch.equal(ours.logit_ids, ct["logits"].long())
    a, b = ours.adjacency, ct["adjacency"].float()
    result: dict[str, object] = {
        "prompt": prompt,
        "same_tokens": same_tokens,
        "same_features": same_features,
        "same_logits": same_logits,
        "n_nodes": int(a.shape[0]),
        "n_features": ours.n_features,
        "massive_positions": n_massive,  # per layer: left out by our rule, kept in this comparison
    }
    if a.shape == b.shape:
        tokens = slice(ours.token_start, ours.logit_start)
        scale = math.sqrt(model.d_model)
        fixed = b.clone()
        fixed[:, tokens] *= scale
        nonzero = fixed[:, tokens] != 0
        ratio = (a[:, tokens][nonzero] / b[:, tokens][nonzero]).median() if nonzero.any() else float("nan")
        err = (a - fixed).abs()
        result.update(
            {
                "max_abs_diff": float(err.max()),
                "max_abs_entry": float(a.abs().max()),
                "max_rel_diff": float(err.max() / a.abs().max()),
                "allclose_1e-3": bool(torch.allclose(a, fixed, rtol=1e-3, atol=1e-4 * float(a.abs().max()))),
                "token_edge_ratio_ours_over_ct": float(ratio),
                "sqrt_d_model": scale,
                "non_token_max_abs_diff": float(
                    torch.cat([err[:, : ours.token_start], err[:, ours.logit_start :]], 1).max()
                ),
                "max_abs_diff_by_source": {
                    "features": float(err[:, : ours.n_features].max()),
                    "errors": float(err[:, ours.n_features : ours.token_start].max()),
                    "tokens": float(err[:, tokens].max()),
                },
                "max_abs_diff_by_target": {
                    "features": float(err[: ours.n_features].max()),
                    "logits": float(err[ours.logit_start :].max()),
                },
            }
        )
    ours_scores = scores(ours)
    result.update(
        {
            "ours_seconds": ours.seconds,
            "ct_seconds": float(ct["seconds"]),
            "ct_wall_with_loading": ct_wall,
            "ours_replacement": ours_scores[0],
            "ours_completeness": ours_scores[1],
            "ct_replacement": float(ct["replacement"]),
            "ct_completeness": float(ct["completeness"]),
        }
    )
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run folder with a transcoder per layer")
    parser.add_argument("--lengths", default="8,16,32,64", help="prompt lengths (tokens) of the timing table")
    parser.add_argument("--ct-python", default=None, help="python of a circuit-tracer environment")
    parser.add_argument(
        "--clt", nargs="?", const="", default=None, metavar="SUBSTRING",
        help="over the run's cross-layer transcoder instead of its transcoder per layer",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=2, help="circuit-tracer check: how many of PROMPTS")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attribute.json"))
    args = parser.parse_args()
    results: dict[str, object] = {"command": " ".join(sys.argv), "machine_cpus": 2}
    print("seconds and peak memory per graph against prompt length (each graph in a fresh process):")
    lengths = [int(v) for v in args.lengths.split(",") if v]
    results["timing"] = timing(args.run, lengths, args.clt) if lengths else []
    if args.ct_python:
        results["circuit_tracer"] = [
            compare_with_circuit_tracer(args.run, args.ct_python, p, args.clt)
            for p in PROMPTS[: args.prompts]
        ]
    else:
        print("circuit-tracer check not run: pass --ct-python PATH (see the module docstring)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        f"wrote {args.out}; peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
