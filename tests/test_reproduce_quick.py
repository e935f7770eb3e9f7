"""bench.reproduce: the real-data reproduction benchmark (run as `python -m bench.reproduce`; these
tests import it, so run pytest as `python -m pytest` from the repository root).

The first tests need no data (the ablation table, the pool oracle, the unit locks, the results
index). The others use conftest's `reproduce_quick`: `python -m bench.reproduce --quick` run once
as a subprocess (CIFAR-10 JPEG victim data + Tiny ImageNet queries from ../shared, 1/10 of the full
protocol; about 2-3 minutes on 2 idle CPU cores), and check what it writes. They are skipped when
../shared (or its data / victim weights) is absent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import reproduce
from bench.benchlib import index, protocol
from bench.benchlib.oracle import PoolOracle
from bench.benchlib.units import Units, key_of
from honeypotnet.verify import stolen_verdict

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- no data needed


def test_every_ablation_variant_is_a_valid_config_change():
    from honeypotnet.config import ProtectConfig

    base = protocol.base_config(protocol.FULL, 0)
    assert base == ProtectConfig.preset("spec")  # the full protocol's schedule is the preset's
    assert (base.trigger, base.eps, base.head, base.hidden, base.lam, base.outer_iters, base.shadow_arch,
            base.shadow_epochs, base.trigger_passes, base.honeypot_steps, base.honeypot_lr, base.honeypot_batch,
            base.target) == ("uap", 16 / 255, "residual", 256, 3.0, 8, "cnn", 3, 2, 400, 1e-3, 256, 0)
    for name, variants in reproduce.ABLATIONS.items():
        assert variants, name
        for label, overrides in variants:
            cfg = base.override(overrides)  # ProtectConfig validates itself
            assert cfg == dataclasses.replace(base, **overrides)
            assert all(getattr(cfg, k) == v for k, v in overrides.items()), (name, label)
    assert reproduce.ABLATION_LABEL_ONLY <= set(reproduce.ABLATIONS)


def test_pool_oracle_answers_like_the_model_and_counts_queries():
    from honeypotnet.attacks import random_extraction
    from honeypotnet.models import create_model
    from honeypotnet.ops import to_float
    from honeypotnet.oracles import ModelOracle, OutputMode
    from honeypotnet.training import FitConfig

    torch.manual_seed(0)
    model = create_model("cnn_small", 10).eval()
    pool = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    probs = ModelOracle(model)(to_float(pool))
    for mode in ("probs", "label"):
        oracle = PoolOracle(probs, pool, OutputMode(mode))
        idx = torch.tensor([5, 3, 60, 3])
        expect = ModelOracle(model, OutputMode(mode))(to_float(pool[idx]))
        assert torch.allclose(oracle(to_float(pool[idx])), expect, atol=1e-5)
        assert oracle(pool[idx]).shape == (4, 10) and oracle.queries == 8
    res = random_extraction(PoolOracle(probs, pool), pool, 20, "cnn_small", 10, FitConfig(epochs=1), seed=0)
    assert res.queries == 20
    with pytest.raises(KeyError):
        PoolOracle(probs, pool)(torch.zeros(1, 3, 32, 32))


def test_units_shared_by_two_processes_run_once(tmp_path):
    """Two benchmark processes on the same output directory: the second waits on the unit's lock
    and reuses the first one's result instead of training the same thing again beside it."""
    code = f"""
import json, time
from pathlib import Path
from bench.benchlib.units import Units
units = Units(Path({str(tmp_path / 'out')!r}), resume=True)
def work(d):
    with open({str(tmp_path / 'calls.txt')!r}, "a") as f:
        f.write("call\\n")
    time.sleep(1.5)
    return {{"value": 42}}
rec = units.run("seed0/thing", {{"p": 1}}, work, "test")
print(json.dumps({{"value": rec["value"], "resumed": rec["resumed"]}}))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "calls.txt").read_text().count("call") == 1
    assert sorted(o["resumed"] for o in outs) == [False, True] and all(o["value"] == 42 for o in outs)


def test_units_record_the_code_that_computed_them(tmp_path):
    """A unit's key is its parameters, not the code, so finished work survives a code change; each unit records
    the commit that computed it (and +dirty), resumed units report it again, and older units count as unrecorded."""
    from bench.benchlib.units import UNRECORDED, code_revision, code_summary

    code = code_revision()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert (code or "").removesuffix("+dirty") == head  # None only where git cannot read the checkout
    units = Units(tmp_path, resume=True)
    assert units.run("seed0/a", {"p": 1}, lambda d: {"v": 1}, "s")["code"] == code
    assert json.loads((tmp_path / "seed0" / "a" / "unit.json").read_text())["code"] == code
    old = tmp_path / "seed0" / "b"
    old.mkdir()
    (old / "unit.json").write_text(json.dumps({"v": 2, "key": key_of({"p": 2}), "seconds": 1.0}))  # before the field
    again = Units(tmp_path, resume=True)
    again.run("seed0/a", {"p": 1}, lambda d: pytest.fail("resumed units are not run"), "s")
    again.run("seed0/b", {"p": 2}, lambda d: pytest.fail("resumed units are not run"), "s")
    assert [u["code"] for u in again.timings] == [code, None]
    line = code_summary(again.timings)
    assert f"{code or UNRECORDED} (1 unit)" in line and f"{UNRECORDED} (1 unit)" in line


def test_results_index_keeps_the_prose_and_lists_every_result(tmp_path):
    """bench.benchlib.index: README.md's prose above the marker is kept, the table below it is rebuilt
    from the files present (one section per folder), and `--record` writes a report there."""
    root = tmp_path / "results"
    (root / "robustness").mkdir(parents=True)
    rob = {"benchmark": "bench/robustness.py", "command": "python bench/robustness.py --variants base --seeds 0 1 "
           "--out runs/x --no-progress", "protocol": {"variants": {"base": {}}, "seeds": [0, 1], "goals": True},
           "machine": {"device": "cpu"}, "recorded": "2026-11-26"}
    (root / "robustness" / "rob-a.json").write_text(json.dumps(rob))
    (root / "robustness" / "rob-a.md").write_text("report\n")
    (root / "README.md").write_text("# Recorded results\n\nProse the docs keep.\n")
    index.rebuild(root)
    text = (root / "README.md").read_text()
    head, marker, table = text.partition(index.MARKER)
    assert marker and head.startswith("# Recorded results\n\nProse the docs keep.")
    assert "### `robustness/`" in table and "[rob-a](robustness/rob-a.md) (`.json`)" in table
    assert "`base`; seeds 0, 1; goal list" in table and "| CPU |" in table and "2026-11-26" in table
    assert "`python bench/robustness.py --variants base --seeds 0 1`" in table  # --out / --no-progress left out
    # a recorded report lands in its folder and the index follows; the prose is never touched again
    index.record("spread", "sp-b", {"benchmark": "bench.spread", "command": "python -m bench.spread --quick",
                                    "protocol": {"variants": ["base"], "seeds": [0], "thief_seeds": [10]}}, "| x |", root)
    again = (root / "README.md").read_text()
    assert again.startswith(head + index.MARKER) and "### `spread/`" in again and "[sp-b](spread/sp-b.md)" in again
    assert json.loads((root / "spread" / "sp-b.json").read_text())["recorded"]
    from bench import index as index_cli

    assert index_cli.main(["--root", str(root), "--check"]) == 0
    (root / "robustness" / "rob-c.json").write_text(json.dumps(rob))
    assert index_cli.main(["--root", str(root), "--check"]) == 1
    assert index_cli.main(["--root", str(root)]) == 0 and "rob-c" in (root / "README.md").read_text()


# ----------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick_run(reproduce_quick):
    out, argv, stdout = reproduce_quick  # conftest: one quick run per session, shared with the other bench tests
    return out, argv, stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_results_have_every_column_and_verdict(quick_run):
    out, _, stdout, r = quick_run
    assert r["benchmark"] == "bench.reproduce" and r["command"].startswith("python -m bench.reproduce --quick")
    assert r["mode"] == "quick" and r["protocol"]["budgets"] == [500, 1000, 2000]
    assert {"torch", "cpu_count", "device"} <= set(r["machine"])
    assert {"data load", "protect", "references", "calibration", "thief (protected)", "thief (clean)",
            "total wall time"} <= set(r["timings"])
    # protect's step timings come from its callback: one entry per step it reports
    assert {"  protect: shadow", "  protect: trigger", "  protect: stamped features", "  protect: honeypot"} <= set(r["timings"])
    (prot,) = r["protections"]
    assert set(protocol.PROTECTION_COLUMNS) <= set(prot)
    assert prot["config"]["version"] == 2 and prot["config"]["trigger"]["eps"] == pytest.approx(16 / 255)
    assert set(prot["step_seconds"]) >= {"shadow", "trigger", "honeypot"}
    assert sum(prot["step_seconds"].values()) <= prot["seconds"] + 1
    assert 0.5 < prot["victim_cta"] <= 1 and abs(prot["cta_delta"] - (prot["protected_cta"] - prot["victim_cta"])) < 1e-9
    assert 0 < prot["tau0"] < 1 and prot["calibration"]["reference"]
    subs = r["substitutes"]
    for s in subs:
        assert set(protocol.SUBSTITUTE_COLUMNS) <= set(s), set(protocol.SUBSTITUTE_COLUMNS) - set(s)
        assert s["queries"] == s["budget"]
        assert s["verdict"] in ("STOLEN (backdoor present)", "not flagged")
        assert s["stolen"] == stolen_verdict(s["p_value"], s.get("paired_p_value"), s["alpha"])
        assert 0 <= s["asr"] <= 1 and 0 <= s["p_value"] <= 1 and s["tau0"] == prot["tau0"]
        assert s["n"] == 900  # verification half: 100 per class, target class excluded
    keys = {(s["oracle"], s["budget"], s["output"], s["pool"]) for s in subs}
    assert keys == {(o, b, m, pool) for o in ("protected", "clean") for b, m, pool in
                    [(500, "probs", "tin"), (1000, "probs", "tin"), (2000, "probs", "tin"), (2000, "label", "tin"),
                     (2000, "probs", "cifar"), (2000, "label", "cifar"), (2000, "probs", "mixed")]}
    assert r["protocol"]["pools"] == ["tin", "cifar", "mixed"]
    assert "| base | cnn | 2000 | soft |" in stdout and "| base | cnn, CIFAR-10 (in-distribution) pool | 2000 | label-only |" in stdout
    assert (out / "trigger.png").is_file() and (out / "results.md").is_file()
    manifest = json.loads((out / "seed0" / "protect-base" / "bundle" / "manifest.json").read_text())
    assert manifest["verification"]["tau0"] == pytest.approx(prot["tau0"])


@pytest.mark.slow
def test_quick_stolen_copy_is_flagged_and_clean_copies_are_not(quick_run):
    """The point of the protection: the copy stolen from the protected model at the largest budget is
    FLAGGED (H0: ASR <= tau0 rejected at alpha), and no copy of the unprotected victim is."""
    _, _, _, r = quick_run
    by = {(s["oracle"], s["budget"], s["output"]): s for s in r["substitutes"] if s["pool"] == "tin"}
    stolen, clean = by[("protected", 2000, "probs")], by[("clean", 2000, "probs")]
    assert stolen["stolen"] and stolen["verdict"] == "STOLEN (backdoor present)", stolen
    assert stolen["p_value"] < stolen["alpha"] and stolen["asr"] > stolen["tau0"]
    assert not clean["stolen"] and clean["verdict"] == "not flagged", \
        f"the clean copy is flagged: ASR {clean['asr']:.4f} against tau0 {clean['tau0']:.4f}, p {clean['p_value']:.2g}"
    flagged = [(s["budget"], s["output"], s["pool"], round(s["asr"], 4), s["p_value"]) for s in r["substitutes"]
               if s["oracle"] == "clean" and s["stolen"]]  # every pool's clean twin, in-distribution ones too
    assert not flagged, f"clean copies flagged (budget, output, pool, ASR, p) against tau0 {clean['tau0']:.4f}: {flagged}"


@pytest.mark.slow
def test_quick_resume_skips_every_finished_unit(quick_run):
    """--resume (in this process: bench.reproduce.main) reuses every unit of the subprocess run."""
    out, argv, _, r = quick_run
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        again = reproduce.main(argv + ["--resume"])
    assert json.loads((out / "results.json").read_text())["units"] == again["units"]
    assert all(u["resumed"] for u in again["units"]), [u["unit"] for u in again["units"] if not u["resumed"]]
    assert again["substitutes"] == r["substitutes"] and "resumed" in buf.getvalue()


@pytest.mark.slow
def test_null_of_more_families_rejudges_every_copy_and_resumes(quick_run, shared_dir, cifar10_jpeg_root,
                                                               tinyimagenet_root, tmp_path):
    """bench.null_study --families on the quick reproduction: one clean reference of another family trained
    (a unit in --out; nothing written to the reproduction), tau0 with the protocol's references is the bundle's,
    with the family it can only rise, and every copy is re-judged under both by verify's own rule."""
    from bench import null_study
    from honeypotnet.verify import binomial_p_value

    src, _, _, r = quick_run
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    argv = ["--quick", "--families", "cnn_small", "--reproduce-out", str(src), "--out", str(tmp_path / "nf"),
            "--shared", str(shared_dir), "--cifar-root", str(cifar10_jpeg_root), "--tin-root", str(tinyimagenet_root),
            "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()):
        res = null_study.main(argv)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # the reproduction is only read
    (row,) = res["results"]
    (prot,) = r["protections"]
    assert row["protection"] == "base" and row["tau0_before"] == prot["tau0"] and row["tau0_after"] >= row["tau0_before"]
    assert [x["arch"] for x in row["reference"]] == [*protocol.QUICK.reference_archs, "cnn_small"]
    subs = {(s["oracle"], s["budget"], s["output"], s["pool"]): s for s in r["substitutes"]}
    assert len(row["copies"]) == len(subs) == row["protected"]["n"] + row["clean"]["n"]
    for j in row["copies"]:
        assert j["before"]["stolen"] == stolen_verdict(binomial_p_value(j["hits"], j["n"], row["tau0_before"]),
                                                       j["paired_p_value"], protocol.QUICK.alpha)
        assert j["after"]["stolen"] == stolen_verdict(binomial_p_value(j["hits"], j["n"], row["tau0_after"]),
                                                      j["paired_p_value"], protocol.QUICK.alpha)
        assert j["after"]["stolen"] <= j["before"]["stolen"]  # a higher tau0 never flags more
    assert sum(j["before"]["stolen"] for j in row["copies"]) == sum(s["stolen"] for s in subs.values())
    assert "references → + families" in (tmp_path / "nf" / "null-families.md").read_text()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        again = null_study.main(argv)  # the reference is a unit: resumed, the same verdicts
    assert again["results"] == res["results"] and "reference cnn_small" in buf.getvalue() and "resumed" in buf.getvalue()


def test_thief_pools_never_hold_the_owners_or_the_test_images(shared_dir, cifar10_jpeg_root, tinyimagenet_root):
    """The in-distribution pool is CIFAR-10 train images the owner never gave protect (nor test images:
    verification), the mixed pool half of it and half Tiny ImageNet, each as large as the Tiny ImageNet pool."""
    from types import SimpleNamespace

    from bench.benchlib.data import POOLS, load_data

    args = SimpleNamespace(shared=str(shared_dir), cifar_root=str(cifar10_jpeg_root), tin_root=str(tinyimagenet_root))
    data = load_data(args, protocol.QUICK)

    def rows(x: torch.Tensor) -> set[bytes]:
        return {bytes(r) for r in x.flatten(1).numpy()}

    owner, test, tin, cifar = rows(data.owner), rows(data.test_images), rows(data.pool), rows(data.pool_in)
    # (a handful of pictures occur twice in CIFAR-10 itself; a pool drawn from the owner's would share ~1,000)
    assert len(cifar) > 0.99 * len(data.pool_in) and len(cifar & owner) <= 3 and len(cifar & test) <= 3
    mixed = data.pool_images("mixed")
    assert len(mixed) == len(data.pool) == len(data.pool_images("cifar")) and set(POOLS) == {"tin", "cifar", "mixed"}
    m = rows(mixed)
    assert abs(len(m & tin) - len(mixed) // 2) <= 5 and abs(len(m & cifar) - len(mixed) // 2) <= 5
    assert torch.equal(mixed, data.pool_images("mixed"))  # a fixed draw
    with pytest.raises(ValueError, match="unknown pool"):
        data.pool_images("imagenet")
