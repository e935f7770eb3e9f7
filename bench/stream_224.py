"""protect on a 224-px model with its images streamed from a folder (decoded batch by batch) against the
same images decoded into one in-memory tensor: peak memory (RSS), seconds, and whether the two give the
same protection.

The images: Caltech-101 photos (../shared/data/caltech101.tar.gz, else generated pictures) resized once
to 224 px and written as JPEG files: OUT/images/shadow/*.jpg (the shadow set) and OUT/images/owner/<class>/
(the owner set). Each mode runs `protect` in a process of its own, so that its peak resident memory
(resource.getrusage's ru_maxrss) is its own:

    memory   load_dataset("folder", ..., size=224).images: every image decoded into a uint8 tensor first
    stream   load_dataset("folder", ..., size=224, lazy=True): a FileSource, each batch decoded when read

The victim is a torchvision model at random init (no download); the loop is the spec preset cut down to
one outer iteration with a small CNN shadow (the point is the data path, not the protection's strength),
every batch 32 images (shadow.batch, trigger.batch, protect(batch_size=32)): at 224 px the default
batches (128-500 images) take gigabytes of activations whatever the set's size.

    python -m bench.stream_224 --quick                    # 300 shadow images: a smoke test
    python -m bench.stream_224 --n 1500 --owner 200       # what docs/results/stream/ records
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from honeypotnet.config import ProtectConfig
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model
from honeypotnet.protect import protect

from .benchlib.args import add_common_args, finish_common_args
from .benchlib.common import REPO, command_line, log, machine_info, save_report, set_threads
from .benchlib.data import unpack_once

NAME = "stream"
SIZE = 224
LOOP = ["loop.outer_iters=1", "shadow.arch=cnn_small", "shadow.epochs=1", "trigger.passes=1", "head.steps=50",
        "shadow.batch=32", "trigger.batch=32"]
BATCH = 32  # protect(batch_size=): images per forward pass of the features (the default 500 takes GBs at 224 px)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_images(out: Path, n_shadow: int, n_owner: int, shared: Path) -> str:
    """OUT/images/{shadow,owner}: 224-px JPEGs, from Caltech-101 when the tarball is there (its train split for
    the shadow set, its test split for the owner set), else generated. Returns where they came from."""
    root = out / "images"
    done = root / "done.json"
    want = {"n_shadow": n_shadow, "n_owner": n_owner, "size": SIZE}
    if done.is_file() and json.loads(done.read_text()).get("want") == want:
        return json.loads(done.read_text())["source"]
    tb = shared / "data" / "caltech101.tar.gz"
    if tb.is_file():
        caltech = unpack_once(tb, "caltech101")
        train = sorted((caltech / "train").rglob("*.jpg"))
        test = sorted((caltech / "test").rglob("*.jpg"))
        step = max(1, len(train) // n_shadow)
        shadow_files = train[::step][:n_shadow]
        owner_files = test[:: max(1, len(test) // n_owner)][:n_owner]
        source = f"Caltech-101 ({len(shadow_files)} train and {len(owner_files)} test photos, resized to {SIZE} px)"
        pictures = None
    else:
        shadow_files = owner_files = []
        source = f"generated pictures ({SIZE} px; no {tb})"
        pictures = torch.Generator().manual_seed(0)
    if len(shadow_files if pictures is None else range(n_shadow)) < n_shadow:
        raise SystemExit(f"Caltech-101 has fewer than {n_shadow} train images")
    for i in range(n_shadow):
        path = root / "shadow" / f"{i:06d}.jpg"
        save_224(shadow_files[i] if pictures is None else None, path, pictures)
    for i in range(n_owner):
        src = owner_files[i] if pictures is None else None
        cls = src.parent.name if src is not None else f"class{i % 10}"
        save_224(src, root / "owner" / cls / f"{i:06d}.jpg", pictures)
    done.write_text(json.dumps({"want": want, "source": source}))
    return source


def save_224(src: Path | None, path: Path, gen: torch.Generator | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if src is not None:
        im = Image.open(src).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    else:  # smooth random colour fields: a few low-frequency waves
        y, x = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
        f = torch.rand(3, 4, generator=gen) * 8
        img = torch.stack([0.5 + 0.25 * torch.sin(f[c, 0] * x + f[c, 1]) + 0.25 * torch.cos(f[c, 2] * y + f[c, 3])
                           for c in range(3)])
        im = Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    im.save(path, quality=90)


def child(args) -> int:
    """One mode in this process: load, protect, report seconds and peak RSS as JSON on stdout's last line."""
    set_threads()
    root = Path(args.out) / "images"
    torch.manual_seed(0)
    victim = create_model(args.arch, 101, normalize="imagenet").eval()
    rss_model = peak_rss_mib()
    lazy = args.child == "stream"
    t0 = time.perf_counter()
    shadow = load_dataset("folder", root / "shadow", None, size=SIZE, lazy=lazy, cache=False)
    owner = load_dataset("imagefolder", root / "owner", None, size=SIZE, lazy=lazy, cache=False)
    t_load = time.perf_counter() - t0
    rss_loaded = peak_rss_mib()
    cfg = ProtectConfig.preset("spec").override(LOOP)
    t0 = time.perf_counter()
    res = protect(victim, shadow.images, owner.images, cfg, progress=False, device=args.device, batch_size=BATCH)
    t_protect = time.perf_counter() - t0
    digest = hashlib.sha256(res.trigger.pattern.numpy().tobytes())
    for v in res.model.state_dict().values():
        digest.update(v.detach().contiguous().numpy().tobytes())
    out = {"mode": args.child, "images": len(shadow) + len(owner),
           "in_memory_bytes": (len(shadow) + len(owner)) * 3 * SIZE * SIZE,
           "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_model_mib": round(rss_model, 1),
           "rss_after_load_mib": round(rss_loaded, 1), "load_s": round(t_load, 1), "protect_s": round(t_protect, 1),
           "result_sha256": digest.hexdigest(), "history": res.history}
    if lazy:
        out["decoded"] = {"shadow": shadow.decoded, "owner": owner.decoded,
                          "largest_batch": max(shadow.largest_batch, owner.largest_batch)}
    print(json.dumps(out), flush=True)
    return 0


