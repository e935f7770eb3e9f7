"""One more trigger step from a stored protect run, under changed trigger-step settings (issue 8).

    python bench/trigger_probe.py --seed 1 --variant negcrft-eps24-ft2-blur \\
        --probe '{}' --probe '{"negative_weight": 1.0}' --probe '{"negative_weight": 1.0, "negative_noise": 0.2}'

A protect run takes 80 min on one CPU thread; most of what decides whether innocent models answer the
trigger is the trigger step. This probe reads a finished bench/robustness.py protection of `--variant`
(runs/reproduce/seed<S>/protect-<variant>: its checkpointed shadow, negative shadows and trigger),
rebuilds the fine-tuned (and fine-pruned) shadow and negative copies with the loop's own helpers
(honeypot.finetune_set, honeypot.trigger_models) as its iteration T+1 would, and for
each --probe (ProtectConfig overrides, JSON) runs honeypot.generate_trigger once from the stored
trigger (~8 min at one thread). Each new trigger is then stamped on the calibration half of the test
set (target class excluded) and read by models the loop never saw:

  innocent   the seed's clean goal thieves (extracted from the unprotected victim), its reference
             models, their fine-tuned copies, and the clean CNN thief fine-tuned by its owner
             (10 ep, lr 0.01 on the thief's 1,000 labelled images)
  protected  the run's protected thieves (which learnt the *stored* trigger's honeypot), that CNN
             thief after the thief's fine-tuning (10 ep at lr 0.01 / 0.05) and fine-pruning (20%)

"stored" is the stored trigger itself; the probe '{}' is the control (one more step, same settings).
It needs the protection's and thieves' units: run robustness.py on that variant and seed first.
What it cannot show: the honeypot is not re-tuned to the new trigger and no thief is re-trained, so
it measures the trigger step alone; a real run must confirm (measured: the stored trigger reproduced
the bench's figures within 1.3 pt, e.g. fine-prune 38.2 vs 37.3, clean copy 13.7 vs 13.5).
Output: one JSON line per probe on stdout and OUT (default runs/trigger-probe-seed<S>.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from honeypotnet import honeypot as hp
from honeypotnet.bundle import load_bundle, load_model
from honeypotnet.countermeasures import fine_prune, finetune
from honeypotnet.models import create_model, list_models
from honeypotnet.training import predict_logits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import reproduce as rp  # noqa: E402
import robustness as rb  # noqa: E402

# the ProtectConfig fields honeypot.trigger_models reads: a probe changing one rebuilds the step's models
STEP_MODEL_FIELDS = ("shadow_finetune_epochs", "shadow_finetune_lr", "shadow_finetune_images", "shadow_prune",
                     "negative_finetune_epochs", "negative_finetune_lr")


def asr(model, trigger, images: torch.Tensor, target: int) -> float:
    """ASR in % of `model` on all of `images` stamped with `trigger` (the loop's own count)."""
    return round(100 * hp._shadow_asr(model, trigger, images, target, n=len(images)), 1)


def _models_in(folder: Path, pattern: str, prefix: str, strip: str = "") -> dict:
    """{prefix + name: model} for every saved model folder/<pattern> matches (sorted; none: {}). A thief's
    name is its folder's name less `strip` ("thief-<oracle>-"), kept only where the rest starts with an
    architecture (so variant "a" does not pick up the thieves of variant "a-blur")."""
    out = {}
    for f in sorted(folder.glob(pattern)):
        if f.name == "substitute.safetensors":
            name = f.parent.name[len(strip):]
            if name.split("-")[0] not in list_models():
                continue
        else:
            name = f.stem
        out[f"{prefix}{name}"] = load_model(f)[0].eval()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rp.add_data_args(ap, victim=False)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--variant", required=True, choices=sorted(rb.VARIANTS))
    ap.add_argument("--probe", action="append", default=[], metavar="JSON",
                    help="ProtectConfig overrides of one trigger step (repeatable; '{}' = the control)")
    ap.add_argument("--runs", help="bench/robustness.py's --reproduce-out (default runs/reproduce; --quick: runs/reproduce-quick)")
    ap.add_argument("--quick", action="store_true", help="the stored run is a --quick one (reproduce.py's quick protocol)")
    ap.add_argument("--substitute", default="cnn", help="the sweeps' thief architecture (robustness.py --substitute)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    probes = []
    for text in args.probe:
        try:
            pr = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--probe {text!r} is not JSON: {e}") from None
        if not isinstance(pr, dict):
            raise SystemExit(f"--probe must be a JSON object of ProtectConfig fields, got {pr!r}")
        probes.append(pr)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    runs = Path(args.runs or REPO / "runs" / ("reproduce-quick" if args.quick else "reproduce"))
    seed = args.seed
    p = rp.QUICK if args.quick else rp.FULL
    cfg = replace(rp.base_config(p, seed), **rb.VARIANTS[args.variant])
    for pr in probes:
        try:
            replace(cfg, **pr)  # a bad field or value fails here, before any work
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--probe {json.dumps(pr)}: {e}") from None
    d = runs / f"seed{seed}" / f"protect-{args.variant}"
    if not (d / "work" / "protect_state.pt").exists():
        raise SystemExit(f"no finished protection at {d}: run bench/robustness.py --variants {args.variant} "
                         f"--seeds {seed}{' --quick' if args.quick else ''} first")
    roots = (["--cifar-root", args.cifar_root] if args.cifar_root else []) + (["--tin-root", args.tin_root] if args.tin_root else [])
    data = rp.load_data(rp.parse_args(["--shared", args.shared, "--out", str(runs), *roots]), p)
    state = torch.load(d / "work" / "protect_state.pt", weights_only=True)
    bundle = load_bundle(d / "bundle")
    victim, _ = load_model(runs / "victim" / "victim.safetensors")
    victim.eval()
    k = len(data.classes)
    shadow = create_model(cfg.shadow_arch, k)
    shadow.load_state_dict(state["shadow"])
    shadow.eval()
    negs = []
    for i, arch in enumerate(cfg.negative_shadow_archs()):
        m = create_model(arch, k)
        m.load_state_dict(state[hp._negative_key(i)])
        negs.append(m.eval())
    # the loop's fine-tuning set and the models its trigger step aims at, built as _protect_run builds them
    images = torch.cat([data.shadow, data.owner])
    logits = predict_logits(victim, images)
    it = cfg.outer_iters
    built: dict[tuple, tuple] = {}

    def step_models(c) -> tuple[list, list]:
        """(shadows, neg_ft) of one trigger step under c; a probe that changes none of the fields they
        depend on reuses the stored run's."""
        key = tuple(getattr(c, f) for f in STEP_MODEL_FIELDS)
        if key not in built:
            built[key] = hp.trigger_models(shadow, negs, *hp.finetune_set(len(data.shadow), images, logits, c), c, it)
        return built[key]

    cal_x, cal_y = data.test_images[data.calib], data.test_labels[data.calib]
    probe_x = cal_x[cal_y != cfg.target]
    lab, _ = rb.labelled_sets(data, p, max(20, 1000 // p.budget_scale))
    # every innocent and protected model the run stored (a --no-goals run has the sweeps' thieves only)
    sd = runs / f"seed{seed}"
    models = _models_in(sd, "thief-clean-*/substitute.safetensors", "clean ", "thief-clean-")
    models |= _models_in(sd / "references", "*.safetensors", "reference ")
    models |= _models_in(sd / "references-finetuned", "*+finetune-e*-lr0.01.safetensors", "reference ")
    main_thief = f"{args.substitute}-{20000 // p.budget_scale}-probs"
    clean = models.get(f"clean {main_thief}")
    if clean is not None:
        models[f"clean {main_thief} fine-tuned e10 lr0.01"] = finetune(clean, *lab, 10, 0.01, seed=seed)
    models |= _models_in(sd, f"thief-{args.variant}-*/substitute.safetensors", "protected ", f"thief-{args.variant}-")
    thief = models.get(f"protected {main_thief}")
    if thief is not None:
        models[f"protected {main_thief} fine-tuned e10 lr0.01"] = finetune(thief, *lab, 10, 0.01, seed=seed)
        models[f"protected {main_thief} fine-tuned e10 lr0.05"] = finetune(thief, *lab, 10, 0.05, seed=seed)
        models[f"protected {main_thief} fine-pruned 0.2"] = fine_prune(thief, *lab, 0.2, 5, 0.01, seed=seed).model
    if not models:
        raise SystemExit(f"no stored thief or reference model under {sd}: nothing to read the trigger with")

    def evaluate(trigger) -> dict:
        r = {name: asr(m, trigger, probe_x, cfg.target) for name, m in models.items()}
        neg_all = negs + step_models(cfg)[1]
        if neg_all:
            r["negative shadows and copies (max)"] = max(asr(m, trigger, probe_x, cfg.target) for m in neg_all)
        r["shadow"] = asr(shadow, trigger, probe_x, cfg.target)
        return r

    out = Path(args.out or REPO / "runs" / f"trigger-probe-seed{seed}.json")
    res = {"seed": seed, "variant": args.variant, "images": len(probe_x), "models": sorted(models),
           "probes": {"stored": evaluate(bundle.trigger)}}
    print("stored", json.dumps(res["probes"]["stored"]), flush=True)
    for pr in probes:
        trig = copy.deepcopy(bundle.trigger)
        t0 = time.time()
        c = replace(cfg, **pr)
        shadows, neg_ft = step_models(c)
        hp.generate_trigger(shadows, trig, data.shadow, c, it, negs + neg_ft)
        r = evaluate(trig)
        if len(shadows) > 1:  # the fine-tuned / fine-pruned shadow copies the step aimed at
            r["shadow copies"] = [asr(m, trig, probe_x, cfg.target) for m in shadows[1:]]
        r["seconds"] = round(time.time() - t0)
        res["probes"][json.dumps(pr, sort_keys=True)] = r
        print(json.dumps(pr, sort_keys=True), json.dumps(r), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
