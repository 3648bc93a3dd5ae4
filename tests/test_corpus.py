"""Tests for corpus.py: the bundled Wikipedia corpus and its split, file sources, packing, masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gemmascope.corpus import Document, is_heldout, load_corpus, pack, source_name, special_mask, token_rows
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.models import LanguageModel

BOS, EOS = 2, 1


class WordTokenizer:
    """A stand-in tokenizer: one id per word (10 + word length), BOS 2, EOS 1."""

    bos_token_id = BOS
    eos_token_id = EOS

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        assert not add_special_tokens
        return {"input_ids": [[10 + len(word) for word in text.split()] for text in texts]}


# -- the bundled corpus


def test_wiki_corpus_has_every_article_with_topics_and_a_fixed_ten_percent_split() -> None:
    everything = load_corpus("wiki", "all")
    train, heldout = load_corpus("wiki", "train"), load_corpus("wiki", "heldout")
    assert len(everything) == 10_033
    assert len(train) + len(heldout) == len(everything)
    assert {d.title for d in train}.isdisjoint({d.title for d in heldout})
    assert 0.08 < len(heldout) / len(everything) < 0.12
    assert len({d.topic for d in everything}) == 12
    assert all(d.text and d.title and d.topic for d in everything)
    assert [d.title for d in everything] == sorted(d.title for d in everything)
    assert load_corpus() == train  # default: wiki, train split
    assert all(is_heldout(d) for d in heldout) and not any(is_heldout(d) for d in train)


def test_split_depends_on_the_title_only_not_on_order() -> None:
    doc = Document(text="anything", title="Photosynthesis")
    assert is_heldout(doc) == is_heldout(Document(text="other text", title="Photosynthesis"))
    untitled = [Document(text=f"paragraph {i}") for i in range(200)]
    assert [is_heldout(d) for d in untitled] == [is_heldout(d) for d in reversed(untitled)][::-1]


# -- file sources


def test_txt_file_gives_one_document_per_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph\nstill first.\n\n\nSecond one.\n   \nThird.\n")
    docs = load_corpus(str(path), "all")
    assert [d.text for d in docs] == ["First paragraph\nstill first.", "Second one.", "Third."]


def test_folder_gives_one_document_per_txt_file(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Bee text.\n\nSame file.")
    (tmp_path / "a.txt").write_text("Ay text.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "From jsonl."}) + "\n")
    docs = load_corpus(str(tmp_path), "all")
    assert [d.title for d in docs] == ["a.txt", "b.txt", ""]
    assert docs[1].text == "Bee text.\n\nSame file."
    assert docs[2].text == "From jsonl."


def test_jsonl_keeps_title_and_topic(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "alpha beta", "topic": "Greek", "title": "A"}, {"text": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs = load_corpus(str(path), "all")
    assert docs == [Document("alpha beta", "A", "Greek"), Document("gamma", "", None)]


def test_parquet_reads_the_text_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one two", "three"], "topic": ["x", "y"]}), path)
    assert load_corpus(str(path), "all") == [Document("one two", "", "x"), Document("three", "", "y")]
    pq.write_table(pa.table({"body": ["no text column"]}), path)
    with pytest.raises(CorpusError, match="no 'text' column"):
        load_corpus(str(path), "all")


def test_split_applies_to_files_too(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(300)))
    train, heldout = load_corpus(str(path), "train"), load_corpus(str(path), "heldout")
    assert len(train) + len(heldout) == 300 and 10 < len(heldout) < 50


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no documents"),
        (b"\n\n  \n", "holds no documents"),
        (b"\xff\xfe\x00bad", "as UTF-8 text"),
    ],
)
def test_empty_or_unreadable_txt_is_a_corpus_error_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as err:
        load_corpus(str(path), "all")
    assert "bad.txt" in str(err.value)


def test_bad_sources_and_splits_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("text\nhello")
    with pytest.raises(CorpusError, match="'.csv'"):
        load_corpus(str(tmp_path / "data.csv"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(CorpusError, match="line 2"):
        load_corpus(str(tmp_path / "broken.jsonl"), "all")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="no string field 'text'"):
        load_corpus(str(tmp_path / "notext.jsonl"), "all")
    with pytest.raises(ConfigError, match="'valid'"):
        load_corpus("wiki", "valid")
    (tmp_path / "one.txt").write_text("only one paragraph")
    with pytest.raises(CorpusError, match="split"):
        load_corpus(
            str(tmp_path / "one.txt"),
            "heldout" if not is_heldout(Document("only one paragraph")) else "train",
        )


def test_hf_source_without_datasets_says_what_to_install() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CorpusError, match="datasets"):
            load_corpus("hf:roneneldan/TinyStories")
    else:
        pytest.skip("datasets is installed")


def test_joined_sources_interleave_in_proportion_and_keep_each_documents_split(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"text": f"a{i:03d}", "title": f"a{i}"}) for i in range(300)))
    b.write_text("\n".join(json.dumps({"text": f"b{i:03d}", "title": f"b{i}"}) for i in range(100)))
    joined = load_corpus(f"{a}+{b}", "all")
    assert sorted(d.text for d in joined) == sorted(
        [f"a{i:03d}" for i in range(300)] + [f"b{i:03d}" for i in range(100)]
    )
    for n in (4, 40, 200):  # any prefix holds each source in its share of the whole, 3 : 1
        assert sum(d.text.startswith("b") for d in joined[:n]) == n // 4
    assert [d.text for d in joined if d.text.startswith("a")] == [
        f"a{i:03d}" for i in range(300)
    ]  # each in order
    heldout = {d.title for d in load_corpus(f"{a} + {b}", "heldout")}  # parts stripped
    assert heldout == {d.title for d in load_corpus(str(a), "heldout")} | {
        d.title for d in load_corpus(str(b), "heldout")
    }
    assert source_name(f"{a}+{tmp_path}/x/../b.jsonl") == f"{a}+{b}"


def test_joined_sources_interleave_by_text_length(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(
        "\n".join(json.dumps({"text": "L" * 1000 if i == 0 else f"s{i}".ljust(10)}) for i in range(10))
    )
    b.write_text("\n".join(json.dumps({"text": f"b{i}".ljust(100)}) for i in range(10)))
    order = [d.text[:2] for d in load_corpus(f"{a}+{b}", "all")]
    # its middle, at 500 of a's 1,090 characters (0.46), comes after 5 of b's 10 equal documents
    assert order.index("LL") == 5


def test_joined_source_errors_name_the_whole_source(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"text": "alpha"}))
    for source, match in (
        (f"{a}+", "empty part"),
        (f"{a}+{tmp_path}/x/../a.jsonl", "names a source twice"),
        (f"{a}+{tmp_path / 'missing.jsonl'}", "in corpus .*missing.jsonl.*not found"),
    ):
        with pytest.raises(CorpusError, match=match):
            load_corpus(source, "all")
    with pytest.raises(CorpusError, match="empty part"):
        source_name("wiki+")
    plus = tmp_path / "c++.jsonl"  # an existing file whose name holds a '+' is one source
    plus.write_text(json.dumps({"text": "cpp"}))
    assert [d.text for d in load_corpus(str(plus), "all")] == ["cpp"]


def test_source_name_resolves_paths(tmp_path: Path) -> None:
    assert source_name("wiki") == "wiki"
    assert source_name("hf:a/b:c") == "hf:a/b:c"
    assert source_name(str(tmp_path / "x" / ".." / "y.txt")) == str(tmp_path / "y.txt")


# -- packing


def test_pack_concatenates_with_eos_and_starts_every_row_with_bos() -> None:
    docs = [Document("a bb ccc"), Document(""), Document("dddd eeeee"), Document("f gg hhh iiii")]
    rows = pack(WordTokenizer(), docs, context_len=4)
    stream = [11, 12, 13, EOS, 14, 15, EOS, 11, 12, 13, 14]
    assert rows.dtype == torch.int64
    assert rows.tolist() == [[BOS, *stream[0:3]], [BOS, *stream[3:6]], [BOS, *stream[6:9]]]  # last 2 dropped
    assert pack(WordTokenizer(), docs, context_len=4, max_rows=2).tolist() == rows[:2].tolist()
    assert len(pack(WordTokenizer(), docs, context_len=4, max_rows=50)) == 3  # fewer when text runs out


def test_pack_stops_tokenising_once_it_has_enough_rows() -> None:
    calls = []

    class Counting(WordTokenizer):
        def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
            calls.append(len(texts))
            return super().__call__(texts, add_special_tokens)

    docs = [Document("w " * 20)] * 2000
    rows = pack(Counting(), docs, context_len=11, max_rows=5)
    assert rows.shape == (5, 11)
    assert sum(calls) < 2000


def test_pack_errors() -> None:
    with pytest.raises(ConfigError, match="context length 1"):
        pack(WordTokenizer(), [Document("a b")], context_len=1)
    with pytest.raises(CorpusError, match="fewer than one row of context length 128"):
        pack(WordTokenizer(), [Document("a b c")], context_len=128)


def test_pack_with_the_gemma_tokenizer(tiny_model: LanguageModel) -> None:
    tok = tiny_model.tokenizer
    docs = load_corpus("wiki", "train")[:20]
    rows = pack(tok, docs, context_len=64, max_rows=6)
    assert rows.shape == (6, 64)
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert (rows[:, 1:] != tok.bos_token_id).all()
    first = tok(docs[0].text, add_special_tokens=False)["input_ids"]
    body = rows[:, 1:].reshape(-1).tolist()
    assert body[: min(len(first), len(body))] == first[: len(body)]
    if len(first) < len(body):
        assert body[len(first)] == tok.eos_token_id


def test_special_mask_marks_bos_eos_and_pad() -> None:
    ids = torch.tensor([[2, 5, 1, 7], [2, 0, 0, 9]])
    assert special_mask(ids, {0, 1, 2}).tolist() == [[True, False, True, False], [True, True, True, False]]
    assert not special_mask(ids, {99}).any()


def test_token_rows_is_pack_of_the_split_with_enough_rows(tmp_path: Path) -> None:
    text = tmp_path / "words.txt"
    text.write_text("\n\n".join(f"paragraph {i} has a few words in it" for i in range(10)))
    docs = load_corpus(str(text), "all")
    rows = token_rows(WordTokenizer(), 17, str(text), "all", context_len=4)  # ceil(17 / 4) rows
    assert rows.tolist() == pack(WordTokenizer(), docs, context_len=4, max_rows=5).tolist()
    # counting only the tokens after BOS: ceil(17 / 3) rows
    assert len(token_rows(WordTokenizer(), 17, str(text), "all", context_len=4, count_bos=False)) == 6
    with pytest.raises(CorpusError, match=r"holds \d+ tokens in rows of 4, fewer than the 1,000 asked for"):
        token_rows(WordTokenizer(), 1000, str(text), "all", context_len=4)
    fewer = token_rows(WordTokenizer(), 1000, str(text), "all", context_len=4, exact=False)
    assert fewer.tolist() == pack(WordTokenizer(), docs, context_len=4).tolist()
    with pytest.raises(ConfigError, match="n_tokens=0"):
        token_rows(WordTokenizer(), 0, str(text), "all")
