"""The `gemmascope` command: argument parsing and printing over the public functions of the
pipeline modules; no pipeline lives here. `pipeline` holds the subcommands that write into a run
folder (demo, suite, harvest, train, convert), `measure` those that measure SAEs and index their
features (eval, index); those that look inside the model through them have one module each:
`inspect`, `contrast` (contrast, bias), `attribute`, `steer`, `serve`; `corpus` writes a corpus of
the model's own text (sample-corpus). `options` holds the shared option groups, the one comma-list
parser, the one number type and the one bounded reader of the text files a user names. A `GemmaScopeError`, or a command line argparse refuses, is printed as one
line (no traceback, no usage dump) and exits with status 2. A command a running server of the same
run can answer is run by it (`warm`, `server.commands`).

Knows nothing of internals beyond those public functions.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NoReturn

from gemmascope.cli import attribute, contrast, corpus, inspect, measure, pipeline, serve, steer
from gemmascope.errors import ConfigError, GemmaScopeError

# Each subcommand is a pair of functions: `args_NAME(parser)` adds its arguments and sets
# `run_NAME(args) -> exit status` as the runner. SUBCOMMANDS lists them in help order.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (
        "the whole loop on the bundled model and corpus: harvest, train, eval, index, serve",
        pipeline.args_demo,
    ),
    "suite": ("train a suite of SAEs over many layers and sites, resumably", pipeline.args_suite),
    "harvest": ("capture activations at sites into a run folder", pipeline.args_harvest),
    "train": ("train SAEs on a run folder's activations with the Gemma Scope recipe", pipeline.args_train),
    "finetune": (
        "fine-tune a trained SAE or transcoder end to end with the model (Gemma Scope 2's MSE + KL loss), resumably",
        pipeline.args_finetune,
    ),
    "eval": ("measure SAEs: L0, FVU, delta LM loss, CE recovered, KL, density, probing", measure.args_eval),
    "index": ("build the feature index (features.sqlite) of SAEs", measure.args_index),
    "inspect": ("print the top features of each token of a text", inspect.args_inspect),
    "contrast": (
        "the latents that separate two sets of prompts, over every SAE of a run",
        contrast.args_contrast,
    ),
    "bias": (
        "a bias experiment: pick latents by contrast, ablate them, measure the watched-token gap and the cost",
        contrast.args_bias,
    ),
    "attribute": (
        "the attribution graph of a prompt's next token over a run's transcoders (JSON and PNG)",
        attribute.args_attribute,
    ),
    "steer": ("generate with and without steering, side by side", steer.args_steer),
    "serve": ("serve the local web UI over a run folder", serve.args_serve),
    "convert": (
        "convert SAEs between formats (native, Gemma Scope npz / safetensors)",
        pipeline.args_convert,
    ),
    "sample-corpus": (
        "a corpus of the model's own text about a list of subjects, to train on beside another (--corpus wiki+FILE)",
        corpus.args_sample_corpus,
    ),
}


class UsageError(Exception):
    """A command line argparse refuses (a missing argument, a number that is not finite float32):
    printed in one line like a GemmaScopeError, exit status 2."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")


class _Parser(argparse.ArgumentParser):
    """argparse, its errors raised as UsageError instead of a usage dump and an exit (--help and
    --version still exit)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    from gemmascope import __version__

    parser = _Parser(
        prog="gemmascope",
        description="An open, trainable, local Gemma Scope: train, measure, explore and steer SAEs.",
    )
    parser.add_argument("--version", action="version", version=f"gemmascope {__version__}")
    parser.set_defaults(run_line=run_line)  # what `serve` and `demo` hand their server (`warm`)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gemmascope` command. A command about a run folder that a running
    `gemmascope serve` holds (`warm.WARM_COMMANDS`) is run by that server, its model already loaded,
    and prints what it prints here (the files it names made absolute); without one, or if the server
    does not take it, it runs here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    served = _run_by_server(args, argv)
    return served if served is not None else execute(args)


def execute(args: argparse.Namespace) -> int:
    """Run a parsed command here; a GemmaScopeError is printed in one line, exit status 2."""
    try:
        return int(args.run(args) or 0)
    except GemmaScopeError as err:
        print(f"gemmascope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"gemmascope {args.command}: interrupted; finished work is kept, re-run to resume",
            file=sys.stderr,
        )
        return 130


def run_line(argv: list[str], cwd: Path, served: Path) -> dict[str, Any]:
    """Run a command line typed in `cwd` about the run folder `served`, for a server that runs the
    command line's commands (`server.commands`; `warm.WARM_COMMANDS` only, their files and folders
    taken from `cwd`): `{"code", "stdout", "stderr"}`. ConfigError: a line that does not parse, is
    not such a command, or is about another run folder."""
    from gemmascope import warm
    from gemmascope.cli.options import absolute_paths

    try:
        args = build_parser().parse_args(argv)
    except UsageError as refused:
        raise ConfigError(str(refused)) from None
    except SystemExit:  # --help, --version
        raise ConfigError("--help and --version are answered by the command itself") from None
    if args.command not in warm.WARM_COMMANDS:
        raise ConfigError(
            f"{args.command!r} is not run by a server: expected one of {', '.join(warm.WARM_COMMANDS)}"
        )
    args = absolute_paths(args, cwd)
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or Path(run_dir).resolve() != served.resolve():
        raise ConfigError(f"this server serves {served}, not {run_dir}")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = execute(args)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _run_by_server(args: argparse.Namespace, argv: list[str]) -> int | None:
    """The exit status of `argv` run by a live server of its run folder (what it printed is printed
    here), or None: not a command a server runs, no server, a model of its own named, or the server
    did not take it. A server that took it and failed is an error here (status 2), not a second run."""
    from gemmascope import warm

    if args.command not in warm.WARM_COMMANDS or getattr(args, "model", None) is not None:
        return None
    server = warm.running_server(getattr(args, "run_dir", None))
    if server is None:
        return None
    if getattr(args, "color", None) == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ:
        argv = [*argv, "--color", "always"]  # the server's output is not a terminal; this one is
    try:
        answer = warm.run_command(server, argv, Path.cwd())
        code, out, err = int(answer["code"]), str(answer["stdout"]), str(answer["stderr"])
    except warm.ServerUnavailable:
        return None
    except (warm.ServerFailed, TypeError, ValueError) as failed:
        print(
            f"gemmascope {args.command}: error: the running gemmascope serve at {server.url} took the command and "
            f"failed ({failed}); its terminal says why. Run it here with GEMMASCOPE_NO_SERVER=1",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            f"gemmascope {args.command}: interrupted (the server at {server.url} finishes the command it took)",
            file=sys.stderr,
        )
        return 130
    print(f"(run by the running gemmascope serve at {server.url}: its model stays loaded)", file=sys.stderr)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return code
