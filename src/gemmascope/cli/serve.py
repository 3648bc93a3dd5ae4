"""`gemmascope serve`: the local web UI over a run folder and/or SAEs named with `--sae` (SAE
folders, official `RELEASE/ID`s). Option parsing over `server.serve`.
"""

from __future__ import annotations

import argparse

from gemmascope.cli.options import add_model, add_serving
from gemmascope.errors import ConfigError


def args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="a run folder (saes/, features.sqlite, report/)"
    )
    p.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="SAE",
        help="also serve this SAE: a folder, or an official RELEASE/ID (e.g. gemma-scope-2-270m-pt/"
        "resid_post/layer_6_width_16k_l0_small, from $GEMMASCOPE_RELEASES or the hub); repeat for more. "
        "Without RUN_DIR, only these",
    )
    add_model(p, None, "model to run (default: the run's, else the one the SAEs' metadata names)")
    p.add_argument(
        "--clt", nargs="?", const="", default=None, metavar="SUBSTRING",
        help="draw the Graph page's graphs over the run's cross-layer transcoder (gemmascope suite RUN --clt) "
        "even when it has a transcoder per layer; SUBSTRING picks one of several (without a per-layer set, "
        "the run's only CLT is used anyway)",
    )  # fmt: skip
    add_serving(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from gemmascope.server import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is out of range: expected 1..65535")
    if args.run_dir is None and not args.sae:
        raise ConfigError("serve needs RUN_DIR, or --sae SAE (a folder or an official RELEASE/ID)")
    if args.clt is not None and args.run_dir is None:
        raise ConfigError("--clt draws graphs over a run folder's cross-layer transcoder: give RUN_DIR")
    serve(
        args.run_dir, host=args.host, port=args.port, extra=args.sae, model=args.model, run_line=args.run_line,
        clt=args.clt,
    )  # fmt: skip
    return 0
