"""Cross-layer transcoder files (`clt.CrossLayerTranscoder`), in the two layouts users have:

- circuit-tracer's (our run folder's own, `save_clt`): per layer i `W_enc_{i}.safetensors` holding
  `W_enc_{i} [width, d_model]`, `b_enc_{i}`, `b_dec_{i}`, `threshold_{i}` and, with the skip,
  `W_skip_{i} [d_model, d_model]` (applied as x @ W_skip), and `W_dec_{i}.safetensors` holding
  `W_dec_{i} [width, n_layers − i, d_model]`; `config.yaml` (circuit-tracer's `model_kind:
  cross_layer_transcoder` and hooks) and `clt.json` (our `CLTConfig`). circuit-tracer's `load_clt`
  reads the folder as it is.
- Gemma Scope 2's (`export_gemma_scope_2`): per layer i `params_layer_{i}.safetensors` holding
  `w_enc [d_model, width]`, `b_enc`, `b_dec [d_model]`, `threshold`, `w_dec [width, n_layers,
  d_model]` (zeros for the layers before i, which it cannot write) and, with the skip,
  `affine_skip_connection [d_model, d_model]`, plus `config.json`. Its zeros nearly double the
  decoders' bytes, so the run folder keeps circuit-tracer's layout.

`load_clt` reads either (an official Gemma Scope 2 release folder too), and a folder whose
circuit-tracer `config.yaml` lists the layers' Gemma Scope 2 files (`transcoders:`, as circuit-tracer
configs name them; local paths, from the folder). Every loader checks files, keys, shapes and
finiteness and raises FormatError naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from gemmascope.clt import CLTConfig, CrossLayerTranscoder
from gemmascope.errors import FormatError
from gemmascope.formats.weights import check_finite
from gemmascope.runs.writes import disk_errors, tmp_path

CLT_JSON = "clt.json"
CT_YAML = "config.yaml"
GS2_CONFIG = "config.json"
# circuit-tracer's hook names for the sites our CLTs read and write (TransformerLens's MLP hooks)
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"


def save_clt(clt: CrossLayerTranscoder, folder: Path | str, replace: bool = False) -> Path:
    """Save in circuit-tracer's layout (module docstring) with `clt.json`; written to `FOLDER.tmp`
    and renamed when complete. An existing folder is never replaced (a FormatError), unless
    `replace` (training's second save, after the refit): the old one goes only once the new one is
    complete."""
    folder = Path(folder)
    if folder.exists() and not replace:
        raise FormatError(f"{str(folder)!r} already exists; refusing to overwrite a CLT")

    def write(tmp: Path) -> None:
        for i in range(clt.n_layers):
            enc = {
                f"W_enc_{i}": clt.W_enc[i].t(), f"b_enc_{i}": clt.b_enc[i],
                f"b_dec_{i}": clt.b_dec[i], f"threshold_{i}": clt.threshold[i],
            }  # fmt: skip
            if clt.W_skip is not None:
                enc[f"W_skip_{i}"] = clt.W_skip[i]
            _save(enc, tmp / f"W_enc_{i}.safetensors")
            _save({f"W_dec_{i}": clt.decoder(i)}, tmp / f"W_dec_{i}.safetensors")
        (tmp / CT_YAML).write_text(
            f"model_name: {clt.cfg.model_name or 'unknown'}\nmodel_kind: cross_layer_transcoder\n"
            f"feature_input_hook: {INPUT_HOOK}\nfeature_output_hook: {OUTPUT_HOOK}\n"
        )
        (tmp / CLT_JSON).write_text(json.dumps(clt.cfg.to_dict(), indent=2) + "\n")

    return _written(folder, write)


def export_gemma_scope_2(clt: CrossLayerTranscoder, folder: Path | str) -> Path:
    """Save in Gemma Scope 2's layout (module docstring); never replaces an existing folder."""
    folder = Path(folder)
    if folder.exists():
        raise FormatError(f"{str(folder)!r} already exists; refusing to overwrite a CLT")
    n, d = clt.n_layers, clt.cfg.d_model

    def write(tmp: Path) -> None:
        for i in range(n):
            w_dec = torch.zeros(clt.width, n, d, dtype=clt.b_dec.dtype)
            w_dec[:, i:] = clt.decoder(i).detach().cpu()
            params = {
                "w_enc": clt.W_enc[i], "b_enc": clt.b_enc[i], "b_dec": clt.b_dec[i],
                "threshold": clt.threshold[i], "w_dec": w_dec,
            }  # fmt: skip
            if clt.W_skip is not None:
                params["affine_skip_connection"] = clt.W_skip[i]
            _save(params, tmp / f"params_layer_{i}.safetensors")
        config = {"architecture": "jump_relu", "type": "clt", "num_layers": n, **clt.cfg.to_dict()}
        (tmp / GS2_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return _written(folder, write)


def load_clt(folder: Path | str, device: str = "cpu") -> CrossLayerTranscoder:
    """A CLT from a folder in either layout (circuit-tracer's `W_enc_{i}` / `W_dec_{i}` files, or Gemma
    Scope 2's `params_layer_{i}`), or a FormatError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"no CLT folder at {str(folder)!r}")
    meta = _read_json(folder / CLT_JSON) or _read_json(folder / GS2_CONFIG)
    listed = _listed_files(folder)
    if listed is not None:
        return _build(folder, [_read_gs2(p, i, len(listed)) for i, p in enumerate(listed)], meta, device)
    ct, gs2 = (
        _layers(folder, r"W_enc_(\d+)\.safetensors"),
        _layers(folder, r"params_layer_(\d+)\.safetensors"),
    )
    if not ct and not gs2:
        raise FormatError(
            f"{str(folder)!r} holds no CLT: expected W_enc_0.safetensors ... (circuit-tracer) or "
            "params_layer_0.safetensors ... (Gemma Scope 2)"
        )
    layers = ct or gs2
    if layers != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise FormatError(f"CLT folder {str(folder)!r} lacks the files of layers {missing}")
    tensors = [
        _read_ct(folder, i) if ct else _read_gs2(folder / f"params_layer_{i}.safetensors", i, len(layers))
        for i in layers
    ]
    return _build(folder, tensors, meta, device)


def _listed_files(folder: Path) -> list[Path] | None:
    """The layer files the circuit-tracer `config.yaml` of `folder` lists (`transcoders:`, Gemma Scope
    2's per-layer files in layer order; a relative path from the folder), or None when it lists
    none (our own config.yaml, or none). FormatError: a config that cannot be read, a `model_kind`
    other than a CLT's, or files that are not here (an hf:// one too: nothing is downloaded)."""
    path = folder / CT_YAML
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FormatError(f"cannot read {str(path)!r}: {err}") from err
    if not isinstance(config, dict):
        raise FormatError(f"{str(path)!r} is not a circuit-tracer config: expected model_kind and hooks")
    kind = config.get("model_kind")
    if kind not in (None, "cross_layer_transcoder"):
        raise FormatError(f"{str(path)!r} says model_kind {kind!r}: expected cross_layer_transcoder")
    entries = config.get("transcoders")
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise FormatError(f"{str(path)!r}: transcoders must be a list of file paths, one per layer")
    files = [folder / e for e in entries]  # an absolute path stays itself
    missing = [e for e, f in zip(entries, files, strict=True) if e.startswith("hf://") or not f.is_file()]
    if missing:
        raise FormatError(
            f"{str(path)!r} lists {len(missing)} of its {len(entries)} layer files that are not here "
            f"(first {missing[0]!r}); nothing is downloaded: put them beside config.yaml"
        )
    return files


def _build(
    folder: Path, tensors: list[dict[str, Tensor]], meta: dict[str, Any], device: str
) -> CrossLayerTranscoder:
    """The module from per-layer tensors (our orientation: `W_enc [d, width]`, `W_dec [width, n − i, d]`),
    every shape checked against layer 0's."""
    n = len(tensors)
    d, width = tensors[0]["W_enc"].shape
    skip = "W_skip" in tensors[0]
    expected = {"W_enc": (d, width), "b_enc": (width,), "b_dec": (d,), "threshold": (width,)}
    for i, t in enumerate(tensors):
        shapes = {**expected, "W_dec": (width, n - i, d)} | ({"W_skip": (d, d)} if skip else {})
        for name, shape in shapes.items():
            if name not in t:
                raise FormatError(
                    f"CLT {str(folder)!r} layer {i} lacks {name} (every layer must have the same tensors)"
                )
            if tuple(t[name].shape) != shape:
                raise FormatError(
                    f"CLT {str(folder)!r} layer {i}: {name} has shape {tuple(t[name].shape)}, expected {shape} "
                    "(every layer of a CLT has the same width and d_model)"
                )
        check_finite(t, f"CLT {str(folder)!r} layer {i}")
    cfg = CLTConfig(n, d, width, str(meta.get("model_name", "")), skip, dict(meta.get("extra", {})))
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for i, t in enumerate(tensors):
            clt.W_enc[i].copy_(t["W_enc"])
            clt.b_enc[i].copy_(t["b_enc"])
            clt.threshold[i].copy_(t["threshold"])
            clt.decoder(i).copy_(t["W_dec"])
            clt.b_dec[i].copy_(t["b_dec"])
            if clt.W_skip is not None:
                clt.W_skip[i].copy_(t["W_skip"])
    return clt.to(device)


def _read_ct(folder: Path, i: int) -> dict[str, Tensor]:
    enc = _read(folder / f"W_enc_{i}.safetensors")
    dec = _read(folder / f"W_dec_{i}.safetensors")
    out = {
        name: enc[f"{name}_{i}"] for name in ("b_enc", "b_dec", "threshold", "W_skip") if f"{name}_{i}" in enc
    }
    if f"W_enc_{i}" in enc:
        out["W_enc"] = enc[f"W_enc_{i}"].t()
    if f"W_dec_{i}" in dec:
        out["W_dec"] = dec[f"W_dec_{i}"]
    return out


def _read_gs2(path: Path, i: int, n: int) -> dict[str, Tensor]:
    """Layer `i`'s tensors from Gemma Scope 2's file of it (of a CLT of `n` layers)."""
    params = _read(path)
    names = {"w_enc": "W_enc", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
             "affine_skip_connection": "W_skip"}  # fmt: skip
    out = {ours: params[theirs] for theirs, ours in names.items() if theirs in params}
    if "w_dec" in params:
        w_dec = params["w_dec"]
        if w_dec.dim() != 3 or w_dec.shape[1] != n:
            raise FormatError(
                f"{str(path)!r}: w_dec has shape {tuple(w_dec.shape)}, "
                f"expected [width, {n}, d_model] (a decoder to each of the {n} layers)"
            )
        out["W_dec"] = w_dec[:, i:]
    return out


def _read(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise FormatError(f"CLT file {str(path)!r} is missing") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise FormatError(f"cannot read CLT file {str(path)!r}: {err}") from err


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot read {str(path)!r}: {err}") from err
    return data if isinstance(data, dict) else {}


def _layers(folder: Path, pattern: str) -> list[int]:
    found = (re.fullmatch(pattern, p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    check_finite(cpu, f"CLT file {str(path)!r}")
    save_file(cpu, str(path), metadata={"format": "pt"})


def _written(folder: Path, write: Any) -> Path:
    tmp = tmp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(folder, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        tmp.mkdir(parents=True)
        write(tmp)
        if folder.exists():  # `replace`: the old folder goes once the new one is complete
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    return folder
