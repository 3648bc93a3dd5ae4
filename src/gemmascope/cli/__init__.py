"""The `gemmascope` command: argument parsing and printing over the public functions of the
pipeline modules; no pipeline lives here. `pipeline` holds the subcommands that write into a run
folder (demo, suite, harvest, train, convert), `measure` those that measure SAEs and index their
features (eval, index); those that look inside the model through them have one module each:
`inspect`, `contrast` (contrast, bias), `attribute`, `steer`, `serve`. `options` holds the shared
option groups, the one comma-list parser, the one number type and the one bounded reader of the
text files a user names. A `GemmaScopeError`, or a command line argparse refuses, is printed as one
line (no traceback, no usage dump) and exits with status 2.

Knows nothing of internals beyond those public functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from gemmascope.cli import attribute, contrast, inspect, measure, pipeline, serve, steer
from gemmascope.errors import GemmaScopeError

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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gemmascope` command."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
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
