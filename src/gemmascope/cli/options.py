"""Option groups shared by the `gemmascope` subcommands (run folder, model, corpus and tokens, SAE
selection, dense latents), the one parser of comma lists, the one argument type of real numbers
(`number`: finite, within float32), the one reader of a text file the user names (`read_lines`:
bounded in size and lines; `prompt_set` reads prompt files through it), and flags generated from a
settings dataclass's fields (`add_fields`: name, type, choices, default and help from the field, as
sparsify's config classes double as its CLI; a float field takes `number`), and the options that
name files and folders (`PATH_OPTIONS`; `absolute_paths` makes them absolute from the directory a
command was typed in, for a server that runs it elsewhere). Parsing only: every check of a value's
meaning lives in the pipeline module that uses it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints, overload

from gemmascope.corpus import DEFAULT_CORPUS, load_corpus
from gemmascope.errors import ConfigError
from gemmascope.limits import MAX_TEXT_FILE_BYTES, MAX_TEXT_FILE_LINES
from gemmascope.models import BUNDLED_MODEL, MODEL_DTYPES
from gemmascope.values import FINITE32, finite32

T = TypeVar("T")

# The options (argparse dests) of the commands a server runs (`warm.WARM_COMMANDS`) that name a file
# or folder; `--sae` names one when it is a path (else an SAE id or an official RELEASE/ID).
PATH_OPTIONS = (
    "run_dir", "db", "index", "a_file", "b_file", "heldout_a", "heldout_b", "prompts_file", "documents",
)  # fmt: skip


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
    `limits.MAX_TEXT_FILE_BYTES` and `MAX_TEXT_FILE_LINES` (a device such as /dev/zero, or a huge file, is
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


MODEL_DTYPE_HELP = (
    "the model's dtype for the passes that only read activations (harvest, feature index): auto "
    "(bfloat16 where the CPU or GPU computes it natively, about 3x faster; float32 elsewhere), float32 "
    "or bfloat16; evaluation always runs in float32"
)


def add_model_dtype(p: argparse.ArgumentParser) -> None:
    """--model-dtype (`models.reading_dtype`)."""
    p.add_argument("--model-dtype", default="auto", choices=MODEL_DTYPES, help=MODEL_DTYPE_HELP)


def add_corpus(p: argparse.ArgumentParser, split: str | None = None, context: bool = True) -> None:
    """--corpus, and --split (when `split` is its default) and --context-len."""
    p.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help=f"{DEFAULT_CORPUS!r} (the bundled Wikipedia summaries), a .txt/.jsonl/.parquet file or hf:NAME, "
        "or several joined by '+' (wiki+sampled.jsonl: see sample-corpus)",
    )
    if split is not None:
        p.add_argument(
            "--split", default=split, help=f"corpus split: train, heldout or all (default {split})"
        )
    if context:
        p.add_argument("--context-len", type=int, default=128, help="tokens per row (default 128)")


def check_corpus(source: str) -> None:
    """Read a corpus's train and held-out splits, so a bad `--corpus` is one line before a model loads
    or a run folder is written."""
    for split in ("train", "heldout"):
        load_corpus(source, split)


def add_sae_choice(p: argparse.ArgumentParser) -> None:
    """--sae (a folder or an SAE id of --run), --run and --db, as inspect uses them."""
    p.add_argument(
        "--sae",
        help="an SAE folder, an SAE id of the run given with --run (or the front of one no other "
        "shares: resid_post.12), or an official RELEASE/ID "
        "(e.g. gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_small)",
    )
    p.add_argument("--run", dest="run_dir", help="a run folder (its SAEs and its features.sqlite)")
    p.add_argument("--db", help="feature index (default: the run's features.sqlite)")


def add_serving(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")


def add_fields(
    p: argparse.ArgumentParser,
    cls: type,
    names: Sequence[str] | None = None,
    *,
    helps: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """A flag for each field of the dataclass `cls` that has a help text (the field's metadata
    `help`, or `helps[name]`; only `names` when given): `--field-name` (or `flags[name]`), its type
    from the annotation (`X | None` also takes "none"; a tuple takes "a,b"; a bool gives `--x` and
    `--no-x`), its choices (metadata `choices` or `choices[name]`) and a help ending in the field's
    default and, from metadata `published`, the published value. A flag left out is not in the
    namespace, so the dataclass's own default applies (`given`). Returns the field names added."""
    hints = get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        text = (helps or {}).get(f.name, f.metadata.get("help"))
        if text is None or (names is not None and f.name not in names):
            continue
        kind = hints[f.name]
        default = _default(f)
        notes = [] if default is None else [f"default {_shown(default)}"]
        if f.metadata.get("published") is not None:
            notes.append(f"published {_shown(f.metadata['published'])}")
        help_text = (text + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        if allowed is not None:
            kwargs["choices"] = tuple(allowed)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parser(kind)
        p.add_argument((flags or {}).get(f.name, "--" + f.name.replace("_", "-")), **kwargs)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The values of the `add_fields` flags the command line gave, by field name."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(_shown(v) for v in value)
    return str(value)


def _parser(kind: Any) -> Callable[[str], Any]:
    """The argparse `type` of a field annotation: int, float, str, `X | None`, `tuple[X, ...]`."""
    args = get_args(kind)
    if get_origin(kind) in (Union, types.UnionType) and type(None) in args:
        inner = _parser(next(a for a in args if a is not type(None)))

        def optional(text: str) -> Any:
            return None if text.strip().lower() == "none" else inner(text)

        optional.__name__ = getattr(inner, "__name__", "value")
        return optional
    if get_origin(kind) is tuple:
        item = _parser(args[0])

        def several(text: str) -> tuple[Any, ...]:
            values = tuple(item(part) for part in text.split(","))
            if len(values) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return values

        several.__name__ = f"{len(args)} comma-separated {getattr(item, '__name__', 'value')}s"
        return several
    if kind is float:
        return number  # finite float32, as every real-valued option
    if kind in (int, str):
        return kind  # type: ignore[no-any-return]
    raise TypeError(f"no command-line type for a field of type {kind!r}")


def add_dense(p: argparse.ArgumentParser, what: str = "features") -> None:
    """--dense SHARE and --show-dense: which latents are hidden as dense (`features.HIDE_DENSE`)."""
    from gemmascope.features.encode import HIDE_DENSE

    p.add_argument(
        "--dense",
        type=number,
        default=HIDE_DENSE,
        help=f"hide {what} firing on more than this share ({HIDE_DENSE})",
    )
    p.add_argument("--show-dense", action="store_true", help=f"do not hide dense {what}")


def prompt_set(texts: list[str], path: str | None, flag: str) -> list[str]:
    """`texts` and the non-blank lines of the UTF-8 file at `path` (named by `flag` in errors), read
    through the bounded `read_lines`."""
    return texts if path is None else texts + read_lines(path, flag)


def absolute_paths(args: argparse.Namespace, cwd: Path) -> argparse.Namespace:
    """`args` with every file or folder it names (`PATH_OPTIONS`, and `--sae` values that are
    paths from `cwd`) made absolute from `cwd`, the directory the command was typed in."""
    out = argparse.Namespace(**vars(args))
    for name in PATH_OPTIONS:
        value = getattr(out, name, None)
        if isinstance(value, str):
            setattr(out, name, str(cwd / value))

    def sae(spec: Any) -> Any:  # an SAE folder there (else an id or RELEASE/ID, as `resolve_sae` reads it)
        return str(cwd / spec) if isinstance(spec, str) and (cwd / spec).is_dir() else spec

    if hasattr(out, "sae"):
        out.sae = [sae(v) for v in out.sae] if isinstance(out.sae, list) else sae(out.sae)
    if hasattr(out, "steps"):  # steer's --sae / --feature / --strength, in order
        out.steps = [(kind, sae(v) if kind == "sae" else v) for kind, v in out.steps]
    return out
