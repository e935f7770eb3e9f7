"""`honeypotnet <verb>`: a thin layer over the library calls, one module per verb.

Every verb writes a JSON result beside what it saves. Bad input prints one clear line and exits with
status 2; nothing already saved is touched by a failed run. `honeypotnet <verb> --help` for each.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..allocator import tune_allocator
from . import demo, extract, protect, serve, train, verify
from .common import DATASETS, setup_logging


COMPUTE_VERBS = ("demo", "train", "protect", "extract", "verify")  # batch jobs: the allocator keeps freed tensors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="honeypotnet", description="HoneypotNet: a backdoor for model thieves, as a defence.",
                                epilog=DATASETS)
    p.add_argument("--version", action="version", version=f"honeypotnet {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results: no progress bars or status lines")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in (demo, train, protect, extract, verify):
        verb.add(sub)
    serve.add(sub, DATASETS)  # serve, keys, log, export
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if args.verb in COMPUTE_VERBS:
        tune_allocator()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"honeypotnet {args.verb}: error: {e}", file=sys.stderr)
        return 2