def main(argv=None) -> dict | int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_224", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1500, help="shadow images (default 1500)")
    ap.add_argument("--owner", type=int, default=200, help="owner images (default 200)")
    ap.add_argument("--arch", default="torchvision:mobilenet_v3_small", help="the victim (random init)")
    ap.add_argument("--modes", nargs="+", choices=["memory", "stream"], default=["memory", "stream"])
    ap.add_argument("--shared", default=os.environ.get("HONEYPOTNET_SHARED", str(REPO.parent / "shared")),
                    help="the shared folder with data/caltech101.tar.gz (default ../shared)")
    ap.add_argument("--child", choices=["memory", "stream"], help=argparse.SUPPRESS)
    add_common_args(ap, quick="300 shadow and 60 owner images", resume=None, progress=False)
    args = finish_common_args(ap.parse_args(argv), NAME)
    if args.quick:
        args.n, args.owner = 300, 60
    if args.child:
        return child(args)
    out = Path(args.out)
    source = write_images(out, args.n, args.owner, Path(args.shared))
    log(f"images: {source} under {out / 'images'}")
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, "-m", "bench.stream_224", "--child", mode, "--n", str(args.n), "--owner", str(args.owner),
               "--arch", args.arch, "--out", str(out), "--device", args.device]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if r.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        log(f"{mode}: peak RSS {row['peak_rss_mib']:.0f} MiB, load {row['load_s']:.1f} s, protect {row['protect_s']:.1f} s")
    same = len({r["result_sha256"] for r in rows}) == 1
    set_mib = rows[0]["in_memory_bytes"] / 2**20
    lines = [f"# protect at {SIZE} px: streamed folder vs in-memory tensor", "",
             f"{args.arch} victim (random init), {args.n} shadow + {args.owner} owner images of {SIZE} px ({source}); "
             f"the set takes {set_mib:.0f} MiB as one uint8 tensor. spec preset with "
             + ", ".join(f"`{s}`" for s in LOOP) + f", `protect(batch_size={BATCH})`; device {args.device}, {torch.get_num_threads()} thread(s) "
             f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).", "",
             "| mode | peak RSS MiB | RSS after the model MiB | RSS after loading the set MiB | load s | protect s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak_rss_mib']:.0f} | {r['rss_after_model_mib']:.0f} | "
                     f"{r['rss_after_load_mib']:.0f} | {r['load_s']:.1f} | {r['protect_s']:.1f} |")
    by = {r["mode"]: r for r in rows}
    if "memory" in by and "stream" in by:
        lines += ["", f"Peak RSS streamed vs in memory: {by['stream']['peak_rss_mib'] - by['memory']['peak_rss_mib']:+.0f} "
                  f"MiB (the set is {set_mib:.0f} MiB); time {by['stream']['protect_s'] / by['memory']['protect_s']:.2f}x "
                  "the in-memory protect (plus its load)."]
    if "stream" in by:
        d = by["stream"]["decoded"]
        lines.append(f"Streamed: {d['shadow'] + d['owner']} images decoded in all, at most {d['largest_batch']} in one "
                     "request.")
    if len(rows) > 1:
        lines.append("Same trigger and protected weights in both modes: " + ("yes (bit for bit)." if same else "NO."))
    md = "\n".join(lines) + "\n"
    print(md)
    results = {"benchmark": "bench.stream_224", "mode": "quick" if args.quick else "full",
               "what": f"protect at {SIZE} px on a streamed folder vs an in-memory tensor: peak RSS and seconds",
               "command": command_line("bench.stream_224", argv),
               "protocol": {"n_shadow": args.n, "n_owner": args.owner, "arch": args.arch, "size": SIZE,
                            "images": source, "set": LOOP, "batch_size": BATCH},
               "rows": rows, "same_result": same, "machine": machine_info(torch.device(args.device))}
    save_report(out, NAME, results, md, record=args.record, folder=NAME)
    return results


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
