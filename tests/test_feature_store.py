"""Tests for features/store.py: a re-build never destroys the good index before the new one is complete
(a killed re-build leaves the old rows whole, a finished one replaces them), messages never hold an
absolute path, and the server's /health claims an index only when it describes an SAE."""

from __future__ import annotations

from pathlib import Path

from gemmascope.features import FeatureIndex


def _info(fingerprint: str) -> dict[str, object]:
    return {
        "sae_id": "s", "site": "resid_post.1", "layer": 1, "width": 3, "d_in": 4, "architecture": "jumprelu",
        "model_name": "tiny-gemma3", "fingerprint": fingerprint, "folder": None,
    }  # fmt: skip


def _build(index: FeatureIndex, fingerprint: str, max_act: float, finish: bool = True) -> None:
    index.begin_sae(_info(fingerprint))
    index.write_features("s", [(i, 0.1, 1, max_act, {"top_examples": []}) for i in range(3)])
    index.set_explanations("s", [(0, f"built with {max_act}", None)])
    index.write_null_windows("s", [(["a"], [0, 1])])
    if finish:
        index.finish_sae("s", {"n_tokens": 10})


def test_a_killed_rebuild_keeps_the_good_index_and_a_finished_one_replaces_it(tmp_path: Path) -> None:
    db = tmp_path / "features.sqlite"
    with FeatureIndex(db, create=True) as index:
        _build(index, "old", 1.0)
    with FeatureIndex(db, create=True) as index:  # the re-build is killed before it finishes
        _build(index, "new", 2.0, finish=False)
    with FeatureIndex(db) as index:
        assert [s["sae_id"] for s in index.saes(include_incomplete=True)] == ["s"]
        assert index.sae_info("s")["fingerprint"] == "old"
        assert index.feature("s", 1)["max_act"] == 1.0
        assert index.explanations("s", 0)[0]["text"] == "built with 1.0"
    with FeatureIndex(db, create=True) as index:  # a complete re-build swaps in at its last write
        _build(index, "new", 3.0)
    with FeatureIndex(db) as index:
        assert index.sae_info("s")["fingerprint"] == "new"
        assert index.feature("s", 1)["max_act"] == 3.0
        assert [e["text"] for e in index.explanations("s", 0)] == ["built with 3.0"]
        assert len(index.null_windows("s")) == 1
        rows = index._query("SELECT DISTINCT sae_id FROM features")
        assert rows == [("s",)]


def test_health_claims_an_index_only_when_it_describes_an_sae(tmp_path: Path) -> None:
    from gemmascope.errors import StoreError
    from gemmascope.server.saes import _index_ready

    class Run:  # the one method /health uses of server.run.Run
        def __init__(self, db: Path) -> None:
            self.db = db

        def feature_index(self) -> FeatureIndex:
            if not self.db.is_file():
                raise StoreError("this run has no feature index")
            return FeatureIndex(self.db)

    db = tmp_path / "features.sqlite"
    assert not _index_ready(Run(db))  # none
    FeatureIndex(db, create=True).close()
    assert not _index_ready(Run(db))  # empty
    with FeatureIndex(db, create=True) as index:
        _build(index, "first", 1.0, finish=False)
    assert not _index_ready(Run(db))  # half-built
    with FeatureIndex(db, create=True) as index:
        _build(index, "first", 1.0)
    assert _index_ready(Run(db))
    db.write_bytes(b"not a database at all, but long enough to look like one" * 4)
    assert not _index_ready(Run(db))  # damaged


def test_index_messages_name_no_absolute_path(tmp_path: Path) -> None:
    from gemmascope.errors import StoreError

    db = tmp_path / "run" / "features.sqlite"
    with FeatureIndex(db, create=True) as index:
        _build(index, "first", 1.0)
        try:
            index.sae_info("nope")
        except StoreError as err:
            assert "'run/features.sqlite'" in str(err) and str(tmp_path) not in str(err)
        else:
            raise AssertionError("an unknown SAE must be an error")


def test_explanation_search_matches_whole_words_only(tmp_path: Path) -> None:
    with FeatureIndex(tmp_path / "features.sqlite", create=True) as index:
        index.begin_sae(_info("f"))
        index.write_features("s", [(i, 0.1, 1, 1.0, {"top_examples": []}) for i in range(3)])
        index.set_explanations(
            "s", [(0, "fires on the", None), (1, "fires on he, she", None), (2, "HE said", None)]
        )
        index.finish_sae("s", {"n_tokens": 10})
        assert sorted(hit["index"] for hit in index.search_explanations("s", "he")) == [1, 2]
        assert [hit["index"] for hit in index.search_explanations(None, "she")] == [1]
        assert index.search_explanations("s", "th") == []


def test_the_index_lists_its_saes_with_numbers_as_numbers(tmp_path: Path) -> None:
    with FeatureIndex(tmp_path / "features.sqlite", create=True) as index:
        for sae_id, layer in (
            ("resid_post.10.w64.l0_8", 10),
            ("resid_post.6.w64.l0_100", 6),
            ("resid_post.6.w64.l0_8", 6),
        ):
            index.begin_sae({**_info("f"), "sae_id": sae_id, "site": f"resid_post.{layer}", "layer": layer})
            index.finish_sae(sae_id, {"n_tokens": 10})
        assert [s["sae_id"] for s in index.saes()] == [
            "resid_post.6.w64.l0_8",
            "resid_post.6.w64.l0_100",
            "resid_post.10.w64.l0_8",
        ]
