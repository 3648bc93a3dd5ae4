"""The meaning-first order (features/rank.py) and where it is used: the firing statistics an index
gives (`FeatureIndex.firing`, also of an index whose pages lack them), a rare specific latent ranked
above a dense function-word latent, the raw order one argument away, topics first in the microscope's
text view, in the document view and in `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gemmascope.errors import ConfigError
from gemmascope.features import FeatureIndex, build_index, meaning_scores, text_features, topic_scores
from gemmascope.features.documents import documents
from gemmascope.features.rank import PRIOR_FIRINGS, RAW_NOTE, Firing, check_order, quantiles
from gemmascope.features.store import sae_fingerprint
from gemmascope.models import LanguageModel
from gemmascope.sae import SAE

pytestmark = pytest.mark.usefixtures("one_thread")
N_TOKENS = 100_000
FUNCTION_WORD, SPECIFIC, RARE = 0, 1, 2  # the latents of the constructed index


def _page(lo: float, hi: float, counts: list[int]) -> dict[str, Any]:
    n_bins = len(counts)
    return {
        "min_act": lo,
        "histogram": {"edges": [lo + (hi - lo) * b / n_bins for b in range(n_bins + 1)], "counts": counts},
    }


def _index(
    path: Path, pages: list[tuple[int, float, dict[str, Any]]], sae_id: str = "s", fingerprint: str = "f"
) -> FeatureIndex:
    """An index of `len(pages)` latents, each `(n_fired, max_act, page)` over N_TOKENS tokens,
    written as the builder writes one."""
    index = FeatureIndex(path, create=True)
    info = {"sae_id": sae_id, "site": "resid_post.1", "layer": 1, "width": len(pages), "d_in": 64,
            "architecture": "jumprelu", "model_name": "tiny-gemma3", "fingerprint": fingerprint}  # fmt: skip
    index.begin_sae(info)
    index.write_features(sae_id, [(i, n / N_TOKENS, n, m, page) for i, (n, m, page) in enumerate(pages)])
    index.finish_sae(sae_id, {"n_tokens": N_TOKENS})
    return index


def _constructed(path: Path) -> FeatureIndex:
    """A dense function-word latent (6% of tokens, always strong on its word: 20..300), a specific
    one (0.3%, 5..50) and a rare one seen 8 times (50..55, near its threshold)."""
    return _index(
        path,
        [
            (6000, 300.0, _page(20.0, 300.0, [600] * 10)),
            (300, 50.0, _page(5.0, 50.0, [30] * 10)),
            (8, 55.0, _page(50.0, 55.0, [1, 1, 1, 1, 0, 1, 1, 1, 0, 1])),
        ],
    )


def test_a_rare_specific_latent_outranks_a_dense_function_word_latent(tmp_path: Path) -> None:
    firing = _constructed(tmp_path / "f.sqlite").firing("s")
    assert firing is not None and firing.n_tokens == N_TOKENS
    assert firing.n_fired.tolist() == [6000, 300, 8]
    acts = torch.tensor([[290.0, 48.0, 55.0]])  # [1 token, 3 latents]: each near its largest
    assert quantiles(acts, firing)[0].tolist() == pytest.approx([270 / 280, 43 / 45, 1.0])
    scores = meaning_scores(acts, firing)[0]
    assert scores.argsort(descending=True).tolist() == [SPECIFIC, FUNCTION_WORD, RARE]  # raw: 0, 2, 1
    assert acts[0].argsort(descending=True).tolist() == [FUNCTION_WORD, RARE, SPECIFIC]
    assert 0 < scores[RARE] < 0.5 * scores[SPECIFIC]  # seen 8 times: the prior of PRIOR_FIRINGS holds it down
    low = meaning_scores(torch.tensor([[25.0, 6.0, 0.0]]), firing)[0]  # below their medians; not firing
    assert low[FUNCTION_WORD] < 0 and low[SPECIFIC] < 0 and low[RARE] == 0
    # topics: summed over the text, zero in expectation on random text
    acts = torch.tensor([[0.0, 0, 0], [290, 0, 0], [0, 45, 0], [0, 48, 54]])  # [T, 3]; BOS first
    keep = torch.tensor([False, True, True, True])
    topics = topic_scores(acts, keep, firing)
    assert topics.argmax() == SPECIFIC and topics[SPECIFIC] == pytest.approx(
        float(meaning_scores(acts, firing)[2:, 1].sum())
    )
    with pytest.raises(ConfigError, match="width 4"):
        meaning_scores(torch.zeros(1, 4), firing)
    with pytest.raises(ConfigError, match="order 'sideways'"):
        check_order("sideways")


def test_firing_from_histograms_and_the_prior() -> None:
    firing = Firing.from_histograms(
        1000, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), torch.tensor([[1, 3], [0, 0]])
    )
    assert firing.cdf.tolist() == [[0.0, 0.25, 1.0], [0.0, 0.0, 0.0]]  # the second never fired
    assert quantiles(torch.tensor([[2.0, 5.0], [4.0, 0.0]]), firing).tolist() == [[0.25, 0.0], [1.0, 0.0]]
    never = meaning_scores(torch.tensor([[0.0, 5.0]]), firing)[0, 1]
    assert never == 0  # a latent the index never saw fire: no evidence either way
    assert PRIOR_FIRINGS == 100


def test_an_index_without_firing_statistics_opens_and_falls_back_to_raw_order(
    tmp_path: Path, tiny_model: LanguageModel
) -> None:
    """Pages without histograms (another writer's): the index still opens and serves its pages;
    its firing is None, so the microscope ranks by activation and says so."""
    index = _index(tmp_path / "old.sqlite", [(500, 10.0, {"min_act": 1.0}), (0, 0.0, {})])
    assert index.feature("s", 0)["n_fired"] == 500 and index.firing("s") is None
    from test_features_contrast import _sae

    sae = _sae("resid_post.2")
    found = text_features(tiny_model, sae, "The sea was calm.", k=3, firing=None)
    assert found["order"] == "raw"
    for r in found["tokens"]:
        values = [f["value"] for f in r["features"]]
        assert values == sorted(values, reverse=True) and all(f["score"] is None for f in r["features"])


def _built_run(tmp_path: Path, model: LanguageModel) -> tuple[Path, SAE, str]:
    from test_features import random_sae

    from gemmascope.formats import sae_dir, save_sae

    run = tmp_path / "run"
    sae = random_sae(2, 32, 5)
    save_sae(sae, sae_dir(run, "resid_post.2", 32, 9))
    build_index(model, {"resid_post.2.w32.l0_9": sae}, run / "features.sqlite", n_tokens=512, progress=False)
    return run, sae, "resid_post.2.w32.l0_9"


def test_text_features_rank_meaning_first_with_topics(tmp_path: Path, tiny_model: LanguageModel) -> None:
    run, sae, key = _built_run(tmp_path, tiny_model)
    firing = FeatureIndex(run / "features.sqlite").firing(key)
    assert firing is not None
    text = "The river flows to the sea and the sea is salty"
    meaning = text_features(tiny_model, sae, text, k=4, hide_dense=None, firing=firing)
    raw = text_features(tiny_model, sae, text, k=4, hide_dense=None, firing=firing, order="raw")
    assert (meaning["order"], raw["order"]) == ("meaning", "raw")
    assert list(meaning) == ["order", "tokens", "topics"]
    differ = 0
    for m, r in zip(meaning["tokens"], raw["tokens"], strict=True):
        scores = [f["score"] for f in m["features"]]
        assert scores == sorted(scores, reverse=True)
        assert [f["value"] for f in r["features"]] == sorted(
            (f["value"] for f in r["features"]), reverse=True
        )
        differ += [f["index"] for f in m["features"]] != [f["index"] for f in r["features"]]
    assert differ, "on some token the two orders should differ"
    topic = [t["score"] for t in meaning["topics"]]
    assert topic == sorted(topic, reverse=True) and all(s > 0 for s in topic) and meaning["topics"]
    assert all(t["count"] >= 1 and t["value"] > 0 for t in meaning["topics"])
    assert [t["value"] for t in raw["topics"]] == sorted((t["value"] for t in raw["topics"]), reverse=True)


def test_inspect_lists_topics_first_and_keeps_the_raw_order(
    tmp_path: Path,
    tiny_model: LanguageModel,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gemmascope.cli import main

    monkeypatch.setattr("gemmascope.models.load_model", lambda *a, **k: tiny_model)
    run, sae, key = _built_run(tmp_path, tiny_model)
    text = "The river flows to the sea and the sea is salty"
    assert main(["inspect", text, "--run", str(run), "--show-dense"]) == 0
    out = capsys.readouterr().out
    topics, per_token = (
        out.index("topics of the text, meaning first:"),
        out.index("per token, meaning first:"),
    )
    assert topics < per_token and RAW_NOTE not in out
    assert main(["inspect", text, "--run", str(run), "--show-dense", "--order", "raw"]) == 0
    out = capsys.readouterr().out
    assert "topics of the text, by activation:" in out and "per token, by activation:" in out
    assert main(["inspect", text, "--run", str(run), "--order", "sideways"]) == 2
    assert "--order" in capsys.readouterr().err
    docs = tmp_path / "docs.txt"
    docs.write_text("The river flows to the sea\nStocks fell as the bank raised rates\n")
    assert main(["inspect", "--run", str(run), "--documents", str(docs), "--dense", "1"]) == 0
    out = capsys.readouterr().out
    assert out.index("topics (meaning first):") < out.index("max-pooled:")
    # an index without firing statistics: the raw order, with a note
    index = tmp_path / "other.sqlite"
    _index(index, [(0, 0.0, {})] * sae.d_sae, sae_id=key, fingerprint=sae_fingerprint(sae))
    with FeatureIndex(index) as other:
        other.write_features(key, [(0, 0.01, 5, 1.0, {"min_act": 0.5})])
    assert main(["inspect", text, "--run", str(run), "--db", str(index), "--show-dense"]) == 0
    assert RAW_NOTE in capsys.readouterr().out


def test_the_document_view_lists_pooled_topics_first(tmp_path: Path, tiny_model: LanguageModel) -> None:
    run, sae, key = _built_run(tmp_path, tiny_model)
    firing = FeatureIndex(run / "features.sqlite").firing(key)
    docs = ["The river flows to the sea", "Stocks fell as the bank raised rates"]
    out = documents(tiny_model, sae, docs, top=4, firing=firing)
    for doc, text in zip(out["documents"], docs, strict=True):
        assert list(doc)[:2] == ["text", "topics"]
        from gemmascope.features import encode

        enc = encode(tiny_model, {"s": sae}, [text])
        expected = topic_scores(enc.latents["s"][0], enc.keep["s"][0], firing)
        assert [r["index"] for r in doc["topics"]] == [
            int(i) for i in expected.topk(4).indices if expected[i] > 0
        ]
    assert all(doc["topics"] == [] for doc in documents(tiny_model, sae, docs, top=4)["documents"])
