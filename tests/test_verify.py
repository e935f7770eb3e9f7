"""Verification statistics and the calibrated null."""
import math
from fractions import Fraction
from math import comb

import pytest
import torch
from scipy.stats import binomtest

from honeypotnet.purify import purify
from honeypotnet.trigger import Trigger
from honeypotnet.verify import (binomial_p_value, calibrate_tau0, clopper_pearson_upper, finetuned_references,
                                paired_p_value, purified_references, verify)


class ConstantModel(torch.nn.Module):
    """Answers `target` on images whose mean brightness exceeds a threshold, else class 1."""

    def __init__(self, target=0, threshold=2.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.target, self.threshold = target, threshold

    def forward(self, x):
        hit = x.mean((1, 2, 3)) > self.threshold
        out = torch.zeros(len(x), 10)
        out[:, 1] = 5.0
        out[hit, 1] = 0.0
        out[hit, self.target] = 5.0
        return out + 0 * self.w


def test_binomial_p_value_matches_scipy_binomtest():
    for hits, n, tau in [(30, 100, 0.1), (5, 100, 0.1), (0, 50, 0.2), (100, 100, 0.5)]:
        expected = binomtest(hits, n, tau, alternative="greater").pvalue if hits > 0 else 1.0
        assert binomial_p_value(hits, n, tau) == pytest.approx(expected, rel=1e-9)


def test_clopper_pearson_upper_bounds():
    assert clopper_pearson_upper(0, 1000, 0.999) == pytest.approx(1 - 0.001 ** (1 / 1000), rel=1e-6)
    assert clopper_pearson_upper(10, 10, 0.99) == 1.0
    assert 0.1 < clopper_pearson_upper(10, 100, 0.95) < 0.2


def _data(n=400):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, 8, 8, generator=g) * 100).to(torch.uint8)  # dark: mean < 0.4
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def test_verify_flags_a_model_that_obeys_the_trigger_and_clears_one_that_does_not():
    images, labels = _data()
    trigger = Trigger(torch.full((3, 8, 8), 1.0), torch.ones(1, 8, 8), "patch")  # stamping -> bright
    obeys, ignores = ConstantModel(threshold=0.6), ConstantModel(threshold=2.0)
    r = verify(obeys, trigger, images, labels, target=0, tau0=0.1)
    assert r.stolen and r.asr == 1.0 and r.n == int((labels != 0).sum()) and r.unstamped_rate == 0.0
    assert r.queries == 2 * r.n
    r2 = verify(ignores, trigger, images, labels, target=0, tau0=0.1)
    assert not r2.stolen and r2.asr == 0.0 and r2.p_value == 1.0
    assert "STOLEN" in str(r) and '"verdict"' in r.to_json()


def test_a_model_that_answers_the_target_to_everything_is_not_flagged():
    """ASR 100% above any tau0, but the trigger adds nothing: the same answer without it. The exact test
    against tau0 alone would call this broken model stolen (p ~ 0); the paired sign test keeps it out."""
    images, labels = _data()
    trigger = Trigger(torch.full((3, 8, 8), 1.0), torch.ones(1, 8, 8), "patch")
    always = ConstantModel(threshold=-1.0)  # every image is "bright": the target, stamped or not
    r = verify(always, trigger, images, labels, target=0, tau0=0.1)
    assert r.asr == 1.0 and r.unstamped_rate == 1.0 and r.p_value < 1e-30
    assert r.paired_p_value == 1.0 and not r.stolen and r.verdict == "not flagged"
    assert any("without the trigger too" in w for w in r.warnings) and "trigger adds target" in str(r)
    # the sign test itself: k images gained and none lost give 2^-k; gains offset by losses give nothing
    assert paired_p_value(10, 0) == pytest.approx(2.0**-10) and paired_p_value(0, 0) == 1.0
    assert paired_p_value(5, 5) > 0.5 and paired_p_value(30, 2) == pytest.approx(binomtest(30, 32, 0.5, "greater").pvalue)


def test_verify_rejects_bad_arguments():
    images, labels = _data(20)
    trigger = Trigger.uap(8)
    with pytest.raises(ValueError, match="tau0"):
        verify(ConstantModel(), trigger, images, labels, 0, tau0=0.0)
    with pytest.raises(ValueError, match="alpha"):
        verify(ConstantModel(), trigger, images, labels, 0, tau0=0.1, alpha=2)
    with pytest.raises(ValueError, match="outside the target class"):
        verify(ConstantModel(), trigger, images, torch.zeros(20, dtype=torch.long), 0, tau0=0.1)


