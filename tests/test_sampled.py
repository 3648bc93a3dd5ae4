"""A corpus of the model's own text (`sampled.py`), on the tiny random Gemma 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemmascope.cli import main
from gemmascope.corpus import load_corpus
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.models import LanguageModel
from gemmascope.sampled import OPENINGS, corpus_vocabulary, sample_batch, sample_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def _vocab_corpus(tmp_path: Path) -> str:
    path = tmp_path / "base.jsonl"
    words = "the dog ran to a house and the cat sat on it while birds sang in trees near water"
    path.write_text("\n".join(json.dumps({"text": words, "title": f"t{i}"}) for i in range(20)))
    return str(path)


def test_samples_stay_in_the_vocabulary_and_follow_the_renormalised_distribution(
    tiny_model: LanguageModel,
) -> None:
    tok = tiny_model.tokenizer
    vocab = torch.tensor(sorted({5, 17, 300, 999, int(tok.eos_token_id)}))
    prompt = [int(tok.bos_token_id), 600, 601]
    rows = sample_batch(
        tiny_model, [prompt] * 4000, vocab, 1, torch.Generator().manual_seed(0), temperature=0.1
    )
    first = torch.tensor([r[0] if r else int(tok.eos_token_id) for r in rows])
    assert set(first.tolist()) <= set(vocab.tolist())
    with torch.no_grad():  # the model's own next-token distribution over those tokens, renormalised, at 0.1
        logits = tiny_model.hf(input_ids=torch.tensor([prompt])).logits[0, -1, vocab]
    expected = torch.softmax(logits.float() / 0.1, -1)
    assert expected.max() - expected.min() > 0.2  # far from uniform: the test can tell
    seen = torch.stack([(first == v).float().mean() for v in vocab])
    assert torch.allclose(seen, expected, atol=0.03), (seen, expected)


def test_left_padded_batches_continue_each_prompt_as_the_model_does_alone(tiny_model: LanguageModel) -> None:
    """At a temperature near 0 (the most likely token of the vocabulary), a prompt padded in a batch
    beside a longer one continues as the model's own uncached forward of that prompt alone says, past
    the tiny model's sliding window of 16."""
    tok = tiny_model.tokenizer
    vocab = torch.arange(3, 400)
    short, long = [int(tok.bos_token_id), 50], [int(tok.bos_token_id), 60, 61, 62, 63, 64, 65]
    assert tiny_model.config.sliding_window < len(long) + 15
    rows = sample_batch(tiny_model, [short, long], vocab, 15, torch.Generator(), temperature=1e-6)
    for prompt, row in ((short, rows[0]), (long, rows[1])):
        ids = list(prompt)
        for _ in range(15):
            with torch.no_grad():
                logits = tiny_model.hf(input_ids=torch.tensor([ids])).logits[0, -1, vocab]
            ids.append(int(vocab[logits.argmax()]))
        assert row == ids[len(prompt) :]


def test_rows_end_at_eos_each_on_its_own(tiny_model: LanguageModel) -> None:
    tok = tiny_model.tokenizer
    eos, bos = int(tok.eos_token_id), int(tok.bos_token_id)
    assert sample_batch(tiny_model, [[bos, 7]] * 3, torch.tensor([eos]), 5, torch.Generator()) == [[], [], []]
    rows = sample_batch(
        tiny_model, [[bos, 7]] * 64, torch.tensor([eos, 9]), 12, torch.Generator().manual_seed(1)
    )
    assert all(set(r) <= {9} for r in rows)  # EOS cut, never kept
    assert len({len(r) for r in rows}) > 3 and max(len(r) for r in rows) <= 12  # rows end at their own step


