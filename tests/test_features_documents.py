"""Document-level analysis (features/documents.py) on the tiny model: per-document top features
(max and mean pooled, dense flagged), shared features, topic features; bad input; the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_features_contrast import _sae

from gemmascope.errors import ConfigError
from gemmascope.features.documents import documents
from gemmascope.features.encode import encode
from gemmascope.models import LanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")
DOCS = [
    "The sea was calm and the waves were small.",
    "Stocks fell as the bank raised rates.",
    "The ship sailed on the sea.",
]


def test_documents_pool_share_and_find_topics(tiny_model: LanguageModel) -> None:
    sae = _sae("resid_post.2")
    out = documents(tiny_model, sae, DOCS, top=5)
    pooled = encode(tiny_model, {"s": sae}, DOCS, pool="max").pooled["max"]["s"]
    for d, doc in enumerate(out["documents"]):
        assert [r["index"] for r in doc["max"]] == pooled[d].topk(5).indices.tolist()
        assert all(r["dense"] is None for r in doc["max"])  # no densities given
        values = [r["value"] for r in doc["mean"]]
        assert values == sorted(values, reverse=True)
        for r in doc["topic"]:  # stronger here than in any other document
            others = torch.cat([pooled[:d], pooled[d + 1 :]]).max(0).values
            assert pooled[d, r["index"]] > others[r["index"]]
    tops = [{r["index"] for r in doc["max"]} for doc in out["documents"]]
    for r in out["shared"]:
        assert r["n_documents"] == sum(r["index"] in t for t in tops) >= 2
    dense = torch.zeros(sae.d_sae)
    dense[out["documents"][0]["max"][0]["index"]] = 0.5
    flagged = documents(tiny_model, sae, DOCS, top=5, densities=dense)
    assert flagged["documents"][0]["max"][0]["dense"] is True
    assert all(not r["dense"] for doc in flagged["documents"] for r in doc["topic"])  # dense: never a topic
    with pytest.raises(ConfigError, match="document 2 is empty"):
        documents(tiny_model, sae, ["text", "  "])
    with pytest.raises(ConfigError, match="1 to 32 documents"):
        documents(tiny_model, sae, [])


def test_inspect_documents_command(
    tiny_model: LanguageModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gemmascope.cli import main
    from gemmascope.formats import save_sae

    monkeypatch.setattr("gemmascope.models.load_model", lambda *a, **k: tiny_model)
    folder = save_sae(_sae("resid_post.2"), tmp_path / "sae")
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(DOCS) + "\n")
    assert main(["inspect", "--sae", str(folder), "--documents", str(docs), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("max-pooled:") == 3 and "its topic" in out and "shared by at least half" in out
    assert main(["inspect", "--sae", str(folder), "--documents", str(tmp_path / "none.txt")]) == 2
    assert "--documents" in capsys.readouterr().err
