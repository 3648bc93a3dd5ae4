"""Building the feature index: one streaming run over a held-out corpus slice that feeds every SAE
given (one forward pass of the model captures all their sites), then the weight-only parts (logit
lens, decoder neighbours), the cross-layer flow and the baseline explanations, written to SQLite.

Two passes over the slice, each keeping only state bounded by the SAEs' widths:
  1. per latent: tokens fired on, max and min activation, the running top-k activating tokens with
     their windows; a sparse sample of activations for the cross-layer correlations;
  2. with each latent's range known: its 50-bin histogram and a uniform sample of windows in each
     of 5 equal-width activation intervals (the k smallest of i.i.d. random keys per interval),
     plus random windows with the latents active in each (negatives for detection scoring).
The second pass reads the sites' activations back from a temporary file when they fit in
`spill_bytes`, else runs the model again (same batches, same values). No dense
`[tokens, d_sae]` tensor of more than one batch ever exists.

Knows models, corpora and SAEs through their public functions; knows nothing of HTTP.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from gemmascope.corpus import DEFAULT_CORPUS, source_name, special_mask, token_rows
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.features.explain import CorpusWords, baseline_explanation, lens_word
from gemmascope.features.lens import decoder_neighbours, lens_agreement, logit_lens
from gemmascope.features.pages import (
    N_BINS,
    N_INTERVALS,
    PER_INTERVAL,
    TOP_K,
    WINDOW,
    feature_pages,
    lens_entries,
    lens_token,
    token_strings,
    window_tokens,
)
from gemmascope.features.store import BASELINE, FeatureIndex, sae_fingerprint
from gemmascope.features.stream import (
    Pass1Stats,
    Pass2Stats,
    SparseSample,
    top_correlations,
)
from gemmascope.models import LanguageModel
from gemmascope.runs import disk_errors, held_by_writer
from gemmascope.sae import SAE, encode_inputs, sae_site
from gemmascope.sites import Site, capture_batches, site_d_in

LOGIT_K = 10
N_NEIGHBOURS = 10
FLOW_K = 10
PAGE_CHUNK = 512  # feature pages assembled and written at once (bounds the memory of that step)
LENS_MIN_COUNT = 10  # a logit-lens token the baseline explanation names occurs this often in the index corpus


class _SiteActivations:
    """The sites' activations of the index rows, a batch of rows at a time, for both passes: from
    the model in the first; in the second from a temporary spill file when it was kept, else from
    the model again."""

    def __init__(
        self,
        model: LanguageModel,
        rows: Tensor,
        sites: list[Site],
        batch_rows: int,
        spill_dir: Path,
        spill_bytes: int,
    ) -> None:
        self.model, self.rows, self.sites, self.batch_rows = model, rows, sites, batch_rows
        n_rows, ctx = rows.shape
        widths = {site: site_d_in(model, site) for site in sites}
        self.spill: dict[Site, np.memmap] | None = None
        self.second_pass = "recompute"  # how pass 2 gets the activations
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if n_rows * ctx * sum(widths.values()) * 4 <= spill_bytes:
            remove_stale_spills(spill_dir)
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=spill_dir)
            try:
                self.spill = {
                    site: _reserved_memmap(Path(self._tmp.name) / f"{site}.npy", (n_rows, ctx, widths[site]))
                    for site in sites
                }
                self.second_pass = "spill"
            except OSError:  # no room for the spill: pass 2 runs the model again instead
                self.close()

    def batches(self, first: bool, desc: str, progress: bool) -> Iterator[tuple[int, dict[Site, Tensor]]]:
        spill = self.spill
        if first or spill is None:
            for batch in capture_batches(
                self.model, self.rows, self.sites, self.batch_rows, desc=desc, progress=progress
            ):
                if first and spill is not None:
                    for site, a in batch.acts.items():
                        spill[site][batch.start : batch.stop] = a.float().cpu().numpy()
                yield batch.start, batch.acts
            return
        n_rows = self.rows.shape[0]
        for start in tqdm(range(0, n_rows, self.batch_rows), desc=desc, unit="batch", disable=not progress):
            stop = min(n_rows, start + self.batch_rows)
            yield start, {site: torch.from_numpy(np.asarray(spill[site][start:stop])) for site in self.sites}

    def close(self) -> None:
        self.spill = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


SPILL_PREFIX = ".index-spill-"  # + the building process's id: a spill folder beside the index file


def _reserved_memmap(path: Path, shape: tuple[int, int, int]) -> np.memmap:
    """A float32 `.npy` memory map of `shape` whose disk blocks are allocated before it is mapped:
    a disk without room is an OSError here, never a SIGBUS when a page is first written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if shutil.disk_usage(path.parent).free < os.fstat(fd).st_size:  # no fallocate here: check
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    finally:
        os.close(fd)
    return array


