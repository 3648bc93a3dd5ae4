"""The feature index on disk: one SQLite file (`features.sqlite` in a run folder) holding several
SAEs keyed by `sae_id`, and `FeatureIndex`, the one way to read and write it.

An SAE's rows are written inside the build and the SAE is marked complete only at the end, so a
half-built index (a killed build) is never served: readers refuse an incomplete SAE. Each SAE's
weights are fingerprinted so an index can be checked against the SAE it is used with.

Knows nothing of how the statistics are computed (see build.py) or of HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gemmascope.errors import ConfigError, StoreError
from gemmascope.features.rank import Firing
from gemmascope.runs import disk_failure, sae_order
from gemmascope.sae import SAE

SCHEMA = "gemmascope-features-1"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS saes (
    sae_id TEXT PRIMARY KEY, site TEXT NOT NULL, layer INTEGER NOT NULL, width INTEGER NOT NULL,
    d_in INTEGER NOT NULL, architecture TEXT NOT NULL, model_name TEXT NOT NULL,
    fingerprint TEXT NOT NULL, folder TEXT, complete INTEGER NOT NULL DEFAULT 0, stats TEXT);
CREATE TABLE IF NOT EXISTS features (
    sae_id TEXT NOT NULL, idx INTEGER NOT NULL, density REAL NOT NULL, n_fired INTEGER NOT NULL,
    max_act REAL NOT NULL, data BLOB NOT NULL, PRIMARY KEY (sae_id, idx));
CREATE TABLE IF NOT EXISTS explanations (
    sae_id TEXT NOT NULL, idx INTEGER NOT NULL, explainer TEXT NOT NULL, text TEXT NOT NULL,
    score REAL, model TEXT, created REAL NOT NULL, PRIMARY KEY (sae_id, idx, explainer));
CREATE TABLE IF NOT EXISTS flow (
    sae_id TEXT NOT NULL, idx INTEGER NOT NULL, other_sae_id TEXT NOT NULL, other_idx INTEGER NOT NULL,
    corr REAL NOT NULL);
CREATE INDEX IF NOT EXISTS flow_by_latent ON flow (sae_id, idx);
CREATE TABLE IF NOT EXISTS null_windows (
    sae_id TEXT NOT NULL, window INTEGER NOT NULL, tokens TEXT NOT NULL, latents BLOB NOT NULL,
    PRIMARY KEY (sae_id, window));
"""

BASELINE = "baseline"  # the explainer that needs no other model (explain.py)
_STAGING = "\t(re-build)"  # suffix of the id a re-build writes under until it completes


def _best_first(explanation: dict[str, Any]) -> tuple[bool, float]:
    """Sort key of a latent's explanations, best first: model-written before the baseline, then by
    detection score (unscored last)."""
    score = explanation["score"]
    return explanation["explainer"] == BASELINE, -(score if score is not None else -1)


def _staging(sae_id: str) -> str:
    return sae_id + _STAGING


def sae_fingerprint(sae: SAE) -> str:
    """A short hash of an SAE's architecture and weights: equal fingerprints, equal SAEs."""
    h = hashlib.sha256(sae.cfg.architecture.encode())
    for name, tensor in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def pack_json(obj: Any) -> bytes:
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 6)


def unpack_json(blob: bytes) -> Any:
    return json.loads(zlib.decompress(blob))


