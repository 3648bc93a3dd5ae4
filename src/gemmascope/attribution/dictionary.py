"""What the replacement model replaces every MLP with, as attribution reads it (`Dictionary`): per layer
the encoder columns its features read, the decoders they write (a transcoder's latent writes its own
layer's MLP output; a cross-layer transcoder's writes its own and every later layer's), the affine
skip connection, the positions it leaves to the model (massive inputs), its latents on a prompt and
its predicted MLP outputs. `dictionary_of` builds one from a transcoder per layer (checked: one per
layer, in order, reading `mlp_in.L` and writing `mlp_out.L`) or from a `clt.CrossLayerTranscoder`,
so the graph, the replacement model and the interventions are written once for both; and finding
a run's transcoder set (`transcoder_set`) or its CLT (`run_clt`).

Everything is float32 on the CPU. Knows nothing of graphs or files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gemmascope.clt import CrossLayerTranscoder, check_model
from gemmascope.errors import ConfigError, SiteError, StoreError
from gemmascope.models import LanguageModel
from gemmascope.runs import clt_layer_id
from gemmascope.sae import SAE, encode_inputs, massive_mask

Replacing = Sequence[SAE] | CrossLayerTranscoder  # what a graph may be drawn over


@dataclass
class Dictionary:
    """The replacement's features, layer by layer (see the module docstring). `decoders[L]` is
    `[width_L, n_targets_L, d]`: latents of layer L write layers L .. L + n_targets_L − 1."""

    encoders: list[Tensor]  # per layer [d, width_L]
    decoders: list[Tensor]  # per layer [width_L, n_targets_L, d]
    skips: list[Tensor | None]  # per layer [d, d] (x @ W_skip), or None
    source: Replacing
    names: list[str]  # per layer, what the graph files record as its transcoders (a CLT's: runs.clt_layer_id)

    @property
    def n_layers(self) -> int:
        return len(self.encoders)

    @property
    def cross_layer(self) -> bool:
        return isinstance(self.source, CrossLayerTranscoder)

    def massive(self, layer: int, x: Tensor) -> Tensor:
        """`[n]` bool: positions of layer `layer`'s MLP input `x [n, d]` the dictionary leaves to the
        model (`sae.massive_mask`; a CLT, trained on every token, none)."""
        if isinstance(self.source, CrossLayerTranscoder):
            return torch.zeros(x.shape[0], dtype=torch.bool)
        return massive_mask(self.source[layer], x)

    @torch.no_grad()
    def encode(self, layer: int, x: Tensor) -> Tensor:
        """`[n, width_L]`: layer `layer`'s latents on its MLP input `x [n, d]`, zero where massive."""
        if isinstance(self.source, CrossLayerTranscoder):
            return self.source.encode(layer, x.to(self.source.b_dec.dtype)).float().cpu()
        return encode_inputs(self.source[layer], x).float().cpu()

    @torch.no_grad()
    def predict(self, mlp_in: list[Tensor]) -> list[Tensor]:
        """Per layer `[n, d]`: the predicted MLP outputs (skip connection and b_dec included) from every
        layer's MLP input `mlp_in[L] [n, d]`, each computed as the module computes it."""
        if isinstance(self.source, CrossLayerTranscoder):
            clt = self.source
            xs = [x.to(clt.b_dec.dtype) for x in mlp_in]
            acts = [clt.encode(s, xs[s]) for s in range(clt.n_layers)]
            return [(clt.decode(t, acts) + clt.skip(t, xs[t])).float().cpu() for t in range(clt.n_layers)]
        return [tc(x.to(tc.W_enc.dtype)).float().cpu() for tc, x in zip(self.source, mlp_in, strict=True)]


def dictionary_of(model: LanguageModel, replacing: Replacing) -> Dictionary:
    """The `Dictionary` of one transcoder per layer (a ConfigError or SiteError unless there is one
    per layer of `model`, in order, `mlp_in.L -> mlp_out.L`, `d_model` wide) or of a CLT spanning
    the model (`clt.check_model`)."""
    if isinstance(replacing, CrossLayerTranscoder):
        check_model(model, replacing)
        clt = replacing
        return Dictionary(
            encoders=[_cpu(w) for w in clt.W_enc],
            decoders=[_cpu(clt.decoder(s)) for s in range(clt.n_layers)],
            skips=[None if clt.W_skip is None else _cpu(clt.W_skip[s]) for s in range(clt.n_layers)],
            source=clt,
            names=[clt_layer_id(clt.cfg.extra.get("folder", "clt"), s) for s in range(clt.n_layers)],
        )
    transcoders = list(replacing)
    if len(transcoders) != model.n_layers:
        raise ConfigError(
            f"the replacement model needs one transcoder per layer ({model.n_layers}), got {len(transcoders)}"
        )
    for layer, tc in enumerate(transcoders):
        if not tc.is_transcoder or tc.cfg.site != f"mlp_in.{layer}" or tc.cfg.out_site != f"mlp_out.{layer}":
            raise SiteError(
                f"transcoder {layer} reads {tc.cfg.site or '?'} and writes {tc.cfg.out_site or '?'}; expected "
                f"mlp_in.{layer} -> mlp_out.{layer} (one transcoder per layer, in order)"
            )
        if tc.d_in != model.d_model:
            raise SiteError(f"transcoder {layer} has d_in {tc.d_in}, the model's d_model is {model.d_model}")
    return Dictionary(
        encoders=[_cpu(tc.W_enc) for tc in transcoders],
        decoders=[_cpu(tc.W_dec)[:, None] for tc in transcoders],
        skips=[None if tc.W_skip is None else _cpu(tc.W_skip) for tc in transcoders],
        source=transcoders,
        names=[str(tc.cfg.extra.get("folder", "")) for tc in transcoders],
    )


