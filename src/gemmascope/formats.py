"""SAE files. Owns saving and loading SAEs in the formats users have (RECIPE.md section 5): our
native folder, which is a SAELens folder (`cfg.json`, `sae_weights.safetensors`,
`sparsity.safetensors`); SAELens folders written by SAELens; Gemma Scope `params.npz`; Gemma Scope 2
`params.safetensors` (lower-case keys). Where SAE folders live in a run folder is runs.py's.

Knows nothing of training: a saved SAE takes raw activations (the trainer folds its input scaling in
before saving). Every loader checks keys, shapes and finiteness and raises FormatError naming the file
and what was expected.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from gemmascope import __version__
from gemmascope.errors import FormatError
from gemmascope.runs import (
    CFG_FILE,
    EVAL_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    disk_errors,
    held_by_writer,
    is_sae_folder,
    save_atomic,
    tmp_path,
    write_atomic,
)
from gemmascope.runs import find_saes as find_saes  # re-exported: the run folder's, kept importable here
from gemmascope.runs import sae_dir as sae_dir
from gemmascope.runs import sae_id as sae_id
from gemmascope.sae import SAE, BatchTopKSAE, JumpReLUSAE, SAEConfig, build_sae, max_norm_from_extra
from gemmascope.sites import parse_site, site_of_hf_hook

NPZ_FILE = "params.npz"  # Gemma Scope (Gemma 2)
GS2_FILE = "params.safetensors"  # Gemma Scope 2 (Gemma 3)
GS2_CONFIG = "config.json"  # beside it
GS2_SKIP = "affine_skip_connection"  # a Gemma Scope 2 transcoder's skip connection, [d_in, d_out]
CONVERT_FORMATS = ("native", "npz", "safetensors")
PARAM_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
# SAELens calls the plain ReLU SAE "standard".
_TO_SAELENS = {"jumprelu": "jumprelu", "topk": "topk", "relu": "standard"}
_FROM_SAELENS = {"jumprelu": "jumprelu", "topk": "topk", "standard": "relu", "batchtopk": "jumprelu"}
# The SAELens config version we write (its v6 layout: sizes at the top, provenance under "metadata").
_SAELENS_VERSION = "6.0.0"


# ---------------------------------------------------------------------------------------------
# Saving


def save_sae(
    sae: SAE, folder: Path | str, log10_density: Tensor | None = None, *, overwrite: bool = False
) -> Path:
    """Save an SAE as a SAELens-compatible folder: `cfg.json`, `sae_weights.safetensors` (W_enc,
    W_dec, b_enc, b_dec, and threshold for JumpReLU) and, when given, `sparsity.safetensors`
    (`sparsity`: log10 feature density `[d_sae]`). A BatchTopK SAE is saved as the JumpReLU SAE
    with one global threshold it is at inference. Written to `FOLDER.tmp` and renamed when complete;
    an existing folder is never replaced unless `overwrite`, and then only when it is an SAE folder."""
    folder = Path(folder)
    if isinstance(sae, BatchTopKSAE):
        sae = sae.to_jumprelu()
    _check_replaceable(folder, overwrite)
    weights = _state(sae)
    if "W_skip" in weights:  # SAELens's layout: [d_out, d_in], applied as x @ W_skip.T
        weights["W_skip"] = weights["W_skip"].T.contiguous()
    _check_finite(weights, f"SAE for {str(folder)!r}")
    density = None
    if log10_density is not None:
        density = log10_density.detach().to("cpu", torch.float32).contiguous()
        if density.shape != (sae.d_sae,):
            raise FormatError(f"log10_density has shape {tuple(density.shape)}, expected ({sae.d_sae},)")
    tmp = tmp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    with held_by_writer(folder), disk_errors(folder, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CFG_FILE).write_text(json.dumps(_saelens_cfg(sae), indent=2) + "\n")
        if density is not None:
            save_file({"sparsity": density}, str(tmp / SPARSITY_FILE), metadata={"format": "pt"})
    if folder.exists():  # overwrite: move the old one aside so the new one appears in one rename
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder


# Files an SAE folder may hold besides the SAE itself; anything else means the folder is not ours to replace.
_SAE_FOLDER_FILES = {CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, EVAL_FILE}


def _check_replaceable(folder: Path, overwrite: bool) -> None:
    """Refuse to replace `folder` unless `overwrite` and it is an SAE folder holding only SAE files
    (an empty folder is fine): `--overwrite` never deletes a folder that is not an SAE."""
    if not folder.exists():
        return
    if not overwrite:
        raise FormatError(f"{str(folder)!r} already exists; refusing to overwrite an SAE")
    if not folder.is_dir():
        raise FormatError(f"{str(folder)!r} is a file, not an SAE folder; refusing to replace it")
    entries = {p.name for p in folder.iterdir()}
    foreign = sorted(entries - _SAE_FOLDER_FILES)
    if entries and (foreign or not is_sae_folder(folder)):
        raise FormatError(
            f"{str(folder)!r} is not an SAE folder (it holds {', '.join(foreign) or 'no SAE weights'}); "
            "refusing to replace it: choose a new or SAE folder"
        )


def _check_new_file(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FormatError(f"{str(path)!r} already exists; refusing to overwrite it (pass --overwrite)")
    if path.is_dir():
        raise FormatError(f"{str(path)!r} is a folder, not a file; refusing to replace it")


def convert(
    src: Path | str, dest: Path | str, to: str = "native", *, overwrite: bool = False
) -> tuple[SAE, Path]:
    """Load the SAE at `src` (any supported format) and save it at `dest` as `to`: `native` (a folder,
    with its log10 densities when `src` has them), `npz` (Gemma Scope) or `safetensors` (Gemma Scope 2).
    Nothing existing is replaced without `overwrite`, never a folder that is not an SAE, never `src`."""
    if to not in CONVERT_FORMATS:
        raise FormatError(f"unknown format {to!r}: expected one of {', '.join(CONVERT_FORMATS)}")
    _check_apart(Path(src), Path(dest), to)
    sae = load_sae(src)
    if to == "native":
        density = load_log10_density(src) if Path(src).is_dir() else None
        return sae, save_sae(sae, dest, log10_density=density, overwrite=overwrite)
    save = save_params_npz if to == "npz" else save_params_safetensors
    return sae, save(sae, dest, overwrite=overwrite)


def _check_apart(src: Path, dest: Path, to: str) -> None:
    """Refuse a destination whose files would be, hold or lie inside the source's (its folder, or its
    file and the config.json beside it): converting never replaces any part of the source."""
    outputs = {"native": [dest], "npz": [_file_path(dest, NPZ_FILE)]}.get(to)
    if outputs is None:
        outputs = [_file_path(dest, GS2_FILE), _file_path(dest, GS2_FILE).with_name(GS2_CONFIG)]
    sources = [src] if src.is_dir() else [src, src.with_name(GS2_CONFIG)]
    for out in (o.resolve() for o in outputs):
        for part in (s.resolve() for s in sources):
            if out == part:
                raise FormatError(
                    f"destination {str(dest)!r} is the source itself; choose another destination"
                )
            if out.is_relative_to(part) or part.is_relative_to(out):
                raise FormatError(
                    f"destination {str(dest)!r} would write {str(out)!r}, part of the source {str(src)!r}; "
                    "choose a destination outside the source"
                )


def _check_config_beside(path: Path, overwrite: bool) -> None:
    """The `config.json` an export writes beside its file: a new one, or with `overwrite` one an SAE
    export wrote (never another file of that name, such as a model folder's)."""
    config = path.with_name(GS2_CONFIG)
    if not config.exists():
        return
    if not overwrite:
        raise FormatError(
            f"{str(config)!r} already exists beside it; refusing to overwrite it (pass --overwrite)"
        )
    try:
        ours = json.loads(config.read_bytes())
    except (OSError, ValueError):
        ours = None
    if not (isinstance(ours, dict) and {"width", "hf_hook_point_in"} <= set(ours)):
        raise FormatError(
            f"{str(config)!r} beside it is not an SAE's config.json (a model's?); refusing to replace it: "
            "export into a new folder"
        )


def save_params_npz(sae: SAE, path: Path | str, *, overwrite: bool = False) -> Path:
    """Export a JumpReLU SAE as Gemma Scope's `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold, fp32).
    The file keeps weights only; site and training details live in the native folder. An existing
    file is replaced only with `overwrite`."""
    params = _gemma_scope_params(sae, "params.npz")
    path = _file_path(path, NPZ_FILE)
    _check_new_file(path, overwrite)
    arrays: dict[str, Any] = {k: v.numpy() for k, v in params.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # to memory: np.savez would add ".npz" to a temporary name
    return write_atomic(path, buffer.getvalue())


def save_params_safetensors(sae: SAE, path: Path | str, *, overwrite: bool = False) -> Path:
    """Export a JumpReLU SAE as Gemma Scope 2's `params.safetensors` (lower-case w_enc, w_dec, b_enc,
    b_dec, threshold, fp32; a transcoder's skip connection as `affine_skip_connection [d_in, d_out]`,
    applied as `x @ affine_skip_connection`), with a `config.json` beside it naming the sites. An
    existing file is replaced only with `overwrite`."""
    params = _gemma_scope_params(sae, "params.safetensors")
    path = _file_path(path, GS2_FILE)
    _check_new_file(path, overwrite)
    _check_config_beside(path, overwrite)
    names = {"W_skip": GS2_SKIP}
    tensors = {names.get(k, k.lower()): v for k, v in params.items()}
    save_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    write_atomic(path.with_name(GS2_CONFIG), json.dumps(_gs2_config(sae), indent=2) + "\n")
    return path


def _gs2_config(sae: SAE) -> dict[str, Any]:
    """The `config.json` written beside an exported `params.safetensors`: sizes, sites (TransformerLens
    hook names) and the training figures worth keeping."""
    c = sae.cfg
    site = parse_site(c.site) if c.site else None
    out = parse_site(c.out_site) if c.out_site else None
    return {  # Gemma Scope 2's own keys first (a release's config.json), then ours
        "width": c.d_sae,
        "model_name": c.model_name,
        "architecture": "jump_relu",
        "l0": c.extra.get("l0"),
        "affine_connection": c.affine_skip,
        "hf_hook_point_in": site.hf_hook_point if site else None,
        "hf_hook_point_out": (out or site).hf_hook_point if site else None,
        "type": "transcoder" if out else "sae",
        "d_in": c.d_in,
        "site": c.site,
        "out_site": c.out_site or None,
        "hook_name": site.hook_name if site else c.hook_name,
        "hook_name_out": out.hook_name if out else None,
        "fvu": c.extra.get("fvu"),
        "source": f"gemmascope {__version__}",
    }


def _file_path(path: Path | str, default_name: str) -> Path:
    """`path` itself when it names a file of the format's suffix, else `path/default_name`."""
    path = Path(path)
    if path.is_dir() or path.suffix != Path(default_name).suffix:
        path = path / default_name
    return path  # its folder is made by the atomic write


def _gemma_scope_params(sae: SAE, fmt: str) -> dict[str, Tensor]:
    if isinstance(sae, BatchTopKSAE):
        sae = sae.to_jumprelu()
    if not isinstance(sae, JumpReLUSAE):
        raise FormatError(
            f"{fmt} holds JumpReLU SAEs only, not {sae.cfg.architecture}; save it natively instead"
        )
    params = _state(sae)
    _check_finite(params, f"SAE exported to {fmt}")
    return params


def _state(sae: SAE) -> dict[str, Tensor]:
    """The weights as saved, fp32 on the CPU (a transcoder's `W_skip [d_in, d_out]` as we apply it)."""
    names = [n for n in PARAM_NAMES if n != "threshold" or isinstance(sae, JumpReLUSAE)]
    if sae.W_skip is not None:
        names.append("W_skip")
    return {n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous().clone() for n in names}


# SAELens's transcoder architectures, by (our architecture, affine skip); SAELens stores the skip
# connection as `W_skip [d_out, d_in]` applied as `x @ W_skip.T` (ours: `x @ W_skip`).
_SAELENS_TRANSCODERS = {
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
}
_FROM_SAELENS_TRANSCODERS = {name: key for key, name in _SAELENS_TRANSCODERS.items()}


def _saelens_architecture(c: SAEConfig) -> str:
    """SAELens's name of the architecture: `jumprelu`, `topk`, `standard`; a transcoder's
    `jumprelu_transcoder`, `jumprelu_skip_transcoder`, ... (a TopK transcoder, which SAELens has no
    name for, `topk_transcoder` / `topk_skip_transcoder`, read back by us only)."""
    if not c.is_transcoder:
        return _TO_SAELENS[c.architecture]
    key = (c.architecture, c.affine_skip)
    return _SAELENS_TRANSCODERS.get(key, f"{c.architecture}{'_skip' if c.affine_skip else ''}_transcoder")


def _saelens_cfg(sae: SAE) -> dict[str, Any]:
    c = sae.cfg
    site = parse_site(c.site) if c.site else None
    cfg: dict[str, Any] = {
        "architecture": _saelens_architecture(c),
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # saved SAEs take raw activations (RECIPE 1)
        "normalize_activations": "none",  # the input scaling is folded into the weights
        "reshape_activations": "none",
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
    if c.is_transcoder:
        cfg["d_out"] = c.d_in
    cfg["metadata"] = {
        "sae_lens_version": _SAELENS_VERSION,
        "sae_lens_training_version": None,
        "model_name": c.model_name,
        "hook_name": c.hook_name or (site.hook_name if site else ""),
        "hook_head_index": None,
        **({"hook_name_out": parse_site(c.out_site).hook_name} if c.out_site else {}),
        "context_size": c.context_size,
        "prepend_bos": True,
        "dataset_path": c.dataset,
        "exclude_special_tokens": True,
        "gemmascope": {
            "version": __version__,
            "site": c.site,
            "k": c.k,
            "max_norm": c.max_norm,
            "out_site": c.out_site,
            "affine_skip": c.affine_skip,
            "extra": c.extra,
        },
    }
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading


def load_sae(path: Path | str, device: str = "cpu", d_in: int | None = None) -> SAE:
    """Load an SAE from any supported format, as a module taking raw activations:
    - a native or SAELens folder (`cfg.json` + `sae_weights.safetensors`, optional sparsity);
    - Gemma Scope `params.npz` (a file, or a folder holding one);
    - Gemma Scope 2 `params.safetensors` with lower-case keys (a file, or a folder holding one).
    With `d_in`, the SAE's input width must equal it (the width of the site it will read)."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"no SAE at {str(path)!r}: the path does not exist")
    if path.is_dir():
        if (path / CFG_FILE).exists() and (path / WEIGHTS_FILE).exists():
            sae = _load_saelens(path)
        elif (path / NPZ_FILE).exists():
            sae = _load_gemma_scope(path / NPZ_FILE)
        elif (path / GS2_FILE).exists():
            sae = _load_gemma_scope(path / GS2_FILE)
        else:
            raise FormatError(
                f"no SAE in folder {str(path)!r}: expected {CFG_FILE} + {WEIGHTS_FILE} (native / SAELens), "
                f"{NPZ_FILE} (Gemma Scope) or {GS2_FILE} (Gemma Scope 2)"
            )
    elif path.name == WEIGHTS_FILE or path.name == CFG_FILE:
        return load_sae(path.parent, device, d_in)
    elif path.suffix in (".npz", ".safetensors"):
        sae = _load_gemma_scope(path)
    else:
        raise FormatError(f"unknown SAE file {str(path)!r}: expected a folder, a .npz or a .safetensors file")
    if d_in is not None and sae.d_in != d_in:
        where = f" of site {sae.cfg.site}" if sae.cfg.site else ""
        raise FormatError(
            f"SAE at {str(path)!r} has d_in {sae.d_in}, but the site{where} it should read has d_in {d_in}"
        )
    return sae.to(device)


def load_log10_density(folder: Path | str) -> Tensor | None:
    """The `sparsity` tensor (log10 feature density `[d_sae]`) of a SAELens folder, if it has one."""
    path = Path(folder) / SPARSITY_FILE
    if not path.exists():
        return None
    return _read_safetensors(path)["sparsity"]


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"cannot read {str(path)!r}: {err}") from err


def _load_saelens(folder: Path) -> SAE:
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot read {str(folder / CFG_FILE)!r}: {err}") from err
    if not isinstance(raw, dict):
        raise FormatError(f"{str(folder / CFG_FILE)!r} is not a JSON object")
    meta = raw.get("metadata") or {}
    flat = {**raw, **meta}  # SAELens < 6 keeps metadata at the top level
    ours = meta.get("gemmascope") or {}
    arch_name = str(flat.get("architecture", "standard"))
    transcoder = _FROM_SAELENS_TRANSCODERS.get(arch_name)
    if transcoder is None and (m := re.fullmatch(r"(topk)(_skip)?_transcoder", arch_name)):
        transcoder = (m.group(1), bool(m.group(2)))
    if transcoder is not None:
        arch_name = {"relu": "standard"}.get(transcoder[0], transcoder[0])
    activation = str(flat.get("activation_fn", flat.get("activation_fn_str", "relu")))
    k = flat.get("k") or (flat.get("activation_fn_kwargs") or {}).get("k")
    if arch_name == "standard" and activation == "topk":
        arch_name = "topk"
    if arch_name not in _FROM_SAELENS:
        raise FormatError(
            f"{str(folder)!r} holds a SAELens {arch_name!r} SAE; supported: {', '.join(sorted(_FROM_SAELENS))}"
        )
    norm = flat.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise FormatError(
            f"{str(folder)!r} normalizes activations at run time ({norm!r}); only SAEs with the scaling "
            "folded into the weights (normalize_activations 'none') are supported"
        )
    weights = _read_safetensors(folder / WEIGHTS_FILE)
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    scaling = weights.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise FormatError(f"{str(folder)!r} has a fine-tuning scaling_factor other than 1; not supported")
    for name in ("d_in", "d_sae"):
        if not isinstance(raw.get(name), int):
            raise FormatError(f"{str(folder / CFG_FILE)!r} lacks a whole-number {name!r}")
    site = ours.get("site") or _site_from_hook(str(flat.get("hook_name", flat.get("hook_point", ""))))
    cfg = _config(
        folder / CFG_FILE,
        architecture=_FROM_SAELENS[arch_name],
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        k=int(k) if k is not None and _FROM_SAELENS[arch_name] == "topk" else None,
        model_name=str(flat.get("model_name") or ""),
        site=site,
        hook_name=str(flat.get("hook_name") or flat.get("hook_point") or ""),
        context_size=int(flat.get("context_size") or 128),
        dataset=str(flat.get("dataset_path") or ""),
        extra=dict(ours.get("extra") or {"source": "saelens"}),
        max_norm=_max_norm(ours),
        out_site=(ours.get("out_site") or _site_from_hook(str(flat.get("hook_name_out") or "")))
        if transcoder
        else "",
        affine_skip=bool(transcoder and transcoder[1]),
    )
    if transcoder and not cfg.out_site:
        raise FormatError(
            f"{str(folder / CFG_FILE)!r} holds a transcoder but names no output site: expected "
            "metadata.hook_name_out (e.g. 'blocks.6.hook_mlp_out')"
        )
    if "W_skip" in weights:
        weights["W_skip"] = weights["W_skip"].T  # SAELens's [d_out, d_in], applied as x @ W_skip.T
    sae = _build(cfg, weights, folder / WEIGHTS_FILE)
    if flat.get("apply_b_dec_to_input"):
        # SAELens subtracts b_dec before encoding; fold that into b_enc so the SAE takes raw x.
        with torch.no_grad():
            sae.b_enc.sub_(sae.b_dec @ sae.W_enc)
    return sae


def _load_gemma_scope(path: Path) -> SAE:
    """Gemma Scope `params.npz` (W_enc...) or Gemma Scope 2 `params.safetensors` (w_enc...)."""
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:
                arrays = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except (OSError, ValueError, EOFError) as err:
            raise FormatError(f"cannot read {str(path)!r}: {err}") from err
        fmt = "gemma-scope"
    else:
        arrays = _read_safetensors(path)
        fmt = "gemma-scope-2"
    by_lower = {k.lower(): k for k in arrays}
    skip = arrays.get(by_lower.pop(GS2_SKIP, ""), None)
    missing = [n for n in PARAM_NAMES if n.lower() not in by_lower]
    unexpected = sorted(set(by_lower) - {n.lower() for n in PARAM_NAMES})
    if missing or unexpected:
        raise FormatError(
            f"{str(path)!r} is not a Gemma Scope JumpReLU SAE: "
            + (f"missing keys {missing}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {unexpected}" if unexpected else "")
            + f" (expected {', '.join(PARAM_NAMES)}, in any case)"
        )
    weights = {n: arrays[by_lower[n.lower()]] for n in PARAM_NAMES}
    w_enc = weights["W_enc"]
    if w_enc.ndim != 2:
        raise FormatError(f"{str(path)!r}: W_enc has shape {tuple(w_enc.shape)}, expected [d_in, d_sae]")
    site, extra = _gemma_scope_path_info(path)
    out_site = ""
    described = _read_gs2_config(path.with_name(GS2_CONFIG))
    if described.get("site"):
        site, out_site = str(described["site"]), str(described.get("out_site") or "")
    elif site.startswith("transcoder."):  # a release's transcoder folder: MLP input to MLP output
        layer = int(site.split(".")[1])
        site, out_site = f"mlp_in.{layer}", f"mlp_out.{layer}"
    if skip is not None:
        weights["W_skip"] = skip
        if not out_site:
            raise FormatError(
                f"{str(path)!r} holds a transcoder ({GS2_SKIP}) but its path names no layer: expected a "
                "release folder such as 'transcoder/layer_6_width_16k_l0_small/' or a config.json with 'site'"
            )
    cfg = _config(
        path,
        architecture="jumprelu",
        d_in=int(w_enc.shape[0]),
        d_sae=int(w_enc.shape[1]),
        model_name=str(described.get("model_name") or ""),
        site=site,
        hook_name=parse_site(site).hook_name if site else "",
        context_size=1024,  # Gemma Scope trained on sequences of 1,024 tokens
        extra={"source": fmt, **extra},
        out_site=out_site,
        affine_skip=skip is not None,
    )
    return _build(cfg, weights, path)


def _read_gs2_config(path: Path) -> dict[str, Any]:
    """The `config.json` beside a `params.safetensors`, with `site` and `out_site` (a transcoder's)
    from ours or from a release's `hf_hook_point_in/out`; {} when there is none or it names no site
    this project reads."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FormatError(f"cannot read {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        return {}
    if not data.get("site") and isinstance(data.get("hf_hook_point_in"), str):
        site = site_of_hf_hook(data["hf_hook_point_in"])
        out = site_of_hf_hook(str(data.get("hf_hook_point_out") or ""))
        if site is not None:
            data["site"] = str(site)
            data["out_site"] = str(out) if out is not None and out != site else None
    return data if data.get("site") else {}


def _max_norm(ours: dict[str, Any]) -> float | None:
    """`SAEConfig.max_norm` from our part of cfg.json; older folders have only the extra keys."""
    if ours.get("max_norm") is not None:
        return float(ours["max_norm"])
    return max_norm_from_extra(ours.get("extra") or {})


def _config(where: Path, **kwargs: Any) -> SAEConfig:
    try:
        return SAEConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise FormatError(f"{str(where)!r} has an invalid SAE config: {err}") from err


def _build(cfg: SAEConfig, weights: dict[str, Tensor], where: Path) -> SAE:
    """An SAE module holding `weights` after checking every key's presence, shape and finiteness."""
    sae = build_sae(cfg)
    if isinstance(sae, BatchTopKSAE):  # never stored as such; batchtopk files are JumpReLU
        raise FormatError(f"{str(where)!r}: batchtopk SAEs are stored as jumprelu")
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
    }
    if isinstance(sae, JumpReLUSAE):
        expected["threshold"] = (cfg.d_sae,)
    if cfg.affine_skip:
        expected["W_skip"] = (cfg.d_in, cfg.d_in)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise FormatError(f"{str(where)!r} lacks {missing}; a {cfg.architecture} SAE needs {list(expected)}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise FormatError(
                f"{str(where)!r}: {name} has shape {list(weights[name].shape)}, expected {list(shape)} "
                f"(d_in {cfg.d_in}, d_sae {cfg.d_sae})"
            )
    tensors = {n: weights[n].to(torch.float32) for n in expected}
    _check_finite(tensors, repr(str(where)))
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(value)
    return sae


def _check_finite(tensors: dict[str, Tensor], what: str) -> None:
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise FormatError(f"{what}: {', '.join(bad)} contain NaN or inf")


def _site_from_hook(hook_name: str) -> str:
    if not hook_name:
        return ""
    try:
        return str(parse_site(hook_name))
    except ValueError:
        return ""


# Markers of the site kind in Gemma Scope paths: Gemma Scope 2 folders, Gemma Scope repo suffixes.
_GS_KINDS = (
    (r"transcoder", "transcoder"),  # Gemma Scope 2's transcoders: mlp_in.L -> mlp_out.L
    (r"resid_post|-res(?:-|/|$)", "resid_post"),
    (r"attn_out|-att(?:-|/|$)", "attn_out"),
    (r"mlp_out|-mlp(?:-|/|$)", "mlp_out"),
)


def _gemma_scope_path_info(path: Path) -> tuple[str, dict[str, Any]]:
    """Site and release details from a Gemma Scope path: `...-res/layer_12/width_16k/average_l0_82/`
    (Gemma Scope) or `resid_post/layer_12_width_16k_l0_small/` (Gemma Scope 2)."""
    text = "/".join(path.parts[-5:])
    extra: dict[str, Any] = {}
    for pattern, key in (
        (r"average_l0_(\d+)", "average_l0"),
        (r"_l0_(small|medium|big)", "l0_size"),
        (r"width_(\w+?)(?:/|_l0|$)", "width"),
    ):
        m = re.search(pattern, text)
        if m:
            extra[key] = int(m.group(1)) if m.group(1).isdigit() else m.group(1)
    layer = re.search(r"layer_(\d+)", text)
    kind = next((k for marker, k in _GS_KINDS if re.search(marker, text)), None)
    site = f"{kind}.{layer.group(1)}" if kind and layer else ""
    return site, extra
