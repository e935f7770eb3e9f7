"""`honeypotnet demo`: the whole chain on the embedded data, one table."""
from __future__ import annotations

from pathlib import Path


def add(sub) -> None:
    s = sub.add_parser("demo", help="the whole chain on the embedded data, one table")
    s.add_argument("--output", default="runs/demo", help="directory for models, bundle and results.json")
    s.add_argument("--quick", action="store_true", help="smaller sizes (about a minute), for smoke tests")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["spec", "robust"], default="spec",
                   help="the protection: 'spec' (default here, eps 24: the chain in a few minutes) or 'robust' (the "
                        "library's and `protect`'s default, several times the protect time)")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(Path(args.output), quick=args.quick, seed=args.seed, preset=args.preset)
    return 0