def _cpu(weight: Tensor) -> Tensor:
    return weight.detach().float().cpu()


def run_clt(run_dir: Path | str, choose: str | None = None) -> CrossLayerTranscoder:
    """The run folder's cross-layer transcoder (under `clts/`; with several, the one whose folder
    holds `choose`), or a StoreError naming what there is and the command that trains one."""
    from gemmascope.formats.clt import load_clt
    from gemmascope.runs import find_clts

    found = [f for f in find_clts(run_dir) if not choose or choose in str(f.relative_to(run_dir))]
    if len(found) != 1:
        have = ", ".join(str(f.relative_to(run_dir)) for f in find_clts(run_dir)) or "none"
        raise StoreError(
            f"run folder {str(run_dir)!r} has {'no' if not found else len(found)} cross-layer transcoders"
            f"{' matching ' + repr(choose) if choose else ''} (it has: {have}); "
            + ("choose one with --clt SUBSTRING" if found else f"train one: gemmascope suite {run_dir} --clt")
        )
    clt = load_clt(found[0])
    clt.cfg.extra["folder"] = str(found[0].relative_to(run_dir))
    return clt


# ---------------------------------------------------------------------------------------------
# A run's transcoder set, or its cross-layer transcoder


def transcoder_set(
    run_dir: Path | str, n_layers: int, choose: str | None = None, saes: Mapping[str, SAE] | None = None
) -> list[SAE]:
    """One transcoder per layer from a run folder's SAEs (those with an output site, by the layer
    of the site they read), in layer order. With several per layer, `choose` (a substring of their
    ids, e.g. `skip_transcoder`, `w4096` or `l0_45`) picks one; a StoreError names the missing layers
    or the layers with more than one to choose from. `saes`: the run's SAEs already loaded, by id
    (`opening.open_run`), else they are loaded from the run folder."""
    from gemmascope.formats import load_sae
    from gemmascope.runs import find_saes, sae_id
    from gemmascope.sites import parse_site

    folders = {} if saes is not None else {sae_id(f): f for f in find_saes(run_dir)}
    by_layer: dict[int, list[tuple[str, SAE]]] = {}
    for key in saes if saes is not None else folders:
        if "transcoder" not in key or (choose and choose not in key):
            continue
        sae = saes[key] if saes is not None else load_sae(folders[key])
        if not sae.is_transcoder or "clt_layer" in sae.cfg.extra:  # a CLT's layer is not one of a set
            continue
        sae.cfg.extra["folder"] = key
        by_layer.setdefault(parse_site(sae.cfg.site).layer, []).append((key, sae))
    missing = [layer for layer in range(n_layers) if layer not in by_layer]
    if missing:
        have = sorted(by_layer)
        raise StoreError(
            f"run folder {str(run_dir)!r} has no transcoder{' matching ' + repr(choose) if choose else ''} for "
            f"layers {_ranges(missing)} (it has {'layers ' + _ranges(have) if have else 'none'}); an attribution "
            f"graph needs one per layer: gemmascope suite {run_dir} --transcoders --layers all"
        )
    several = {layer: found for layer, found in by_layer.items() if len(found) > 1}
    if several:
        layer, found = next(iter(sorted(several.items())))
        raise StoreError(
            f"run folder {str(run_dir)!r} has {len(found)} transcoders at layer {layer} "
            f"({', '.join(key for key, _ in found)}): choose one set with --transcoders SUBSTRING of their ids"
        )
    return [by_layer[layer][0][1] for layer in range(n_layers)]


def _ranges(layers: list[int]) -> str:
    """`[0, 1, 2, 5]` as `0-2, 5`."""
    parts: list[str] = []
    for layer in layers:
        if parts and parts[-1].split("-")[-1] == str(layer - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{layer}"
        else:
            parts.append(str(layer))
    return ", ".join(parts)
