"""Before/after timings of the speed-ups the real-data benchmark relies on, each pair measured in
this one run on the same inputs (so the ratios hold for this machine at this moment).

    python bench/speed.py                   # real data from ../shared (or --cifar-root/--tin-root)
    python bench/speed.py --n 2000 --json runs/speed.json

What is compared (before -> after):
  features   protect's f(x ⊕ δ) over the shadow+owner images (the step that dominated protect):
             NCHW convolutions -> channels_last (honeypot.compute_features(channels_last=...))
  training   one epoch of substitute training: NCHW -> channels_last (what training.fit does)
  answers    a thief's answers for its queries: a forward pass of the victim per thief (ModelOracle)
             -> one pass over the pool shared by every thief, looked up by image bytes (PoolOracle in
             bench/reproduce.py); both through the Oracle base class, so queries are still counted
  decode     loading cifar10-jpeg/test: decoding 10k JPEG files -> reading the uint8 safetensors cache
  stamping   stamping a UAP on a batch: per image in a Python loop -> one broadcast over the batch

Each figure is the median of --repeats runs. The output is a markdown table (and --json).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402  (the benchmark whose speed-ups are measured here)

from honeypotnet.data import load_dataset  # noqa: E402
from honeypotnet.honeypot import Trigger, compute_features  # noqa: E402
from honeypotnet.models import create_model, split_classifier  # noqa: E402
from honeypotnet.oracles import ModelOracle  # noqa: E402
from honeypotnet.training import soft_cross_entropy, to_float  # noqa: E402
from honeypotnet.attacks import query_oracle  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_epoch(model, images, targets, channels_last: bool, batch: int = 128) -> None:
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = soft_cross_entropy(model(x), targets[i : i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    reproduce.add_data_args(ap)
    ap.add_argument("--n", type=int, default=4000, help="images per timed step (default 4000)")
    ap.add_argument("--thieves", type=int, default=4, help="thieves sharing one pool in the answers comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-decode", action="store_true", help="skip the JPEG decode comparison (about a minute)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cifar_root, tin_root = reproduce.resolve_roots(args)
    test = load_dataset("imagefolder", cifar_root, "test")
    pool = load_dataset("tinyimagenet", tin_root, "train", size=32).images[: args.n].contiguous()
    images = test.images[: args.n].contiguous()
    victim = create_model("resnet20", 10, pretrained=str(reproduce._find_victim(Path(args.shared)))).eval()
    rows: list[dict] = []

    def add(name: str, before_label: str, after_label: str, before: float, after: float, unit: str) -> None:
        rows.append({"step": name, "before": before_label, "after": after_label, "before_s": round(before, 4),
                     "after_s": round(after, 4), "speedup": round(before / after, 2), "per": unit})
        print(f"{name:>9}: {before_label} {before:.3f} s -> {after_label} {after:.3f} s  ({before / after:.2f}x)  per {unit}",
              flush=True)

    # features f(x ⊕ δ): NCHW vs channels_last
    trig = Trigger.uap(32, 16 / 255)
    trig.pattern.uniform_(-16 / 255, 16 / 255)
    f_nchw, _ = split_classifier(copy.deepcopy(victim))
    f_cl, _ = split_classifier(copy.deepcopy(victim))
    a = compute_features(f_nchw, images, trig, channels_last=False)
    b = compute_features(f_cl, images, trig, channels_last=True)
    diff = float((a - b).abs().max())
    add("features", "NCHW", "channels_last",
        median_time(lambda: compute_features(f_nchw, images, trig, channels_last=False), args.repeats),
        median_time(lambda: compute_features(f_cl, images, trig, channels_last=True), args.repeats),
        f"{args.n} stamped images (max |Δ| {diff:.1e})")

    # one training epoch: NCHW vs channels_last (cnn and resnet20 substitutes)
    targets = torch.softmax(torch.randn(args.n, 10), 1)
    for arch in ("cnn", "resnet20"):
        m0, m1 = create_model(arch, 10), create_model(arch, 10)
        add(f"train {arch}", "NCHW", "channels_last",
            median_time(lambda: train_epoch(m0, pool, targets, False), args.repeats),
            median_time(lambda: train_epoch(m1, pool, targets, True), args.repeats), f"epoch of {args.n} images")

    # thief answers: a victim pass per thief vs one pool pass shared by all thieves
    def per_thief():
        for _ in range(args.thieves):
            query_oracle(ModelOracle(victim), pool, batch_size=500)

    def shared_pool():
        probs = query_oracle(ModelOracle(victim), pool, batch_size=500)
        for _ in range(args.thieves):
            query_oracle(reproduce.PoolOracle(probs, pool), pool, batch_size=500)

    add("answers", "ModelOracle/thief", "PoolOracle", median_time(per_thief, args.repeats),
        median_time(shared_pool, args.repeats), f"{args.thieves} thieves x {args.n} queries")

    # stamping: per image vs batched
    x = to_float(images[:1000])
    add("stamping", "per image", "batched",
        median_time(lambda: torch.stack([trig.stamp(xi[None])[0] for xi in x]), args.repeats),
        median_time(lambda: trig.stamp(x), args.repeats), "1000 images")

    # decode: JPEG files vs the uint8 cache (a fresh cache dir, so the first load decodes)
    if not args.skip_decode:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            load_dataset("imagefolder", cifar_root, "test", cache_dir=tmp)
            decode = time.perf_counter() - t
            cached = median_time(lambda: load_dataset("imagefolder", cifar_root, "test", cache_dir=tmp), args.repeats)
        add("decode", "JPEG decode", "uint8 cache", decode, cached, "cifar10-jpeg/test (10k)")

    print()
    print("| step | before | after | before s | after s | speed-up | per |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['step']} | {r['before']} | {r['after']} | {r['before_s']:.3f} | {r['after_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['per']} |")
    out = {"benchmark": "bench/speed.py", "rows": rows, "machine": reproduce.machine_info(torch.device("cpu")),
           "n": args.n, "repeats": args.repeats}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
