"""A corpus of the model's own text. Owns `sample_corpus`: documents the model writes about a list of
subjects, each under a few plain openings ("Dogs", "All about dogs", "Facts about dogs", ...),
sampled at temperature 1 over a vocabulary (by default the tokens of the bundled corpus: English
prose, no code or other scripts), written as a `.jsonl` corpus that `corpus.load_corpus` reads, alone
or joined to another (`"wiki+sampled.jsonl"`).

Why: a dictionary learns the concepts its training text holds, and the bundled corpus (10,033
Wikipedia summaries) holds 51 sentences about dogs. No larger corpus with a licence that allows it
installs from the package registries; the model itself writes as much text as asked about whatever a
researcher wants its features to cover, and its text is what it computes on. Every sampled document
falls in the corpus's train split (its title is chosen so), so held-out figures stay those of the
corpus it is joined to.

Knows the model (`models.LanguageModel`) and the corpus's documents and split; nothing of sites or SAEs.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gemmascope.corpus import DEFAULT_CORPUS, Document, is_heldout, load_corpus
from gemmascope.errors import ConfigError, CorpusError
from gemmascope.models import LanguageModel, OutputHead, output_head

# The openings a document starts from ({S}: the subject with a capital first letter); kept in its text.
OPENINGS = (
    "{S}\n\n",
    "All about {s}\n\n",
    "A short guide to {s}.\n\n",
    "What I learned about {s}\n\n",
    "Facts about {s}\n\n",
)
MIN_NEW_TOKENS = 16  # a sample that ends sooner is dropped
MAX_SUBJECT_CHARS = 100


def check_subjects(subjects: Sequence[str]) -> list[str]:
    """The subjects stripped, or a ConfigError naming the first bad one."""
    out = [s.strip() for s in subjects]
    if not out:
        raise ConfigError("no subjects: expected at least one subject to write about")
    for s in out:
        if not s or len(s) > MAX_SUBJECT_CHARS or "\n" in s:
            raise ConfigError(
                f"subject {s!r}: expected a short phrase of 1-{MAX_SUBJECT_CHARS} characters on one line"
            )
    return out


def corpus_vocabulary(tokenizer: Any, source: str = DEFAULT_CORPUS) -> Tensor:
    """`[V']` sorted token ids: those of the corpus's train split, and EOS (which ends a sample)."""
    docs = load_corpus(source, "train")
    ids: set[int] = {int(tokenizer.eos_token_id)}
    for start in range(0, len(docs), 512):
        for row in tokenizer([d.text for d in docs[start : start + 512]], add_special_tokens=False)[
            "input_ids"
        ]:
            ids.update(row)
    return torch.tensor(sorted(ids), dtype=torch.long)


def sample_batch(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    vocabulary: Tensor,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> list[list[int]]:
    """Sample continuations of `prompts` (token ids, BOS first) at `temperature` (0: the most likely
    token), over `vocabulary`
    `[V']` alone (`models.output_head`'s rows of those tokens; the distribution renormalised over them),
    each until EOS or `max_new_tokens`; the prompts left-padded into one batch with a KV cache."""
    from transformers import DynamicCache

    device, pad = model.device, int(model.tokenizer.pad_token_id or 0)
    eos = int(model.tokenizer.eos_token_id)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    position = (mask.cumsum(1) - 1).clamp_min(0)
    vocab, full = vocabulary.to(device), output_head(model)
    head = OutputHead(
        full.weight[vocab], None if full.bias is None else full.bias[vocab], full.softcap
    )  # [V', d]
    cache, alive, out = DynamicCache(), torch.ones(len(prompts), dtype=torch.bool, device=device), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            hidden = model.hf.base_model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]  # [B, d], after the final norm
            logits = head.logits(hidden).float()  # [B, V']
            noise = torch.rand(logits.shape, generator=generator, device=device).clamp_min(1e-20)
            if temperature > 0:  # Gumbel-max: a sample of softmax(logits / temperature)
                logits = logits / temperature - torch.log(-torch.log(noise))
            token = vocab[logits.argmax(-1)]
            out.append(torch.where(alive, token, eos))
            alive &= token != eos
            if not alive.any():
                break
            ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = position[:, -1:] + 1
    rows = torch.stack(out, dim=1).tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def check_request(
    out_path: Path, n_tokens: int, batch_size: int, max_new_tokens: int, temperature: float
) -> None:
    """A ConfigError naming the first of `sample_corpus`'s settings that cannot be written or run."""
    for name, value, least in (
        ("n_tokens", n_tokens, 1),
        ("batch_size", batch_size, 1),
        ("max_new_tokens", max_new_tokens, MIN_NEW_TOKENS),
    ):
        if value < least:
            raise ConfigError(f"{name}={value}: expected at least {least}")
    if not 0 < temperature <= 10:
        raise ConfigError(
            f"temperature={temperature}: expected a number above 0 and at most 10 (1: the model's own)"
        )
    if out_path.suffix != ".jsonl":
        raise ConfigError(f"corpus file {str(out_path)!r}: expected a .jsonl path")
    for path in (out_path, _partial(out_path)):
        if path.exists():
            raise ConfigError(
                f"{str(path)!r} exists: choose another path or remove it (it is not overwritten)"
            )
    if not out_path.parent.is_dir():
        raise ConfigError(
            f"{str(out_path.parent)!r} is not a folder: expected the corpus file's folder to exist"
        )