def test_calibration_bounds_reference_models_from_above():
    images, labels = _data()
    trigger = Trigger(torch.full((3, 8, 8), 1.0), torch.ones(1, 8, 8), "patch")
    cal = calibrate_tau0([("a", ConstantModel(threshold=2.0)), ("b", ConstantModel(threshold=2.0))], trigger, images, labels, 0)
    assert cal.tau0 == 0.05 and len(cal.reference) == 2  # floor: references never answer the target
    cal = calibrate_tau0([("leaky", ConstantModel(threshold=0.6))], trigger, images, labels, 0)
    assert cal.tau0 == 0.5  # capped: a reference that obeys the trigger makes the trigger useless


def test_finetuned_references_train_copies_and_widen_the_null():
    """Each reference fine-tuned under each setting: new, changed models (the originals untouched);
    calibrating over references + copies never gives a lower tau0 than the references alone."""
    from honeypotnet.data import load_dataset
    from honeypotnet.models import create_model
    from honeypotnet.training import FitConfig, fit

    train = load_dataset("shapes", split="train", n=300)
    torch.manual_seed(0)
    ref = create_model("cnn_small", 10)
    fit(ref, train.images, train.labels, FitConfig(epochs=1), progress=False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    out = finetuned_references([("r", ref)], train.images[:100], train.labels[:100], settings=((1, 0.01), (1, 0.05)))
    assert [n for n, _ in out] == ["r+finetune-e1-lr0.01", "r+finetune-e1-lr0.05"]
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    for _, m in out:
        assert not all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    trig = Trigger.uap(32, 32 / 255)
    trig.pattern.uniform_(-32 / 255, 32 / 255)
    test = load_dataset("shapes", split="test", n=300)
    plain = calibrate_tau0([("r", ref)], trig, test.images, test.labels, 0)
    wide = calibrate_tau0([("r", ref), *out], trig, test.images, test.labels, 0)
    assert wide.tau0 >= plain.tau0 and len(wide.reference) == 3


class SmoothModel(torch.nn.Module):
    """Answers class 0 on images whose mean absolute difference between neighbouring pixels is below
    a threshold (smooth images), else class 1: an innocent model that a blur moves to the target."""

    def __init__(self, threshold):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.threshold = threshold

    @staticmethod
    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))

    def forward(self, x):
        hit = self.roughness(x) < self.threshold
        out = torch.zeros(len(x), 10)
        out[:, 1] = 5.0
        out[hit, 1] = 0.0
        out[hit, 0] = 5.0
        return out + 0 * self.w


def test_purified_references_put_an_innocent_model_that_blurs_its_inputs_in_the_null():
    """An innocent model behind a blur answers the target on ~30% of the images: calibrated on the plain
    reference, the test against tau0 rejects (a false positive of that test); with the reference behind
    each purification in the null it does not. The wrappers share the
    reference's weights and compute model(purify(x))."""
    g = torch.Generator().manual_seed(0)
    amp = 20 + torch.rand(400, 1, 1, 1, generator=g) * 40  # noise of a different strength per image
    images = (128 + amp * torch.randn(400, 3, 16, 16, generator=g)).clamp(0, 255).to(torch.uint8)
    labels = 1 + torch.randint(0, 9, (400,), generator=g)  # no target-class (0) images
    x = images.float() / 255
    blurred = SmoothModel.roughness(purify(x, "blur", sigma=1.0))
    assert SmoothModel.roughness(x).min() > blurred.quantile(0.3)  # without the blur it never answers 0
    ref = SmoothModel(threshold=float(blurred.quantile(0.3)))
    trigger = Trigger.uap(16)  # a zero pattern: stamping leaves the images as they are

    wrapped = purified_references([("ref", ref)])
    assert [n for n, _ in wrapped] == ["ref+jpeg-q75", "ref+jpeg-q50", "ref+blur-0.5", "ref+blur-1.0"]
    blur1 = dict(wrapped)["ref+blur-1.0"]
    assert blur1.model is ref and torch.equal(blur1(x), ref(purify(x, "blur", sigma=1.0)))

    plain = calibrate_tau0([("ref", ref)], trigger, images, labels, 0)
    wide = calibrate_tau0([("ref", ref), *wrapped], trigger, images, labels, 0)
    assert plain.tau0 == 0.05 and 0.2 < dict((r["arch"], r["asr"]) for r in wide.reference)["ref+blur-1.0"] < 0.4
    assert wide.tau0 > 0.4
    suspect = SmoothModel(threshold=ref.threshold)  # an independent model of the same kind, blurring its inputs
    behind_blur = purified_references([("suspect", suspect)], [("blur-1.0", {"method": "blur", "sigma": 1.0})])[0][1]
    r = verify(behind_blur, trigger, images, labels, 0, plain.tau0)
    assert r.p_value < r.alpha  # the test against the plain null rejects: a false positive of that test
    # (the verdict itself is kept out by the paired test here: this zero trigger changes no answer)
    assert not r.stolen and r.paired_p_value == 1.0
    wide_r = verify(behind_blur, trigger, images, labels, 0, wide.tau0)
    assert wide_r.p_value >= wide_r.alpha and not wide_r.stolen

    # with labelled images, a wrapper that costs the reference more than max_drop of accuracy is left out
    ones = torch.ones_like(labels)  # ref answers 1 on every unblurred image: accuracy 100%, ~70% behind blur σ 1
    kept = [n for n, _ in purified_references([("ref", ref)], images=images, labels=ones)]
    assert "ref+blur-1.0" not in kept and "ref+jpeg-q75" in kept
    assert "ref+blur-1.0" in [n for n, _ in purified_references([("ref", ref)], images=images, labels=ones, max_drop=0.5)]
    with pytest.raises(ValueError, match="both images and labels"):
        purified_references([("ref", ref)], images=images)


