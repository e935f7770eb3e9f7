"""bench.robustness --quick on the real data of ../shared (skipped when absent): the quick
reproduction's protected and clean substitutes go through every counter-measure, and each
counter-measure visibly does something (accuracy or ASR moves), is verified, and lands in the
JSON, table and plot. Reuses conftest's `reproduce_quick` (copied: its directory stays as it is).
The scripts run in this process (bench.robustness.main, bench.spread.main); run pytest as
`python -m pytest` from the repository root so that `bench` imports."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest

from bench import robustness as rob
from bench import null_study, spread
from bench.benchlib import protocol
from honeypotnet.verify import stolen_verdict


def _bench(module, args: list[str], shared_dir=None, cifar10_jpeg_root=None, tinyimagenet_root=None):
    """module.main(args) on the test data and the CPU (a --merge reads files only), in this process:
    (results, stdout, stderr)."""
    argv = list(args)
    if "--merge" not in args:
        argv += ["--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root),
                 "--device", "cpu"] + (["--no-progress"] if module is not null_study else [])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        res = module.main(argv)
    return res, out.getvalue(), err.getvalue()


def test_robust_preset_is_the_measured_variant():
    """The library default (ProtectConfig(), CLI `protect`) is the robust preset, exactly the variant the
    three-seed robustness table measured: the same overrides of the protocol's base config, which is the
    "spec" preset (the paper's protocol)."""
    from honeypotnet.config import ProtectConfig

    assert ProtectConfig() == ProtectConfig.preset("robust")
    assert protocol.base_config(protocol.FULL, 0) == ProtectConfig.preset("spec")
    assert dataclasses.replace(ProtectConfig.preset("spec"), **rob.VARIANTS[rob.ROBUST]) == ProtectConfig.preset("robust")
    quick = protocol.base_config(protocol.QUICK, 0).override(rob.VARIANTS[rob.ROBUST])
    assert quick == ProtectConfig.preset("robust", outer_iters=protocol.QUICK.outer_iters,
                                         shadow_epochs=protocol.QUICK.shadow_epochs)


def test_rows_named_alike_in_reproduce_and_robustness_are_one_configuration():
    """bench.reproduce's ablation rows and bench.robustness's variants of the same name share their protection
    units (seed<N>/protect-NAME), so they must be the same configuration."""
    from bench import reproduce

    base = protocol.base_config(protocol.FULL, 0)
    shared = [(name, o) for rows in reproduce.ABLATIONS.values() for name, o in rows if name in rob.VARIANTS]
    assert {"robust-lean0.5", "robust-fast-once24", "robust-once24-lean0.2"} <= {name for name, _ in shared}
    for name, o in shared:
        assert base.override(o) == base.override(rob.VARIANTS[name]), name


def test_every_variant_is_a_valid_config():
    """Every variant sets existing fields only (those of removed options are gone from the table) and is
    a distinct configuration, except base, which is the protocol's own."""
    base = protocol.base_config(protocol.FULL, 0)
    configs = {name: base.override(o) for name, o in rob.VARIANTS.items()}  # raises on an unknown field
    assert configs["base"] == base and len({c.hash() for c in configs.values()}) == len(configs)
    assert not {"lowres16", "lowres16-eps24", "negsv0.25-eps24", "negcrft-eps24-ft2-audit", "negcrft-eps24-ft2-gate",
                "negcrft-w1-noise-prune-eps24-ft2-blur"} & set(rob.VARIANTS)


def test_false_positive_goal_leaves_out_only_unservable_purifications():
    """The goal list's false-positive count leaves out a clean copy behind a purification that costs it
    more than 20 pt of its own accuracy (as the thief's goals do), names it in the note, and counts
    every other flagged clean copy: a flagged JPEG copy still fails the goal."""
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
    r, stdout, _ = _bench(rob, ["--quick", "--reproduce-out", str(rep), "--out", str(out), "--cross-substitute", "cnn_small",
                                "--variants", "base", "--pools", "tin", "cifar", "mixed"], shared_dir, cifar10_jpeg_root,
                          tinyimagenet_root)
    assert r["benchmark"] == "bench.robustness" and r["command"].startswith("python -m bench.robustness --quick")
    return out, stdout, json.loads((out / "robustness.json").read_text())


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
            assert 0 <= row["asr"] <= 1 and 0 <= row["cta"] <= 1 and row["stolen"] == stolen_verdict(row["p_value"], row.get("paired_p_value"), row["alpha"])
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


def test_thieves_with_images_like_the_owners_join_the_goal_list(robustness):
    """--pools cifar mixed: the in-distribution thieves (soft, label-only) and the mixed one, each with its clean
    twin, are verified and get goals of their own (ASR >= 90%, flagged), apart from the Tiny ImageNet thieves'; the
    twins count in the false-positive goal."""
    out, _, r = robustness
    assert r["protocol"]["pools"] == ["tin", "cifar", "mixed"]
    kinds = {(s["pool"], s["output"], s["oracle"]) for s in r["substitutes"]}
    for pool, mode in (("cifar", "probs"), ("cifar", "label"), ("mixed", "probs")):
        assert {(pool, mode, "protected"), (pool, mode, "clean")} <= kinds
    pool_goals = [g for g in r["goals"] if g["null"] == "references" and "pool" in g["goal"]]
    assert len(pool_goals) == 3 and all(g["target"] == "≥ 90, flagged" for g in pool_goals)
    tin = [g for g in r["goals"] if g["null"] == "references" and g["goal"].startswith("thief ASR") and "pool" not in g["goal"]]
    assert tin and all("90" not in g["target"] for g in tin)
    for g in pool_goals:  # each goal is its own thief's verdict, not another pool's
        s = next(s for s in r["substitutes"] if s["oracle"] == "protected" and s["pool"] == ("cifar" if "CIFAR-10 (" in g["goal"] else "mixed")
                 and s["output"] == ("label" if "label-only" in g["goal"] else "probs"))
        assert g["pass"] == (s["asr"] >= 0.9 and s["stolen"]) and g["worst"] == f"{100 * s['asr']:.1f}"
    fp = next(g for g in r["goals"] if g["null"] == "references" and g["goal"].startswith("false positives"))
    assert fp["n"] >= sum(s["oracle"] == "clean" for s in r["substitutes"])
    assert "cnn_small, CIFAR-10 (in-distribution) pool" not in (out / "robustness.md").read_text()
    assert "CIFAR-10 (in-distribution) pool" in (out / "robustness.md").read_text()


def test_resume_reuses_every_unit(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root):
    out, _, r = robustness
    rep = r["protocol"]["reproduce_out"]
    _bench(rob, ["--quick", "--reproduce-out", rep, "--out", str(out), "--cross-substitute", "cnn_small", "--variants", "base",
                 "--pools", "tin", "cifar", "mixed"], shared_dir, cifar10_jpeg_root, tinyimagenet_root)
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
    copies = 2 * len(r["protocol"]["sweep"]["reference_finetune"])  # each of the 2 references, fine-tuned per setting
    assert r["protocol"]["sweep"]["reference_finetune"] == [[1, 0.01], [3, 0.05]]  # --quick: 2 of verify's 4 settings
    assert any(n.endswith("+jpeg-q50") for n in purified) and len(names) == 2 + copies + len(purified)
    assert g["victim CTA drop"]["pass"] == (-prot["cta_delta"] <= 0.002 + 1e-9)
    subs = [s for s in r["substitutes"] if s["oracle"] == "protected" and s["budget"] == budget and s["pool"] == "tin"]
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
    # the five clean goal thieves and the three clean twins of the other pools' thieves
    assert fp_goal["worst"] == str(fp) and fp_goal["pass"] == (fp == 0) and fp_goal["n"] == len(served) + 5 + 3
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
    assert "## Variants" in md and "## Goals (the robustness study)" in md and "## Goal thieves" in md and "references null: " in md and "widened null: " in md and "## Over seeds" in md


def test_clean_goal_thieves_only(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """--no-goals --clean-goal-thieves verifies every clean goal thief (cached units) but trains no
    protected goal thief: the false-positive goal counts them all, no thief-ASR goal is claimed for
    a thief that was not run."""
    _, _, r = robustness
    out = tmp_path / "clean-only"
    _bench(rob, ["--quick", "--reproduce-out", r["protocol"]["reproduce_out"], "--out", str(out), "--cross-substitute",
                 "cnn_small", "--variants", "base", "--no-goals", "--clean-goal-thieves", "--pools", "tin", "cifar", "mixed"],
           shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    c = json.loads((out / "robustness.json").read_text())
    budget = r["protocol"]["budget"]
    assert {(s["arch"], s["budget"], s["output"], s["pool"]) for s in c["substitutes"] if s["oracle"] == "protected"} == \
        {("cnn", budget, "probs", "tin")}
    assert len([s for s in c["substitutes"] if s["oracle"] == "clean"]) == 5 + 3  # and the other pools' twins
    g = {x["goal"]: x for x in c["goals"] if x["null"] == "references"}
    assert [k for k in g if k.startswith("thief ASR")] == [f"thief ASR: cnn {budget} soft"]
    full_fp = next(x for x in r["goals"] if x["goal"].startswith("false positives") and x["null"] == "references")
    assert g["false positives (clean thieves, with and without counter-measures)"] == full_fp


def test_no_sweeps_screens_the_goal_thieves_only(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """--no-sweeps trains and verifies every goal thief (cached units: the same figures as the full run) but runs
    no counter-measure: no row, no counter-measure goal claimed, and the report says so."""
    _, _, r = robustness
    out = tmp_path / "no-sweeps"
    _bench(rob, ["--quick", "--reproduce-out", r["protocol"]["reproduce_out"], "--out", str(out), "--cross-substitute",
                 "cnn_small", "--variants", "base", "--no-sweeps", "--pools", "tin", "cifar", "mixed"],
           shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    c = json.loads((out / "robustness.json").read_text())
    assert c["rows"] == [] and c["protocol"]["sweeps"] is False and r["protocol"]["sweeps"] is True
    key = ("protection", "seed", "arch", "budget", "output", "pool", "epochs", "oracle")
    assert sorted((tuple(s[k] for k in key), s["asr"], s["stolen"]) for s in c["substitutes"]) == \
        sorted((tuple(s[k] for k in key), s["asr"], s["stolen"]) for s in r["substitutes"])
    names = {x["goal"] for x in c["goals"]}
    full = {x["goal"]: x for x in r["goals"] if x["null"] == "references"}
    assert not any(n.startswith(("fine-tune", "fine-prune", "purify", "Neural Cleanse")) for n in names)
    assert any(n.startswith(("fine-tune", "Neural Cleanse")) for n in full)
    for g in (x for x in c["goals"] if x["null"] == "references" and x["goal"].startswith("thief ASR")):
        assert (g["worst"], g["pass"]) == (full[g["goal"]]["worst"], full[g["goal"]]["pass"])
    assert "--no-sweeps: no counter-measure was run" in (out / "robustness.md").read_text()


def test_deadline_writes_what_finished(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """--deadline: units that finished are still resumed, the first unit that would start after it
    stops the run, and the tables and JSON of what finished are written (exit 0): base's units all
    exist, eps24's protection does not, so eps24 is left out and base comes back whole."""
    _, _, r = robustness
    out = tmp_path / "deadline"
    _, stdout, _ = _bench(rob, ["--quick", "--reproduce-out", r["protocol"]["reproduce_out"], "--out", str(out),
                                "--cross-substitute", "cnn_small", "--variants", "base", "eps24", "--deadline", "0"],
                          shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    d = json.loads((out / "robustness.json").read_text())
    assert d["stopped_at_deadline"].startswith("seed0/protect-eps24"), d["stopped_at_deadline"]
    assert [p["protection"] for p in d["protections"]] == ["base"]
    assert [(x["measure"], x["asr"] if "asr" in x else None) for x in d["rows"]] == \
        [(x["measure"], x["asr"] if "asr" in x else None) for x in r["rows"]]
    assert {g["variant"] for g in d["goals"]} == {"base"} and "deadline" in stdout
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
    _bench(rob, ["--merge", str(out / "robustness.json"), "--out", str(one)])
    assert (one / "robustness.md").read_text() == (out / "robustness.md").read_text()
    other = tmp_path / "seed7.json"
    other.write_text(json.dumps(_reseeded(r, 7)))
    both = tmp_path / "both"
    _bench(rob, ["--merge", str(out / "robustness.json"), str(other), "--out", str(both)])
    m = json.loads((both / "robustness.json").read_text())
    assert m["protocol"]["seeds"] == [0, 7] and len(m["merged_from"]) == 2
    assert len(m["rows"]) == 2 * len(r["rows"]) and len(m["substitutes"]) == 2 * len(r["substitutes"])
    single = {(g["goal"], g["null"]): g for g in r["goals"]}
    for g in m["goals"]:
        assert g["seeds"] == [0, 7] and g["n"] == 2 * single[(g["goal"], g["null"])]["n"], g
        assert g["pass"] == single[(g["goal"], g["null"])]["pass"]  # the same runs twice: the same verdicts
    with pytest.raises(SystemExit, match="in both"):
        _bench(rob, ["--merge", str(out / "robustness.json"), str(out / "robustness.json"), "--out", str(tmp_path / "x")])
    changed = _reseeded(r, 8)
    changed["protocol"]["budget"] += 1
    other.write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="'budget'"):
        _bench(rob, ["--merge", str(out / "robustness.json"), str(other), "--out", str(tmp_path / "y")])
    other.write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read"):
        _bench(rob, ["--merge", str(other), "--out", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()


def test_spread_separates_the_thief_from_the_protection(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """bench.spread --quick: the run's own thief is bench.robustness's (its units resumed: the same
    fine-tuning results), a thief of another seed is a new unit with other weights, and the spread
    table's within-protection SD is the SD of the two thieves' figures."""
    _, _, r = robustness
    rep = r["protocol"]["reproduce_out"]
    out = tmp_path / "spread"
    _bench(spread, ["--quick", "--reproduce-out", rep, "--out", str(out), "--thief-seeds", "10"],
           shared_dir, cifar10_jpeg_root, tinyimagenet_root)
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
    err = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
        spread.main(["--quick", "--reproduce-out", rep, "--out", str(out), "--thief-seeds", "0"])
    assert "--thief-seeds must differ" in err.getvalue()


def test_null_study_rejudges_every_verification(robustness, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path):
    """bench.null_study --quick on a robustness result of two seeds (seed 1 here is seed 0's run copied:
    its clean extracted copies become seed 0's references, and the other way round): tau0 over those
    copies, every verification re-judged, nothing trained."""
    _, _, r = robustness
    rep = tmp_path / "reproduce"
    src = Path(r["protocol"]["reproduce_out"])
    (rep / "seed0").mkdir(parents=True)
    for seed in ("seed0", "seed1"):
        shutil.copytree(src / "seed0" / "protect-base" / "bundle", rep / seed / "protect-base" / "bundle")
        for d in (src / "seed0").glob("thief-clean-*"):
            if (d / "substitute.safetensors").is_file():
                (rep / seed / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(d / "substitute.safetensors", rep / seed / d.name / "substitute.safetensors")
    two = tmp_path / "robustness.json"
    two.write_text(json.dumps({**r, "protections": r["protections"] + _reseeded(r, 1)["protections"],
                               "rows": r["rows"] + _reseeded(r, 1)["rows"],
                               "substitutes": r["substitutes"] + _reseeded(r, 1)["substitutes"]}))
    res, stdout, _ = _bench(null_study,
                            ["--quick", "--reproduce-out", str(rep), "--robustness", str(two), "--out", str(tmp_path / "ns")],
                            shared_dir, cifar10_jpeg_root, tinyimagenet_root)
    assert [(x["variant"], x["seed"]) for x in res["results"]] == [("base", 0), ("base", 1)]
    for x in res["results"]:
        # cnn 2000 soft and label-only, cnn 500 (the cross-architecture thief here is cnn_small, not resnet20)
        assert 0.05 <= x["tau0_extracted"] <= 0.5 and len(x["extracted_reference"]) == 3
        assert x["protected"]["n"] > 0 and x["clean"]["n"] > 0
        assert x["protected"]["flagged_references"] == sum(
            y["stolen"] for y in r["rows"] + r["substitutes"] if y.get("oracle") == "protected" and "hits" in y)
    assert (tmp_path / "ns" / "null-study.md").read_text().count("| base |") == 2 and "tau0" in stdout