def sample_corpus(
    model: LanguageModel,
    subjects: Sequence[str],
    out_path: Path | str,
    n_tokens: int,
    *,
    vocabulary: str = DEFAULT_CORPUS,
    batch_size: int = 64,
    max_new_tokens: int = 160,
    temperature: float = 1.0,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write at least `n_tokens` sampled tokens (the openings not counted; the last batch whole; at
    `temperature`, 1 being the model's own distribution over `vocabulary`'s tokens) as a `.jsonl`
    corpus at `out_path`: rounds
    over every subject x opening in a seeded order, `batch_size` samples at a time, each document
    {"text": opening + sample, "title", "subject"}. Written to `OUT.partial` and linked into place at
    the end, so a failed or killed run leaves no half corpus under the name; an existing file is
    never overwritten. Returns what it wrote (documents, tokens, seconds)."""
    from tqdm import tqdm

    out_path, subjects = Path(out_path), check_subjects(subjects)
    check_request(out_path, n_tokens, batch_size, max_new_tokens, temperature)
    started = time.monotonic()
    vocab = corpus_vocabulary(model.tokenizer, vocabulary)
    say(
        f"sampling {n_tokens:,} tokens about {len(subjects)} subjects over {len(vocab):,} tokens of {vocabulary!r}"
    )
    openings = [(s, o.format(s=s, S=s[0].upper() + s[1:])) for s in subjects for o in OPENINGS]
    rng, generator = random.Random(seed), torch.Generator(device=model.device).manual_seed(seed)
    bos, written, documents, serial = int(model.tokenizer.bos_token_id), 0, 0, 0
    partial = _partial(out_path)
    try:
        with (
            open(partial, "x", encoding="utf-8") as f,
            tqdm(total=n_tokens, unit="tok", desc="sampling") as bar,
        ):
            while written < n_tokens:
                before = documents
                order = rng.sample(openings, len(openings))
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    prompts = [
                        [bos, *model.tokenizer(o, add_special_tokens=False)["input_ids"]] for _, o in chunk
                    ]
                    samples = sample_batch(model, prompts, vocab, max_new_tokens, generator, temperature)
                    for (subject, opening), sample in zip(chunk, samples, strict=True):
                        if len(sample) < MIN_NEW_TOKENS:
                            continue
                        text = opening + model.tokenizer.decode(sample)
                        title, serial = _train_title(subject, text, serial)
                        f.write(json.dumps({"text": text, "title": title, "subject": subject}) + "\n")
                        written, documents = written + len(sample), documents + 1
                        bar.update(len(sample))
                    if written >= n_tokens:
                        break
                if documents == before:
                    raise CorpusError(
                        f"every sample of a round ended within {MIN_NEW_TOKENS} tokens: nothing to write"
                    )
    except BaseException as err:
        partial.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CorpusError(f"cannot write the corpus {str(out_path)!r}: {err.strerror or err}") from None
        raise
    _publish(partial, out_path)
    return {"path": str(out_path), "documents": documents, "tokens": written, "subjects": len(subjects),
            "vocabulary": len(vocab), "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def _partial(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".partial")


def _publish(partial: Path, out_path: Path) -> None:
    """Move the finished corpus into place without overwriting a file that appeared there meanwhile
    (it is then kept under its partial name)."""
    try:
        os.link(partial, out_path)
    except FileExistsError:
        raise CorpusError(
            f"{str(out_path)!r} appeared while sampling: the corpus is kept at {str(partial)!r}"
        ) from None
    except OSError:  # a file system without hard links
        partial.replace(out_path)
        return
    partial.unlink()


def _train_title(subject: str, text: str, serial: int) -> tuple[str, int]:
    """The first title `sampled: SUBJECT N` (N from `serial` on) that puts the document in the train
    split, and the next serial."""
    while is_heldout(Document(text=text, title=f"sampled: {subject} {serial}")):
        serial += 1
    return f"sampled: {subject} {serial}", serial + 1