class FeatureIndex:
    """A feature index file. `FeatureIndex(path)` opens an existing one for reading (and adding
    explanations); `FeatureIndex(path, create=True)` creates it if missing (the builder's way in).
    Safe to share between threads (one connection behind a lock)."""

    def __init__(self, db_path: str | Path, create: bool = False) -> None:
        self.path = Path(db_path)
        # How messages name the file: its folder and name, never an absolute path (they reach HTTP clients).
        self.where = str(Path(self.path.parent.name) / self.path.name)
        if not create and not self.path.is_file():
            raise StoreError(f"no feature index at {self.where!r}: build one with 'gemmascope index RUN_DIR'")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._staged: dict[str, str] = {}  # sae_id -> staging id, for re-builds begun by this object
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            schema = self._meta_schema()
            if schema is None and create:
                self._db.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a build writes
                self._db.executescript(_TABLES)
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
                self._db.commit()
            elif schema != SCHEMA:
                raise StoreError(
                    f"{self.where!r} is not a gemmascope feature index (schema {schema!r}, "
                    f"expected {SCHEMA!r})"
                )
        except sqlite3.DatabaseError as err:
            why = disk_failure(err, self.path)  # SQLite cannot open its journal on a full disk
            if why is not None:
                raise StoreError(f"cannot open the feature index {self.where!r}: {why}") from err
            raise StoreError(f"{self.where!r} is not a readable SQLite feature index: {err}") from err

    def _meta_schema(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError:  # no meta table: an empty file or another database
            tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            return None if tables == 0 else "(not a feature index)"
        return None if row is None else str(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeatureIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # -----------------------------------------------------------------------------------------
    # Reading

    @property
    def model_name(self) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = 'model_name'")
        return str(rows[0][0]) if rows else None

    def saes(self, include_incomplete: bool = False) -> list[dict[str, Any]]:
        """The SAEs in the index, in `runs.sae_order` (site, layer, width, L0; numbers as numbers):
        `sae_id`, `site`, `layer`, `width` (= `d_sae`), `d_in`, `architecture`, `model_name`,
        `fingerprint`, `folder`, `complete`, `stats`."""
        rows = self._query(
            "SELECT sae_id, site, layer, width, d_in, architecture, model_name, fingerprint, folder, "
            "complete, stats FROM saes"
        )
        rows.sort(key=lambda r: sae_order(r[0]))
        names = "sae_id site layer width d_in architecture model_name fingerprint folder".split()
        out = []
        for r in rows:
            if (not r[9] and not include_incomplete) or str(r[0]).endswith(_STAGING):
                continue
            entry = dict(zip(names, r[:9], strict=True))
            stats = json.loads(r[10]) if r[10] else {}
            out.append({**entry, "d_sae": r[3], "complete": bool(r[9]), "stats": stats})
        return out

    def sae_info(self, sae_id: str) -> dict[str, Any]:
        """One complete SAE's entry of `saes()`; a StoreError names the known ones otherwise."""
        for info in self.saes(include_incomplete=True):
            if info["sae_id"] == sae_id:
                if not info["complete"]:
                    raise StoreError(
                        f"the index of SAE {sae_id!r} in {self.where!r} is incomplete (its build "
                        "was interrupted): rebuild it with 'gemmascope index'"
                    )
                return info
        known = ", ".join(i["sae_id"] for i in self.saes()) or "none"
        raise StoreError(f"unknown SAE {sae_id!r} in {self.where!r}: indexed SAEs are {known}")

    def _check_latent(self, info: dict[str, Any], index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise ConfigError(f"latent index {index!r} must be an integer")
        if not 0 <= int(index) < info["width"]:
            raise ConfigError(
                f"latent {index} is out of range for SAE {info['sae_id']!r}: valid latents are "
                f"0..{info['width'] - 1}"
            )
        return int(index)

    def check_sae(self, sae_id: str, sae: SAE) -> None:
        """Raise StoreError unless the index of `sae_id` was built from exactly this SAE."""
        info = self.sae_info(sae_id)
        if info["fingerprint"] != sae_fingerprint(sae):
            raise StoreError(
                f"the index of {sae_id!r} in {self.where!r} was built from other weights "
                f"(fingerprint {info['fingerprint']}, this SAE {sae_fingerprint(sae)}): rebuild it "
                "with 'gemmascope index'"
            )

    def feature(self, sae_id: str, index: int) -> dict[str, Any]:
        """Everything a feature page shows for latent `index` of `sae_id`, JSON-ready (the shape is
        documented in docs/CONTRACTS.md)."""
        info = self.sae_info(sae_id)
        index = self._check_latent(info, index)
        rows = self._query(
            "SELECT density, n_fired, max_act, data FROM features WHERE sae_id = ? AND idx = ?",
            (sae_id, index),
        )
        if not rows:
            raise StoreError(f"latent {index} of {sae_id!r} is missing from {self.where!r}: rebuild it")
        density, n_fired, max_act, blob = rows[0]
        data = unpack_json(blob)
        explanations = self.explanations(sae_id, index)
        return {
            "sae_id": sae_id,
            "index": index,
            "site": info["site"],
            "layer": info["layer"],
            "width": info["width"],
            "d_in": info["d_in"],
            "model_name": info["model_name"],
            "density": density,
            "n_fired": n_fired,
            "max_act": max_act,
            **data,
            "flow": self.flow(sae_id, index),
            "explanation": explanations[0]["text"] if explanations else None,
            "explanations": explanations,
            "stats": info["stats"],
        }

    def explanations(self, sae_id: str, index: int) -> list[dict[str, Any]]:
        """The explanations of a latent, best first: model-written before the baseline, then by
        detection score."""
        rows = self._query(
            "SELECT explainer, text, score, model FROM explanations WHERE sae_id = ? AND idx = ?",
            (sae_id, index),
        )
        out = [{"explainer": r[0], "text": r[1], "score": r[2], "model": r[3]} for r in rows]
        out.sort(key=_best_first)
        return out

    def best_explanations(self, sae_id: str, indices: Iterable[int]) -> dict[int, str]:
        """The best explanation (as `explanations` ranks them) of each of these latents that has
        one: `{index: text}`, one query. The one lookup of "the explanation" of a latent (feature
        pages, the microscope, search, contrast, graphs, the CLI)."""
        wanted = sorted({int(i) for i in indices})
        best: dict[int, tuple[tuple[bool, float], str]] = {}
        for start in range(0, len(wanted), 500):  # SQLite's bound on parameters
            chunk = wanted[start : start + 500]
            rows = self._query(
                f"SELECT idx, explainer, text, score FROM explanations WHERE sae_id = ? "
                f"AND idx IN ({', '.join('?' * len(chunk))})",
                [sae_id, *chunk],
            )
            for idx, explainer, text, score in rows:
                rank = _best_first({"explainer": explainer, "score": score})
                if idx not in best or rank < best[idx][0]:
                    best[idx] = (rank, text)
        return {idx: text for idx, (_, text) in sorted(best.items())}

    def flow(self, sae_id: str, index: int) -> list[dict[str, Any]]:
        """The latents of the other layers' SAEs whose activations correlate most with this one over
        the index corpus, by layer then correlation: `[{sae_id, layer, index, corr}]`."""
        rows = self._query(
            "SELECT f.other_sae_id, s.layer, f.other_idx, f.corr FROM flow f JOIN saes s "
            "ON s.sae_id = f.other_sae_id WHERE f.sae_id = ? AND f.idx = ? AND s.complete = 1 "
            "ORDER BY s.layer, f.other_sae_id, f.corr DESC",
            (sae_id, index),
        )
        return [{"sae_id": r[0], "layer": r[1], "index": r[2], "corr": r[3]} for r in rows]

    def column(self, sae_id: str, name: str) -> Tensor:
        """`[d_sae]` per-latent `density`, `max_act` or `n_fired` of an SAE."""
        if name not in ("density", "max_act", "n_fired"):
            raise ConfigError(f"unknown per-latent column {name!r}: expected density, max_act or n_fired")
        info = self.sae_info(sae_id)
        out = torch.zeros(info["width"], dtype=torch.float64 if name != "n_fired" else torch.long)
        rows = self._query(f"SELECT idx, {name} FROM features WHERE sae_id = ?", (sae_id,))
        if rows:
            idx, values = zip(*rows, strict=True)
            out[list(idx)] = torch.tensor(values, dtype=out.dtype)
        return out

    def densities(self, sae_id: str) -> Tensor:
        """`[d_sae]`: the fraction of index tokens each latent fires on."""
        return self.column(sae_id, "density")

    def firing(self, sae_id: str) -> Firing | None:
        """Each latent's firing over the index corpus (`rank.Firing`: tokens indexed, tokens fired
        on, the histogram of the values fired with), read from its pages: what the meaning-first
        ranking needs. None when a latent that fired has no histogram (pages another writer made)."""
        width = self.sae_info(sae_id)["width"]
        rows = self._query("SELECT idx, density, n_fired, data FROM features WHERE sae_id = ?", (sae_id,))
        hists = {idx: unpack_json(blob).get("histogram") or {} for idx, _, _, blob in rows}
        if any(n and not hists[idx].get("counts") for idx, _, n, _ in rows):
            return None
        n_bins = max((len(h.get("counts", [])) for h in hists.values()), default=1)
        lo, hi = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
        counts = torch.zeros(width, n_bins, dtype=torch.float64)
        for idx, h in hists.items():
            if h.get("counts"):
                lo[idx], hi[idx] = h["edges"][0], h["edges"][-1]
                counts[idx] = torch.tensor(h["counts"], dtype=torch.float64)
        n_tokens = max((round(n / d) for _, d, n, _ in rows if d > 0), default=0)  # d = n / n_tokens
        return Firing.from_histograms(n_tokens, lo, hi, counts)

    def null_windows(self, sae_id: str) -> list[tuple[list[str], np.ndarray]]:
        """Random windows of the index corpus with the sorted latents `[n] int32` firing anywhere
        in each (for detection scoring: a latent's non-activating windows)."""
        self.sae_info(sae_id)
        rows = self._query(
            "SELECT tokens, latents FROM null_windows WHERE sae_id = ? ORDER BY window", (sae_id,)
        )
        return [(json.loads(t), np.frombuffer(b, dtype=np.int32)) for t, b in rows]

    def search_explanations(self, sae_id: str | None, query: str, limit: int = 20) -> list[dict[str, Any]]:
        """Latents whose explanation matches `query` (case-insensitive whole words: "he" does not
        match "the"; whole-phrase matches first, then by the number of words matched, then by explanation score), over one SAE or,
        with `sae_id=None`, over all. Returns `[{sae_id, index, explanation, explainer, score}]`."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            raise ConfigError(f"explanation search needs at least one word, got {query!r}")
        if limit < 1:
            raise ConfigError(f"search limit {limit} must be at least 1")
        complete = {i["sae_id"] for i in self.saes()}
        if sae_id is not None:
            self.sae_info(sae_id)
            complete = {sae_id}
        clause = " OR ".join("lower(text) LIKE ?" for _ in words)
        rows = self._query(
            f"SELECT sae_id, idx, explainer, text, score FROM explanations WHERE ({clause})",
            [f"%{w}%" for w in words],
        )
        phrase = " ".join(words)
        best: dict[tuple[str, int], tuple[tuple[float, ...], dict[str, Any]]] = {}
        for sid, idx, explainer, text, score in rows:
            if sid not in complete:
                continue
            lowered = text.lower()
            text_words = set(re.findall(r"\w+", lowered))
            if not any(w in text_words for w in words):
                continue  # only inside other words ("he" in "the"): not a match
            rank = (
                float(phrase in " ".join(re.findall(r"\w+", lowered))),
                float(sum(w in text_words for w in words)),
                float(explainer != BASELINE),
                score if score is not None else -1.0,
            )
            hit = {"sae_id": sid, "index": idx, "explanation": text, "explainer": explainer, "score": score}
            if (sid, idx) not in best or rank > best[(sid, idx)][0]:
                best[(sid, idx)] = (rank, hit)
        ordered = sorted(best.values(), key=lambda item: item[0], reverse=True)
        return [hit for _, hit in ordered[:limit]]

    # -----------------------------------------------------------------------------------------
    # Writing (the builder and the explainers)

    def begin_sae(self, info: dict[str, Any]) -> None:
        """Start (re)building one SAE. A first build registers it as incomplete under its own id; a
        re-build of a complete SAE writes under a staging id, and `finish_sae` swaps the new rows in
        for the old in one transaction, so a killed re-build leaves the good index whole. `info` has
        sae_id, site, layer, width, d_in, architecture, model_name, fingerprint, folder."""
        with self._transaction() as db:
            current = self.model_name
            if current is not None and current != info["model_name"]:
                raise StoreError(
                    f"{self.where!r} indexes SAEs of model {current!r}, not {info['model_name']!r}: "
                    "use another index file"
                )
            if current is None:
                db.execute("INSERT INTO meta VALUES ('model_name', ?)", (info["model_name"],))
            sae_id = info["sae_id"]
            complete = db.execute("SELECT complete FROM saes WHERE sae_id = ?", (sae_id,)).fetchone()
            key = _staging(sae_id) if complete is not None and complete[0] else sae_id
            self._delete_rows(db, _staging(sae_id))
            if key == sae_id:
                self._delete_rows(db, sae_id)
            else:
                self._staged[sae_id] = key
            db.execute(
                "INSERT OR REPLACE INTO saes (sae_id, site, layer, width, d_in, architecture, model_name, "
                "fingerprint, folder, complete, stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL)",
                (
                    key,
                    info["site"],
                    info["layer"],
                    info["width"],
                    info["d_in"],
                    info["architecture"],
                    info["model_name"],
                    info["fingerprint"],
                    info.get("folder"),
                ),
            )

    @staticmethod
    def _delete_rows(db: sqlite3.Connection, sae_id: str) -> None:
        for table in ("features", "explanations", "null_windows", "flow"):
            db.execute(f"DELETE FROM {table} WHERE sae_id = ?", (sae_id,))
        db.execute("DELETE FROM flow WHERE other_sae_id = ?", (sae_id,))
        db.execute("DELETE FROM saes WHERE sae_id = ?", (sae_id,))

    def _key(self, sae_id: str) -> str:
        """Where this SAE's rows are written now: its staging id during a re-build."""
        return self._staged.get(sae_id, sae_id)

    def write_features(
        self, sae_id: str, rows: Iterable[tuple[int, float, int, float, dict[str, Any]]]
    ) -> None:
        """Rows `(index, density, n_fired, max_act, data)` with `data` the rest of the feature page."""
        key = self._key(sae_id)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?, ?)",
                ((key, i, d, n, m, pack_json(data)) for i, d, n, m, data in rows),
            )

    def patch_features(self, sae_id: str, patches: Mapping[int, Mapping[str, Any]]) -> None:
        """Replace fields of stored feature pages, `{index: {field: value}}`, the rest kept."""
        key, rows = self._key(sae_id), []
        with self._transaction() as db:
            for i, patch in patches.items():
                got = db.execute(
                    "SELECT data FROM features WHERE sae_id = ? AND idx = ?", (key, i)
                ).fetchone()
                if got is None:
                    raise StoreError(f"latent {i} of {sae_id!r} has no page in {self.where!r}: rebuild it")
                rows.append((pack_json({**unpack_json(got[0]), **patch}), key, i))
            db.executemany("UPDATE features SET data = ? WHERE sae_id = ? AND idx = ?", rows)

    def write_flow(self, rows: Iterable[tuple[str, int, str, int, float]]) -> None:
        """Rows `(sae_id, index, other_sae_id, other_index, corr)`."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO flow VALUES (?, ?, ?, ?, ?)",
                ((self._key(a), i, self._key(b), j, c) for a, i, b, j, c in rows),
            )

    def write_null_windows(self, sae_id: str, windows: Iterable[tuple[list[str], np.ndarray]]) -> None:
        key = self._key(sae_id)
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO null_windows VALUES (?, ?, ?, ?)",
                (
                    (key, w, json.dumps(tokens), np.asarray(latents, dtype=np.int32).tobytes())
                    for w, (tokens, latents) in enumerate(windows)
                ),
            )

    def finish_sae(self, sae_id: str, stats: dict[str, Any]) -> None:
        """Mark an SAE's index complete (the last write of a build); a re-build's rows replace the old
        ones here, in one transaction."""
        key = self._staged.pop(sae_id, sae_id)
        with self._transaction() as db:
            if key != sae_id:
                self._delete_rows(db, sae_id)
                for table in ("saes", "features", "explanations", "null_windows", "flow"):
                    db.execute(f"UPDATE {table} SET sae_id = ? WHERE sae_id = ?", (sae_id, key))
                db.execute("UPDATE flow SET other_sae_id = ? WHERE other_sae_id = ?", (sae_id, key))
            db.execute(
                "UPDATE saes SET complete = 1, stats = ? WHERE sae_id = ?", (json.dumps(stats), sae_id)
            )

    def set_explanations(
        self,
        sae_id: str,
        items: Iterable[tuple[int, str, float | None]],
        explainer: str = BASELINE,
        model: str | None = None,
    ) -> None:
        """Store (or replace) one explainer's explanations `(index, text, detection score)`."""
        key = self._key(sae_id)
        widths = {r[0]: r[1] for r in self._query("SELECT sae_id, width FROM saes")}
        if key not in widths:
            raise StoreError(f"unknown SAE {sae_id!r} in {self.where!r}")
        now = time.time()
        rows = []
        for index, text, score in items:
            self._check_latent({"sae_id": sae_id, "width": widths[key]}, index)
            rows.append((key, int(index), explainer, text, score, model, now))
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
