"""The options every bench script shares, so that each one reads the same way:

    --out DIR             where the run writes (default runs/<name>, runs/<name>-quick with --quick)
    --quick               the same pipeline at a small size (what the tests run)
    --device DEV          cpu / cuda (default: cuda when available)
    --resume/--no-resume  reuse finished units (scripts that keep units; the default is the script's)
    --progress/--no-progress   progress bars (default: when stderr is a terminal)
    --record NAME         also copy the report into docs/results/<folder>/NAME.{md,json} and rebuild
                          docs/results/README.md's index (scripts that write a report)

and the data options (--shared, --cifar-root, --tin-root, --victim-weights)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from honeypotnet.training import default_device

from .common import REPO


def add_common_args(ap: argparse.ArgumentParser, *, quick: str, resume: bool | None = False,
                    device: bool = True, progress: bool = True, record: bool = True) -> None:
    """The shared options. resume: the default of --resume (None: the script keeps no units, no option);
    device / progress / record: False where the script has no use for them."""
    g = ap.add_argument_group("common options (every bench script)")
    g.add_argument("--out", help="output directory (default runs/<script>, runs/<script>-quick with --quick)")
    g.add_argument("--quick", action="store_true", help=quick)
    if device:
        g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    if resume is not None:
        g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=resume,
                       help="skip finished units, continue partial ones (default: "
                            + ("on; --no-resume recomputes them" if resume else "off: every unit from scratch") + ")")
    if progress:
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                       help="progress bars (default: when stderr is a terminal)")
    if record:
        g.add_argument("--record", metavar="NAME",
                       help="also write the report to docs/results/<benchmark>/NAME.md and .json and rebuild "
                            "docs/results/README.md's index (python -m bench.index)")


def add_data_args(ap: argparse.ArgumentParser, victim: bool = True) -> None:
    """Where the real data (and the victim's weights) come from."""
    g = ap.add_argument_group("data")
    g.add_argument("--shared", default=os.environ.get("HONEYPOTNET_SHARED", str(REPO.parent / "shared")),
                   help="the shared folder with data/*.tar.gz and weights/ (default ../shared)")
    g.add_argument("--cifar-root", help="an unpacked cifar10-jpeg directory ({train,test}/<class>/*.jpg)")
    g.add_argument("--tin-root", help="an unpacked tiny-imagenet-200 directory")
    if victim:
        g.add_argument("--victim-weights", help="resnet20 checkpoint (default SHARED/weights/resnet-cifar10/resnet20-*.th)")


def finish_common_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Fill the defaults that depend on other options: --out (runs/<name>[-quick]) and --device."""
    if getattr(args, "out", None) is None:
        args.out = str(default_out(name, args.quick))
    if hasattr(args, "device") and args.device is None:
        args.device = str(default_device())
    return args


def default_out(name: str, quick: bool) -> Path:
    return REPO / "runs" / (f"{name}-quick" if quick else name)


def add_reproduction_reader_args(ap: argparse.ArgumentParser, quick: str, arsenal_what: str = "their copies too") -> None:
    """The arguments of a study that reads a finished bench.reproduce run (bench.ownership, bench.decoys):
    the common ones, the data roots, --reproduce-out and --arsenal-out."""
    add_common_args(ap, quick=quick, resume=None, device=False, progress=False)
    add_data_args(ap, victim=False)
    ap.add_argument("--reproduce-out", required=True, help="a finished bench.reproduce output directory (read only)")
    ap.add_argument("--arsenal-out", nargs="*", default=[], metavar="DIR",
                    help=f"bench.arsenal output directories made with --from-reproduce REPRODUCE_OUT: {arsenal_what}")
