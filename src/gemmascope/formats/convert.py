"""Loading an SAE from any supported format (`load_sae`: a native or SAELens folder, Gemma Scope
`params.npz`, Gemma Scope 2 `params.safetensors`, a file or the folder holding it) and converting
between them (`convert`). Knows nothing of training.
"""

from __future__ import annotations

from pathlib import Path

from gemmascope.errors import FormatError
from gemmascope.formats.gemma_scope import (
    GS2_CONFIG,
    GS2_FILE,
    NPZ_FILE,
    export_files,
    load_gemma_scope,
    save_params_npz,
    save_params_safetensors,
)
from gemmascope.formats.native import load_log10_density, load_saelens, save_sae
from gemmascope.runs import CFG_FILE, WEIGHTS_FILE
from gemmascope.sae import SAE

CONVERT_FORMATS = ("native", "npz", "safetensors")


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
            sae = load_saelens(path)
        elif (path / NPZ_FILE).exists():
            sae = load_gemma_scope(path / NPZ_FILE)
        elif (path / GS2_FILE).exists():
            sae = load_gemma_scope(path / GS2_FILE)
        else:
            raise FormatError(
                f"no SAE in folder {str(path)!r}: expected {CFG_FILE} + {WEIGHTS_FILE} (native / SAELens), "
                f"{NPZ_FILE} (Gemma Scope) or {GS2_FILE} (Gemma Scope 2)"
            )
    elif path.name == WEIGHTS_FILE or path.name == CFG_FILE:
        return load_sae(path.parent, device, d_in)
    elif path.suffix in (".npz", ".safetensors"):
        sae = load_gemma_scope(path)
    else:
        raise FormatError(f"unknown SAE file {str(path)!r}: expected a folder, a .npz or a .safetensors file")
    if d_in is not None and sae.d_in != d_in:
        where = f" of site {sae.cfg.site}" if sae.cfg.site else ""
        raise FormatError(
            f"SAE at {str(path)!r} has d_in {sae.d_in}, but the site{where} it should read has d_in {d_in}"
        )
    return sae.to(device)


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
    outputs = [dest] if to == "native" else export_files(dest, to)
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
