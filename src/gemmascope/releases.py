"""Official Gemma Scope releases by name. Owns the mapping from a release and an SAE id, as Gemma
Scope and SAELens name them, to the hub repository, the file in it, the site and the model the SAE
belongs to; and fetching that file from the hub or from a local folder of the same layout.

- Gemma Scope (Gemma 2): release `gemma-scope-2b-pt-res` (also `9b`, `27b`, `-it-`, `-att`, `-mlp`),
  id `layer_20/width_16k/average_l0_71` -> `google/gemma-scope-2b-pt-res`, file `ID/params.npz`.
- Gemma Scope 2 (Gemma 3): release `gemma-scope-2-270m-pt` (also `1b`, `4b`, `12b`, `27b`, `-it`),
  id `resid_post/layer_6_width_16k_l0_small` -> `google/gemma-scope-2-270m-pt`, file `ID/params.safetensors`;
  transcoders as `transcoder/layer_6_width_16k_l0_small` (or `transcoder_all/...`): MLP input to output.

Reading the files is formats/' job; this module only resolves names. Knows nothing of training.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gemmascope.errors import ConfigError, FormatError
from gemmascope.formats import load_sae
from gemmascope.models import BUNDLED_MODEL
from gemmascope.sae import SAE
from gemmascope.sites import parse_site

_GS1 = re.compile(r"^gemma-scope-(?P<size>2b|9b|27b)-(?P<variant>pt|it)-(?P<kind>res|att|mlp)$")
_GS2 = re.compile(r"^gemma-scope-2-(?P<size>270m|1b|4b|12b|27b)-(?P<variant>pt|it)$")
_GS1_KINDS = {"res": "resid_post", "att": "attn_out", "mlp": "mlp_out"}
_GS1_ID = re.compile(r"^layer_(?P<layer>\d+)/width_(?P<width>\w+)/average_l0_(?P<l0>\d+)$")
_GS2_ID = re.compile(
    r"^(?P<kind>resid_post|attn_out|mlp_out|transcoder)(?:_all)?/layer_(?P<layer>\d+)_width_(?P<width>\w+)_l0_(?P<l0>\w+)$"
)


@dataclass(frozen=True)
class ReleaseSAE:
    """Where one official SAE lives and what it reads."""

    repo_id: str  # e.g. "google/gemma-scope-2b-pt-res"
    filename: str  # path inside the repo, e.g. "layer_20/width_16k/average_l0_71/params.npz"
    model_name: str  # the model it was trained on, as `models.load_model` takes it
    site: str  # e.g. "resid_post.20"


def resolve(release: str, sae_id: str) -> ReleaseSAE:
    """The repository, file, model and site of `sae_id` in `release`, or a ConfigError that shows
    the expected forms."""
    sae_id = sae_id.strip("/")
    if m := _GS1.match(release):
        ident = _GS1_ID.match(sae_id)
        if ident is None:
            raise ConfigError(
                f"SAE id {sae_id!r} is not of the form 'layer_L/width_W/average_l0_K' that {release!r} uses "
                "(canonical ids are a SAELens alias: use the average_l0 id they point to)"
            )
        model = f"google/gemma-2-{m['size']}" + ("-it" if m["variant"] == "it" else "")
        site = f"{_GS1_KINDS[m['kind']]}.{ident['layer']}"
        return ReleaseSAE(f"google/{release}", f"{sae_id}/params.npz", model, site)
    if m := _GS2.match(release):
        ident = _GS2_ID.match(sae_id)
        if ident is None:
            raise ConfigError(
                f"SAE id {sae_id!r} is not of the form 'KIND/layer_L_width_W_l0_SIZE' that {release!r} uses, "
                "e.g. 'resid_post/layer_6_width_16k_l0_small'"
            )
        # The bundled model is Gemma 3 270M (pt): use it, so these SAEs work offline.
        pt_270m = m["size"] == "270m" and m["variant"] == "pt"
        model = BUNDLED_MODEL if pt_270m else f"google/gemma-3-{m['size']}-{m['variant']}"
        kind = (
            "mlp_in" if ident["kind"] == "transcoder" else ident["kind"]
        )  # a transcoder reads the MLP input
        site = f"{kind}.{ident['layer']}"
        return ReleaseSAE(f"google/{release}", f"{sae_id}/params.safetensors", model, site)
    raise ConfigError(
        f"unknown release {release!r}: expected a Gemma Scope release such as 'gemma-scope-2b-pt-res' "
        "(2b|9b|27b, pt|it, res|att|mlp) or a Gemma Scope 2 release such as 'gemma-scope-2-270m-pt'"
    )


def release_file(release: str, sae_id: str, root: str | Path | None = None) -> Path:
    """The local path of an official SAE file: under `root` (or $GEMMASCOPE_RELEASES) laid out as
    `ROOT/RELEASE/ID/params.*`, else downloaded from the hub by `huggingface_hub` (needs access)."""
    where = resolve(release, sae_id)
    root = root or os.environ.get("GEMMASCOPE_RELEASES")
    if root is not None:
        path = Path(root) / release / where.filename
        if not path.exists():
            raise FormatError(
                f"no file {str(path)!r}: expected {release}/{where.filename} under {str(root)!r}"
            )
        return path
    from huggingface_hub import constants, hf_hub_download

    offline = bool(constants.HF_HUB_OFFLINE)  # HF_HUB_OFFLINE=1: the local hub cache only, no network
    try:
        return Path(
            hf_hub_download(
                repo_id=where.repo_id, filename=where.filename, local_files_only=offline, etag_timeout=5
            )
        )
    except Exception as err:  # network, auth or missing-file errors all mean the same to the user
        why = "HF_HUB_OFFLINE is set and it is not in the hub cache" if offline else str(err)
        raise FormatError(
            f"cannot fetch {where.filename!r} from {where.repo_id!r}: {why}. Without hub access, put the file "
            "under a folder laid out as RELEASE/ID/ and pass it as root= or $GEMMASCOPE_RELEASES"
        ) from err


def load_release(release: str, sae_id: str, root: str | Path | None = None, device: str = "cpu") -> SAE:
    """Load an official Gemma Scope or Gemma Scope 2 SAE by release and id, with its model and site
    filled in so evaluation, indexing and steering know where it reads."""
    where = resolve(release, sae_id)
    sae = load_sae(release_file(release, sae_id, root), device=device)
    sae.cfg.model_name = where.model_name
    sae.cfg.site = where.site
    sae.cfg.hook_name = parse_site(where.site).hook_name
    if where.site.startswith("mlp_in."):  # a transcoder: MLP input -> MLP output of its layer
        sae.cfg.out_site = f"mlp_out.{parse_site(where.site).layer}"
    sae.cfg.extra = {**sae.cfg.extra, "release": release, "sae_id": sae_id}
    return sae
