"""Our native SAE folder, which is a SAELens (v6) folder: `cfg.json` (sizes at the top, provenance under
`metadata`, ours under `metadata.gemmascope`), `sae_weights.safetensors` and `sparsity.safetensors`
(log10 feature densities); and SAELens folders written by SAELens (v6 and older). An SAE is saved in
its architecture's saved form (`Architecture.as_saved`: BatchTopK as JumpReLU) under its SAELens name
(`Architecture.saelens_name`); a transcoder under SAELens's transcoder names.

Knows nothing of training: a saved SAE takes raw activations (the trainer folds its input scaling in
before saving). Where SAE folders live in a run folder is runs/'s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from gemmascope import __version__
from gemmascope.errors import FormatError
from gemmascope.formats.weights import build, check_finite, config, read_safetensors, site_from_hook, state
from gemmascope.runs import (
    CFG_FILE,
    EVAL_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    disk_errors,
    held_by_writer,
    is_sae_folder,
    tmp_path,
)
from gemmascope.sae import SAE, SAEConfig, architecture, architecture_names, max_norm_from_extra
from gemmascope.sites import parse_site

# The SAELens config version we write (its v6 layout: sizes at the top, provenance under "metadata").
_SAELENS_VERSION = "6.0.0"
# SAELens's plain ReLU SAE ("standard") has transcoders named without a prefix: "transcoder",
# "skip_transcoder"; every other architecture's are "NAME_transcoder", "NAME_skip_transcoder".
_STANDARD = "standard"
_SAELENS_TOPK = "topk"  # SAELens < 6 wrote a TopK SAE as "standard" with activation_fn "topk"


def save_sae(
    sae: SAE, folder: Path | str, log10_density: Tensor | None = None, *, overwrite: bool = False
) -> Path:
    """Save an SAE as a SAELens-compatible folder: `cfg.json`, `sae_weights.safetensors` (W_enc,
    W_dec, b_enc, b_dec and the architecture's own, JumpReLU's threshold) and, when given, `sparsity.safetensors`
    (`sparsity`: log10 feature density `[d_sae]`). An SAE is saved in its architecture's saved form
    (`Architecture.as_saved`: a BatchTopK SAE as the JumpReLU SAE with one global threshold it is at
    inference). Written to `FOLDER.tmp` and renamed when complete;
    an existing folder is never replaced unless `overwrite`, and then only when it is an SAE folder."""
    folder = Path(folder)
    sae = architecture(sae.cfg.architecture).as_saved(sae)
    _check_replaceable(folder, overwrite)
    weights = state(sae)
    if "W_skip" in weights:  # SAELens's layout: [d_out, d_in], applied as x @ W_skip.T
        weights["W_skip"] = weights["W_skip"].T.contiguous()
    check_finite(weights, f"SAE for {str(folder)!r}")
    density = None
    if log10_density is not None:
        density = log10_density.detach().to("cpu", torch.float32).contiguous()
        if density.shape != (sae.d_sae,):
            raise FormatError(f"log10_density has shape {tuple(density.shape)}, expected ({sae.d_sae},)")
    tmp = tmp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    with held_by_writer(folder):  # a folder of a run folder is written holding its lock
        with disk_errors(folder, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
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


def saelens_architecture(c: SAEConfig) -> str:
    """SAELens's name of the architecture: `jumprelu`, `topk`, `standard`; a transcoder's
    `jumprelu_transcoder`, `jumprelu_skip_transcoder`, `transcoder`, `skip_transcoder` (a TopK
    transcoder, which SAELens has no name for, `topk_transcoder`, read back by us only)."""
    return _saelens_name(architecture(c.architecture).saelens_name, c.is_transcoder, c.affine_skip)


def _saelens_name(name: str, transcoder: bool, skip: bool) -> str:
    if not transcoder:
        return name
    return ("" if name == _STANDARD else f"{name}_") + ("skip_" if skip else "") + "transcoder"


def _saelens_names() -> dict[str, tuple[str, bool, bool]]:
    """Every SAELens architecture name we read -> (SAELens's name of the kind of SAE, transcoder,
    affine skip), from the registry."""
    out: dict[str, tuple[str, bool, bool]] = {}
    for name in architecture_names():
        base = architecture(name).saelens_name
        for transcoder, skip in ((False, False), (True, False), (True, True)):
            out.setdefault(_saelens_name(base, transcoder, skip), (base, transcoder, skip))
    return out


def _ours(base: str) -> str:
    """Our architecture of SAELens's kind `base`, as we load it (its saved form: BatchTopK's
    SAELens folders hold the JumpReLU SAE it is at inference)."""
    arch = next(architecture(n) for n in architecture_names() if architecture(n).saelens_name == base)
    return arch.saved_as or arch.name


def _saelens_cfg(sae: SAE) -> dict[str, Any]:
    c = sae.cfg
    site = parse_site(c.site) if c.site else None
    cfg: dict[str, Any] = {
        "architecture": saelens_architecture(c),
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # saved SAEs take raw activations (RECIPE 1)
        "normalize_activations": "none",  # the input scaling is folded into the weights
        "reshape_activations": "none",
    }
    if c.k is not None:  # an architecture that takes k (a saved BatchTopK SAE has none)
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


def load_log10_density(folder: Path | str) -> Tensor | None:
    """The `sparsity` tensor (log10 feature density `[d_sae]`) of a SAELens folder, if it has one."""
    path = Path(folder) / SPARSITY_FILE
    if not path.exists():
        return None
    return read_safetensors(path)["sparsity"]


def load_saelens(folder: Path) -> SAE:
    """The SAE of a native or SAELens folder (`cfg.json` + `sae_weights.safetensors`)."""
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot read {str(folder / CFG_FILE)!r}: {err}") from err
    if not isinstance(raw, dict):
        raise FormatError(f"{str(folder / CFG_FILE)!r} is not a JSON object")
    meta = raw.get("metadata") or {}
    flat = {**raw, **meta}  # SAELens < 6 keeps metadata at the top level
    ours = meta.get("gemmascope") or {}
    arch_name, transcoder, skip = _architecture_of(flat, folder)
    k = flat.get("k") or (flat.get("activation_fn_kwargs") or {}).get("k")
    norm = flat.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise FormatError(
            f"{str(folder)!r} normalizes activations at run time ({norm!r}); only SAEs with the scaling "
            "folded into the weights (normalize_activations 'none') are supported"
        )
    weights = read_safetensors(folder / WEIGHTS_FILE)
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    scaling = weights.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise FormatError(f"{str(folder)!r} has a fine-tuning scaling_factor other than 1; not supported")
    for name in ("d_in", "d_sae"):
        if not isinstance(raw.get(name), int):
            raise FormatError(f"{str(folder / CFG_FILE)!r} lacks a whole-number {name!r}")
    site = ours.get("site") or site_from_hook(str(flat.get("hook_name", flat.get("hook_point", ""))))
    cfg = config(
        folder / CFG_FILE,
        architecture=arch_name,
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        k=int(k) if k is not None and architecture(arch_name).uses_k else None,
        model_name=str(flat.get("model_name") or ""),
        site=site,
        hook_name=str(flat.get("hook_name") or flat.get("hook_point") or ""),
        context_size=int(flat.get("context_size") or 128),
        dataset=str(flat.get("dataset_path") or ""),
        extra=dict(ours.get("extra") or {"source": "saelens"}),
        max_norm=_max_norm(ours),
        out_site=(ours.get("out_site") or site_from_hook(str(flat.get("hook_name_out") or "")))
        if transcoder
        else "",
        affine_skip=skip,
    )
    if transcoder and not cfg.out_site:
        raise FormatError(
            f"{str(folder / CFG_FILE)!r} holds a transcoder but names no output site: expected "
            "metadata.hook_name_out (e.g. 'blocks.6.hook_mlp_out')"
        )
    if "W_skip" in weights:
        weights["W_skip"] = weights["W_skip"].T  # SAELens's [d_out, d_in], applied as x @ W_skip.T
    sae = build(cfg, weights, folder / WEIGHTS_FILE)
    if flat.get("apply_b_dec_to_input"):
        # SAELens subtracts b_dec before encoding; fold that into b_enc so the SAE takes raw x.
        with torch.no_grad():
            sae.b_enc.sub_(sae.b_dec @ sae.W_enc)
    return sae


def _architecture_of(flat: dict[str, Any], folder: Path) -> tuple[str, bool, bool]:
    """(our architecture, transcoder, affine skip) of a SAELens cfg.json's `architecture` (SAELens < 6:
    a "standard" SAE with a TopK `activation_fn` is a TopK SAE)."""
    name = str(flat.get("architecture", _STANDARD))
    known = _saelens_names()
    if name not in known:
        supported = sorted(n for n, (_, transcoder, _) in known.items() if not transcoder)
        raise FormatError(f"{str(folder)!r} holds a SAELens {name!r} SAE; supported: {', '.join(supported)}")
    base, transcoder, skip = known[name]
    if base == _STANDARD and flat.get("activation_fn", flat.get("activation_fn_str")) == _SAELENS_TOPK:
        base = _SAELENS_TOPK
    return _ours(base), transcoder, skip


def _max_norm(ours: dict[str, Any]) -> float | None:
    """`SAEConfig.max_norm` from our part of cfg.json; older folders have only the extra keys."""
    if ours.get("max_norm") is not None:
        return float(ours["max_norm"])
    return max_norm_from_extra(ours.get("extra") or {})
