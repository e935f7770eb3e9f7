"""head.owner_lean (the owner images' soft answers lean toward the target along the trigger's feature
shift, top-1 kept) and the benign-user cost figures (honeypotnet.metrics) that say what it costs."""
import math
from functools import partial

import pytest
import torch

from honeypotnet.config import ProtectConfig
from honeypotnet.metrics import benign_costs, calibration_error, mean_kl
from honeypotnet.protect import protect
from honeypotnet.head import HoneypotLayer
from honeypotnet.steps import _answer_gain, _clean_term, _target_gain, _mixed_norm, lean_toward_target

SPEC = partial(ProtectConfig.preset, "spec")


def _features(n_shadow=50, n_owner=200, d=16, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n_shadow + n_owner, d, generator=g)
    shift = torch.zeros(d)
    shift[0] = 2.0  # the trigger moves every image along feature 0
    logits = 3 * torch.randn(n_shadow + n_owner, k, generator=g)
    return clean, clean + shift, logits


def test_lean_keeps_top1_and_raises_the_target_with_alignment():
    clean, stamped, logits = _features()
    n_shadow, target = 50, 2
    lean = lean_toward_target(logits, clean, stamped, n_shadow, target, 1.0)
    p, q = torch.softmax(logits, 1), torch.softmax(lean, 1)
    assert torch.allclose(q.sum(1), torch.ones(len(q)), atol=1e-5)
    assert torch.equal(lean[:n_shadow], logits[:n_shadow])  # shadow rows untouched
    assert torch.equal(q.argmax(1), p.argmax(1))  # top-1 kept on every row
    own = slice(n_shadow, None)
    moved = q[own, target] - p[own, target]
    assert (moved >= -1e-6).all() and moved.max() > 0.1
    was_target = p[own].argmax(1) == target
    assert torch.allclose(q[own][was_target], p[own][was_target], atol=1e-6)  # rows already answering the target
    # images further along the shift lean more; those at or below the mean not at all
    along = clean[own, 0]
    low = along <= along.mean()
    assert moved[low & ~was_target].abs().max() < 1e-6
    top_tenth = along >= along.quantile(0.9)
    assert moved[top_tenth & ~was_target].mean() > moved[~low & ~top_tenth & ~was_target].mean()


def test_flip_swaps_the_top_class_and_a_runner_up_target_on_aligned_rows_only():
    clean, stamped, logits = _features()
    n_shadow, target, r = 50, 2, 0.3
    out = lean_toward_target(logits, clean, stamped, n_shadow, target, 0.0, flip=r)
    p, q = torch.softmax(logits, 1), torch.softmax(out, 1)
    assert torch.equal(out[:n_shadow], logits[:n_shadow])  # shadow rows untouched
    own = slice(n_shadow, None)
    po, qo = p[own], q[own]
    top2 = po.topk(2, 1)
    aligned = clean[own, 0] > clean[own, 0].mean()
    want = (top2.indices[:, 1] == target) & (po[:, target] >= r * top2.values[:, 0]) & aligned
    assert want.sum() >= 3 and (~want).sum() > 100  # the toy data has rows of both kinds
    assert torch.equal(qo.argmax(1) == target, (po.argmax(1) == target) | want)
    # a flipped row is the victim's distribution with the top class and the target swapped
    sw = po[want].clone()
    sw[:, target], sw[torch.arange(len(sw)), top2.indices[want, 0]] = top2.values[want, 0], po[want, target]
    assert torch.allclose(qo[want], sw, atol=1e-5)
    assert torch.allclose(qo[~want], po[~want], atol=1e-5)  # without owner_lean the other rows are the victim's
    # a runner-up target below r times the top class, or a row at or below the mean along u, is not flipped
    weak = (top2.indices[:, 1] == target) & (po[:, target] < r * top2.values[:, 0]) & aligned
    assert weak.any() and (qo[weak].argmax(1) != target).all()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="owner_flip"):
            SPEC(owner_flip=bad)
    assert ProtectConfig().owner_flip == 0  # the default does not flip


def test_lean_strength_zero_or_no_owner_rows_is_the_identity_and_the_option_is_checked():
    clean, stamped, logits = _features()
    assert torch.equal(lean_toward_target(logits, clean, stamped, 50, 2, 0.0), logits)
    assert torch.equal(lean_toward_target(logits[:50], clean[:50], stamped[:50], 50, 2, 1.0), logits[:50])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="owner_lean"):
            SPEC(owner_lean=bad)
    assert ProtectConfig().owner_lean == 0 and ProtectConfig.preset("spec").owner_lean == 0  # presets unchanged


def test_owner_lean_changes_the_honeypot_and_keeps_it_deterministic(toy_victim):
    victim, shadow, owner = toy_victim
    runs = {}
    for lean in (0.0, 1.0, 1.0):
        cfg = SPEC(outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1, honeypot_steps=20, owner_lean=lean)
        res = protect(victim, shadow, owner.images, cfg, progress=False)
        runs.setdefault(lean, []).append(torch.cat([p.flatten() for p in res.model.parameters()]))
    assert torch.equal(runs[1.0][0], runs[1.0][1])
    assert not torch.equal(runs[0.0][0], runs[1.0][0])


