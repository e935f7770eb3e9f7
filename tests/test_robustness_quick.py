"""bench/robustness.py --quick on the real data of ../shared (skipped when absent): the quick
reproduction's protected and clean substitutes go through every counter-measure, and each
counter-measure visibly does something (accuracy or ASR moves), is verified, and lands in the
JSON, table and plot. Reuses conftest's `reproduce_quick` (copied: its directory stays as it is)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, args: list[str], shared_dir, cifar10_jpeg_root, tinyimagenet_root, timeout=600):
    """bench/<script> with `args`, on the test data and the CPU (a --merge reads files only)."""
    cmd = [sys.executable, str(REPO / "bench" / script), *args]
    if "--merge" not in args:
        cmd += ["--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root),
                "--device", "cpu", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)



def _load_robustness():
    spec = importlib.util.spec_from_file_location("bench_robustness", REPO / "bench" / "robustness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_robustness"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_robust_preset_is_the_measured_variant():
    """The library default (ProtectConfig(), CLI `protect`) is the robust preset, exactly the variant the
    README's three-seed table measured: the same overrides of the protocol's base config, which is the
    "spec" preset (PAPER.md §5's protocol)."""
    from honeypotnet.honeypot import PRESETS, ProtectConfig

    rob = _load_robustness()
    assert rob.VARIANTS[rob.ROBUST] == PRESETS["robust"]
    assert ProtectConfig() == ProtectConfig.preset("robust")
    base = rob.rp.base_config(rob.rp.QUICK, 0)
    assert {k: getattr(base, k) for k in PRESETS["spec"]} == PRESETS["spec"]
    variant = dataclasses.replace(base, **rob.VARIANTS[rob.ROBUST])
    assert {k: getattr(variant, k) for k in PRESETS["robust"]} == PRESETS["robust"]


def test_false_positive_goal_leaves_out_only_unservable_purifications():
    """The goal list's false-positive count leaves out a clean copy behind a purification that costs it
    more than 20 pt of its own accuracy (as the thief's goals do), names it in the note, and counts
    every other flagged clean copy: a flagged JPEG copy still fails the goal."""
    rob = _load_robustness()

    def row(oracle, measure, cta, asr, stolen):
        return {"variant": "v", "seed": 0, "oracle": oracle, "measure": measure, "cta": cta, "asr": asr,
                "stolen": stolen}

    prot = [{"protection": "v", "seed": 0, "cta_delta": 0.0}]
    protected = [row("protected", "none", 0.60, 0.99, True), row("protected", "purify-blur-1.0", 0.26, 0.03, False)]
    clean = [row("clean", "none", 0.60, 0.01, False), row("clean", "purify-jpeg-q50", 0.50, 0.02, False),
             row("clean", "purify-blur-1.0", 0.26, 0.08, True)]

    def fp_goal(rows):
        return next(g for g in rob.goals(prot, rows, [], 20000) if g["goal"].startswith("false positives"))

    g = fp_goal(protected + clean)
    assert g["pass"] and g["worst"] == "0" and g["n"] == 2
    assert "1 flagged of 1 clean copies" in g["note"] and "blur-1.0" in g["note"]
    assert "**no**" not in rob.goals_table(rob.goals(prot, protected + clean, [], 20000)).split("false positives")[1].split("\n")[0]
    clean[1]["stolen"] = True  # a usable purification (10 pt) that flags the clean copy is a false positive
    g = fp_goal(protected + clean)
    assert not g["pass"] and g["worst"] == "1" and g["n"] == 2
    clean[2]["cta"] = 0.45  # blur that costs 15 pt is a deployment a party would serve: counted
    g = fp_goal(protected + clean)
    assert g["worst"] == "2" and g["n"] == 3 and g["note"] == ""


@pytest.fixture(scope="module")
def robustness(reproduce_quick, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robustness")
    rep = tmp / "reproduce"
    shutil.copytree(reproduce_quick[0], rep)
    out = tmp / "out"
    proc = _bench("robustness.py", ["--quick", "--reproduce-out", str(rep), "--out", str(out), "--cross-substitute", "cnn_small",
                                    "--variants", "base"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "robustness.json").read_text())


def test_every_counter_measure_runs_on_both_substitutes_and_is_verified(robustness):
    out, stdout, r = robustness
    sweep = r["protocol"]["sweep"]
    expected = ({"none", "neural-cleanse"} | {f"finetune-e{e}-lr{lr:g}" for e, lr in sweep["finetune"]}
                | {f"fineprune-{p:g}" for p in sweep["prune"]} | {f"purify-{n}" for n, _ in sweep["purify"]})
    for oracle in ("protected", "clean"):
        got = {row["measure"] for row in r["rows"] if row["oracle"] == oracle}
        assert got == expected, (oracle, got ^ expected)
    for row in r["rows"]:
        if row["measure"] != "neural-cleanse":
            assert 0 <= row["asr"] <= 1 and 0 <= row["cta"] <= 1 and row["stolen"] == (row["p_value"] < row["alpha"])
    assert (out / "robustness-finetune.png").stat().st_size > 5000
    assert "Thief's pick" in (out / "robustness.md").read_text()


def test_counter_measures_do_something(robustness):
    """A counter-measure that silently returned the substitute unchanged would leave CTA and ASR
    exactly where they were; each one must move at least one of them."""
    _, _, r = robustness
    rows = [row for row in r["rows"] if row["oracle"] == "protected"]
    none = next(row for row in rows if row["measure"] == "none")
    for row in rows:
        if row["measure"] in ("none", "neural-cleanse"):
            continue
        assert (row["cta"], row["asr"]) != (none["cta"], none["asr"]), row["measure"]
    nc = next(row for row in rows if row["measure"] == "neural-cleanse")
    assert len(nc["norms"]) == 10 and all(n > 0 for n in nc["norms"])
    assert nc["target_flagged"] == (0 in nc["flagged"])


def test_resume_reuses_every_unit(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root):
    out, _, r = robustness
    rep = r["protocol"]["reproduce_out"]
    proc = _bench("robustness.py", ["--quick", "--reproduce-out", rep, "--out", str(out), "--cross-substitute", "cnn_small",
                                    "--variants", "base"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "robustness.json").read_text())
    assert all(row["resumed"] for row in again["rows"])
    assert [(x["measure"], x.get("asr")) for x in again["rows"]] == [(x["measure"], x.get("asr")) for x in r["rows"]]
    assert again["goals"] == r["goals"]


def test_goal_list_follows_the_measured_rows(robustness):
    """The goal checklist is computed from the runs, not asserted: every thief the goal list names was
    trained and verified (protected and clean), and each verdict agrees with the numbers it reports."""
    out, _, r = robustness
    budget = r["protocol"]["budget"]
    epochs = 4  # the quick protocol's thief epochs; the quarter-budget thief also trains twice as long
    assert [tuple(t) for t in r["protocol"]["goal_thieves"]] == [
        ("cnn", budget, "probs", None), ("cnn", budget, "label", None), ("cnn_small", budget, "probs", None),
        ("cnn", budget // 4, "probs", epochs), ("cnn", budget // 4, "probs", 2 * epochs)]
    for arch, b, mode, e in r["protocol"]["goal_thieves"]:
        got = {s["oracle"] for s in r["substitutes"]
               if (s["arch"], s["budget"], s["output"], s["epochs"]) == (arch, b, mode, e or epochs)}
        assert got == {"protected", "clean"}, (arch, b, mode, e)
    g = {x["goal"]: x for x in r["goals"] if x["null"] == "references"}
    gw = {x["goal"]: x for x in r["goals"] if x["null"] == "widened"}
    assert set(gw) == set(g) and r["protections"][0]["tau0_widened"] >= r["protections"][0]["tau0"]
    prot = r["protections"][0]
    # the widened null: the references, their fine-tuned copies, and those behind the sweep's purifications
    # that keep their accuracy within 20 pt (JPEG q50 does on every reference measured)
    names = [x["arch"] for x in prot["widened_reference"]]
    purified = [n for n in names if n.rsplit("+", 1)[-1] in {p for p, _ in r["protocol"]["sweep"]["purify"]}]
    assert any(n.endswith("+jpeg-q50") for n in purified) and len(names) == 10 + len(purified)
    assert g["victim CTA drop"]["pass"] == (-prot["cta_delta"] <= 0.002 + 1e-9)
    subs = [s for s in r["substitutes"] if s["oracle"] == "protected" and s["budget"] == budget]
    for s in subs:
        goal = g[f"thief ASR: {s['arch']} {s['budget']} {'label-only' if s['output'] == 'label' else 'soft'}"]
        assert goal["pass"] == (s["asr"] >= 0.95 and s["stolen"])
    # the quarter-budget goal is the thief's pick: its most accurate copy over the epochs it tried
    quarter = [s for s in r["substitutes"] if s["oracle"] == "protected" and s["budget"] == budget // 4]
    assert sorted(s["epochs"] for s in quarter) == [epochs, 2 * epochs]
    assert quarter[0]["cta"] != quarter[1]["cta"]  # training longer changed the copy
    qpick = max(quarter, key=lambda s: s["cta"])
    goal = g[f"thief ASR: cnn {budget // 4} soft, thief's pick of {epochs}/{2 * epochs} epochs"]
    assert goal["pass"] == (qpick["asr"] >= 0.85 and qpick["stolen"]) and goal["n"] == 1
    assert f"({qpick['epochs']} ep, seed 0)" in goal["worst"]
    clean_rows = [x for x in r["rows"] if x["oracle"] == "clean" and x["measure"] != "neural-cleanse"]
    # the false-positive goal counts every clean copy a party would serve: a purification that costs the
    # copy more than 20 pt of its accuracy is left out (named in the note), as on the thief's side
    clean_cta = next(x["cta"] for x in clean_rows if x["measure"] == "none")
    unserved = [x for x in clean_rows if x["measure"].startswith("purify") and clean_cta - x["cta"] > 0.2 + 1e-9]
    served = [x for x in clean_rows if x not in unserved]
    fp = sum(x["stolen"] for x in served) + sum(s["stolen"] for s in r["substitutes"] if s["oracle"] == "clean")
    fp_goal = next(x for x in r["goals"] if x["goal"].startswith("false positives"))
    assert fp_goal["worst"] == str(fp) and fp_goal["pass"] == (fp == 0) and fp_goal["n"] == len(served) + 5
    assert (f"{sum(x['stolen'] for x in unserved)} flagged of {len(unserved)} clean copies" in fp_goal["note"]) == bool(unserved)
    pick = max((x for x in r["rows"] if x["oracle"] == "protected" and x["measure"].startswith("finetune")),
               key=lambda x: x["cta"])
    assert g["fine-tune, thief's pick"]["pass"] == (pick["asr"] >= 0.5 and pick["stolen"])
    assert gw["fine-tune, thief's pick"]["pass"] == (pick["asr"] >= 0.5 and pick["stolen_widened"])
    for x in r["rows"] + r["substitutes"]:  # the widened verdicts follow from hits, n and the widened tau0
        if "hits" in x:
            assert x["stolen_widened"] == (x["p_value_widened"] < x["alpha"])
            assert x["tau0_widened"] == r["protections"][0]["tau0_widened"]
    nc = next(x for x in r["rows"] if x["oracle"] == "protected" and x["measure"] == "neural-cleanse")
    assert g["Neural Cleanse anomaly index of the target"]["pass"] == (nc["target_anomaly_index"] < 2 and not nc["target_flagged"])
    md = (out / "robustness.md").read_text()
    assert f"| {qpick['epochs']} * |" in md  # the goal thieves' table marks the thief's pick
    assert "## Variants" in md and "## Goals (issue 8)" in md and "## Goal thieves" in md and "references null: " in md and "widened null: " in md and "## Over seeds" in md


def test_clean_goal_thieves_only(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """--no-goals --clean-goal-thieves verifies every clean goal thief (cached units) but trains no
    protected goal thief: the false-positive goal counts them all, no thief-ASR goal is claimed for
    a thief that was not run."""
    _, _, r = robustness
    out = tmp_path / "clean-only"
    proc = _bench("robustness.py", ["--quick", "--reproduce-out", r["protocol"]["reproduce_out"], "--out", str(out),
                                    "--cross-substitute", "cnn_small", "--variants", "base", "--no-goals",
                                    "--clean-goal-thieves"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.loads((out / "robustness.json").read_text())
    budget = r["protocol"]["budget"]
    assert {(s["arch"], s["budget"], s["output"]) for s in c["substitutes"] if s["oracle"] == "protected"} == {("cnn", budget, "probs")}
    assert len([s for s in c["substitutes"] if s["oracle"] == "clean"]) == 5
    g = {x["goal"]: x for x in c["goals"] if x["null"] == "references"}
    assert [k for k in g if k.startswith("thief ASR")] == [f"thief ASR: cnn {budget} soft"]
    full_fp = next(x for x in r["goals"] if x["goal"].startswith("false positives") and x["null"] == "references")
    assert g["false positives (clean thieves, with and without counter-measures)"] == full_fp


def test_deadline_writes_what_finished(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """--deadline: units that finished are still resumed, the first unit that would start after it
    stops the run, and the tables and JSON of what finished are written (exit 0): base's units all
    exist, eps24's protection does not, so eps24 is left out and base comes back whole."""
    _, _, r = robustness
    out = tmp_path / "deadline"
    proc = _bench("robustness.py", ["--quick", "--reproduce-out", r["protocol"]["reproduce_out"], "--out", str(out),
                                    "--cross-substitute", "cnn_small", "--variants", "base", "eps24", "--deadline", "0"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((out / "robustness.json").read_text())
    assert d["stopped_at_deadline"].startswith("seed0/protect-eps24"), d["stopped_at_deadline"]
    assert [p["protection"] for p in d["protections"]] == ["base"]
    assert [(x["measure"], x["asr"] if "asr" in x else None) for x in d["rows"]] == \
        [(x["measure"], x["asr"] if "asr" in x else None) for x in r["rows"]]
    assert {g["variant"] for g in d["goals"]} == {"base"} and "deadline" in proc.stdout + proc.stderr
    assert not (Path(r["protocol"]["reproduce_out"]) / "seed0" / "protect-eps24" / "unit.json").exists()


def _reseeded(r: dict, seed: int) -> dict:
    """The same results as if run at another seed (for merging: a second, disjoint run)."""
    c = json.loads(json.dumps(r))
    for rec in c["protections"] + c["rows"] + c["substitutes"]:
        rec["seed"] = seed
    c["protocol"]["seeds"] = [seed]
    return c


def test_merge_rebuilds_the_report_and_refuses_overlaps(robustness, tmp_path):
    """--merge: one file gives back its own report byte for byte; two disjoint runs give one report over
    both seeds (every goal counts both); the same seed twice, another protocol or a foreign file is refused."""
    out, _, r = robustness
    one = tmp_path / "one"
    proc = _bench("robustness.py", ["--merge", str(out / "robustness.json"), "--out", str(one)], None, None, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (one / "robustness.md").read_text() == (out / "robustness.md").read_text()
    other = tmp_path / "seed7.json"
    other.write_text(json.dumps(_reseeded(r, 7)))
    both = tmp_path / "both"
    proc = _bench("robustness.py", ["--merge", str(out / "robustness.json"), str(other), "--out", str(both)], None, None, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((both / "robustness.json").read_text())
    assert m["protocol"]["seeds"] == [0, 7] and len(m["merged_from"]) == 2
    assert len(m["rows"]) == 2 * len(r["rows"]) and len(m["substitutes"]) == 2 * len(r["substitutes"])
    single = {(g["goal"], g["null"]): g for g in r["goals"]}
    for g in m["goals"]:
        assert g["seeds"] == [0, 7] and g["n"] == 2 * single[(g["goal"], g["null"])]["n"], g
        assert g["pass"] == single[(g["goal"], g["null"])]["pass"]  # the same runs twice: the same verdicts
    proc = _bench("robustness.py", ["--merge", str(out / "robustness.json"), str(out / "robustness.json"), "--out",
                                    str(tmp_path / "x")], None, None, None)
    assert proc.returncode != 0 and "in both" in proc.stderr
    changed = _reseeded(r, 8)
    changed["protocol"]["budget"] += 1
    other.write_text(json.dumps(changed))
    proc = _bench("robustness.py", ["--merge", str(out / "robustness.json"), str(other), "--out", str(tmp_path / "y")],
                  None, None, None)
    assert proc.returncode != 0 and "'budget'" in proc.stderr
    other.write_text("{not json")
    proc = _bench("robustness.py", ["--merge", str(other), "--out", str(tmp_path / "z")], None, None, None)
    assert proc.returncode != 0 and "cannot read" in proc.stderr and not (tmp_path / "z").exists()


def test_spread_separates_the_thief_from_the_protection(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """bench/spread.py --quick: the run's own thief is robustness.py's (its units resumed: the same
    fine-tuning results), a thief of another seed is a new unit with other weights, and the spread
    table's within-protection SD is the SD of the two thieves' figures."""
    _, _, r = robustness
    rep = r["protocol"]["reproduce_out"]
    out = tmp_path / "spread"
    proc = _bench("spread.py", ["--quick", "--reproduce-out", rep, "--out", str(out), "--thief-seeds", "10"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "spread.json").read_text())
    own, other = s["records"]
    assert (own["thief_seed"], other["thief_seed"]) == (0, 10) and other["thief"].endswith("-t10")
    mine = {x["measure"]: x for x in r["rows"] if x["variant"] == "base" and x["oracle"] == "protected"}
    assert own["asr"] == mine["none"]["asr"]
    for m, v in own["finetune"].items():
        assert v["asr"] == mine[m]["asr"] and v["cta"] == mine[m]["cta"]
    assert (other["cta"], other["asr"]) != (own["cta"], own["asr"])  # another thief, not the same copy
    part = next(p for p in s["spread"] if p["measure"].startswith("after"))
    a, b = own["pick_asr"], other["pick_asr"]
    assert part["within_sd"] == pytest.approx(abs(a - b) / 2 ** 0.5) and part["between_sd"] is None
    assert part["min"] == min(a, b) and part["max"] == max(a, b)
    assert "## Spread" in (out / "spread.md").read_text()
    proc = _bench("spread.py", ["--quick", "--reproduce-out", rep, "--out", str(out), "--thief-seeds", "0"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode != 0 and "--thief-seeds must differ" in proc.stderr


def test_self_audit_compares_with_the_real_thief(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """bench/self_audit.py --quick: the base protection (attacked by robustness.py) is audited; the real
    thief's pick is the fine-tuning setting with the best clean accuracy in robustness.py's rows; a
    protection without units is skipped and never trained."""
    _, _, r = robustness
    rep = r["protocol"]["reproduce_out"]
    out = tmp_path / "audit"
    proc = _bench("self_audit.py", ["--quick", "--reproduce-out", rep, "--out", str(out), "--protections", "base:0"],
                  shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((out / "self-audit.json").read_text())
    (row,) = a["rows"]
    ft = [x for x in r["rows"] if x["variant"] == "base" and x["oracle"] == "protected" and x["measure"].startswith("finetune")]
    pick = max(ft, key=lambda x: x["cta"])
    assert row["real_pick"] == pick["measure"].replace("finetune-", "") and row["real_pick_asr"] == pick["asr"]
    assert set(row["audit"]) == {"copy", "e3-lr0.01", "e10-lr0.01"}
    assert all(0 <= x <= 1 for x in row["audit"].values())
    assert row["audit"]["e10-lr0.01"] != row["audit"]["copy"]  # the audit's fine-tuning did something
    audit_dir = Path(rep) / "seed0" / "protect-base" / "self-audit"
    assert (audit_dir / "unit.json").exists() and (audit_dir / "substitute.safetensors").exists()
    assert (audit_dir / "finetune-e10-lr0.01" / "unit.json").exists()
    assert {c["score"] for c in a["correlation"]} == set()  # one protection: nothing to correlate
    proc = _bench("self_audit.py", ["--quick", "--reproduce-out", rep, "--out", str(tmp_path / "none"), "--protections",
                                    "eps24:0"], shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert proc.returncode != 0 and "no protection could be audited" in proc.stderr
    assert not (Path(rep) / "seed0" / "protect-eps24" / "unit.json").exists()


def test_trigger_probe_reads_a_stored_run(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root):
    """bench/trigger_probe.py on the quick run's stored protection: one trigger step per --probe, read by
    every stored innocent and protected model (measured: the stored trigger moves the protected CNN thief
    90%, its clean twin 8%); a probe that adds the fine-pruned shadow copy reports the copies it aimed at;
    a bad probe field is refused before any work."""
    out, _, _ = robustness
    rep, res_path = out.parent / "reproduce", out.parent / "probe.json"
    base = [sys.executable, str(REPO / "bench" / "trigger_probe.py"), "--quick", "--seed", "0", "--variant", "base",
            "--runs", str(rep), "--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root),
            "--tin-root", str(tinyimagenet_root), "--out", str(res_path)]
    bad = subprocess.run(base + ["--probe", '{"no_such_field": 1}'], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode != 0 and "no_such_field" in bad.stderr and not res_path.exists()
    prune = '{"shadow_finetune_epochs": 1, "shadow_prune": 0.5}'
    proc = subprocess.run(base + ["--probe", prune], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(res_path.read_text())
    thief = "protected cnn-2000-probs"
    for name in ("clean cnn-2000-probs", thief, f"{thief} fine-pruned 0.2", f"{thief} fine-tuned e10 lr0.05", "reference cnn"):
        assert name in res["models"], (name, res["models"])
    assert list(res["probes"]) == ["stored", json.dumps(json.loads(prune), sort_keys=True)]
    stored, pruned = res["probes"].values()
    assert all(0 <= stored[m] <= 100 for m in res["models"])
    assert stored[thief] > stored["clean cnn-2000-probs"]  # the protected thief learnt the stored trigger
    assert "shadow copies" not in stored and len(pruned["shadow copies"]) == 2  # fine-tuned and fine-pruned copies
    assert any(pruned[m] != stored[m] for m in res["models"])  # the step changed the trigger