# ----------------------------------------------------------------------------- borderline verdicts


class IndexedHitsModel(torch.nn.Module):
    """A suspect whose answers are set exactly: it answers the target class on a stamped image whose
    index (written into pixel (0, 0) of the red channel, 0..255) is below `k`, and class 1 on
    everything else. Stamping is seen as the trigger's bottom-right patch being all white."""

    def __init__(self, k: int, target: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.k, self.target = k, target

    def forward(self, x):
        stamped = x[:, :, -2:, -2:].flatten(1).min(1).values > 0.99
        index = (x[:, 0, 0, 0] * 255).round().long()
        hit = stamped & (index < self.k)
        out = torch.zeros(len(x), 10)
        out[:, 1] = 5.0
        out[hit, 1] = 0.0
        out[hit, self.target] = 5.0
        return out + 0 * self.w


def _indexed_data(n: int = 100, n_target: int = 15):
    """`n` non-target images (label 1) indexed 0..n-1, then `n_target` target-class images (label 0)
    indexed 0..n_target-1, which verification must leave out (the suspect would hit them). Black
    elsewhere, so the unstamped images never show the patch."""
    images = torch.zeros(n + n_target, 3, 8, 8, dtype=torch.uint8)
    images[:n, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    images[n:, 0, 0, 0] = torch.arange(n_target, dtype=torch.uint8)
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n_target, dtype=torch.long)])
    return images, labels


def _white_patch_trigger():
    mask = torch.zeros(1, 8, 8)
    mask[:, -2:, -2:] = 1
    return Trigger(torch.ones(3, 8, 8), mask, "patch")  # stamped patch clamps to 1.0; pixel (0, 0) untouched


def _exact_tail(hits: int, n: int, tau0: Fraction) -> Fraction:
    """P(X >= hits), X ~ Binomial(n, tau0), in exact rational arithmetic (independent of scipy)."""
    return sum((Fraction(comb(n, i)) * tau0**i * (1 - tau0) ** (n - i) for i in range(hits, n + 1)), Fraction(0))


# (hits of 100, verdict) at tau0 = 5% and the default alpha (1e-3). The exact one-sided binomial test
# first rejects at 14 hits (p = 4.6e-4; 13 hits give p = 1.5e-3). Every case below has ASR > tau0,
# so a rule "ASR > tau0" flags all of them; a normal approximation flags 12 and 13 hits.
BORDERLINE = [(6, False), (12, False), (13, False), (14, True), (15, True)]


@pytest.mark.parametrize("k, stolen", BORDERLINE, ids=[f"{k}-of-100" for k, _ in BORDERLINE])
def test_verify_borderline_verdicts_follow_the_exact_binomial_test(k, stolen):
    images, labels = _indexed_data()
    r = verify(IndexedHitsModel(k), _white_patch_trigger(), images, labels, target=0, tau0=0.05)
    # the suspect answered exactly as built: k hits out of the 100 non-target images, none unstamped
    assert (r.n, r.hits, r.unstamped_rate, r.queries) == (100, k, 0.0, 200)
    assert r.asr == k / 100 and r.asr > r.tau0 and r.alpha == 1e-3
    exact = _exact_tail(k, 100, Fraction(1, 20))
    assert r.p_value == pytest.approx(float(exact), rel=1e-9)
    assert r.stolen is stolen and r.stolen == (exact < Fraction(1, 1000))
    assert r.verdict == ("STOLEN (backdoor present)" if stolen else "not flagged")


