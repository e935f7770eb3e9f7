"""bench.arsenal --quick on the real data of ../shared (skipped when absent): every part of the
thief's arsenal, ART's attacks and the thieves of other network families included (ART is a test
dependency: its part must run, not be skipped), runs end to end on the quick reproduction's victim
and bundle, pays exactly its budget, writes its tables and plot, and resumes.

The quick reproduction it reads is conftest's `reproduce_quick` (shared with
tests/test_reproduce_quick.py), or an existing one named by $HONEYPOTNET_REPRODUCE_QUICK (e.g.
runs/reproduce-quick; only read). The arsenal run itself (bench.arsenal.main, in this process; run
pytest as `python -m pytest` from the repository root) takes about two minutes on one thread; the
families part runs one of its three families here (tests/test_models.py trains the others a step)."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from bench import arsenal as arsenal_script
from honeypotnet.verify import stolen_verdict


def _run(argv: list[str]) -> tuple[dict, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = arsenal_script.main(argv)
    return res, buf.getvalue()


@pytest.fixture(scope="module")
def arsenal(request, shared_dir, cifar10_jpeg_root, tinyimagenet_root, tmp_path_factory):
    given = os.environ.get("HONEYPOTNET_REPRODUCE_QUICK")
    if given and (Path(given) / "seed0" / "protect-base" / "bundle" / "manifest.json").is_file():
        source = Path(given)
    else:
        source = request.getfixturevalue("reproduce_quick")[0]
    out = tmp_path_factory.mktemp("arsenal") / "quick"
    argv = ["--quick", "--from-reproduce", str(source), "--out", str(out), "--shared", str(shared_dir),
            "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root), "--device", "cpu", "--no-progress",
            "--budgets", "5000", "20000",  # quick: 500 (< the pool: active picks) and 2000 (the whole pool)
            "--families", "mobilenetv2_small",  # the fastest family of the three (quick: one epoch, ~5 s a thief)
            "--family-modes", "probs"]  # soft answers only (label-only: the outputs part; its families rows cost 30 s more)
    res, stdout = _run(argv)
    assert res["benchmark"] == "bench.arsenal" and res["parts"] == list(arsenal_script.PARTS)  # every part, by default
    return out, argv, stdout, json.loads((out / "results.json").read_text())


def test_every_strategy_budget_and_oracle_is_measured_with_exact_accounting(arsenal):
    _, _, _, r = arsenal
    plan = r["plan"]
    rows = r["strategies"]
    keys = {(s["strategy"], s["budget"], s["oracle"]) for s in rows}
    assert keys == {(s, b, o) for s in ("random", "entropy", "kcenter", "dfal") for b in plan["budgets"]
                    for o in ("protected", "clean")}
    pool = r["protocol"]["pool"]
    for s in rows:
        assert s["queries"] == s["budget"]
        assert s["stolen"] == stolen_verdict(s["p_value"], s.get("paired_p_value"), plan["alpha"]) and s["tau0"] == r["bundle"]["tau0"]
        assert 0 <= s["asr"] <= 1 and 0 <= s["cta"] <= 1
        if s["strategy"] != "random" and s["budget"] < pool:
            # an active thief's picks rank high on its own score (random: 0.5 on average)
            for rd in s["rounds"][1:]:
                pct = rd["picked_percentile"]
                assert (pct < 0.35) if s["strategy"] == "dfal" else (pct > 0.65), (s["strategy"], rd)
        if s["budget"] >= pool:
            assert s["strategy"] == "random" or "every strategy" in s["note"]


def test_the_random_thief_inherits_the_backdoor_and_the_clean_one_is_not_accused(arsenal):
    _, _, _, r = arsenal
    by = {(s["strategy"], s["budget"], s["oracle"]): s for s in r["strategies"]}
    top = max(r["plan"]["budgets"])
    stolen, clean = by[("random", top, "protected")], by[("random", top, "clean")]
    assert stolen["stolen"] and stolen["asr"] > clean["asr"] + 0.2, (stolen["asr"], clean["asr"])
    assert not any(s["stolen"] for s in r["strategies"] if s["oracle"] == "clean" and s["strategy"] == "random")


def test_output_modes_counter_measures_and_art(arsenal):
    """Every output mode and counter-measure, and ART's two attacks: the ART part ran (ART is installed
    for the tests), it was not skipped."""
    _, _, _, r = arsenal
    modes = {(o["output"], o["oracle"]) for o in r["outputs"]}
    assert modes == {(m, o) for m in r["plan"]["modes"] for o in ("protected", "clean")}
    top1 = [o for o in r["outputs"] if o["output"] == "top1"]
    assert all("'label'" in o["note"] for o in top1)  # top-1 renormalised is the one-hot label: one unit
    cm = r["counter"]
    measures = {c["measure"] for c in cm}
    assert {"none (stolen substitute)", "Neural Cleanse (detector)"} <= measures
    assert any(m.startswith("fine-tune") for m in measures) and any(m.startswith("fine-prune") for m in measures)
    assert any(m.startswith("JPEG") for m in measures) and any(m.startswith("Gaussian blur") for m in measures)
    for c in cm:
        if "nc" in c:
            assert len(c["nc"]["norms"]) == 10 and len(c["nc"]["anomaly_index"]) == 10
        else:
            assert 0 <= c["cta"] <= 1 and 0 <= c["asr"] <= 1 and c["verdict"] in ("STOLEN (backdoor present)", "not flagged")
        if "pruned_channels" in c:
            assert c["pruned_channels"] == round(0.5 * c["channels"])
    assert "art" in r["parts"] and r["skipped"] == [], r["skipped"]
    assert {(a["attack"], a["oracle"]) for a in r["art"]} == {(a, o) for a in ("knockoffnets", "copycatcnn")
                                                              for o in ("protected", "clean")}
    assert all(a["queries"] == a["budget"] for a in r["art"])
    for a in r["art"]:
        assert 0 <= a["cta"] <= 1 and 0 <= a["asr"] <= 1 and a["stolen"] == stolen_verdict(a["p_value"], a.get("paired_p_value"), r["plan"]["alpha"])
    by = {(a["attack"], a["oracle"]): a for a in r["art"]}
    assert not by[("knockoffnets", "clean")]["stolen"] and not by[("copycatcnn", "clean")]["stolen"]


def test_thieves_of_other_families_and_training_loops(arsenal):
    """The families part: every family the protection never uses, the protocol's arch under a plain Adam
    loop and the protocol's own thief as reference, soft answers here (--family-modes probs), each with its clean twin;
    exact accounting at the counter-measures' budget. Quick models are weak: no accuracy or ASR is
    asserted, only that each row is a well-formed measurement."""
    _, _, _, r = arsenal
    plan, rows = r["plan"], r["families"]
    assert plan["families"] == ["mobilenetv2_small"] and plan["seed"] == 0
    thieves = [(plan["arch"], "fit"), *((f, "fit") for f in plan["families"]), (plan["arch"], "adam")]
    assert plan["family_modes"] == ["probs"] and plan["family_epochs"] == 1  # quick: the other families train 1 epoch
    expected = {(f, t, "soft", o) for f, t in thieves for o in ("protected", "clean")}
    keys = [(x["family"], x["trainer"], x["labels"], x["oracle"]) for x in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    budget = plan["cm_budget"]
    assert budget == r["protocol"]["pool"]  # quick: the counter-measures' budget is the whole pool
    for x in rows:
        assert x["budget"] == budget and x["queries"] == budget
        assert x["arch"] == x["family"] and x["output"] == {"soft": "probs", "label-only": "label"}[x["labels"]]
        assert 0 <= x["asr"] <= 1 and 0 <= x["cta"] <= 1 and 0 <= x["p_value"] <= 1
        assert x["stolen"] == stolen_verdict(x["p_value"], x.get("paired_p_value"), plan["alpha"]) and x["tau0"] == r["bundle"]["tau0"]
        assert x["verdict"] == ("STOLEN (backdoor present)" if x["stolen"] else "not flagged")
        assert 0 < x["parameters"] < 1_500_000
    by = {(x["family"], x["trainer"], x["labels"], x["oracle"]): x for x in rows}
    for f, t, lab, o in expected:
        if o == "protected":
            assert (f, t, lab, "clean") in by  # every protected thief has its clean twin
    ref = by[(plan["arch"], "fit", "soft", "protected")]  # the protocol's thief: the counter-measures' own substitute
    base = next(c for c in r["counter"] if c["oracle"] == "protected" and c["measure"] == "none (stolen substitute)")
    assert (ref["cta"], ref["asr"]) == (base["cta"], base["asr"])


def test_thief_seed_and_families_options():
    """--thief-seed sets the seed of every thief the plan trains (and of its units' keys); --families takes registry
    names and refuses an unknown one; --family-modes picks the families' answers."""
    quick = arsenal_script.parse_args(["--quick", "--thief-seed", "2", "--families", "VGG_small", "--budgets", "5000",
                                       "--family-modes", "label"])
    plan = arsenal_script.plan_from_args(quick, arsenal_script.PROTOCOL_QUICK)
    assert (plan.seed, plan.families, plan.budgets, plan.arch) == (2, ("vgg_small",), (500,), "cnn_small")
    assert plan.family_modes == ("label",)
    full = arsenal_script.plan_from_args(arsenal_script.parse_args([]), arsenal_script.PROTOCOL_FULL)
    assert (full.seed, full.arch, full.budgets, full.family_modes) == (0, "cnn", (5000, 10000, 20000), ("probs", "label"))
    with pytest.raises(SystemExit):
        arsenal_script.parse_args(["--family-modes", "top3"])
    with pytest.raises(SystemExit, match="unknown model"):
        arsenal_script.plan_from_args(arsenal_script.parse_args(["--families", "resnet999"]), arsenal_script.PROTOCOL_FULL)


def test_tables_plot_and_resume(arsenal):
    out, argv, stdout, r = arsenal
    md = (out / "results.md").read_text()
    for head in ("### Query strategies", "### What the API returns", "### A thief who suspects a backdoor",
                 "### Neural Cleanse", "### Thieves of other network families", "### ART's attacks"):
        assert head in md and head in stdout
    assert "2000 queries; the other families trained 1 epoch)" in md
    png = (out / "budget_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    _run(argv + ["--resume"])
    again = json.loads((out / "results.json").read_text())
    assert again["units"] and all(u["resumed"] for u in again["units"])
    strip = lambda rows: [{k: v for k, v in x.items() if k not in ("resumed", "seconds")} for x in rows]  # noqa: E731
    assert strip(again["strategies"]) == strip(r["strategies"]) and strip(again["counter"]) == strip(r["counter"])
    assert strip(again["art"]) == strip(r["art"]) and strip(again["families"]) == strip(r["families"])


def test_a_twin_reused_against_another_protection_is_verified_with_that_protection(arsenal, tmp_path):
    """A clean twin's training depends on the victim only, so its unit is reused by a run against another protection
    of the same victim and tau0; its verdict must then come from that protection's trigger, not the stored one."""
    import argparse
    import shutil

    import torch

    from bench.benchlib.protocol import QUICK as PROTOCOL
    from bench.ownership import verification_set
    from honeypotnet.bundle import load_bundle, load_model, save_bundle
    from honeypotnet.verify import verify

    out, argv, _, r = arsenal
    value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    source = Path(value("--from-reproduce"))
    rep = tmp_path / "reproduce"  # the same victim file (copytree keeps its modification time: its key), another trigger
    shutil.copytree(source / "victim", rep / "victim")
    prot = rep / "seed0" / "protect-base"
    b = load_bundle(source / "seed0" / "protect-base" / "bundle")
    with torch.no_grad():
        b.trigger.pattern.copy_(-b.trigger.pattern.flip(-1))  # another trigger within the same bound
    m = b.manifest
    save_bundle(prot / "bundle", b.model, b.trigger, arch="resnet20", target=b.target, classes=m["classes"],
                config=m["config"], verification=m["verification"])
    shutil.copytree(source / "seed0" / "protect-base" / "pool-answers", prot / "pool-answers")
    assert load_bundle(prot / "bundle").tau0 == b.tau0
    twin = next(x for x in r["strategies"] if x["oracle"] == "clean" and x["strategy"] == "random" and x["budget"] == 500)
    reused = tmp_path / "arsenal"
    shutil.copytree(out / twin["rel"], reused / twin["rel"])  # the twin's units, its verify unit the first bundle's

    res, _ = _run(["--quick", "--from-reproduce", str(rep), "--out", str(reused), "--shared", value("--shared"),
                   "--cifar-root", value("--cifar-root"), "--tin-root", value("--tin-root"), "--device", "cpu",
                   "--no-progress", "--resume", "--parts", "strategies", "--strategies", "random", "--budgets", "5000"])
    units = {u["unit"]: u["resumed"] for u in res["units"]}
    assert units[twin["rel"]] is True and units[twin["rel"] + "/verify"] is False  # trained once, verified again
    row = next(x for x in res["strategies"] if x["oracle"] == "clean")
    images, labels, _, _ = verification_set(argparse.Namespace(cifar_root=value("--cifar-root")), PROTOCOL)
    sub, _ = load_model(reused / twin["rel"] / "substitute.safetensors")
    v = verify(sub.eval(), load_bundle(prot / "bundle").trigger, images, labels, b.target, b.tau0, r["plan"]["alpha"])
    assert (row["hits"], row["n"], row["stolen"]) == (v.hits, v.n, v.stolen) and row["cta"] == twin["cta"]
    assert row["hits"] != twin["hits"]  # what the reused unit had stored: the first trigger's answers
