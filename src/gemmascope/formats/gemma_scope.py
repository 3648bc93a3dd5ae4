"""Gemma Scope's files (RECIPE.md section 5): Gemma Scope (Gemma 2) `params.npz` and Gemma Scope 2
(Gemma 3) `params.safetensors` with lower-case keys and a `config.json` beside it naming the sites
(a transcoder's skip connection as `affine_skip_connection`). Both hold JumpReLU SAEs only
(`GEMMA_SCOPE_ARCHITECTURE`): an SAE saved as another architecture cannot be exported to them.

Knows nothing of training or of where files live in a run folder (runs/).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from gemmascope import __version__
from gemmascope.errors import FormatError
from gemmascope.formats.weights import build as build_weights
from gemmascope.formats.weights import check_finite, check_new_file, config, read_safetensors, state
from gemmascope.runs import save_atomic, write_atomic
from gemmascope.sae import SAE, architecture
from gemmascope.sites import parse_site, site_of_hf_hook

NPZ_FILE = "params.npz"  # Gemma Scope (Gemma 2)
GS2_FILE = "params.safetensors"  # Gemma Scope 2 (Gemma 3)
GS2_CONFIG = "config.json"  # beside it
GS2_SKIP = "affine_skip_connection"  # a Gemma Scope 2 transcoder's skip connection, [d_in, d_out]
PARAM_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
GEMMA_SCOPE_ARCHITECTURE = "jumprelu"  # what every Gemma Scope file holds


def save_params_npz(sae: SAE, path: Path | str, *, overwrite: bool = False) -> Path:
    """Export a JumpReLU SAE as Gemma Scope's `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold, fp32).
    The file keeps weights only; site and training details live in the native folder. An existing
    file is replaced only with `overwrite`."""
    params = _gemma_scope_params(sae, "params.npz")
    path = _file_path(path, NPZ_FILE)
    check_new_file(path, overwrite)
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
    check_new_file(path, overwrite)
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


def export_files(path: Path | str, fmt: str) -> list[Path]:
    """The files an export to `path` as `fmt` ("npz" or "safetensors") writes: the params file, and
    for Gemma Scope 2 the `config.json` beside it (`convert` keeps them apart from its source)."""
    if fmt == "npz":
        return [_file_path(path, NPZ_FILE)]
    params = _file_path(path, GS2_FILE)
    return [params, params.with_name(GS2_CONFIG)]


def _check_config_beside(path: Path, overwrite: bool) -> None:
    """The `config.json` an export writes beside its file: a new one, or with `overwrite` one an SAE
    export wrote (never another file of that name, such as a model folder's)."""
    config_path = path.with_name(GS2_CONFIG)
    if not config_path.exists():
        return
    if not overwrite:
        raise FormatError(
            f"{str(config_path)!r} already exists beside it; refusing to overwrite it (pass --overwrite)"
        )
    try:
        ours = json.loads(config_path.read_bytes())
    except (OSError, ValueError):
        ours = None
    if not (isinstance(ours, dict) and {"width", "hf_hook_point_in"} <= set(ours)):
        raise FormatError(
            f"{str(config_path)!r} beside it is not an SAE's config.json (a model's?); refusing to replace "
            "it: export into a new folder"
        )


def _file_path(path: Path | str, default_name: str) -> Path:
    """`path` itself when it names a file of the format's suffix, else `path/default_name` (its
    folder is made by the atomic write, and removed again when that fails)."""
    path = Path(path)
    if path.is_dir() or path.suffix != Path(default_name).suffix:
        path = path / default_name
    return path


def _gemma_scope_params(sae: SAE, fmt: str) -> dict[str, Tensor]:
    """The weights an exported Gemma Scope file holds: those of the SAE's saved form, which must be
    a JumpReLU SAE."""
    sae = architecture(sae.cfg.architecture).as_saved(sae)
    if sae.cfg.architecture != GEMMA_SCOPE_ARCHITECTURE:
        raise FormatError(
            f"{fmt} holds JumpReLU SAEs only, not {sae.cfg.architecture}; save it natively instead"
        )
    params = state(sae)
    check_finite(params, f"SAE exported to {fmt}")
    return params


def load_gemma_scope(path: Path) -> SAE:
    """Gemma Scope `params.npz` (W_enc...) or Gemma Scope 2 `params.safetensors` (w_enc...)."""
    if path.suffix == ".npz":
        try:
            with np.load(path) as data:
                arrays = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except (OSError, ValueError, EOFError) as err:
            raise FormatError(f"cannot read {str(path)!r}: {err}") from err
        fmt = "gemma-scope"
    else:
        arrays = read_safetensors(path)
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
    cfg = config(
        path,
        architecture=GEMMA_SCOPE_ARCHITECTURE,
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
    return build_weights(cfg, weights, path)


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
