"""Opening a run: which SAE a name on the command line means (opening.resolve_sae)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemmascope.errors import StoreError
from gemmascope.opening import resolve_sae
from gemmascope.runs import CFG_FILE, WEIGHTS_FILE


def _sae_folder(run: Path, layer: int, width: int, l0: int) -> Path:
    folder = run / "saes" / "resid_post" / f"layer_{layer}" / f"width_{width}" / f"l0_{l0}"
    folder.mkdir(parents=True)
    (folder / CFG_FILE).write_text("{}")
    (folder / WEIGHTS_FILE).write_bytes(b"")
    return folder


def test_an_sae_is_named_by_its_id_or_a_front_no_other_id_shares(tmp_path: Path) -> None:
    l2 = _sae_folder(tmp_path, 2, 4096, 30)
    l10 = _sae_folder(tmp_path, 10, 4096, 44)
    l12 = _sae_folder(tmp_path, 12, 4096, 45)
    l12_wide = _sae_folder(tmp_path, 12, 16384, 51)
    assert resolve_sae("resid_post.10.w4096.l0_44", tmp_path) == ("resid_post.10.w4096.l0_44", l10)
    assert resolve_sae("resid_post.10", tmp_path) == ("resid_post.10.w4096.l0_44", l10)
    assert resolve_sae("resid_post.2", tmp_path) == ("resid_post.2.w4096.l0_30", l2)
    assert resolve_sae("resid_post.12.w4096", tmp_path) == ("resid_post.12.w4096.l0_45", l12)
    assert resolve_sae("resid_post.12.w16384", tmp_path)[1] == l12_wide
    with pytest.raises(
        StoreError, match=r"--sae 'resid_post.12' fits 2 SAEs .*: name one of resid_post.12.w4096"
    ):
        resolve_sae("resid_post.12", tmp_path)  # two SAEs at layer 12: the name is ambiguous
    with pytest.raises(
        StoreError, match="no SAE 'resid_post.1' .*one of resid_post.2.w4096.l0_30, resid_post.10"
    ):
        resolve_sae(
            "resid_post.1", tmp_path
        )  # a front ends at a dot: only layer 10's id starts "resid_post.1"
    with pytest.raises(StoreError, match="no SAE 'resid_post.10.w4' "):
        resolve_sae("resid_post.10.w4", tmp_path)  # not w4096
    with pytest.raises(StoreError, match="no SAE None"):
        resolve_sae(None, tmp_path)  # four SAEs: one must be named


def test_a_run_without_saes_says_none(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"expected --sae with one of none$"):
        resolve_sae("resid_post.12", tmp_path)