def test_verify_6_of_100_at_tau0_5_percent_is_not_flagged_although_asr_exceeds_tau0():
    """6% observed against a 5% null is what an innocent model shows by chance (p = 0.38)."""
    images, labels = _indexed_data()
    r = verify(IndexedHitsModel(6), _white_patch_trigger(), images, labels, 0, tau0=0.05)
    assert r.hits == 6 and r.asr > r.tau0  # "asr > tau0" would say stolen here
    assert r.p_value == pytest.approx(0.38400087204385897, rel=1e-9)
    assert not r.stolen and "not flagged" in str(r)
    # the verdict turns where alpha passes p = 0.384, whatever the ASR
    assert not verify(IndexedHitsModel(6), _white_patch_trigger(), images, labels, 0, tau0=0.05, alpha=0.3).stolen
    assert verify(IndexedHitsModel(6), _white_patch_trigger(), images, labels, 0, tau0=0.05, alpha=0.4).stolen


def test_verify_15_of_100_at_tau0_5_percent_is_flagged_at_the_default_alpha():
    images, labels = _indexed_data()
    r = verify(IndexedHitsModel(15), _white_patch_trigger(), images, labels, 0, tau0=0.05)
    assert r.hits == 15 and r.alpha == 1e-3
    assert r.p_value == pytest.approx(float(_exact_tail(15, 100, Fraction(1, 20))), rel=1e-9)
    assert r.p_value < 2e-4 and r.stolen and "STOLEN" in str(r)
    # the same 15 hits against a wider null (tau0 8%) are no longer enough
    assert not verify(IndexedHitsModel(15), _white_patch_trigger(), images, labels, 0, tau0=0.08).stolen


def test_normal_approximation_would_flag_what_the_exact_test_clears():
    """Guards the premise of BORDERLINE: at 12 and 13 hits of 100 (tau0 5%) a one-sided z-test, with
    or without continuity correction, is below alpha 1e-3 while the exact tail is above it."""
    from scipy.stats import norm

    sd = (100 * 0.05 * 0.95) ** 0.5
    assert norm.sf((12 - 5) / sd) < 1e-3 < float(_exact_tail(12, 100, Fraction(1, 20)))
    assert norm.sf((13 - 0.5 - 5) / sd) < 1e-3 < float(_exact_tail(13, 100, Fraction(1, 20)))
    assert binomial_p_value(13, 100, 0.05) > 1e-3 > binomial_p_value(14, 100, 0.05)


# ----------------------------------------------------------------------------- the sequential test


class HitEveryNth(torch.nn.Module):
    """A suspect that answers the target class on every `every`-th stamped image (ASR 1/every), class 1 otherwise."""

    def __init__(self, every: int, target: int = 0):
        super().__init__()
        self.every, self.target, self.seen = every, target, 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, 1] = 5.0
        stamped = x[:, :, -2:, -2:].flatten(1).min(1).values > 0.99
        for i in range(len(x)):
            if stamped[i]:
                self.seen += 1
                if self.seen % self.every == 0:
                    out[i, 1], out[i, self.target] = 0.0, 5.0
        return out + 0 * self.w


def test_sequential_test_flags_a_stolen_copy_in_a_handful_of_queries_and_clears_an_innocent_one():
    from honeypotnet.oracles import ModelOracle

    images, labels = _indexed_data(n=200, n_target=15)
    trig = _white_patch_trigger()
    stolen = ModelOracle(HitEveryNth(1))  # ASR 100%
    r = verify(stolen, trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True)
    assert r.stolen and r.sequential["decided"] == "stolen" and r.n == 10 and r.queries == 10  # no unstamped queries
    assert r.p_value <= 1e-6
    innocent = ModelOracle(HitEveryNth(10**6))  # never answers the target
    r = verify(innocent, trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True)
    assert not r.stolen and r.sequential["decided"] == "cleared" and r.n <= 30
    half = ModelOracle(HitEveryNth(5))  # ASR 20%: above tau0, below a stolen copy's: more queries, then a verdict
    r = verify(half, trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True, max_queries=20)
    assert not r.stolen and r.sequential["decided"] == "undecided" and r.n == 20 and r.warnings
    r = verify(ModelOracle(HitEveryNth(1)), trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True, unstamped=True)
    assert r.queries == 2 * r.n and r.clean_accuracy == 1.0


