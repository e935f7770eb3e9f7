"""Rebuild docs/results/README.md's index from the result files present (bench.benchlib.index).

    python -m bench.index              # rewrite the index below the marker line
    python -m bench.index --check      # exit 1 when the index is out of date (nothing written)
    python -m bench.index --print      # print README.md as it would be written
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .benchlib import index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(index.RESULTS), help="the results folder (default docs/results)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="only say whether README.md is up to date (exit 1 if not)")
    g.add_argument("--print", action="store_true", help="print the README as it would be written, write nothing")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise SystemExit(f"{root} is not a directory")
    text = index.render(root)
    readme = root / "README.md"
    if args.print:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = readme.read_text() if readme.is_file() else None
        if current != text:
            print(f"{readme} is out of date: run python -m bench.index", file=sys.stderr)
            return 1
        print(f"{readme} is up to date")
        return 0
    index.rebuild(root)
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
