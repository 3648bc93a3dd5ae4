"""`gemmascope sample-corpus`: a corpus of the model's own text about a list of subjects
(`sampled.sample_corpus`), to join to another with `--corpus wiki+FILE`."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmascope.cli.options import add_model, number, read_lines
from gemmascope.corpus import DEFAULT_CORPUS


def args_sample_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the .jsonl corpus file to write (refused if it exists)")
    p.add_argument(
        "--subjects",
        required=True,
        help="a text file, one subject a line (examples/corpus_subjects.txt: 253 everyday ones)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        required=True,
        help="sampled tokens to write, at least (the last batch is written whole); about 230 a second on 2 cores",
    )
    add_model(p)
    p.add_argument(
        "--vocabulary",
        default=DEFAULT_CORPUS,
        help=f"the corpus whose tokens the samples may use (default {DEFAULT_CORPUS}: English prose)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="samples written at once (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="tokens a sample may run to (default 160)")
    p.add_argument(
        "--temperature",
        type=number,
        default=1.0,
        help="1 (default): the model's own distribution; lower: its likelier tokens (above 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_sample_corpus)


def run_sample_corpus(args: argparse.Namespace) -> int:
    from gemmascope.corpus import load_corpus
    from gemmascope.models import load_model
    from gemmascope.sampled import check_request, check_subjects, sample_corpus

    subjects = check_subjects(read_lines(args.subjects, "--subjects"))
    out = Path(args.out)
    check_request(out, args.tokens, args.batch_size, args.max_new_tokens, args.temperature)
    load_corpus(args.vocabulary, "train")  # before the model loads
    info = sample_corpus(
        load_model(args.model), subjects, out, args.tokens, vocabulary=args.vocabulary,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed,
    )  # fmt: skip
    print(
        f"wrote {info['documents']:,} documents, {info['tokens']:,} sampled tokens about {info['subjects']} subjects "
        f"to {info['path']} in {info['seconds']:.0f} s; train on it with --corpus wiki+{info['path']}"
    )
    return 0
