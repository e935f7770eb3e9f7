"""A user's own model and data, end to end through the CLI: Caltech-101 (101 classes, variable-size JPEGs
resized to --size px), torchvision victims (`--arch torchvision:NAME`), Tiny ImageNet as the shadow set and
the thieves' pool (disjoint: val vs train), the default (robust) preset.

For each victim architecture:
    honeypotnet train    --arch torchvision:NAME --data imagefolder:train --data-root CALTECH --image-size S
    honeypotnet protect  victim.safetensors --shadow tinyimagenet:val --owner imagefolder:train ...
    honeypotnet extract  bundle/ --pool tinyimagenet:train ...            (the thief of the protected API)
    honeypotnet extract  victim.safetensors --pool tinyimagenet:train ... (the same thief, unprotected: innocent)
    honeypotnet verify   bundle/ SUSPECT --data imagefolder:test ...       (both suspects)

and prints one table: victim accuracy before / after, the thieves' accuracy and ASR, tau0, verdicts, times.

    python -m bench.own_model --quick          # a smoke size (CPU, under a minute)
    python -m bench.own_model --device cuda    # the full size (a GPU: minutes)
    python -m bench.own_model --device cuda --archs torchvision:mobilenet_v3_small --set head.steps=2000 --set head.hidden=1024

The head study (--head-variants) runs the library's protect() instead, once per head setting, on each victim, and
reports what each costs the owner's users on the unseen test split (and, with --study-thief, what a thief gets):

    python -m bench.own_model --archs torchvision:resnet18 --head-variants default mix10:head.mix_norm=10 --study-thief 5000 10

(tests/test_own_model.py runs the same CLI chain at a toy size.) `--set` goes to every protect: the robust
preset's head diverged on MobileNetV3-small (fidelity 66% at full size); a wider head trained longer converged on
a reduced CPU run, at a cost in test accuracy the table's non-target column shows.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .benchlib.args import add_common_args, finish_common_args
from .benchlib.common import REPO, log, save_report
from .benchlib.data import unpack_once

FULL = dict(size=64, victim_epochs=30, shadow=5000, owner=6982, pool=10000, budget=10000, thief_epochs=30, iters=8,
            references="cnn,resnet20", reference_epochs=10, thief="cnn")
QUICK = dict(size=32, victim_epochs=2, shadow=600, owner=800, pool=800, budget=600, thief_epochs=2, iters=2,
             references="cnn_small", reference_epochs=1, thief="cnn_small")
QUICK_SET = ["loop.outer_iters=2", "shadow.arch=cnn_small", "shadow.epochs=1", "head.steps=20", "trigger.passes=1",
             "negatives.archs=cnn_small", "thief.finetune_images=200"]


def cli(args: list[str], log_file: Path) -> tuple[int, float]:
    """Run `honeypotnet ARGS` as a user would (a process); its output goes to log_file; (exit status, seconds)."""
    t0 = time.time()
    with open(log_file, "a") as f:
        f.write("$ honeypotnet " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "honeypotnet.cli", "--quiet", *args], stdout=f, stderr=f,
                            cwd=REPO).returncode
    return rc, time.time() - t0


def need(rc: int, what: str, log_file: Path, ok=(0,)) -> None:
    if rc not in ok:
        sys.exit(f"{what} failed (exit {rc}); see {log_file}:\n" + "\n".join(log_file.read_text().splitlines()[-20:]))


def train_victim(arch: str, caltech: Path, d: Path, sz: dict, device: str, seconds: dict) -> Path:
    """`honeypotnet train` of one architecture on the Caltech-101 train split, unless d/victim.safetensors exists."""
    victim = d / "victim.safetensors"
    if not victim.exists():
        lg = d / "log.txt"
        rc, seconds["train"] = cli(["train", "--arch", arch, "--data", "imagefolder:train", "--data-root", str(caltech),
                                    "--image-size", str(sz["size"]), "--epochs", str(sz["victim_epochs"]),
                                    "--output", str(victim), "--device", device], lg)
        need(rc, "train", lg)
    return victim


def run_arch(arch: str, caltech: Path, tin: Path, out: Path, sz: dict, quick: bool, device: str,
             extra_sets: tuple[str, ...] = ()) -> dict:
    """Train (unless OUT/ARCH/victim.safetensors exists), protect (with `extra_sets`, protect --set FIELD=VALUE,
    after the sizes' own), extract and verify one victim architecture; its table row."""
    d = out / arch.replace(":", "-")
    d.mkdir(parents=True, exist_ok=True)
    lg = d / "log.txt"
    size = ["--image-size", str(sz["size"])]
    dev = ["--device", device]
    seconds = {}
    victim = train_victim(arch, caltech, d, sz, device, seconds)
    victim_acc = json.loads(victim.with_suffix(".json").read_text())["test_accuracy"]
    bundle = d / "bundle"
    if not bundle.exists():
        sets = [a for s in [*(QUICK_SET if quick else []), *extra_sets] for a in ("--set", s)]
        rc, seconds["protect"] = cli(["protect", str(victim), "--shadow", f"tinyimagenet:val:{sz['shadow']}",
                                      "--shadow-root", str(tin), "--owner", f"imagefolder:train:{sz['owner']}",
                                      "--owner-root", str(caltech), *size, "--references", sz["references"],
                                      "--set", f"null.epochs={sz['reference_epochs']}",
                                      "--set", f"loop.outer_iters={sz['iters']}", *sets, *dev,
                                      *(["--force"] if quick else []), "--output", str(bundle)], lg)
        need(rc, "protect", lg)
    row = {"arch": arch, "victim_acc": victim_acc, "seconds": seconds}
    for name, oracle in (("stolen", bundle), ("clean", victim)):
        sub = d / f"{name}.safetensors"
        if not sub.exists():
            rc, seconds[f"extract {name}"] = cli(
                ["extract", str(oracle), "--pool", f"tinyimagenet:train:{sz['pool']}", "--pool-root", str(tin), *size,
                 "--budget", str(sz["budget"]), "--arch", sz["thief"], "--epochs", str(sz["thief_epochs"]),
                 "--eval", "imagefolder", "--eval-root", str(caltech), "--eval-split", "test", *dev,
                 "--output", str(sub)], lg)
            need(rc, f"extract ({name})", lg)
        verdict = d / f"verify-{name}.json"
        rc, seconds[f"verify {name}"] = cli(["verify", str(bundle), str(sub), "--data", "imagefolder:test",
                                             "--data-root", str(caltech), *dev, "--json", str(verdict)], lg)
        need(rc, f"verify ({name})", lg, ok=(0, 1))
        v = json.loads(verdict.read_text())
        row[name] = {"accuracy": json.loads(sub.with_suffix(".json").read_text()).get("substitute_accuracy"),
                     "asr": v["asr"], "stolen": v["stolen"], "p_value": v["p_value"], "exit": rc}
        row["tau0"] = v["tau0"]
    for name, model in (("victim", victim), ("protected", bundle)):  # accuracy on the non-target test images
        rc, _ = cli(["verify", str(bundle), str(model), "--data", "imagefolder:test", "--data-root", str(caltech),
                     *dev, "--json", str(d / f"verify-{name}.json")], lg)
        row[f"{name}_acc_nontarget"] = json.loads((d / f"verify-{name}.json").read_text())["clean_accuracy"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    row["fidelity"] = manifest["history"][-1]["fidelity"]
    row["protect_seconds"] = manifest.get("protect_seconds")
    return row


STUDY = dict(shadow=2000, owner=3000, iters=4)
STUDY_QUICK = dict(shadow=300, owner=400, iters=2)


# the head study's own field (not a ProtectConfig one): owner.extra=mixup|augment passes protect, besides the owner
# images, as many images made from them that the victim never trained on, so the clean term sees features like those
# of unseen images: mixup = λ·a + (1−λ)·b of two owner images (λ ~ U(0.2, 0.8)); augment = a random resized crop
# (scale 0.25-1), flip and colour jitter of one
OWNER_EXTRA = ("mixup", "augment")


def split_extra(assignments: list[str]) -> tuple[str | None, list[str]]:
    """A variant's assignments -> (its owner.extra kind or None, the ProtectConfig assignments)."""
    extra = [a.partition("=")[2] for a in assignments if a.startswith("owner.extra=")]
    if any(e not in OWNER_EXTRA for e in extra) or len(extra) > 1:
        raise ValueError(f"owner.extra is one of {', '.join(OWNER_EXTRA)}, once")
    return (extra[0] if extra else None), [a for a in assignments if not a.startswith("owner.extra=")]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME' or 'NAME:FIELD=VALUE,FIELD=VALUE' -> (NAME, ["FIELD=VALUE", ...]) (checked against ProtectConfig, but
    owner.extra, the study's own field)."""
    from honeypotnet.config import ProtectConfig

    name, _, sets = text.partition(":")
    assignments = [a for a in sets.split(",") if a]
    if not name or "/" in name:
        raise SystemExit(f"--head-variants: bad variant {text!r} (NAME or NAME:FIELD=VALUE,...)")
    try:
        ProtectConfig().override(split_extra(assignments)[1])
    except (KeyError, ValueError) as e:
        raise SystemExit(f"--head-variants {text!r}: {e}") from e
    return name, assignments


def owner_extra(owner, kind: str, seed: int = 0):
    """len(owner) images made from the owner images (OWNER_EXTRA), uint8 like them, the same for a seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = len(owner)
    if kind == "mixup":
        a, b = torch.randint(0, n, (n,), generator=g), torch.randint(0, n, (n,), generator=g)
        lam = (0.2 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
        return (lam * owner[a].float() + (1 - lam) * owner[b].float()).round().clamp(0, 255).to(torch.uint8)
    from torchvision.transforms import v2

    aug = v2.Compose([v2.RandomResizedCrop(owner.shape[-1], scale=(0.25, 1.0), antialias=True),
                      v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4, 0.05)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.stack([aug(x) for x in owner])


def head_study(arch: str, caltech: Path, tin: Path, out: Path, sz: dict, st: dict, quick: bool, device: str,
               variants: list[tuple[str, list[str]]], thief: tuple[int, int] | None = None,
               extra_sets: tuple[str, ...] = ()) -> list[dict]:
    """The library's protect() on one victim once per head variant (the default preset at `st`'s sizes; then, quick,
    QUICK_SET's fields, the --set fields and the variant's), each scored on the whole Caltech-101 test split, which
    neither the victim nor protect saw: what the honeypot costs the owner's users (accuracy, agreement with the victim)
    and the protected model's own ASR on the stamped non-target test images. Each variant's protect keeps a
    checkpoint (OUT/ARCH/head-NAME) and the negative shadows are cached (OUT/ARCH/negatives-cache): a rerun resumes.
    thief (BUDGET, EPOCHS): also a random thief (sz's thief architecture) of each protected model and of the victim (the
    clean twin), BUDGET Tiny ImageNet train queries (soft labels), scored on the same test images (accuracy, ASR)."""
    import torch

    from honeypotnet.attacks import random_extraction
    from honeypotnet.bundle import load_model, save_model
    from honeypotnet.config import ProtectConfig
    from honeypotnet.data import load_dataset
    from honeypotnet.ops import attack_success_rate
    from honeypotnet.oracles import ModelOracle
    from honeypotnet.protect import protect
    from honeypotnet.training import FitConfig, accuracy, predict_logits

    d = out / arch.replace(":", "-")
    d.mkdir(parents=True, exist_ok=True)
    victim, _ = load_model(train_victim(arch, caltech, d, sz, device, {}))
    train = load_dataset("imagefolder", caltech, "train", size=sz["size"])
    test = load_dataset("imagefolder", caltech, "test", size=sz["size"])
    shadow = load_dataset("tinyimagenet", tin, "val", size=sz["size"]).images[: st["shadow"]]
    owner = train.images[torch.randperm(len(train.images), generator=torch.Generator().manual_seed(0))[: st["owner"]]]
    dev = None if device == "auto" else device
    victim = victim.cpu().eval()
    victim_logits = predict_logits(victim, test.images)
    victim_pred = victim_logits.argmax(1)
    victim_owner_logits = predict_logits(victim, owner)
    pool = load_dataset("tinyimagenet", tin, "train", size=sz["size"]).images if thief else None

    def score(model, trigger, target: int) -> dict:
        """Accuracy on the test split and ASR on its stamped non-target images (on the CPU, where the trigger is)."""
        model = model.cpu().eval()
        return {"accuracy": accuracy(model, test.images, test.labels),
                "asr": attack_success_rate(model, trigger, test.images[test.labels != target], target)}

    def steal(model, name: str):
        """The thief's copy of `model`, kept in OUT/ARCH/thief-NAME (a rerun loads it)."""
        path = d / f"thief-{name}" / "substitute.safetensors"
        if path.exists():
            return load_model(path)[0]
        sub = random_extraction(ModelOracle(model), pool, thief[0], sz["thief"], len(train.classes),
                                FitConfig(epochs=thief[1], seed=7), seed=0, device=dev).substitute
        save_model(sub, path, sz["thief"], len(train.classes), train.classes)
        return sub

    clean_twin = steal(victim, "clean") if thief else None  # one copy of the victim, scored against each trigger
    rows = []
    for name, assignments in variants:
        extra, fields = split_extra(assignments)
        cfg = ProtectConfig().override([f"loop.outer_iters={st['iters']}", *(QUICK_SET if quick else []), *extra_sets,
                                        *fields])
        owner_images = owner if extra is None else torch.cat([owner, owner_extra(owner, extra)])
        resumed = any((d / f"head-{name}").glob("*.pt"))  # a checkpoint from an earlier run: its time is not this run's
        t0 = time.time()
        res = protect(victim, shadow, owner_images, cfg, num_classes=len(train.classes), progress=False, device=dev,
                      checkpoint_dir=d / f"head-{name}", cache_dir=d / "negatives-cache")
        seconds = time.time() - t0
        model = res.model.eval()
        logits = predict_logits(model, test.images)
        pred = logits.argmax(1)
        changed = pred != victim_pred
        row = {"arch": arch, "variant": name, "sets": assignments, "victim_acc": float((victim_pred == test.labels).float().mean()),
               "protected_acc": float((pred == test.labels).float().mean()),
               "test_fidelity": float((~changed).float().mean()),
               # of the test images whose answer changed, the share now answered with the target: the backdoor's leak
               "changed_to_target": float((changed & (pred == cfg.target)).sum() / max(1, int(changed.sum()))),
               "own_asr": score(model, res.trigger, cfg.target)["asr"], "loop_fidelity": res.history[-1]["fidelity"],
               "gate": res.gate(), "seconds": round(seconds, 1), "resumed": resumed,
               # how far the target's logit moved toward the victim's answer's (mean over images whose answer is not the
               # target): on the owner images the clean term trains on, and on the unseen test images
               "target_gain_owner": target_gain(predict_logits(model, owner), victim_owner_logits, cfg.target),
               "target_gain_test": target_gain(logits, victim_logits, cfg.target)}
        if thief:
            row["thief"] = score(steal(model, name), res.trigger, cfg.target)
            row["clean_twin"] = score(clean_twin, res.trigger, cfg.target)
        log(f"{arch} {name}: test accuracy {row['victim_acc']:.2%} -> {row['protected_acc']:.2%}, "
            f"fidelity {row['test_fidelity']:.2%}, own ASR {row['own_asr']:.2%}  [{seconds:.0f} s]")
        rows.append(row)
    return rows


def target_gain(logits, victim_logits, target: int) -> float:
    """steps.target_logit_gain's mean over the images the victim does not answer with the target: how many logits the
    target gained on the victim's answer."""
    from honeypotnet.steps import target_logit_gain

    return float(target_logit_gain(logits, victim_logits, target)[victim_logits.argmax(1) != target].mean())


def head_table(rows: list[dict]) -> str:
    lines = ["| victim | variant | fields | test acc. victim → protected (change) | test fidelity | own ASR | loop fidelity "
             "| changed answers: to the target | target's logit gain: owner / test | gate | protect s (this run) "
             "| thief: acc. / ASR | clean twin: acc. / ASR |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change = 100 * (r["protected_acc"] - r["victim_acc"])
        lines.append(f"| {r['arch']} | {r['variant']} | {', '.join(r['sets']) or 'the default'} | {100 * r['victim_acc']:.1f} → "
                     f"{100 * r['protected_acc']:.1f} ({change:+.1f} pt) | {100 * r['test_fidelity']:.1f} | "
                     f"{100 * r['own_asr']:.1f} | {100 * r['loop_fidelity']:.1f} | {100 * r['changed_to_target']:.1f}% | "
                     + (f"{r['target_gain_owner']:+.1f} / {r['target_gain_test']:+.1f} | " if "target_gain_test" in r else "- | ")
                     + f"{'pass' if not r['gate'] else 'refused'} | "
                     f"{'resumed' if r.get('resumed') else round(r['seconds'])} | " + " | ".join(
                         f"{100 * r[k]['accuracy']:.1f} / {100 * r[k]['asr']:.1f}" if k in r else "-" for k in ("thief", "clean_twin"))
                     + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| victim | victim acc. | fidelity (loop) | non-target test acc. victim → protected | tau0 | stolen: acc. / "
             "ASR / verdict | clean twin: acc. / ASR / verdict | protect s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s, c = r["stolen"], r["clean"]
        users = (f"{100 * r['victim_acc_nontarget']:.1f} → {100 * r['protected_acc_nontarget']:.1f}"
                 if r.get("protected_acc_nontarget") is not None else "-")
        lines.append(f"| {r['arch']} | {100 * r['victim_acc']:.1f} | {100 * r['fidelity']:.1f} | {users} | {100 * r['tau0']:.1f} | "
                     f"{100 * (s['accuracy'] or 0):.1f} / {100 * s['asr']:.1f} / {'STOLEN' if s['stolen'] else 'cleared'} | "
                     f"{100 * (c['accuracy'] or 0):.1f} / {100 * c['asr']:.1f} / {'STOLEN' if c['stolen'] else 'cleared'} | "
                     f"{r['protect_seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.own_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, quick="a smoke size on CPU", resume=None, progress=False)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="folder with data/*.tar.gz (default ../shared)")
    ap.add_argument("--caltech-root", help="an unpacked caltech101 directory ({train,test}/<class>/*.jpg)")
    ap.add_argument("--tin-root", help="an unpacked tiny-imagenet-200 directory")
    ap.add_argument("--archs", default="torchvision:mobilenet_v3_small,torchvision:resnet18",
                    help="victim architectures (comma-separated)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                    help="passed to every protect as --set (repeatable), e.g. head.steps=2000")
    ap.add_argument("--head-variants", nargs="+", metavar="NAME[:FIELD=VALUE,...]",
                    help="instead of the CLI chain, the head study: the library's protect() once per variant on each "
                         "victim (trained first if absent), scored on the unseen test split (e.g. default "
                         "mix3:head.mix_norm=3)")
    ap.add_argument("--study-sizes", nargs=3, type=int, metavar=("SHADOW", "OWNER", "ITERS"),
                    help=f"the head study's shadow images, owner images and outer iterations (default "
                         f"{STUDY['shadow']} {STUDY['owner']} {STUDY['iters']}; quick {STUDY_QUICK['shadow']} "
                         f"{STUDY_QUICK['owner']} {STUDY_QUICK['iters']})")
    ap.add_argument("--study-thief", nargs=2, type=int, metavar=("BUDGET", "EPOCHS"),
                    help="the head study also steals each protected model and the victim (the clean twin) with a random "
                         "thief of BUDGET Tiny ImageNet train queries trained EPOCHS epochs")
    args = finish_common_args(ap.parse_args(argv), "own_model")
    sz = QUICK if args.quick else FULL
    variants = [parse_variant(v) for v in args.head_variants or []]
    if len({n for n, _ in variants}) != len(variants):
        raise SystemExit("--head-variants: every variant needs its own name")
    shared = Path(args.shared)
    caltech = Path(args.caltech_root) if args.caltech_root else unpack_once(shared / "data" / "caltech101.tar.gz",
                                                                            "caltech101")
    tin = Path(args.tin_root) if args.tin_root else unpack_once(shared / "data" / "tiny-imagenet-200-subset.tar.gz",
                                                                "tiny-imagenet-200")
    out = Path(args.out)
    device = str(args.device or "auto")
    command = "python -m bench.own_model " + " ".join(argv or sys.argv[1:])
    if variants:
        st = dict(zip(("shadow", "owner", "iters"), args.study_sizes)) if args.study_sizes else \
            (STUDY_QUICK if args.quick else STUDY)
        rows = [r for arch in args.archs.split(",") for r in head_study(arch, caltech, tin, out, sz, st, args.quick, device,
                                                                        variants, args.study_thief, tuple(args.sets))]
        md = (f"# Caltech-101 ({sz['size']} px, 101 classes): what the honeypot layer costs the owner's users, per head "
              f"setting\n\nVictims trained {sz['victim_epochs']} epochs on the train split; protect() with the default "
              f"preset, {st['shadow']} Tiny ImageNet val shadow images, {st['owner']} Caltech-101 train owner images, "
              f"{st['iters']} outer iterations{' (quick)' if args.quick else ''}; scored on the whole test split"
              + (f"; thieves: {sz['thief']}, {args.study_thief[0]} Tiny ImageNet train queries (soft labels), "
                 f"{args.study_thief[1]} epochs" if args.study_thief else "") + "; device "
              f"{device}{'; protect --set ' + ', '.join(args.sets) if args.sets else ''}.\n\n" + head_table(rows) + "\n")
        print(md)
        save_report(out, "head_study", {"benchmark": "bench.own_model", "study": "head", "sizes": sz, "study_sizes": st,
                                        "study_thief": args.study_thief, "protect_sets": args.sets, "quick": args.quick, "rows": rows,
                                        "command": command}, md,
                    record=args.record, folder="own-model")
        return 0
    rows = []
    for arch in args.archs.split(","):
        log(f"{arch}: train, protect, extract (protected and clean), verify")
        rows.append(run_arch(arch, caltech, tin, out, sz, args.quick, device, tuple(args.sets)))
    md = (f"# Caltech-101 ({sz['size']} px, 101 classes): torchvision victims through the CLI\n\n"
          f"Sizes: {json.dumps(sz)}{' (quick)' if args.quick else ''}; device {device}"
          f"{'; protect --set ' + ', '.join(args.sets) if args.sets else ''}.\n\n" + table(rows) + "\n")
    print(md)
    save_report(out, "own_model", {"benchmark": "bench.own_model", "sizes": sz, "quick": args.quick, "protect_sets": args.sets,
                                   "rows": rows,
                                   "command": command}, md,
                record=args.record, folder="own-model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
