"""Export of an indexed SAE to Neuronpedia's import format: a folder per source,
`MODEL/LAYER-SOURCESET/` with `source.jsonl` and batched `features/`, `activations/` and
`explanations/` `batch-N.jsonl.gz` files whose records carry the fields of Neuronpedia's Feature,
Activation and Explanation tables (as its `neuronpedia-utils` exporter writes them).

Reads only the feature index; knows nothing of models or SAE weights.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gemmascope.errors import ConfigError
from gemmascope.features.store import FeatureIndex
from gemmascope.sites import parse_site

_KIND_SHORT = {"resid_post": "res", "attn_out": "att", "mlp_out": "mlp", "mlp_in": "mlpin"}


def default_source_set(info: dict[str, Any]) -> str:
    """A Neuronpedia source-set name for an indexed SAE, e.g. `gemmascope-res-4096-l0-52`."""
    kind = str(info["site"]).split(".")[0]
    tail = str(info["sae_id"]).split(f".w{info['width']}", 1)[-1].strip(".")
    name = f"gemmascope-{_KIND_SHORT.get(kind, kind)}-{info['width']}" + (f"-{tail}" if tail else "")
    return re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-").lower()


def _write_gz(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=5) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def export_neuronpedia(
    index: FeatureIndex | str | Path,
    sae_id: str,
    out_dir: str | Path,
    model_id: str | None = None,
    source_set: str | None = None,
    batch_size: int = 128,
    creator_id: str = "gemmascope",
) -> Path:
    """Write one indexed SAE in Neuronpedia's format under `out_dir/MODEL/LAYER-SOURCESET/`
    (replacing an earlier export; written to a temporary folder and renamed when complete), with
    `batch_size` latents per batch file. Returns the source folder."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    fi = index if isinstance(index, FeatureIndex) else FeatureIndex(index)
    info = fi.sae_info(sae_id)
    model_id = model_id or str(info["model_name"])
    source_set = source_set or default_source_set(info)
    source_id = f"{info['layer']}-{source_set}"
    hook_name = parse_site(str(info["site"])).hook_name
    created = datetime.now(UTC).isoformat(timespec="seconds")
    dest = Path(out_dir) / model_id / source_id
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("features", "activations", "explanations"):
        (tmp / sub).mkdir(parents=True)
    stats = info["stats"]
    source = {
        "id": source_id, "modelId": model_id, "setName": source_set, "visibility": "PUBLIC",
        "dataset": stats.get("corpus"), "num_prompts": stats.get("n_rows"),
        "num_tokens_in_prompt": stats.get("context_len"), "hookName": hook_name, "creatorId": creator_id,
    }  # fmt: skip
    (tmp / "source.jsonl").write_text(json.dumps(source) + "\n")
    width = int(info["width"])
    for batch, start in enumerate(range(0, width, batch_size)):
        features, activations, explanations = [], [], []
        for i in range(start, min(width, start + batch_size)):
            f = fi.feature(sae_id, i)
            common = {"modelId": model_id, "layer": source_id, "index": str(i)}
            features.append(_feature_record(f, common, hook_name, creator_id, created))
            activations += _activation_records(f, common, stats.get("corpus"), creator_id, created)
            explanations += _explanation_records(f, common, creator_id, created)
        _write_gz(tmp / "features" / f"batch-{batch}.jsonl.gz", features)
        _write_gz(tmp / "activations" / f"batch-{batch}.jsonl.gz", activations)
        _write_gz(tmp / "explanations" / f"batch-{batch}.jsonl.gz", explanations)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _activation_records(
    f: dict[str, Any], common: dict[str, str], corpus: Any, creator_id: str, created: str
) -> list[dict[str, Any]]:
    """A latent's top and interval windows as Neuronpedia's Activation rows."""
    source_id, i = common["layer"], common["index"]
    examples = [(ex, None) for ex in f["top_examples"]]
    examples += [(ex, iv) for iv in f["intervals"] for ex in iv["examples"]]
    return [
        {
            "id": f"{source_id}-{i}-{n}",
            **common,
            "tokens": ex["tokens"],
            "values": ex["acts"],
            "maxValue": max(ex["acts"]),
            "maxValueTokenIndex": ex["acts"].index(max(ex["acts"])),
            "minValue": min(ex["acts"]),
            "creatorId": creator_id,
            "dataSource": corpus,
            "dataIndex": None,
            "createdAt": created,
            "binMin": None if iv is None else iv["lo"],
            "binMax": None if iv is None else iv["hi"],
            "binContains": None if iv is None else iv["share"],
            "qualifyingTokenIndex": ex["focus"],
        }
        for n, (ex, iv) in enumerate(examples)
    ]


def _explanation_records(
    f: dict[str, Any], common: dict[str, str], creator_id: str, created: str
) -> list[dict[str, Any]]:
    """A latent's explanations as Neuronpedia's Explanation rows."""
    source_id, i = common["layer"], common["index"]
    return [
        {
            "id": f"{source_id}-{i}-x{n}",
            **common,
            "description": e["text"],
            "authorId": creator_id,
            "typeName": e["explainer"],
            "explanationModelName": e["model"],
            "notes": None if e["score"] is None else f"detection score {e['score']:.3f}",
            "createdAt": created,
        }
        for n, e in enumerate(f["explanations"])
    ]


def _feature_record(
    f: dict[str, Any], common: dict[str, str], hook_name: str, creator_id: str, created: str
) -> dict[str, Any]:
    edges, counts = f["histogram"]["edges"], f["histogram"]["counts"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    promoted, suppressed = f["logit_lens"]["promoted"], f["logit_lens"]["suppressed"]
    return {
        **common,
        "creatorId": creator_id,
        "createdAt": created,
        "maxActApprox": f["max_act"],
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "vectorDefaultSteerStrength": f["max_act"],
        "hookName": hook_name,
        "topkCosSimIndices": [n["index"] for n in f["neighbours"]],
        "topkCosSimValues": [n["cosine"] for n in f["neighbours"]],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "pos_str": [p["token"] for p in promoted],
        "pos_values": [p["value"] for p in promoted],
        "neg_str": [s["token"] for s in suppressed],
        "neg_values": [s["value"] for s in suppressed],
        "frac_nonzero": f["density"],
        "freq_hist_data_bar_heights": counts,
        "freq_hist_data_bar_values": centres,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }
