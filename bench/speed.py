"""Before/after timings of the speed-ups the real-data benchmark relies on, each pair measured in
this one run on the same inputs (so the ratios hold for this machine at this moment), and where a
protect run spends its time.

    python -m bench.speed                   # real data from ../shared (or --cifar-root/--tin-root)
    python -m bench.speed --n 2000 --out runs/speed
    python -m bench.speed --quick           # small sizes, one repeat, no decode comparison (a smoke test)

What is compared (before -> after):
  features   protect's f(x ⊕ δ) over the shadow+owner images (the step that dominated protect):
             NCHW convolutions -> channels_last (honeypotnet.ops.batched_forward(channels_last=...))
  training   one epoch of substitute training: NCHW -> channels_last (what training.fit does)
  answers    a thief's answers for its queries: a forward pass of the victim per thief (ModelOracle)
             -> one pass over the pool shared by every thief, looked up by image bytes (PoolOracle,
             bench.benchlib.oracle); both through the Oracle base class, so queries are still counted
  decode     loading cifar10-jpeg/test: decoding 10k JPEG files -> reading the uint8 safetensors cache
  stamping   stamping a UAP on a batch: per image in a Python loop -> one broadcast over the batch

Each figure is the median of --repeats runs. Then short protect runs, one per --configs entry (default:
the spec preset, the robust default, and the robust default again with the negative shadows its first run
cached on disk, "@cached", as a later protection of the same victim and images gets them: protect(cache_dir=);
every other run starts from an empty cache; "@glibc" runs one with glibc's own allocator thresholds, where
the others run with the CPU allocator tuned as the CLI tunes it: honeypotnet.allocator), each in a fresh
process of its own, one after the other, at --protect-iters outer iterations on --n shadow and --n owner
images on --device, side by side: the wall time of each step as protect's callback gives
it (ProtectEvent.seconds) and each run's total as a multiple of the first's. Output: markdown tables on
stdout and OUT/speed.md, OUT/speed.json (default runs/speed[-quick]).

    python -m bench.speed --n 2000 --protect-iters 2 --skip-decode --configs spec robust
    python -m bench.speed --n 10000 --protect-iters 8 --protect-only --configs spec robust
                                            # the CIFAR-10 protocol's protect, spec against the default
    python -m bench.speed --n 10000 --protect-iters 8 --protect-only --configs spec robust robust@cached
                                            # ... and a second protection that loads the cached negatives
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from honeypotnet import allocator
from honeypotnet.attacks import query_oracle
from honeypotnet.config import ProtectConfig
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model, split_classifier
from honeypotnet.ops import batched_forward, to_float
from honeypotnet.oracles import ModelOracle
from honeypotnet.protect import ProtectEvent, protect
from honeypotnet.training import soft_cross_entropy
from honeypotnet.trigger import Trigger

from .benchlib.args import add_common_args, add_data_args, finish_common_args
from .benchlib.common import command_line, log, machine_info, save_report, set_threads
from .benchlib.data import find_victim, resolve_roots
from .benchlib.oracle import PoolOracle

NAME = "speed"


GLIBC_SUFFIX = "@glibc"
CACHED_SUFFIX = "@cached"


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


def protect_steps(victim, shadow: torch.Tensor, owner: torch.Tensor, cfg: ProtectConfig, device: torch.device,
                  cache_dir: str | None = None) -> dict:
    """Wall time of each step of protect per outer iteration, from protect's own callback."""
    events: list[ProtectEvent] = []
    cached = sorted(p.name for p in Path(cache_dir).glob("*.safetensors")) if cache_dir else []
    t = time.perf_counter()
    protect(victim, shadow, owner, cfg, progress=False, device=device, callback=events.append, cache_dir=cache_dir)
    total = time.perf_counter() - t
    steps: dict[str, float] = {}
    for e in events:
        for k, v in e.seconds.items():
            steps[k] = steps.get(k, 0.0) + v
    return {"iterations": len(events), "cached_before": cached, "total_s": round(total, 3), "steps_s": {k: round(v, 3) for k, v in steps.items()},
            "per_iteration": [{k: round(v, 3) for k, v in e.seconds.items()} for e in events]}


