"""`honeypotnet verify`: the ownership test of a suspect against the owner's bundle."""
from __future__ import annotations

import os
from pathlib import Path

from .common import DATASETS, log, dataset_args, device_arg, load_any_model, load_data, resolve_device, write_json


def add(sub) -> None:
    s = sub.add_parser("verify", help="ownership test of a suspect model", epilog=DATASETS + " Exit status: 0 the "
                       "suspect is flagged STOLEN, 1 not flagged, 2 bad input.")
    s.add_argument("bundle", help="the owner's bundle (trigger, target, tau0)")
    s.add_argument("suspect", help="suspect model file or bundle, or an http(s) URL http://HOST:PORT/v2/models/NAME")
    s.add_argument("--api-key", default=os.environ.get("HONEYPOTNET_API_KEY"),
                   help="bearer token for an http(s) suspect (default $HONEYPOTNET_API_KEY)")
    dataset_args(s, "data", None, "test", "owner's held-out (labelled, never used by protect)")
    s.add_argument("--image-size", type=int, default=None,
                   help="side the held-out images are resized to; it must be the bundle's own (its trigger's size, "
                        "the default): a trigger is stamped at the size it was made for, so another is refused")
    s.add_argument("--tau0", type=float, default=None, help="override the bundle's calibrated null bound")
    s.add_argument("--commitment", default=None, metavar="HEX",
                   help="the trigger commitment published at protect time: refuse a bundle whose trigger is not it")
    s.add_argument("--bundle-hash", default=None, metavar="HEX",
                   help="the bundle hash kept at protect time: refuse a bundle rewritten since")
    s.add_argument("--alpha", type=float, default=None,
                   help="significance level (default 1e-3; 1e-6 with --max-queries)")
    s.add_argument("--max-queries", type=int, default=None, metavar="N",
                   help="the sequential test: send stamped images 10 at a time and stop as soon as the verdict is "
                        "decided (always-valid at alpha), at most N; without it every held-out image is sent once")
    s.add_argument("--stolen-asr", type=float, default=None, metavar="P",
                   help="with --max-queries: clear a suspect once its ASR is shown below P, what stolen copies reach "
                        "(default 0.5, or halfway between tau0 and 1). A copy that obeys the trigger less, such as a "
                        "thief that queried images like yours (8-12%% on the CIFAR-10 protocol), is cleared at 0.5: "
                        "give a P just above tau0 to keep testing it (more queries)")
    s.add_argument("--unstamped", action="store_true",
                   help="with --max-queries: also send each image unstamped (the suspect's clean accuracy; not "
                        "needed for the verdict, doubles the queries)")
    device_arg(s)
    s.add_argument("--json", default=None, help="write the result as JSON here")
    s.add_argument("--report", default=None, metavar="FILE.html",
                   help="write a report people can look at (and FILE.png): verdict, ASR with its confidence interval "
                        "against tau0, p-value, hashes, clean and stamped examples with the suspect's answers")
    s.set_defaults(func=run)


def check_classes(data, bundle) -> None:
    """Refuse verification data that is not the bundle's task: a different number of classes, or other class
    names (a verdict on another task's images is meaningless and can accuse an innocent model)."""
    want = list(bundle.classes)
    if data.labels is None:
        raise ValueError("verification needs the owner's labelled held-out images (the target class is left out "
                         "by its label)")
    if data.num_classes != len(want):
        raise ValueError(f"the data {data.name!r} has {data.num_classes} classes but the bundle {len(want)}: "
                         "verify with held-out images of the protected model's own task")
    if list(data.classes) != want:
        diff = [(a, b) for a, b in zip(data.classes, want) if a != b][:3]
        raise ValueError(f"the data's class names differ from the bundle's (e.g. {diff}): verify with held-out "
                         "images of the protected model's own task, in its class order")


def run(args) -> int:
    from ..bundle import load_bundle
    from ..oracles_http import HttpOracle, is_url
    from ..verify import verify

    device = resolve_device(args.device)
    bundle = load_bundle(args.bundle, expected_hash=args.bundle_hash, commitment=args.commitment)
    size = bundle.trigger.image_size
    if args.image_size is not None and args.image_size != size:
        raise ValueError(f"--image-size {args.image_size}: the bundle's trigger is {size}x{size} and is stamped on "
                         f"images of that size only; verify resizes the held-out images to {size} (leave "
                         "--image-size out, or pass it the bundle's size)")
    if is_url(args.suspect):  # a suspect model behind an HTTP endpoint (v2 protocol)
        suspect = HttpOracle(args.suspect, api_key=args.api_key)
    else:
        suspect, _ = load_any_model(args.suspect)
        suspect = suspect.to(device)
    data = load_data(args, "data", size=size)
    check_classes(data, bundle)
    tau0 = args.tau0 if args.tau0 is not None else bundle.tau0
    if tau0 is None:
        raise ValueError("the bundle has no calibrated tau0 (protect without --references); pass --tau0")
    sequential = args.max_queries is not None
    if args.stolen_asr is not None and not sequential:
        raise ValueError("--stolen-asr is the sequential test's: give it with --max-queries")
    alpha = args.alpha if args.alpha is not None else (1e-6 if sequential else 1e-3)
    res = verify(suspect, bundle.trigger, data.images, data.labels, bundle.target, tau0, alpha, sequential=sequential,
                 max_queries=args.max_queries, stolen_asr=args.stolen_asr, unstamped=args.unstamped)
    print(res)
    if args.report:
        from ..oracles import ModelOracle, Oracle
        from ..ops import to_float
        from ..report import write_report

        oracle = suspect if isinstance(suspect, Oracle) else ModelOracle(suspect)
        keep = data.labels != bundle.target
        examples = to_float(data.images[keep][:6]).to("cpu")
        clean = oracle(examples).argmax(1)
        stamped = oracle(bundle.trigger.cpu().stamp(examples)).argmax(1)
        html_path, png_path = write_report(args.report, res, bundle, str(args.suspect), examples, clean, stamped)
        log.info(f"report: {html_path} ({png_path})")
    if args.json:
        write_json(Path(args.json), res.to_dict() | {"bundle": str(args.bundle), "suspect": str(args.suspect)})
    return 0 if res.stolen else 1  # like grep: 0 = found (flagged), 1 = not flagged, 2 = error