def test_sample_corpus_writes_train_split_documents_with_their_openings(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    base = _vocab_corpus(tmp_path)
    out = tmp_path / "sampled.jsonl"
    info = sample_corpus(
        tiny_model,
        ["dogs", "rain"],
        out,
        300,
        vocabulary=base,
        batch_size=4,
        max_new_tokens=20,
        say=lambda _: None,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert info["documents"] == len(records) and info["tokens"] >= 300
    assert {r["subject"] for r in records} == {"dogs", "rain"}
    openings = {o.format(s=s, S=s[0].upper() + s[1:]) for s in ("dogs", "rain") for o in OPENINGS}
    assert all(any(r["text"].startswith(o) for o in openings) for r in records)
    assert len(load_corpus(str(out), "train")) == len(records)  # none held out
    joined = load_corpus(f"{base}+{out}", "heldout")
    assert {d.title for d in joined} == {d.title for d in load_corpus(base, "heldout")}
    again = tmp_path / "again.jsonl"
    sample_corpus(
        tiny_model,
        ["dogs", "rain"],
        again,
        300,
        vocabulary=base,
        batch_size=4,
        max_new_tokens=20,
        say=lambda _: None,
    )
    assert again.read_text() == out.read_text()  # seeded
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_input_is_refused_before_anything_is_written(tiny_model: LanguageModel, tmp_path: Path) -> None:
    base = _vocab_corpus(tmp_path)
    out = tmp_path / "c.jsonl"
    out.write_text("kept\n")
    (tmp_path / "d.jsonl.partial").write_text("an earlier run's\n")
    for subjects, tokens, path, kw, match in (
        (["dogs"], 10, out, {}, "c.jsonl' exists"),
        (["dogs"], 10, tmp_path / "d.jsonl", {}, "d.jsonl.partial' exists"),
        ([], 10, tmp_path / "n.jsonl", {}, "no subjects"),
        (["x" * 200], 10, tmp_path / "n.jsonl", {}, "short phrase"),
        (["dogs"], 0, tmp_path / "n.jsonl", {}, "n_tokens=0"),
        (["dogs"], 10, tmp_path / "n.jsonl", {"max_new_tokens": 8}, "max_new_tokens=8: expected at least 16"),
        (["dogs"], 10, tmp_path / "n.jsonl", {"temperature": 0.0}, "temperature=0.0"),
        (["dogs"], 10, tmp_path / "n.txt", {}, "expected a .jsonl"),
        (["dogs"], 10, tmp_path / "nowhere" / "n.jsonl", {}, "is not a folder"),
    ):
        with pytest.raises(ConfigError, match=match):
            sample_corpus(tiny_model, subjects, path, tokens, vocabulary=base, **kw)
    assert out.read_text() == "kept\n" and (tmp_path / "d.jsonl.partial").read_text() == "an earlier run's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.jsonl", "c.jsonl", "d.jsonl.partial"]


def test_samples_that_all_end_at_once_are_an_error_not_an_endless_loop(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    eos_only = tmp_path / "eos.jsonl"
    eos_only.write_text(json.dumps({"text": tiny_model.tokenizer.eos_token}))  # the vocabulary: EOS alone
    with pytest.raises(CorpusError, match="nothing to write"):
        sample_corpus(
            tiny_model, ["dogs"], tmp_path / "n.jsonl", 10, vocabulary=str(eos_only), say=lambda _: None
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eos.jsonl"]  # no corpus, no partial


def test_cli_sample_corpus(
    tiny_model: LanguageModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _vocab_corpus(tmp_path)
    subjects = tmp_path / "subjects.txt"
    subjects.write_text("dogs\n\ncoffee\n")
    out = tmp_path / "s.jsonl"
    argv = [
        "sample-corpus",
        str(out),
        "--subjects",
        str(subjects),
        "--tokens",
        "50",
        "--model",
        "tiny-gemma3",
    ]
    assert main([*argv, "--vocabulary", base, "--max-new-tokens", "20"]) == 0
    assert f"--corpus wiki+{out}" in capsys.readouterr().out and out.exists()
    assert main([*argv, "--vocabulary", base]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            [
                "sample-corpus",
                str(tmp_path / "t.jsonl"),
                "--subjects",
                str(tmp_path / "none.txt"),
                "--tokens",
                "5",
            ]
        )
        == 2
    )
    assert "--subjects" in capsys.readouterr().err


def test_corpus_vocabulary_is_the_train_split_tokens_and_eos(
    tiny_model: LanguageModel, tmp_path: Path
) -> None:
    base = _vocab_corpus(tmp_path)
    tok = tiny_model.tokenizer
    expected = {int(tok.eos_token_id)} | {
        i for d in load_corpus(base, "train") for i in tok(d.text, add_special_tokens=False)["input_ids"]
    }
    assert corpus_vocabulary(tok, base).tolist() == sorted(expected)