def protect_images(cifar_root: str, tin_root: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The protect runs' shadow (Tiny ImageNet val at 32 px) and owner (CIFAR-10 train) images."""
    shadow = load_dataset("tinyimagenet", tin_root, "val", size=32).images[:n].contiguous()
    return shadow, load_dataset("imagefolder", cifar_root, "train").images[:n].contiguous()


def _protect_child(queue, spec: str, iters: int, n: int, cifar_root: str, tin_root: str, victim_path: str,
                   device: str, cache_dir: str | None) -> None:
    try:
        set_threads()  # tunes the allocator unless the parent set HONEYPOTNET_MALLOC=0 (an @glibc run)
        torch.manual_seed(0)
        shadow, owner = protect_images(cifar_root, tin_root, n)
        victim = create_model("resnet20", 10, pretrained=victim_path).eval()
        queue.put({"config": spec, "device": device, "shadow": len(shadow), "owner": len(owner),
                   "allocator": allocator.tune_allocator(),
                   **protect_steps(victim, shadow, owner, config_of(spec, iters), torch.device(device), cache_dir)})
    except BaseException as e:  # the parent reports it
        queue.put({"config": spec, "error": f"{type(e).__name__}: {e}"})


def fresh_protect(spec: str, iters: int, n: int, cifar_root: str, tin_root: str, victim_path: str, device: str,
                  cache_dir: str | None = None) -> dict:
    """One protect run in a fresh process (spawned, run alone), so that no run inherits another's warm caches
    or heap, and an "@glibc" run gets glibc's own allocator (HONEYPOTNET_MALLOC=0 in its environment).
    cache_dir: protect's cache of negative shadows (None: none)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = os.environ.get("HONEYPOTNET_MALLOC")
    if glibc_run(spec):
        os.environ["HONEYPOTNET_MALLOC"] = "0"
    try:
        p = ctx.Process(target=_protect_child,
                        args=(queue, spec, iters, n, cifar_root, tin_root, victim_path, device, cache_dir))
        p.start()
    finally:
        os.environ.pop("HONEYPOTNET_MALLOC", None)
        if saved is not None:
            os.environ["HONEYPOTNET_MALLOC"] = saved
    r = queue.get()
    p.join()
    if "error" in r:
        raise RuntimeError(f"protect {spec}: {r['error']}")
    return r


def protect_table(runs: list[dict], iters: int, n_shadow: int, n_owner: int, device) -> list[str]:
    """Markdown: one column per protect run, one row per step (seconds summed over its iterations), the
    total, and each total as a multiple of the first run's."""
    steps = list(dict.fromkeys(k for r in runs for k in r["steps_s"]))
    names = [r["config"] for r in runs]
    md = ["", f"protect, side by side ({iters} outer iteration(s), {n_shadow} shadow + {n_owner} owner images, "
              f"{device}; seconds summed over iterations):", "",
          "| step | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    md += [f"| {k} | " + " | ".join(f"{r['steps_s'].get(k, 0.0):.2f}" for r in runs) + " |" for k in steps]
    md.append("| total (protect call) | " + " | ".join(f"{r['total_s']:.2f}" for r in runs) + " |")
    base = runs[0]["total_s"] or 1.0
    md.append(f"| × {names[0]} | " + " | ".join(f"{r['total_s'] / base:.2f}×" for r in runs) + " |")
    return md


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, quick="500 images, 1 repeat, no decode comparison, a 1-iteration protect (a smoke test)",
                    resume=None, progress=False)
    add_data_args(ap)
    ap.add_argument("--n", type=int, help="images per timed step (default 4000; quick 500)")
    ap.add_argument("--thieves", type=int, default=4, help="thieves sharing one pool in the answers comparison")
    ap.add_argument("--repeats", type=int, help="runs per timing, the median is kept (default 3; quick 1)")
    ap.add_argument("--skip-decode", action="store_true", help="skip the JPEG decode comparison (about a minute)")
    ap.add_argument("--protect-only", action="store_true",
                    help="only the protect runs side by side, none of the before/after comparisons (minutes at --n 10000)")
    ap.add_argument("--configs", nargs="+", default=["spec", "robust", "robust@cached"],
                    metavar="PRESET[:KEY=VALUE,...][@glibc][@cached]",
                    help="protect runs timed side by side: a preset, optionally with --set style changes, "
                         "@glibc for glibc's own allocator thresholds instead of the tuned ones, and @cached for a "
                         "second run of an earlier entry's configuration that loads the negative shadows that "
                         "run cached (default: spec robust robust@cached; the first is the ratios' base)")
    ap.add_argument("--protect-iters", type=int, help="outer iterations of the protect run (default 2; quick 1; 0 skips it)")
    args = finish_common_args(ap.parse_args(argv), NAME)
    args.n = args.n or (500 if args.quick else 4000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.skip_decode = args.skip_decode or args.quick
    if args.protect_iters is None:
        args.protect_iters = 1 if args.quick else 2
    try:
        args.protect_configs = [(c, config_of(c, args.protect_iters)) for c in args.configs]
        args.cache_from = cache_sources(args.protect_configs)
    except (ValueError, KeyError) as e:
        ap.error(f"--configs: {e}")
    return args


def run_flags(spec: str) -> tuple[str, set[str]]:
    """A --configs entry without its trailing run flags ("@glibc", "@cached", in any order), and the flags."""
    flags: set[str] = set()
    while True:
        for suffix in (GLIBC_SUFFIX, CACHED_SUFFIX):
            if spec.endswith(suffix):
                spec, flags = spec.removesuffix(suffix), flags | {suffix}
                break
        else:
            return spec, flags


def glibc_run(spec: str) -> bool:
    """Whether a --configs entry asks for glibc's own allocator thresholds (a trailing "@glibc")."""
    return GLIBC_SUFFIX in run_flags(spec)[1]


def cache_sources(configs: list[tuple[str, ProtectConfig]]) -> list[int | None]:
    """Per --configs entry, the index of the earlier entry whose negative-shadow cache an "@cached" entry
    reads (the last earlier run of the same configuration that is not itself @cached), else None (the run
    starts from an empty cache). ValueError when an @cached entry has no such run before it."""
    out: list[int | None] = []
    for i, (spec, cfg) in enumerate(configs):
        if CACHED_SUFFIX not in run_flags(spec)[1]:
            out.append(None)
            continue
        if not cfg.negative_once:
            raise ValueError(f"{spec}: only negatives.once > 0 caches negative shadows")
        earlier = [j for j in range(i) if configs[j][1] == cfg and out[j] is None]
        if not earlier:
            raise ValueError(f"{spec} needs a run of the same configuration without @cached earlier in --configs "
                             "(the run that fills the cache)")
        out.append(earlier[-1])
    return out


def config_of(spec: str, outer_iters: int) -> ProtectConfig:
    """"robust" or "robust:negatives.per_batch=1,trigger.passes=1" -> the preset with those changes (the
    trailing "@glibc" and "@cached" are the run's, not the config's: run_flags)."""
    preset, _, sets = run_flags(spec)[0].partition(":")
    cfg = ProtectConfig.preset(preset, outer_iters=outer_iters)
    return cfg.override([a for a in sets.split(",") if a]) if sets else cfg


def before_after(args, cifar_root, victim, images: torch.Tensor, pool: torch.Tensor, add) -> None:
    """The before/after comparisons (features, training, answers, stamping, decode), each reported through add()."""
    # features f(x ⊕ δ): NCHW vs channels_last
    trig = Trigger.uap(32, 16 / 255)
    trig.pattern.uniform_(-16 / 255, 16 / 255)
    f_nchw, _ = split_classifier(copy.deepcopy(victim))
    f_cl, _ = split_classifier(copy.deepcopy(victim))

    def feats(f, channels_last: bool):
        return batched_forward(f, images, transform=trig.stamp, channels_last=channels_last)

    diff = float((feats(f_nchw, False) - feats(f_cl, True)).abs().max())
    add("features", "NCHW", "channels_last", median_time(lambda: feats(f_nchw, False), args.repeats),
        median_time(lambda: feats(f_cl, True), args.repeats), f"{args.n} stamped images (max abs. difference {diff:.1e})")

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
            query_oracle(PoolOracle(probs, pool), pool, batch_size=500)

    add("answers", "ModelOracle/thief", "PoolOracle", median_time(per_thief, args.repeats),
        median_time(shared_pool, args.repeats), f"{args.thieves} thieves x {args.n} queries")

    # stamping: per image vs batched
    x = to_float(images[:1000])
    add("stamping", "per image", "batched",
        median_time(lambda: torch.stack([trig.stamp(xi[None])[0] for xi in x]), args.repeats),
        median_time(lambda: trig.stamp(x), args.repeats), f"{len(x)} images")

    # decode: JPEG files vs the uint8 cache (a fresh cache dir, so the first load decodes)
    if not args.skip_decode:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            load_dataset("imagefolder", cifar_root, "test", cache_dir=tmp)
            decode = time.perf_counter() - t
            cached = median_time(lambda: load_dataset("imagefolder", cifar_root, "test", cache_dir=tmp), args.repeats)
        add("decode", "JPEG decode", "uint8 cache", decode, cached, "cifar10-jpeg/test (10k)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads()
    torch.manual_seed(0)
    cifar_root, tin_root = resolve_roots(args)
    test = load_dataset("imagefolder", cifar_root, "test")
    pool = load_dataset("tinyimagenet", tin_root, "train", size=32).images[: args.n].contiguous()
    images = test.images[: args.n].contiguous()
    victim = create_model("resnet20", 10, pretrained=str(find_victim(args))).eval()
    rows: list[dict] = []

    def add(name: str, before_label: str, after_label: str, before: float, after: float, unit: str) -> None:
        rows.append({"step": name, "before": before_label, "after": after_label, "before_s": round(before, 4),
                     "after_s": round(after, 4), "speedup": round(before / after, 2), "per": unit})
        log(f"{name:>9}: {before_label} {before:.3f} s -> {after_label} {after:.3f} s  ({before / after:.2f}x)  per {unit}")

    if not args.protect_only:
        before_after(args, cifar_root, victim, images, pool, add)

    md = ["| step | before | after | before s | after s | speed-up | per |", "| --- | --- | --- | --- | --- | --- | --- |"] if rows else []
    md += [f"| {r['step']} | {r['before']} | {r['after']} | {r['before_s']:.3f} | {r['after_s']:.3f} | "
           f"{r['speedup']:.2f}x | {r['per']} |" for r in rows]

    # where protect's time goes, per configuration side by side (each run's own step timings, from the callback)
    runs: list[dict] = []
    if args.protect_iters:
        device = torch.device(args.device)
        victim_path = str(find_victim(args))
        with tempfile.TemporaryDirectory(prefix="speed-negatives-") as caches:
            for i, (name, _) in enumerate(args.protect_configs):
                source = args.cache_from[i]  # an @cached run reads the cache its source run filled
                cache_dir = str(Path(caches) / f"run{i if source is None else source}")
                r = fresh_protect(name, args.protect_iters, args.n, str(cifar_root), str(tin_root), victim_path,
                                  str(device), cache_dir)
                r["cache_from"] = None if source is None else args.protect_configs[source][0]
                runs.append(r)
                log(f"protect {name} (T={r['iterations']}, {r['shadow']} + {r['owner']} images, {device}): "
                    f"{r['total_s']:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["steps_s"].items()))
        md += protect_table(runs, args.protect_iters, runs[0]["shadow"], runs[0]["owner"], device)
    table = "\n".join(md)
    out = {"benchmark": "bench.speed", "mode": "quick" if args.quick else "full", "command": command_line("bench.speed", argv),
           "rows": rows, "protect": runs, "machine": machine_info(torch.device(args.device)), "n": args.n,
           "repeats": args.repeats}
    written = save_report(Path(args.out), "speed", out, table, record=args.record, folder=NAME)
    log("")
    log(table)
    log(f"\nwrote {', '.join(map(str, written))}")
    return out


if __name__ == "__main__":
    main()
