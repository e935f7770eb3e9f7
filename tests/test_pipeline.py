"""End to end on the embedded data: the method itself must work, or these fail.

One small run of the whole chain (victim -> protect -> bundle -> thieves -> verify) is shared by
the tests below (and by tests/test_art_interop.py: conftest's session fixture `quick_demo`); it
takes about a minute on 2 CPU cores.
"""
import json

import pytest

from honeypotnet.demo import QUICK


@pytest.fixture(scope="module")
def demo(quick_demo):
    return quick_demo


def test_honeypot_keeps_the_victim_useful(demo):
    _, r = demo
    assert r["fidelity"] >= 0.95, r["fidelity"]
    assert r["protected_cta"] >= r["victim_cta"] - 0.03


def test_backdoor_transfers_to_the_thief_and_not_to_an_innocent_model(demo):
    _, r = demo
    stolen, clean = r["verify_stolen"]["asr"], r["verify_clean"]["asr"]
    assert stolen >= clean + 0.3, (stolen, clean)
    # the quick thief (a small CNN, 10 epochs on 3,000 answers) lands near 0.5, on which side depends on the CPU's
    # float kernels (0.495 on one 2-core machine, above 0.5 on another; its clean twin 0.71); the full demo's copy
    # reaches 0.98. What is asserted: a copy far above chance, so the thief was not simply broken by the honeypot.
    assert r["stolen_cta"] >= 0.3, ("the thief must still get a useful copy (10 classes: chance is 0.1)", r["stolen_cta"])


def test_verification_flags_the_stolen_copy_and_clears_the_innocent_one(demo):
    _, r = demo
    assert r["verify_stolen"]["stolen"] and r["verify_stolen"]["p_value"] < 1e-6
    assert not r["verify_clean"]["stolen"]
    assert r["verify_clean"]["asr"] <= r["tau0"]


def test_demo_writes_bundle_and_results(demo):
    out, r = demo
    saved = json.loads((out / "results.json").read_text())
    assert saved["verify_stolen"]["verdict"] == r["verify_stolen"]["verdict"]
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["verification"]["tau0"] == pytest.approx(r["tau0"])
    assert len(manifest["history"]) == QUICK.outer_iters
