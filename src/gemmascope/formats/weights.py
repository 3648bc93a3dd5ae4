"""An SAE's weights as every file format holds them: which tensors an architecture saves (`state`),
the checks every loader makes (keys, shapes, finiteness) and the module built from them (`build`),
and the small readers the formats share. Knows nothing of where files live (runs/) or of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from gemmascope.errors import FormatError
from gemmascope.sae import SAE, SAEConfig, architecture, build_sae
from gemmascope.sites import parse_site

# The tensors of every SAE; an architecture adds its own per-latent ones (`Architecture.extra_tensors`).
BASE_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


def state(sae: SAE) -> dict[str, Tensor]:
    """The weights as saved, fp32 on the CPU: the base four, the architecture's own, and a
    transcoder's `W_skip [d_in, d_out]` as we apply it."""
    names = [*BASE_TENSORS, *architecture(sae.cfg.architecture).extra_tensors]
    if sae.W_skip is not None:
        names.append("W_skip")
    return {n: getattr(sae, n).detach().to("cpu", torch.float32).contiguous().clone() for n in names}


def build(cfg: SAEConfig, weights: dict[str, Tensor], where: Path) -> SAE:
    """An SAE module holding `weights` after checking every key's presence, shape and finiteness."""
    arch = architecture(cfg.architecture)
    if arch.saved_as:  # never stored as such (batchtopk files are jumprelu)
        raise FormatError(f"{str(where)!r}: {cfg.architecture} SAEs are stored as {arch.saved_as}")
    sae = build_sae(cfg)
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
    }
    expected.update({name: (cfg.d_sae,) for name in arch.extra_tensors})
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
    check_finite(tensors, repr(str(where)))
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(value)
    return sae


def config(where: Path, **kwargs: Any) -> SAEConfig:
    """An SAEConfig from a file's values, or a FormatError naming the file."""
    try:
        return SAEConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise FormatError(f"{str(where)!r} has an invalid SAE config: {err}") from err


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise FormatError(f"{what}: {', '.join(bad)} contain NaN or inf")


def check_new_file(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FormatError(f"{str(path)!r} already exists; refusing to overwrite it (pass --overwrite)")
    if path.is_dir():
        raise FormatError(f"{str(path)!r} is a folder, not a file; refusing to replace it")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"cannot read {str(path)!r}: {err}") from err


def site_from_hook(hook_name: str) -> str:
    """The site a hook name names (`blocks.6.hook_resid_post` -> `resid_post.6`), or ""."""
    if not hook_name:
        return ""
    try:
        return str(parse_site(hook_name))
    except ValueError:
        return ""
