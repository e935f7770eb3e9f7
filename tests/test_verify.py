"""Verification statistics and the calibrated null."""
import pytest
import torch
from scipy.stats import binomtest

from honeypotnet.honeypot import Trigger
from honeypotnet.countermeasures import purify
from honeypotnet.verify import (binomial_p_value, calibrate_tau0, clopper_pearson_upper, finetuned_references,
                                purified_references, verify)


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
    """An innocent model behind a blur answers the target on ~30% of the stamped images and never
    without it: calibrated on the plain reference, verification flags it (a false positive); with
    the reference behind each purification in the null it does not. The wrappers share the
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
    assert verify(behind_blur, trigger, images, labels, 0, plain.tau0).stolen  # the false positive
    assert not verify(behind_blur, trigger, images, labels, 0, wide.tau0).stolen

    # with labelled images, a wrapper that costs the reference more than max_drop of accuracy is left out
    ones = torch.ones_like(labels)  # ref answers 1 on every unblurred image: accuracy 100%, ~70% behind blur σ 1
    kept = [n for n, _ in purified_references([("ref", ref)], images=images, labels=ones)]
    assert "ref+blur-1.0" not in kept and "ref+jpeg-q75" in kept
    assert "ref+blur-1.0" in [n for n, _ in purified_references([("ref", ref)], images=images, labels=ones, max_drop=0.5)]
    with pytest.raises(ValueError, match="both images and labels"):
        purified_references([("ref", ref)], images=images)
