"""bench.decoys: the tests' arithmetic on its own, then a run on the quick reproduction (conftest's
`reproduce_quick`, real CIFAR-10 / Tiny ImageNet data of ../shared) with small crafting sizes."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from bench import decoys
from honeypotnet.verify import clopper_pearson_lower


def test_lower_bound_and_p_value_are_exact_binomial_ones():
    lo = clopper_pearson_lower(30, 100, 0.999)
    assert binomtest(30, 100, lo, alternative="greater").pvalue == pytest.approx(0.001, rel=1e-3)
    assert clopper_pearson_lower(0, 100, 0.999) == 0.0
    assert decoys.below_p_value(3, 100, 0.2) == pytest.approx(binomtest(3, 100, 0.2, alternative="less").pvalue)


def test_verdicts_stolen_first_then_evading_then_cleared():
    n, tau0, beta0, pi0, alpha = 1000, 0.05, 0.2, 0.3, 1e-6
    v = decoys.judge(990, 0, n, tau0, beta0, pi0, alpha)
    assert v["verdict"] == "flagged" and v["share"] == 1.0  # stolen wins over evading
    assert decoys.judge(0, 0, n, tau0, beta0, pi0, alpha)["verdict"] == "evading"  # refuses decoys and trigger alike
    assert decoys.judge(30, 400, n, tau0, beta0, pi0, alpha)["verdict"] == "cleared"  # an honest innocent model
    assert decoys.judge(30, 190, n, tau0, beta0, pi0, alpha)["verdict"] == "cleared"  # below beta0, not shown below
    # a stolen copy keeping 5% of its target answers (4,500 of each kind): its ASR passes for innocent, its
    # decoy rate (4.1%) for honest, but not its share of 0.55
    kept = decoys.judge(225, 186, 4500, tau0, 0.035, pi0, alpha)
    assert kept["p_trigger"] > alpha and kept["p_evading"] > alpha and kept["p_share"] < alpha / 2
    assert kept["verdict"] == "flagged"


def test_the_randomised_suspect_passes_only_with_an_innocent_share():
    n, tau0, beta0, pi0, alpha = 4500, 0.05, 0.035, 0.1, 1e-6
    assert decoys.q_pass(0.997, 0.827, n, tau0, beta0, pi0, alpha) is None  # a stolen copy: no q is cleared
    lo, hi = decoys.q_pass(0.01, 0.35, n, tau0, beta0, pi0, alpha)  # an innocent copy: passes unless q is small
    assert hi == 1.0 and 0.05 < lo < 0.2


def test_median3_filters_an_isolated_speck_and_keeps_a_flat_image():
    x = torch.full((1, 3, 8, 8), 0.5)
    assert torch.equal(decoys.median3(x), x)
    x[0, :, 4, 4] = 1.0
    assert torch.allclose(decoys.median3(x), torch.full_like(x, 0.5))


def test_served_answers_per_strategy():
    own = {"pred": np.array([1, 2]), "non_target": np.array([3, 2]), "purified": np.array([1, 1])}
    assert decoys.served("refuse", own, None).tolist() == [3, 2]
    assert decoys.served("switch", own, None) is None
    assert decoys.served("switch", own, {"pred": np.array([0, 0])}).tolist() == [0, 0]


def test_quick_run_judges_every_copy_and_innocent_model(reproduce_quick, shared_dir, cifar10_jpeg_root, tmp_path):
    src = reproduce_quick[0]
    argv = ["--quick", "--reproduce-out", str(src), "--out", str(tmp_path / "out"), "--shared", str(shared_dir),
            "--cifar-root", str(cifar10_jpeg_root), "--passes", "1", "--craft-images", "200", "--no-detector", "--independent"]
    with contextlib.redirect_stdout(io.StringIO()):
        res = decoys.main(argv)
    saved = json.loads((tmp_path / "out" / "decoys.json").read_text())
    assert saved["summary"] == res["summary"] and (tmp_path / "out" / "decoys.md").is_file()
    fl = res["floor"]
    assert [h["left_out"] for h in fl["held_out"]] == ["victim", "cnn", "resnet20"]
    assert 0 <= fl["beta0"] <= 0.5 * min(h["rate"] for h in fl["held_out"]) + 1e-12
    assert 0.1 <= fl["pi0"] <= 0.5 and fl["pi0"] >= 2 * max(h["share"] for h in fl["held_out"]) - 1e-12 or fl["pi0"] == 0.5
    rows = res["copies"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"stolen", "clean twin"}  # --independent with no model: none
    for r in rows:
        assert set(r["strategies"]) == set(decoys.STRATEGIES) - ({"switch"} if r["backup"] is None else set())
        h, ref = r["strategies"]["honest"], r["strategies"]["refuse"]
        assert ref["asr"] == 0 and ref["decoy_rate"] == 0  # refusing never answers the target
        if r["kind"] == "stolen":
            assert r["backup"] is not None and r["strategies"]["switch"]["asr"] <= h["asr"]
    stolen_probs = [r for r in rows if r["kind"] == "stolen" and r["output"] == "probs" and r["pool"] == "tin"]
    assert stolen_probs and all(r["strategies"]["honest"]["verdict"] == "flagged" for r in stolen_probs)


def test_a_decoy_takes_the_triggers_amplitudes_and_keeps_its_signs_and_ranks():
    from honeypotnet.trigger import Trigger

    g = torch.Generator().manual_seed(0)
    trig, dec = Trigger.uap(8, 16 / 255), Trigger.uap(8, 16 / 255)
    trig.pattern.copy_((torch.rand(3, 8, 8, generator=g) * 2 - 1).sign() * 16 / 255)
    trig.pattern[0, :2] *= 0.5
    dec.pattern.copy_((torch.rand(3, 8, 8, generator=g) * 2 - 1) * 10 / 255)
    before = dec.pattern.clone()
    decoys.match_amplitude(dec, trig)
    assert torch.equal(dec.pattern.abs().flatten().sort().values, trig.pattern.abs().flatten().sort().values)
    assert torch.equal(dec.pattern.sign(), before.sign())
    smallest = before.abs().flatten().argsort()[:16]  # the trigger's 16 half-amplitude pixels go to these
    assert torch.allclose(dec.pattern.flatten()[smallest].abs(), torch.full((16,), 8 / 255))


def test_a_smooth_decoy_is_made_as_rough_as_the_trigger_by_sign_flips_alone():
    from honeypotnet.trigger import Trigger

    g = torch.Generator().manual_seed(0)
    trig, dec = Trigger.uap(32, 24 / 255), Trigger.uap(32, 24 / 255)
    trig.pattern.copy_(torch.randn(3, 32, 32, generator=g).sign() * 24 / 255)  # iid signs: as rough as it gets
    smooth = torch.nn.functional.avg_pool2d(torch.randn(1, 3, 36, 36, generator=g), 5, 1)[0]
    dec.pattern.copy_(smooth.sign() * 24 / 255)
    before = dec.pattern.clone()
    assert decoys.roughness(before) < 0.6 * decoys.roughness(trig.pattern)
    decoys.match_roughness(dec, trig, seed=0)
    assert decoys.roughness(dec.pattern) == pytest.approx(decoys.roughness(trig.pattern), rel=0.03)
    assert torch.equal(dec.pattern.abs(), before.abs())  # amplitudes untouched, some signs flipped
    assert 0 < (dec.pattern != before).float().mean() <= 0.5
    rough = dec.pattern.clone()
    assert torch.equal(decoys.match_roughness(dec, Trigger.uap(32, 24 / 255), seed=0).pattern, rough)  # rough enough
