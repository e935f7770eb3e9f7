"""bench/reproduce.py: the real-data reproduction benchmark.

The first tests need no data (the script's oracle and ablation table). The others run
`bench/reproduce.py --quick` once (CIFAR-10 JPEG victim data + Tiny ImageNet queries from
../shared, 1/10 of the full protocol; about 2-3 minutes on 2 idle CPU cores) and check what it
writes. They are skipped when ../shared (or its data / victim weights) is absent.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "reproduce.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_reproduce", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_reproduce"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def script():
    return _load_script()


# ----------------------------------------------------------------------------- no data needed


def test_every_ablation_variant_is_a_valid_config_change(script):
    base = script.base_config(script.FULL, 0)
    assert (base.trigger, base.eps, base.head, base.hidden, base.lam, base.outer_iters, base.shadow_arch,
            base.shadow_epochs, base.trigger_passes, base.honeypot_steps, base.honeypot_lr, base.honeypot_batch,
            base.target) == ("uap", 16 / 255, "residual", 256, 3.0, 8, "cnn", 3, 2, 400, 1e-3, 256, 0)
    for name, variants in script.ABLATIONS.items():
        assert variants, name
        for label, overrides in variants:
            cfg = script.replace(base, **overrides)  # ProtectConfig validates itself
            assert all(getattr(cfg, k) == v for k, v in overrides.items()), (name, label)


def test_pool_oracle_answers_like_the_model_and_counts_queries(script):
    from honeypotnet.attacks import random_extraction
    from honeypotnet.models import create_model
    from honeypotnet.oracles import ModelOracle, OutputMode
    from honeypotnet.training import FitConfig, to_float

    torch.manual_seed(0)
    model = create_model("cnn_small", 10).eval()
    pool = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    probs = ModelOracle(model)(to_float(pool))
    for mode in ("probs", "label"):
        oracle = script.PoolOracle(probs, pool, OutputMode(mode))
        idx = torch.tensor([5, 3, 60, 3])
        expect = ModelOracle(model, OutputMode(mode))(to_float(pool[idx]))
        assert torch.allclose(oracle(to_float(pool[idx])), expect, atol=1e-5)
        assert oracle(pool[idx]).shape == (4, 10) and oracle.queries == 8
    res = random_extraction(script.PoolOracle(probs, pool), pool, 20, "cnn_small", 10, FitConfig(epochs=1), seed=0)
    assert res.queries == 20
    with pytest.raises(KeyError):
        script.PoolOracle(probs, pool)(torch.zeros(1, 3, 32, 32))


# ----------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick_run(reproduce_quick):
    out, cmd, stdout = reproduce_quick  # conftest: one quick run per session, shared with test_arsenal_quick.py
    return out, cmd, stdout, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_results_have_every_column_and_verdict(quick_run, script):
    out, _, stdout, r = quick_run
    assert r["mode"] == "quick" and r["protocol"]["budgets"] == [500, 1000, 2000]
    assert {"torch", "cpu_count", "device"} <= set(r["machine"])
    assert {"data load", "protect", "references", "calibration", "thief (protected)", "thief (clean)",
            "total wall time"} <= set(r["timings"])
    (prot,) = r["protections"]
    assert set(script.PROTECTION_COLUMNS) <= set(prot)
    assert 0.5 < prot["victim_cta"] <= 1 and abs(prot["cta_delta"] - (prot["protected_cta"] - prot["victim_cta"])) < 1e-9
    assert 0 < prot["tau0"] < 1 and prot["calibration"]["reference"]
    subs = r["substitutes"]
    for s in subs:
        assert set(script.SUBSTITUTE_COLUMNS) <= set(s), set(script.SUBSTITUTE_COLUMNS) - set(s)
        assert s["queries"] == s["budget"]
        assert s["verdict"] in ("STOLEN (backdoor present)", "not flagged")
        assert s["stolen"] == (s["p_value"] < s["alpha"])
        assert 0 <= s["asr"] <= 1 and 0 <= s["p_value"] <= 1 and s["tau0"] == prot["tau0"]
        assert s["n"] == 900  # verification half: 100 per class, target class excluded
    keys = {(s["oracle"], s["budget"], s["output"]) for s in subs}
    assert keys == {(o, b, m) for o in ("protected", "clean") for b, m in
                    [(500, "probs"), (1000, "probs"), (2000, "probs"), (2000, "label")]}
    assert "| base | cnn | 2000 | soft |" in stdout
    assert (out / "trigger.png").is_file() and (out / "results.md").is_file()
    manifest = json.loads((out / "seed0" / "protect-base" / "bundle" / "manifest.json").read_text())
    assert manifest["verification"]["tau0"] == pytest.approx(prot["tau0"])


@pytest.mark.slow
def test_quick_protected_thief_inherits_more_backdoor_than_clean_thief(quick_run):
    _, _, _, r = quick_run
    by = {(s["oracle"], s["budget"], s["output"]): s for s in r["substitutes"]}
    stolen, clean = by[("protected", 2000, "probs")], by[("clean", 2000, "probs")]
    assert stolen["asr"] > clean["asr"], (stolen["asr"], clean["asr"])  # loose: quick mode is small
    assert not clean["stolen"], "an innocent model must not be flagged"


@pytest.mark.slow
def test_quick_resume_skips_every_finished_unit(quick_run):
    out, cmd, _, r = quick_run
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert all(u["resumed"] for u in again["units"]), [u["unit"] for u in again["units"] if not u["resumed"]]
    assert again["substitutes"] == r["substitutes"]


def test_units_shared_by_two_processes_run_once(tmp_path):
    """Two benchmark processes on the same output directory: the second waits on the unit's lock
    and reuses the first one's result instead of training the same thing again beside it."""
    code = f"""
import importlib.util, json, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("bench_reproduce", {str(SCRIPT)!r})
mod = importlib.util.module_from_spec(spec); sys.modules["bench_reproduce"] = mod; spec.loader.exec_module(mod)
units = mod.Units(Path({str(tmp_path / 'out')!r}), resume=True)
def work(d):
    with open({str(tmp_path / 'calls.txt')!r}, "a") as f:
        f.write("call\\n")
    time.sleep(1.5)
    return {{"value": 42}}
rec = units.run("seed0/thing", {{"p": 1}}, work, "test")
print(json.dumps({{"value": rec["value"], "resumed": rec["resumed"]}}))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "calls.txt").read_text().count("call") == 1
    assert sorted(o["resumed"] for o in outs) == [False, True] and all(o["value"] == 42 for o in outs)
