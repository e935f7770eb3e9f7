"""`honeypotnet serve`, `keys`, `log`, `export`: serving a bundle, its API keys, its query log, and the
exported model for serving hosts (docs/serving.md)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

from ..names import OUTPUT_MODES
from .common import write_json


# `serve` flag -> Limits field; a flag left out keeps the field's default
LIMIT_FLAGS = {"max_batch": "max_batch", "max_body_mb": "max_body_mb", "quota": "quota", "rate": "rate", "burst": "burst",
               "rate_unit": "rate_unit", "read_timeout": "read_timeout_s", "log_timeout": "log_timeout_s",
               "auth_fail_rate": "auth_fail_rate", "auth_fail_burst": "auth_fail_burst",
               "auth_log_interval": "auth_log_interval_s"}


def limits_from_args(args):
    """The server's Limits from the parsed `serve` flags."""
    from ..serve import Limits

    return Limits(**{field: getattr(args, flag) for flag, field in LIMIT_FLAGS.items() if getattr(args, flag) is not None})


def _number(kind: type, minimum: float, inclusive: bool, what: str) -> "Callable[[str], float]":
    """An argparse type: a finite `kind` (int or float) >= minimum (> minimum unless inclusive)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, False, "a positive integer")
count = _number(int, 0, True, "an integer >= 0")
positive = _number(float, 0, False, "a number > 0")
non_negative = _number(float, 0, True, "a number >= 0")
at_least_one = _number(float, 1, True, "a number >= 1")


def cmd_serve(args) -> int:
    from ..oracles import OutputMode
    from ..serve import create_app, run_server

    limits = limits_from_args(args)
    app = create_app(args.model, name=args.name, output=OutputMode(args.output_mode, args.top_k, args.decimals),
                     keys=args.keys, log_path=args.log, limits=limits, image_size=args.image_size)
    state = app.state.honeypotnet
    s = state.served

    def announce(host: str, port: int) -> None:
        h = f"[{host}]" if ":" in host else host
        print(f"serving {args.model} as '{s.name}' ({s.num_classes} classes, {s.image_size}x{s.image_size}, output {args.output_mode})", flush=True)
        print(f"  {'open (no --keys): requests logged as anonymous' if args.keys is None else f'API keys from {args.keys}'}; "
              f"query log {args.log or '(in memory only: pass --log FILE to keep it)'}", flush=True)
        print(f"listening on http://{h}:{port}/v2/models/{s.name}", flush=True)

    run_server(app, args.host, args.port, log_level=args.log_level, on_listening=announce)
    return 0


def cmd_keys(args) -> int:
    from ..apikeys import add_key, read_keys, remove_key, set_quota

    if args.action == "add":
        if not args.name:
            raise ValueError("keys add needs a NAME")
        token = add_key(args.keys, args.name, args.quota)
        print(token)
        print(f"added key {args.name!r} to {args.keys}"
              f"{f' (quota {args.quota} images)' if args.quota is not None else ''}; the token above is shown only once",
              file=sys.stderr)
    elif args.action == "set-quota":
        if not args.name:
            raise ValueError("keys set-quota needs a NAME (and --quota N, or none for the server default)")
        set_quota(args.keys, args.name, args.quota)
        print(f"key {args.name!r}: quota {args.quota if args.quota is not None else '(server default)'}")
    elif args.action == "remove":
        if not args.name:
            raise ValueError("keys remove needs a NAME")
        remove_key(args.keys, args.name)
        print(f"removed key {args.name!r} from {args.keys}")
    else:
        keys = read_keys(args.keys)
        if args.json:
            print(json.dumps([{"name": k.name, "quota": k.quota, "created": k.created} for k in keys], indent=2))
        else:
            for k in keys:
                print(f"{k.name:<24} quota {k.quota if k.quota is not None else '(server default)':<16} created {k.created}")
            if not keys:
                print("(no keys)")
    return 0


def cmd_log(args) -> int:
    from ..querylog import format_summary, summarise

    s = summarise(args.database, bucket=args.bucket, heavy_share=args.heavy_share, heavy_images=args.heavy_images)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_export(args) -> int:
    from ..bundle import load_bundle, load_model, save_model
    from ..export import export_model

    p = Path(args.model)
    if args.format == "model":  # the protected model alone, for `serve` on hosts that must not hold the trigger
        if not p.is_dir():
            raise ValueError("--format model exports a bundle's protected model: give the bundle directory")
        b = load_bundle(p)
        out = save_model(b.model, args.output, b.manifest["arch"], len(b.classes), b.classes,
                         image_size=b.trigger.image_size, honeypot=b.manifest["head"])
        print(f"wrote {out}: the protected model without its trigger (serve it with `honeypotnet serve {out}`)")
        return 0
    if p.is_dir():
        b = load_bundle(p)
        model, size = b.model, int(b.manifest.get("image_size") or b.trigger.image_size)
    else:
        model, info = load_model(p)
        size = int(args.image_size or info.get("image_size") or 32)
    out = Path(args.output)
    rep = export_model(model, out, args.format, size, probabilities=not args.logits, opset=args.opset, tolerance=args.tolerance)
    print(rep)
    write_json(out.with_name(out.name + ".json"), rep.to_dict() | {"source": str(p)})
    if not rep.ok:
        print(f"honeypotnet export: the exported model differs from torch by {rep.max_abs_diff:.3g} > {rep.tolerance:g}", file=sys.stderr)
        return 1
    return 0


def add(sub: argparse._SubParsersAction, epilog: str = "") -> None:
    """Register serve / keys / log / export on the CLI's subparsers."""
    s = sub.add_parser("serve", help="serve a bundle or model file over HTTP (KServe v2 protocol)", epilog=epilog,
                       description="Serve a protected bundle (or a plain model file, e.g. a thief's substitute) with "
                                   "API keys, quotas, rate limits and a SQLite query log. See docs/serving.md.")
    s.add_argument("model", help="bundle directory or model file (.safetensors)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    s.add_argument("--name", default=None, help="model name in URLs (default: the file or directory name)")
    s.add_argument("--output-mode", choices=list(OUTPUT_MODES), default="probs", help="what the API answers (default probs)")
    s.add_argument("--top-k", type=int, default=1, help="k for --output-mode topk")
    s.add_argument("--decimals", type=int, default=2, help="decimals for --output-mode rounded")
    s.add_argument("--image-size", type=int, default=None, help="input side for a model file (default 32; a bundle fixes it)")
    s.add_argument("--keys", default=None, metavar="KEYFILE", help="API key file (from `honeypotnet keys add`); without it the server is open")
    s.add_argument("--quota", type=count, default=None, metavar="N", help="images each key may query in total (a key's own quota wins; default: no quota)")
    s.add_argument("--rate", type=positive, default=None, metavar="R", help="rate limit per key: R requests (or images) per second (default: none)")
    s.add_argument("--burst", type=at_least_one, default=None, metavar="B", help="token bucket size, >= 1 (default R for requests, max(R, --max-batch) for images)")
    s.add_argument("--rate-unit", choices=["requests", "images"], default=None, help="what --rate counts (default requests)")
    s.add_argument("--log", default=None, metavar="DB", help="SQLite query log (WAL; one row per request; servers sharing it share quotas)")
    s.add_argument("--log-timeout", type=positive, default=None, metavar="S",
                   help="a request whose query log write cannot finish within S seconds gets a 503, unanswered (default 2)")
    s.add_argument("--max-batch", type=positive_int, default=None, metavar="N", help="images per request at most (default 256)")
    s.add_argument("--max-body-mb", type=positive, default=None, metavar="MB", help="request body size limit in MB (default 16)")
    s.add_argument("--read-timeout", type=positive, default=None, metavar="S",
                   help="a request head or body not received within S seconds is cut off (408; default 10)")
    s.add_argument("--auth-fail-rate", type=positive, default=None, metavar="R",
                   help="failed authentications per second per client address, after --auth-fail-burst (default 1)")
    s.add_argument("--auth-fail-burst", type=at_least_one, default=None, metavar="B",
                   help="failed authentications at once per address before it gets 429 (default 20)")
    s.add_argument("--auth-log-interval", type=non_negative, default=None, metavar="S",
                   help="write failed-authentication counts to the query log at most every S seconds (default 60)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("keys", help="manage the server's API keys", epilog=epilog,
                       description="The key file stores only sha256 hashes of the tokens; `add` prints the new token once.")
    s.add_argument("action", choices=["add", "list", "set-quota", "remove"])
    s.add_argument("name", nargs="?", default=None, help="key name (add, set-quota, remove)")
    s.add_argument("--keys", required=True, metavar="KEYFILE", help="key file (created by the first `add`)")
    s.add_argument("--quota", type=int, default=None, metavar="N", help="images this key may query (add, set-quota; default: the server's --quota)")
    s.add_argument("--json", action="store_true", help="list as JSON")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("log", help="summarise a server's query log", epilog=epilog)
    s.add_argument("database", help="the SQLite file given to `serve --log`")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--bucket", choices=["minute", "hour", "day"], default="hour", help="time bucket (default hour)")
    s.add_argument("--heavy-share", type=float, default=0.5, help="flag keys with more than this share of all images (default 0.5)")
    s.add_argument("--heavy-images", type=int, default=None, help="also flag keys with at least this many images")
    s.set_defaults(func=cmd_log)

    s = sub.add_parser("export", help="export a bundle's protected model to ONNX or TorchScript", epilog=epilog)
    s.add_argument("model", help="bundle directory (or model file)")
    s.add_argument("--format", choices=["onnx", "torchscript", "model"], required=True,
                   help="onnx / torchscript for other engines; model: the protected model as a honeypotnet model file "
                        "(no trigger inside) for `honeypotnet serve` on serving hosts")
    s.add_argument("--output", required=True, help="file to write; its check goes to OUTPUT.json")
    s.add_argument("--logits", action="store_true", help="output logits instead of softmax probabilities")
    s.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    s.add_argument("--image-size", type=int, default=None, help="input side for a model file (default 32)")
    s.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference accepted (default 1e-4)")
    s.set_defaults(func=cmd_export)

