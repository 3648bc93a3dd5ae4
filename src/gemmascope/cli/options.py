"""Option groups shared by the `gemmascope` subcommands (run folder, model, corpus and tokens, SAE
selection), the one parser of comma lists, the one argument type of real numbers (finite, within
float32) and the one reader of a text file the user names (bounded in size and lines). Parsing only:
every check of a value's meaning lives in the pipeline module that uses it."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar, overload

from gemmascope.corpus import DEFAULT_CORPUS
from gemmascope.errors import ConfigError
from gemmascope.models import BUNDLED_MODEL
from gemmascope.values import FINITE32, finite32

T = TypeVar("T")
# A text file named on the command line (prompt sets, documents) is read whole only up to these.
MAX_TEXT_FILE_BYTES = 8 << 20
MAX_TEXT_FILE_LINES = 100_000


def number(text: str) -> float:
    """The argparse type (and `parse_list` kind) of every real-valued option: a finite number within
    float32, the type of every tensor it reaches (1e39 would be inf there)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return finite32(value, "value")
    except ConfigError:
        why = "is out of range" if math.isfinite(value) else "is not finite"
        raise argparse.ArgumentTypeError(f"{text!r} {why}: expected {FINITE32}") from None


def read_lines(path: str, flag: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file named by `flag`, read only up to
    MAX_TEXT_FILE_BYTES and MAX_TEXT_FILE_LINES (a device such as /dev/zero, or a huge file, is
    refused at the bound instead of read to the end); a ConfigError naming the flag otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{flag} {path!r} cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise ConfigError(
            f"{flag} {path!r} is larger than {MAX_TEXT_FILE_BYTES >> 20} MiB: expected a text file of prompts"
        )
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path!r} cannot be read as UTF-8 text") from None
    if len(lines) > MAX_TEXT_FILE_LINES:
        raise ConfigError(f"{flag} {path!r} has {len(lines)} lines: expected at most {MAX_TEXT_FILE_LINES}")
    return [line for line in lines if line.strip()]


_KIND_NAMES = {int: "integers", float: "numbers", number: "numbers", str: "names"}


@overload
def parse_list(spec: str | None, flag: str) -> list[str]: ...
@overload
def parse_list(spec: str | None, flag: str, kind: Callable[[str], T]) -> list[T]: ...
def parse_list(spec: str | None, flag: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """`a,b,c` as a list of `kind`; empty items are skipped. A bad item is a ConfigError naming the
    flag and the item: `--widths '4096,x': item 'x' is not valid: expected comma-separated integers`."""
    out: list[Any] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(kind(part))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            what = _KIND_NAMES.get(kind, getattr(kind, "__name__", "values"))  # type: ignore[call-overload]
            raise ConfigError(
                f"{flag} {spec!r}: item {part!r} is not valid: expected comma-separated {what}"
            ) from None
    return out


def parse_ranges(spec: str | None, flag: str) -> list[int]:
    """`0-99,512` as integers (ranges inclusive)."""
    out: list[int] = []
    for part in parse_list(spec, flag):
        lo, _, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(
                f"{flag} {spec!r}: {part!r} is not an integer or a range such as '0-99'"
            ) from None
    return out


def add_model(p: argparse.ArgumentParser, default: str | None = BUNDLED_MODEL, what: str = "") -> None:
    p.add_argument(
        "--model",
        default=default,
        help=what or "model name, local folder or hub id" + (f" (default {default})" if default else ""),
    )


def add_corpus(p: argparse.ArgumentParser, split: str | None = None, context: bool = True) -> None:
    """--corpus, and --split (when `split` is its default) and --context-len."""
    p.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help=f"{DEFAULT_CORPUS!r} (the bundled Wikipedia summaries), a .txt/.jsonl/.parquet file or hf:NAME",
    )
    if split is not None:
        p.add_argument(
            "--split", default=split, help=f"corpus split: train, heldout or all (default {split})"
        )
    if context:
        p.add_argument("--context-len", type=int, default=128, help="tokens per row (default 128)")


def add_sae_choice(p: argparse.ArgumentParser) -> None:
    """--sae (a folder or an SAE id of --run), --run and --db, as inspect uses them."""
    p.add_argument(
        "--sae",
        help="an SAE folder, an SAE id of the run given with --run, or an official RELEASE/ID "
        "(e.g. gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_small)",
    )
    p.add_argument("--run", dest="run_dir", help="a run folder (its SAEs and its features.sqlite)")
    p.add_argument("--db", help="feature index (default: the run's features.sqlite)")


def add_serving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