def test_sequential_test_clears_a_weak_stolen_copy_at_the_default_bar_and_keeps_testing_it_at_a_lower_one():
    """A copy obeying the trigger 1 time in 8 (the in-distribution thieves' 8-12%) is cleared against the
    default stolen ASR 0.5, and says so; with stolen_asr just above tau0 it is not cleared, and enough queries
    flag it."""
    from honeypotnet.oracles import ModelOracle

    images, labels = _indexed_data(n=1200, n_target=15)
    trig = _white_patch_trigger()
    r = verify(ModelOracle(HitEveryNth(8)), trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True)
    assert r.sequential["decided"] == "cleared" and r.n <= 100 and "below 50%" in str(r)
    r = verify(ModelOracle(HitEveryNth(8)), trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True,
               stolen_asr=0.1, max_queries=100)
    assert r.sequential["decided"] == "undecided" and not r.stolen
    r = verify(ModelOracle(HitEveryNth(8)), trig, images, labels, 0, 0.05, alpha=1e-6, sequential=True, stolen_asr=0.1)
    assert r.sequential["decided"] == "stolen" and r.stolen and 300 < r.n <= 1185
    with pytest.raises(ValueError, match="stolen_asr"):
        verify(ModelOracle(HitEveryNth(8)), trig, images, labels, 0, 0.05, sequential=True, stolen_asr=0.04)


def test_sequential_test_keeps_its_error_rate_under_optional_stopping():
    """Under H0 (ASR exactly tau0), peeking after every query and stopping at the first crossing flags at most
    alpha of the innocent suspects (Ville's inequality); the fixed-n binomial test peeked at the same way does not."""
    import numpy as np
    from scipy.stats import binom

    from honeypotnet.verify import log_evidence_stolen

    rng = np.random.default_rng(0)
    tau0, alpha, runs, horizon = 0.05, 0.05, 3000, 300
    hits = np.cumsum(rng.random((runs, horizon)) < tau0, axis=1)  # each row: one innocent suspect, query by query
    n = np.arange(1, horizon + 1)[None, :].repeat(runs, 0)
    seq = (log_evidence_stolen(hits, n, tau0) >= math.log(1 / alpha)).any(1).mean()
    naive = (binom.sf(hits - 1, n, tau0) < alpha).any(1).mean()  # the fixed-n test, peeked at after each query
    assert seq <= alpha, seq
    assert naive > 2 * alpha, naive  # why the sequential test is needed


def test_a_trigger_crafted_after_the_fact_on_an_innocent_model_is_refused_by_the_commitment(tmp_path):
    """The false-claim attack: a universal perturbation optimised *now* against an innocent model makes that
    model answer "the target" often, so a bundle built around it flags the innocent model. Only the trigger
    commitment published when the real bundle was written tells them apart: checked against it, the crafted
    bundle is refused, the owner's real one loads."""
    from honeypotnet.bundle import BundleError, load_bundle, save_bundle
    from honeypotnet.config import ProtectConfig
    from honeypotnet.data import load_dataset
    from honeypotnet.head import build_protected
    from honeypotnet.models import create_model
    from honeypotnet.steps import generate_trigger
    from honeypotnet.training import FitConfig, fit

    train = load_dataset("shapes", split="train", n=1200)
    test = load_dataset("shapes", split="test", n=400)
    torch.manual_seed(0)
    innocent = create_model("cnn_small", 10)
    fit(innocent, train.images, train.labels, FitConfig(epochs=3), progress=False)
    innocent.eval()
    protected = build_protected("cnn_small", 10, "linear", 8)
    classes = [str(i) for i in range(10)]
    real = save_bundle(tmp_path / "real", protected, Trigger.uap(32, 24 / 255), arch="cnn_small", target=3,
                       classes=classes, verification={"tau0": 0.05})
    published = load_bundle(real).commitment  # what the owner published at protect time
    cfg = ProtectConfig.preset("spec", target=3, eps=48 / 255, trigger_passes=4)
    crafted = generate_trigger([innocent], Trigger.uap(32, cfg.eps), train.images, cfg, 0)
    fake = save_bundle(tmp_path / "fake", protected, crafted, arch="cnn_small", target=3, classes=classes,
                       verification={"tau0": 0.05})
    b = load_bundle(fake)  # consistent in itself: its own commitment is made after the fact
    without = verify(innocent, b.trigger, test.images, test.labels, b.target, b.tau0)
    assert without.stolen and without.asr > 0.3, without  # the innocent model "obeys" the crafted trigger
    with pytest.raises(BundleError, match="not the published"):
        load_bundle(fake, commitment=published)
    assert load_bundle(real, commitment=published).commitment == published
