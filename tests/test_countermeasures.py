"""A thief's counter-measures against a suspected backdoor, on a small model with a planted patch
backdoor (shapes, 15% of the training images stamped and relabelled): each must do what it says."""
import copy

import pytest
import torch

from honeypotnet.countermeasures import anomaly_index, channel_activations, fine_prune, finetune, neural_cleanse
from honeypotnet.data import load_dataset
from honeypotnet.trigger import Trigger
from honeypotnet.models import create_model, split_classifier
from honeypotnet.ops import to_float
from honeypotnet.purify import PurifiedModel, purify
from honeypotnet.training import FitConfig, accuracy, fit, predict_logits
from honeypotnet.verify import assess

TARGET = 3


@pytest.fixture(scope="module")
def backdoored():
    """(model, trigger, clean test images, labels): a cnn_small with a white 5x5 patch backdoor -> class 3."""
    train = load_dataset("shapes", split="train", n=2000, seed=0)
    test = load_dataset("shapes", split="test", n=1000, seed=0)
    trigger = Trigger.patch(32, 5, seed=3)
    trigger.pattern.copy_(trigger.mask.expand(3, -1, -1))  # +1 on the patch: white after clamping
    x, y = train.images.clone(), train.labels.clone()
    poison = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:300]
    x[poison] = (trigger.stamp(to_float(x[poison])) * 255).round().to(torch.uint8)
    y[poison] = TARGET
    torch.manual_seed(0)
    model = create_model("cnn_small", 10)
    fit(model, x, y, FitConfig(epochs=6, batch_size=64, seed=0), progress=False)
    return model, trigger, test.images, test.labels


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_the_planted_backdoor_works(backdoored):
    model, trigger, images, labels = backdoored
    r = assess(model, trigger, images, labels, TARGET, tau0=0.2)
    assert r["cta"] > 0.85 and r["asr"] > 0.6 and r["stolen"] and r["verdict"].startswith("STOLEN")
    assert set(r) >= {"cta", "asr", "p_value", "verdict", "unstamped_rate", "n"}


def test_finetune_changes_weights_keeps_accuracy_and_leaves_the_input_alone(backdoored):
    model, _, images, labels = backdoored
    before = _state(model)
    acc = accuracy(model, images[500:], labels[500:])
    tuned = finetune(model, images[:500], labels[:500], epochs=2, lr=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = [k for k, v in tuned.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    assert accuracy(tuned, images[500:], labels[500:]) >= acc - 0.05
    with pytest.raises(ValueError):
        finetune(model, images[:10], labels[:9])


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_fine_prune_masks_the_stated_share_of_least_active_channels(backdoored, ratio):
    model, _, images, labels = backdoored
    before = _state(model)
    res = fine_prune(model, images[:500], labels[:500], prune_ratio=ratio, finetune_epochs=0)
    d = res.channels
    assert d == 128 and len(res.pruned) == round(ratio * d) and res.ratio == pytest.approx(round(ratio * d) / d)
    act = torch.tensor(res.activation)
    kept = [c for c in range(d) if c not in res.pruned]
    assert act[res.pruned].max() <= act[kept].min()  # the least active ones
    _, head = split_classifier(res.model)
    assert (head.weight[:, res.pruned] == 0).all() and (head.weight[:, kept] != 0).any(1).all()
    assert set(res.model.state_dict()) == set(model.state_dict())  # a plain model again (mask made permanent)
    # pruning only (no fine-tuning): logits = the original head on the masked features
    feats, orig_head = split_classifier(copy.deepcopy(model).eval())
    x = to_float(images[:64])
    with torch.no_grad():
        f = feats(x)
        f[:, res.pruned] = 0
        assert torch.allclose(res.model(x), orig_head(f), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fine_prune_with_finetuning_keeps_the_mask_and_weakens_the_backdoor(backdoored):
    model, trigger, images, labels = backdoored
    res = fine_prune(model, images[:500], labels[:500], prune_ratio=0.5, finetune_epochs=3, lr=0.01)
    _, head = split_classifier(res.model)
    assert (head.weight[:, res.pruned] == 0).all()  # fine-tuning did not bring pruned channels back
    before = assess(model, trigger, images[500:], labels[500:], TARGET, 0.2)
    after = assess(res.model, trigger, images[500:], labels[500:], TARGET, 0.2)
    assert after["asr"] < before["asr"] and after["cta"] > 0.5, (before["asr"], after["asr"], after["cta"])
    with pytest.raises(ValueError):
        fine_prune(model, images[:100], labels[:100], prune_ratio=1.0)


def test_channel_activations_are_the_mean_penultimate_features(backdoored):
    model, _, images, _ = backdoored
    feats, _ = split_classifier(model)
    with torch.no_grad():
        expected = feats(to_float(images[:300])).mean(0)
    assert torch.allclose(channel_activations(model, images[:300], batch_size=128), expected, atol=1e-5)


@pytest.mark.parametrize("method, kw", [("jpeg", {"quality": 50}), ("blur", {"sigma": 1.0})])
def test_purify_changes_images_and_keeps_shape_and_dtype(backdoored, method, kw):
    _, _, images, _ = backdoored
    u8 = images[:50]
    out = purify(u8, method, **kw)
    assert out.shape == u8.shape and out.dtype == torch.uint8
    assert (out.float() - u8.float()).abs().mean() > 2.0  # measurably changed (in 0..255 units)
    f = to_float(u8)
    out_f = purify(f, method, **kw)
    assert out_f.shape == f.shape and out_f.dtype == torch.float32 and 0 <= out_f.min() and out_f.max() <= 1
    assert (out_f - to_float(out)).abs().max() <= 1.5 / 255  # float and uint8 paths agree
    model = backdoored[0]
    pm = PurifiedModel(model, method, **kw)
    assert torch.allclose(predict_logits(pm, f), predict_logits(model, purify(f, method, **kw)), atol=1e-5)


def test_purify_is_gentle_at_high_quality_and_rejects_bad_settings(backdoored):
    images = backdoored[2][:50]

    def change(**kw):
        return float((purify(images, **kw).float() - images.float()).abs().mean())

    assert change(method="jpeg", quality=95) < 0.8 * change(method="jpeg", quality=30)
    assert change(method="blur", sigma=0.5) < 0.6 * change(method="blur", sigma=1.5)
    for bad in [dict(method="median"), dict(method="jpeg", quality=0), dict(method="blur", sigma=0.0)]:
        with pytest.raises(ValueError):
            purify(images, **bad)


def test_anomaly_index_is_the_mad_statistic():
    ai = anomaly_index([10.0, 11.0, 9.0, 10.5, 2.0])
    # median 10, |dev| = 0, 1, 1, 0.5, 8 -> MAD 1 -> scaled 1.4826
    assert ai.tolist() == pytest.approx([0.0, 1 / 1.4826, 1 / 1.4826, 0.5 / 1.4826, 8 / 1.4826])


def test_neural_cleanse_finds_the_planted_class(backdoored):
    model, _, images, _ = backdoored
    before = _state(model)
    res = neural_cleanse(model, images[:256], steps=80, batch_size=32)
    assert len(res.norms) == 10 and len(res.anomaly_index) == 10
    assert all(torch.isfinite(torch.tensor(res.anomaly_index))) and all(n > 0 for n in res.norms)
    assert min(range(10), key=res.norms.__getitem__) == TARGET, res.norms
    assert res.masks.shape == (10, 1, 32, 32) and res.patterns.shape == (10, 3, 32, 32)
    d = res.to_dict()
    assert d["smallest_class"] == TARGET and d["max_anomaly"] == pytest.approx(res.anomaly_index[TARGET])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