def remove_stale_spills(folder: Path) -> None:
    """Remove the spill folders a killed build left in `folder` (those of processes that are gone;
    a spill folder without a process id is from an older version, also gone)."""
    for spill in folder.glob(f"{SPILL_PREFIX}*"):
        pid = spill.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(spill, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def build_index(
    model: LanguageModel,
    saes: Mapping[str, SAE],
    db_path: str | Path,
    n_tokens: int = 20_000,
    corpus: str = DEFAULT_CORPUS,
    split: str = "heldout",
    *,
    context_len: int = 128,
    batch_rows: int = 8,
    flow_tokens: int = 8192,
    n_null_windows: int = 64,
    seed: int = 0,
    spill_bytes: int = 1 << 30,
    folders: Mapping[str, str] | None = None,
    reader: LanguageModel | None = None,
    progress: bool = True,
) -> Path:
    """Index SAEs of one model over the first `n_tokens` token positions of a corpus split (by
    default the held-out split of the bundled Wikipedia corpus, which training does not use) and
    write them to the SQLite file `db_path` (created if missing; other SAEs in it are kept). Each
    SAE is marked complete only once all its rows are written. `flow_tokens` non-special tokens
    (0: none) sample the cross-layer correlations between SAEs at different layers. `reader` (default
    `model`) runs the corpus passes: the same model in another dtype (a bfloat16 copy,
    `models.reading_dtype`); the logit lens reads `model`'s weights. Returns `db_path`."""
    if not saes:
        raise ConfigError("build_index needs at least one SAE")
    if batch_rows < 1:
        raise ConfigError(f"batch_rows={batch_rows} must be at least 1")
    started = time.perf_counter()
    sites = {sae_id: sae_site(model, sae, sae_id) for sae_id, sae in saes.items()}
    rows = token_rows(model.tokenizer, n_tokens, corpus, split, context_len)
    keep = ~special_mask(rows, model.special_token_ids)  # [rows, ctx]
    n_valid = int(keep.sum())
    if n_valid == 0:
        raise CorpusError(f"the {split!r} split of corpus {corpus!r} gives no tokens besides BOS/EOS/pad")
    db_path = Path(db_path)
    with held_by_writer(db_path), disk_errors(db_path):  # a failed build is never served (complete=0)
        with FeatureIndex(db_path, create=True) as index:
            job = _Job(
                model, reader or model, dict(saes), sites, rows, keep, index, corpus, split, batch_rows, seed,
                started,
            )  # fmt: skip
            _begin(job, folders or {})
            passes = _corpus_passes(job, flow_tokens, n_null_windows, spill_bytes, progress)
            decode = token_strings(model, rows)  # token id -> text, for every page's windows
            stats = {sid: _write_pages(job, sid, passes, decode, progress) for sid in job.saes}
            if passes.samples:
                _write_flow(index, job.saes, sites, passes.samples)
            _finish(job, stats, min((s.n_tokens for s in passes.samples.values()), default=0))
    return db_path


@dataclass
class _Job:
    """One index build: the SAEs, their sites, the token rows and which positions count, the open
    index, and the settings every stage reads."""

    model: LanguageModel
    reader: LanguageModel  # the corpus passes' (model itself, or a copy in another dtype)
    saes: dict[str, SAE]
    sites: Mapping[str, Site]
    rows: Tensor  # [n_rows, ctx] token ids
    keep: Tensor  # [n_rows, ctx] bool: not BOS/EOS/pad
    index: FeatureIndex
    corpus: str
    split: str
    batch_rows: int
    seed: int
    started: float


@dataclass
class _Passes:
    """What the two passes over the corpus gathered per SAE (pass1: counts, extremes, top windows;
    pass2: histograms and interval samples), the flow samples, the null windows' latents, and timings."""

    pass1: dict[str, Pass1Stats]
    pass2: dict[str, Pass2Stats]
    samples: dict[str, SparseSample]
    centres: Tensor
    null_latents: dict[str, dict[int, Tensor]]
    second_pass: str
    first_pass_s: float
    corpus_s: float


def _begin(job: _Job, folders: Mapping[str, str]) -> None:
    """Register every SAE in the index (not served until `_finish`)."""
    for sae_id, sae in job.saes.items():
        site = job.sites[sae_id]
        job.index.begin_sae(
            {
                "sae_id": sae_id,
                "site": str(site),
                "layer": site.layer,
                "width": sae.d_sae,
                "d_in": sae.d_in,
                "architecture": sae.cfg.architecture,
                "model_name": job.model.name,
                "fingerprint": sae_fingerprint(sae),
                "folder": folders.get(sae_id),
            }
        )


def _corpus_passes(
    job: _Job, flow_tokens: int, n_null_windows: int, spill_bytes: int, progress: bool
) -> _Passes:
    """The two passes over the token rows (see the module docstring): one forward pass per batch
    feeds every SAE; the second reads the first's activations back when they were kept."""
    saes, sites, keep, ctx = job.saes, job.sites, job.keep, job.rows.shape[1]
    device = next(iter(saes.values())).W_enc.device
    unique_sites = sorted(set(sites.values()))
    source = _SiteActivations(
        job.reader, job.rows, unique_sites, job.batch_rows, job.index.path.parent, spill_bytes
    )
    try:
        with_flow = flow_tokens > 0 and len({s.layer for s in sites.values()}) > 1
        pass1 = {sid: Pass1Stats(sae.d_sae, TOP_K, WINDOW, device) for sid, sae in saes.items()}
        samples = (
            {sid: SparseSample(sae.d_sae, flow_tokens, 1 << 25) for sid, sae in saes.items()}
            if with_flow
            else {}
        )
        for start, acts_by_site in source.batches(True, "indexing: pass 1/2", progress):
            k = keep[start : start + job.batch_rows]
            for sid, sae in saes.items():
                acts = encode_inputs(sae, acts_by_site[sites[sid]], k).float()
                pass1[sid].update(acts, int(k.sum()), start * ctx)
                if with_flow:
                    samples[sid].update(acts[k.to(acts.device)].cpu())
        first_pass_s = time.perf_counter() - job.started

        pass2 = {
            sid: Pass2Stats(p.min_act, p.max_act, N_BINS, N_INTERVALS, PER_INTERVAL, WINDOW, job.seed)
            for sid, p in pass1.items()
        }
        centres = _null_window_centres(keep, n_null_windows, job.seed)
        null_latents: dict[str, dict[int, Tensor]] = {sid: {} for sid in saes}
        for start, acts_by_site in source.batches(False, "indexing: pass 2/2", progress):
            k = keep[start : start + job.batch_rows]
            for sid, sae in saes.items():
                acts = encode_inputs(sae, acts_by_site[sites[sid]], k).float()
                pass2[sid].update(acts, start * ctx)
                for c in centres[(centres // ctx >= start) & (centres // ctx < start + len(k))].tolist():
                    row, pos = c // ctx - start, c % ctx
                    span = acts[row, max(0, pos - WINDOW) : pos + WINDOW + 1]
                    null_latents[sid][c] = (span > 0).any(0).nonzero().squeeze(1).cpu()
        corpus_s = time.perf_counter() - job.started
    finally:
        source.close()
    return _Passes(pass1, pass2, samples, centres, null_latents, source.second_pass, first_pass_s, corpus_s)


def lens_vocabulary(rows: Tensor, decode: dict[int, str], min_count: int = LENS_MIN_COUNT) -> CorpusWords:
    """The words a baseline explanation may name as promoted, as `explain.lens_word` writes them
    (case and leading blank folded: " Animal", "animal" and " animal" are one word): those the index
    corpus `rows [n_rows, ctx]` uses at least `min_count` times in all their forms (a token seen once
    or twice, such as a Bengali piece of a name in English Wikipedia, says nothing a reader can
    check), and that a reader can see (not a byte-fallback piece, which decodes alone to U+FFFD "�",
    nor only blanks and invisible format characters such as U+200C). Each with its count (what a
    label's context words are weighed against)."""
    counts: list[int] = torch.bincount(rows.reshape(-1).cpu()).tolist()
    words: Counter[str] = Counter()
    for i, text in decode.items():
        if (
            i < len(counts)
            and "\ufffd" not in text
            and any(ch.isprintable() and not ch.isspace() for ch in text)
        ):
            words[lens_word(text)] += counts[i]
    return CorpusWords({word: n for word, n in words.items() if n >= min_count})


def relabel(model: LanguageModel, db_path: str | Path, sae_id: str, sae: SAE) -> int:
    """Write the weights part of one SAE's stored feature pages again (logit lens, neighbours: what
    `sae`'s weights say, seconds) and its baseline explanations from those pages and the corpus rows
    its stats name (for the lens vocabulary), as the build writes them: what an index built by an
    older lens or labeller needs to show the current one's, without a pass over the corpus
    (`gemmascope index RUN --relabel`). A StoreError when `sae` is not the SAE the index was built
    from. Holds the run folder's lock while it writes; a disk failure is one StoreError. Returns the
    number of latents labelled."""
    db_path = Path(db_path)
    with held_by_writer(db_path), disk_errors(db_path), FeatureIndex(db_path) as index:
        index.check_sae(sae_id, sae)
        info = index.sae_info(sae_id)
        stats = info["stats"]
        ctx = int(stats["context_len"])
        rows = token_rows(model.tokenizer, int(stats["n_rows"]) * ctx, stats["corpus"], stats["split"], ctx)
        decode = token_strings(model, rows)
        known = lens_vocabulary(rows, decode)
        lens, tok = weights_part(model, sae, sae_site(model, sae, sae_id)), lens_token(model, decode)
        for start in range(0, info["d_sae"], PAGE_CHUNK):
            stop = min(info["d_sae"], start + PAGE_CHUNK)
            index.patch_features(sae_id, {i: lens_entries(lens, i, tok) for i in range(start, stop)})
            labels = [
                (i, baseline_explanation(index.feature(sae_id, i), known), None) for i in range(start, stop)
            ]
            index.set_explanations(sae_id, labels, BASELINE)
    return int(info["d_sae"])


def weights_part(model: LanguageModel, sae: SAE, site: Site, progress: bool = False) -> dict[str, Any]:
    """What a feature page shows of an SAE's weights, for every latent: the logit lens's top and
    bottom `LOGIT_K` token ids and values and how much its top tokens agree (`lens_agreement`), the
    `N_NEIGHBOURS` nearest latents and their cosines (`pages.lens_entries` turns latent i's into its
    page's part)."""
    up_ids, up_vals, down_ids, down_vals = logit_lens(model, sae, site, LOGIT_K, progress=progress)
    nb_idx, nb_cos = decoder_neighbours(sae, N_NEIGHBOURS)
    return {
        "up_ids": up_ids.tolist(),
        "up_vals": up_vals.tolist(),
        "agreement": lens_agreement(model, up_ids).tolist(),
        "down_ids": down_ids.tolist(),
        "down_vals": down_vals.tolist(),
        "nb_idx": nb_idx.tolist(),
        "nb_cos": nb_cos.tolist(),
    }


def _write_pages(
    job: _Job, sid: str, passes: _Passes, decode: dict[int, str], progress: bool
) -> dict[str, Any]:
    """One SAE's feature pages (with logit lens, neighbours and baseline explanations) and null
    windows, a chunk of pages at a time; returns its build figures."""
    model, sae, rows = job.model, job.saes[sid], job.rows
    n_valid = int(job.keep.sum())
    t0 = time.perf_counter()
    lens = weights_part(model, sae, job.sites[sid], progress)
    weights_s = time.perf_counter() - t0
    pass1, pass2 = passes.pass1[sid], passes.pass2[sid]
    known = lens_vocabulary(rows, decode)
    for start in range(0, sae.d_sae, PAGE_CHUNK):  # a chunk of pages at a time: bounded memory
        stop = min(sae.d_sae, start + PAGE_CHUNK)
        chunk = list(feature_pages(pass1, pass2, n_valid, rows, decode, lens, model, start, stop))
        job.index.write_features(sid, chunk)
        job.index.set_explanations(
            sid,
            ((r[0], baseline_explanation({**r[4], "density": r[1]}, known), None) for r in chunk),
            BASELINE,
        )
    null_latents = passes.null_latents[sid]
    job.index.write_null_windows(
        sid,
        (
            (
                window_tokens(rows, c, decode, model.special_token_ids, model.tokenizer),
                null_latents[c].numpy(),
            )
            for c in passes.centres.tolist()
            if c in null_latents
        ),
    )
    pass1.top = pass2.samples = None  # type: ignore[assignment]  # free as we go
    return {
        "n_tokens": n_valid,
        "n_rows": int(rows.shape[0]),
        "context_len": rows.shape[1],
        "corpus": source_name(job.corpus),
        "split": job.split,
        "seed": job.seed,
        "model_name": model.name,
        "second_pass": passes.second_pass,
        "first_pass_s": round(passes.first_pass_s, 2),
        "corpus_passes_s": round(passes.corpus_s, 2),
        "weights_s": round(weights_s, 2),
        "width": sae.d_sae,
    }


def _finish(job: _Job, stats: Mapping[str, dict[str, Any]], flow_n: int) -> None:
    """The last write: only now is each SAE served."""
    total_s = time.perf_counter() - job.started
    n_valid = int(job.keep.sum())
    for sid in job.saes:
        job.index.finish_sae(
            sid,
            {
                **stats[sid],
                "flow_tokens": flow_n,
                "seconds": round(total_s, 2),
                "tokens_per_s": round(n_valid / total_s, 1),
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )


def _write_flow(
    index: FeatureIndex,
    saes: Mapping[str, SAE],
    sites: Mapping[str, Site],
    samples: Mapping[str, SparseSample],
) -> None:
    """Correlations between every pair of SAEs at different layers over the shared token sample."""
    n = min(s.n_tokens for s in samples.values())
    if n < 2:
        return
    matrices = {sid: s.matrix(n) for sid, s in samples.items()}
    ids = sorted(saes, key=lambda sid: (sites[sid].layer, sid))
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if sites[a].layer == sites[b].layer:
                continue
            a_idx, a_corr, b_idx, b_corr = top_correlations(matrices[a], matrices[b], FLOW_K)
            index.write_flow(_flow_rows(a, b, a_idx, a_corr))
            index.write_flow(_flow_rows(b, a, b_idx, b_corr))


def _flow_rows(sid: str, other: str, idx: Tensor, corr: Tensor) -> Iterator[tuple[str, int, str, int, float]]:
    """The index's flow rows of one direction's `idx, corr [d_sae, k]`, read out as lists (an element
    at a time took 0.39 s a call at width 4,096, 2 minutes over the 306 of an 18-layer suite)."""
    latents, slots = (idx >= 0).nonzero().unbind(1)
    picked = zip(latents.tolist(), idx[latents, slots].tolist(), corr[latents, slots].tolist(), strict=True)
    for latent, j, c in picked:
        yield sid, latent, other, j, round(c, 4)


def _null_window_centres(keep: Tensor, n: int, seed: int) -> Tensor:
    """`[n]` sorted flat token indices of random non-special positions (the centres of the random
    windows used as negatives in detection scoring)."""
    candidates = keep.flatten().nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(len(candidates), generator=g)[: min(n, len(candidates))]
    return candidates[pick].sort().values