def _linear_victim():
    """A random last layer (16 features, 5 classes), 300 features, its logits there and an untouched honeypot layer
    of it -> (generator, features, logits, layer)."""
    g = torch.Generator().manual_seed(0)
    h = torch.nn.Linear(16, 5)
    feats = torch.randn(300, 16, generator=g)
    with torch.no_grad():
        logits = h(feats)
    return g, feats, logits, HoneypotLayer.from_linear(h)


def test_mixed_features_reference_is_the_victims_own_answer_there():
    """head.mix_norm: between two owner images' features the reference is the same mix of the victim's logits, which
    is exactly the victim's last layer on the mixed features (it is affine): the term is 0 for the untouched head
    (H = h) and positive once the head moves; the option is checked and hash-neutral at 0."""
    g, feats, logits, layer = _linear_victim()
    cfg = SPEC(mix_norm=1.0, honeypot_batch=64)
    with torch.no_grad():
        term = _mixed_norm(layer, feats, logits, 100, cfg, torch.Generator().manual_seed(1), "cpu")
    assert abs(float(term)) < 1e-6  # (float rounding can leave -1e-9)
    with torch.no_grad():
        layer.mlp[2].weight.normal_(0, 0.5, generator=g)
    assert float(_mixed_norm(layer, feats, logits, 100, cfg, torch.Generator().manual_seed(1), "cpu").detach()) > 1e-3
    # no owner rows (every row a shadow image): the pairs are drawn from all of them
    assert float(_mixed_norm(layer, feats, logits, 300, cfg, torch.Generator().manual_seed(1), "cpu").detach()) > 1e-3
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mix_norm"):
            SPEC(mix_norm=bad)
    assert ProtectConfig().mix_norm == 0 and ProtectConfig().hash() == ProtectConfig(mix_norm=0.0).hash() != \
        ProtectConfig(mix_norm=1.0).hash()


def test_logit_holds_count_only_gains_over_the_victims_gap():
    """head.target_hold (head.answer_hold: the same for any class): relu of how much the target's logit gained on the reference's top-1, beyond the reference's
    own gap; 0 where the head keeps the gap or widens it, and where the reference's answer is the target. The KL
    barely sees a gain of 8 logits on a sure row, the hold sees all of it; checked and hash-neutral at 0."""
    ref = torch.tensor([[10.0, 0.0, -5.0], [0.0, 10.0, -5.0], [1.0, 0.0, 0.5]])  # target 2; the last row's answer 0
    out = ref.clone()
    assert torch.equal(_target_gain(out, ref, 2), torch.zeros(3))
    out[0, 2] += 8.0  # row 0: the target gains 8 on the answer (still far below it: the KL hardly moves)
    out[1, 1] += 3.0  # row 1: the answer gains; no target gain
    assert torch.allclose(_target_gain(out, ref, 2), torch.tensor([8.0, 0.0, 0.0]))
    assert float(_clean_term(out[:1], ref[:1], "kl")) < 0.01
    # head.answer_hold: the largest gain of any class on the answer (row 0: the target's 8; row 1: none)
    assert torch.allclose(_answer_gain(out, ref), torch.tensor([8.0, 0.0, 0.0]))
    out[1, 0] += 12.0  # row 1: class 0 up 12, the answer up 3 (above): a gain of 9 on it; class 2 nothing
    assert torch.allclose(_answer_gain(out, ref), torch.tensor([8.0, 9.0, 0.0]))
    assert float(_target_gain(out, ref, 2)[1]) == 0  # not the target: only the answer hold sees it
    ref[2, 2] = 2.0  # the reference answers the target: nothing held there
    assert float(_target_gain(out, ref, 2)[2]) == 0
    # in the honeypot's loop: the hold makes the loss larger once the head raises the target on owner rows
    g, feats, logits, layer = _linear_victim()
    with torch.no_grad():
        layer.linear.bias[0] += 6.0  # the target's logit up everywhere
    cfg = SPEC(mix_norm=1.0, honeypot_batch=64, target=0)
    plain = float(_mixed_norm(layer, feats, logits, 100, cfg, torch.Generator().manual_seed(1), "cpu").detach())
    held = float(_mixed_norm(layer, feats, logits, 100, SPEC(mix_norm=1.0, honeypot_batch=64, target=0, target_hold=1.0),
                             torch.Generator().manual_seed(1), "cpu").detach())
    assert held > plain + 3  # most rows: a gain of 6, less where the answer is the target
    for name in ("target_hold", "answer_hold"):
        for bad in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                SPEC(**{name: bad})
        assert getattr(ProtectConfig(), name) == 0 and ProtectConfig().hash() == ProtectConfig(**{name: 0.0}).hash() != \
            ProtectConfig(**{name: 1.0}).hash()


def test_benign_costs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g)
    labels = logits.argmax(1)
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn(500, 4, generator=g)
    assert mean_kl(logits, other) > 0.05
    # always right: the error is 1 - mean confidence; scaled up to certainty it vanishes
    conf = torch.softmax(logits, 1).max(1).values.mean()
    assert calibration_error(logits, labels) == pytest.approx(float(1 - conf), abs=1e-5)
    assert calibration_error(1000 * logits, labels) < 1e-2 * calibration_error(logits, labels)
    c = benign_costs(logits, other, labels)
    assert set(c) == {"agreement", "kl", "ece_victim", "ece_protected"} and 0 < c["agreement"] < 1
    assert all(math.isfinite(v) for v in c.values())
    with pytest.raises(ValueError):
        benign_costs(logits, other[:10], labels)
