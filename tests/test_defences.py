"""honeypotnet.defences on the embedded data: every defence does what it claims.

One small victim (cnn_small, 3,000 shapes images, 6 epochs: ~98% test accuracy, ~6 s on one
thread) is shared by the tests; the whole file runs in well under a minute on one CPU thread.
"""
from __future__ import annotations

import math

import pytest
import torch

from honeypotnet.attacks import random_extraction
from honeypotnet.data import load_dataset
from honeypotnet.defences import (
    DAWN, MAD, AdaptiveMisinformation, DefendedOracle, GaussianNoise, LabelOnly, NoDefence, ReverseSigmoid, Rounding,
    TopK, dawn_verify, mad_jacobian, make_defence, misinformation_loss, train_misinformation_model,
)
from honeypotnet.head import HoneypotLayer, head_attribute, install_honeypot
from honeypotnet.models import create_model, split_classifier
from honeypotnet.oracles import ModelOracle, OutputMode
from honeypotnet.ops import to_float
from honeypotnet.training import FitConfig, accuracy, fit


@pytest.fixture(scope="module")
def world():
    train = load_dataset("shapes", split="train", n=3000, seed=0)
    test = load_dataset("shapes", split="test", n=500, seed=0)
    pool = load_dataset("shapes", split="pool", n=1000, seed=0)
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10)
    fit(victim, train.images, train.labels, FitConfig(epochs=6, seed=0), progress=False)
    assert accuracy(victim, test.images, test.labels) > 0.9
    with torch.inference_mode():
        p_test = torch.softmax(victim(to_float(test.images)), 1)
        p_pool = torch.softmax(victim(to_float(pool.images)), 1)
    return {"train": train, "test": test, "pool": pool, "victim": victim, "p_test": p_test, "p_pool": p_pool}


def _on_simplex(y: torch.Tensor, atol: float = 1e-5) -> bool:
    return bool((y >= -atol).all() and torch.allclose(y.sum(1), torch.ones(len(y)), atol=atol))


# ----------------------------------------------------------------------------- output-only defences


def test_topk_keeps_k_renormalised_probabilities(world):
    y = world["p_test"]
    for k in (1, 3):
        out = TopK(k)(y)
        assert ((out > 0).sum(1) <= k).all() and _on_simplex(out)
        assert torch.equal(out.argmax(1), y.argmax(1))
        vals, idx = y.topk(k, 1)
        assert torch.allclose(out.gather(1, idx), vals / vals.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(TopK(10)(y), y / y.sum(1, keepdim=True))


def test_rounding_and_label_only(world):
    y = world["p_test"]
    r = Rounding(1)(y)
    assert torch.allclose(r * 10, (r * 10).round(), atol=1e-5) and (r - y).abs().max() <= 0.05 + 1e-6
    assert not torch.allclose(r, y)
    lab = LabelOnly()(y)
    assert ((lab == 0) | (lab == 1)).all() and torch.equal(lab.sum(1), torch.ones(len(y)))
    assert torch.equal(lab.argmax(1), y.argmax(1))
    assert torch.equal(NoDefence()(y), y)


def test_gaussian_noise_is_on_the_simplex_seeded_and_fixed_per_image(world):
    y, x = world["p_pool"][:200], world["pool"].images[:200]
    out = GaussianNoise(0.05, seed=1)(y, x)
    assert _on_simplex(out) and (out - y).abs().sum(1).mean() > 0.05
    again = GaussianNoise(0.05, seed=1)(y[50:], x[50:])  # another instance, another batching
    assert torch.allclose(again, out[50:], atol=1e-6)
    assert not torch.allclose(GaussianNoise(0.05, seed=2)(y, x), out)
    raw = GaussianNoise(0.5, renormalise=False, seed=1)(y, x)
    assert raw.min() >= 0 and raw.max() <= 1 and not torch.allclose(raw.sum(1), torch.ones(len(y)), atol=1e-3)
    s1, s2 = GaussianNoise(0.1, seed=3), GaussianNoise(0.1, seed=3)  # without images: a seeded stream
    assert torch.equal(s1(y), s2(y))


def test_reverse_sigmoid_changes_probabilities_but_not_the_label(world):
    y = world["p_test"]
    out = ReverseSigmoid(beta=0.3, gamma=0.2)(y)
    assert _on_simplex(out)
    assert (out - y).abs().sum(1).mean() > 0.1  # a real change ...
    assert torch.equal(out.argmax(1), y.argmax(1))  # ... that keeps every label
    # the formula, by hand, on one vector: y' ∝ max(0, y - beta (sigmoid(gamma logit y) - 1/2))
    v = torch.tensor([[0.7, 0.2, 0.1]])
    r = 0.3 * (torch.sigmoid(0.2 * torch.log(v / (1 - v))) - 0.5)
    assert torch.allclose(ReverseSigmoid(0.3, 0.2, keep_argmax=False)(v), (v - r) / (v - r).sum(), atol=1e-6)
    # beta*gamma > 1: the bare formula flips close calls; keep_argmax restores the model's label
    close = torch.tensor([[0.50, 0.49, 0.01]])
    assert ReverseSigmoid(1.0, 2.0, keep_argmax=False)(close).argmax(1).item() == 1
    kept = ReverseSigmoid(1.0, 2.0)(close)
    assert kept.argmax(1).item() == 0 and _on_simplex(kept)


# ----------------------------------------------------------------------------- MAD


def test_mad_objective_matches_the_autograd_jacobian(world):
    torch.manual_seed(3)
    surrogate = create_model("cnn_small", 10).eval()
    img = world["test"].images[7]
    G = mad_jacobian(surrogate, img).double()  # (K, K*d)
    assert G.shape[0] == 10 and G.shape[1] == 10 * split_classifier(surrogate)[1].in_features
    y = world["p_test"][7].double()
    with torch.inference_mode():
        p = torch.softmax(surrogate(to_float(img[None])).double(), 1)
    cands = torch.eye(10, dtype=torch.float64)
    a = G.T @ y / (G.T @ y).norm()
    explicit = torch.stack([((G.T @ c / (G.T @ c).norm() - a) ** 2).sum() for c in cands])
    closed = MAD(1.0, surrogate)._objective(cands[None], y[None], p)[0]
    assert torch.allclose(explicit, closed, atol=1e-6)


def test_mad_argmax_keeps_the_label_within_epsilon_and_mad_changes_more(world):
    torch.manual_seed(0)
    surrogate = create_model("cnn_small", 10)
    y, x = world["p_pool"][:300], world["pool"].images[:300]
    eps = 1.0
    arg = MAD(eps, surrogate, argmax_preserving=True)(y, x)
    plain = MAD(eps, surrogate)(y, x)
    for out in (arg, plain):
        assert _on_simplex(out)
        assert (out - y).abs().sum(1).max() <= eps + 1e-5
        assert (out - y).abs().sum(1).mean() > 0.3  # the budget is used
    assert torch.equal(arg.argmax(1), y.argmax(1))
    flipped = (plain.argmax(1) != y.argmax(1)).float().mean()
    assert flipped > 0.5, flipped
    assert torch.allclose(MAD(0.0, surrogate)(y, x), y, atol=1e-6)
    # the chosen target maximises the objective over all 2^(K-1) argmax-preserving vertex sets
    m = MAD(eps, surrogate, argmax_preserving=True)
    p = m.surrogate_probs(x[:5])
    yd = y[:5].double()
    ystar = m.target(yd, p)
    chosen = m._objective(ystar[:, None], yd, p)[:, 0]
    for i in range(5):
        t = int(yd[i].argmax())
        sets = m._vertex_sets(10)
        cand = torch.zeros(len(sets), 10, dtype=torch.float64)
        cand[:, [j for j in range(10) if j != t]] = sets
        cand[:, t] = 1 + 1e-5
        cand = cand / cand.sum(1, keepdim=True)
        assert chosen[i] >= m._objective(cand[None], yd[i : i + 1], p[i : i + 1]).max() - 1e-9


def test_mad_greedy_search_for_many_classes_keeps_the_label():
    torch.manual_seed(0)
    k = 20
    y = torch.softmax(3 * torch.randn(16, k), 1)
    surrogate = create_model("cnn_small", k)
    out = MAD(0.8, surrogate, argmax_preserving=True)(y, torch.rand(16, 3, 32, 32))
    assert torch.equal(out.argmax(1), y.argmax(1)) and (out - y).abs().sum(1).max() <= 0.8 + 1e-5 and _on_simplex(out)


# ----------------------------------------------------------------------------- Adaptive Misinformation


def test_adaptive_misinformation_changes_ood_answers_only(world):
    train, test, pool = world["train"], world["test"], world["pool"]
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    labels = torch.tensor([0, 0])
    expect = -torch.log(1 - torch.softmax(logits, 1)[:, 0]).mean()
    assert torch.allclose(misinformation_loss(logits, labels), expect, atol=1e-6)

    mis = train_misinformation_model("cnn_small", 10, train.images[:2000], train.labels[:2000], FitConfig(epochs=3, lr=0.5))
    with torch.inference_mode():
        p_mis = torch.softmax(mis(to_float(test.images)), 1)
    assert p_mis[torch.arange(len(test)), test.labels].mean() < 0.06  # it learnt to avoid the correct class
    assert (p_mis.argmax(1) == test.labels).float().mean() < 0.05  # (chance: 0.1)

    am = AdaptiveMisinformation(tau=0.6, nu=1000.0, misinformation_model=mis)
    for y, x in ((world["p_test"], test.images), (world["p_pool"], pool.images)):
        out = am(y, x)
        assert _on_simplex(out)
        conf = y.max(1).values
        sure, unsure = conf > 0.65, conf < 0.55
        assert sure.any() and unsure.any()
        assert (out[sure] - y[sure]).abs().sum(1).max() < 1e-6  # confident (in-distribution) answers untouched
        changed = (out[unsure].argmax(1) != y[unsure].argmax(1)).float().mean()
        assert changed > 0.8, changed  # low-confidence (OOD) answers: misinformation
    assert (am.last_alpha >= 0).all() and (am.last_alpha <= 1).all()


# ----------------------------------------------------------------------------- DAWN


def test_dawn_watermarks_a_keyed_share_deterministically(world):
    y, x = world["p_pool"], world["pool"].images
    d = DAWN(0.2, key="owner secret")
    out = d(y, x)
    wm = (out.argmax(1) != y.argmax(1))
    assert abs(wm.float().mean().item() - 0.2) < 0.05
    assert _on_simplex(out)
    assert len(d.watermark_labels) == int(wm.sum()) and d.served == len(y)
    assert (d.watermark_labels != y.argmax(1)[wm]).all()
    # same key, another instance, other batching: the same answers; another key: another selection
    again = torch.cat([DAWN(0.2, key="owner secret")(y[i : i + 64], x[i : i + 64]) for i in range(0, len(y), 64)])
    assert torch.equal(again, out)
    other = DAWN(0.2, key="another key")(y, x)
    assert not torch.equal(other.argmax(1) != y.argmax(1), wm)
    # the same image asked twice is recorded once
    d(y[:10], x[:10])
    assert len(d.watermark_labels) == int(wm.sum())
    assert torch.equal(DAWN(0.0, key="k")(y, x), y)


def test_dawn_verify_flags_a_thief_of_its_answers_and_not_an_independent_model(world):
    victim, pool = world["victim"], world["pool"]
    dawn = DAWN(0.1, key="owner secret")
    api = DefendedOracle(victim, dawn, output=OutputMode("label"))
    cfg = FitConfig(epochs=30, augment=False, seed=0)  # long enough to memorise the watermarks
    thief = random_extraction(api, pool.images, 1000, "cnn_small", 10, cfg, seed=0)
    assert thief.queries == 1000 and len(dawn.watermark_labels) > 50
    clean = random_extraction(ModelOracle(victim, OutputMode("label")), pool.images, 1000, "cnn_small", 10, cfg, seed=0)
    imgs, labs = dawn.watermark_images, dawn.watermark_labels
    suspect = ModelOracle(thief.substitute)
    v_thief = dawn_verify(suspect, imgs, labs)
    assert suspect.queries == len(labs) == v_thief.n  # one query per watermarked image
    v_clean = dawn_verify(clean.substitute, imgs, labs)
    assert v_thief.null_rate == pytest.approx(1 / 9)
    assert v_thief.stolen and v_thief.p_value < 1e-6 and v_thief.agreement_rate > 0.5, v_thief
    assert not v_clean.stolen and v_clean.agreement_rate <= 1 / 9 + 0.05, v_clean
    assert v_thief.to_dict()["verdict"].startswith("STOLEN")
    with pytest.raises(ValueError, match="no watermarked"):
        dawn_verify(clean.substitute, imgs[:0], labs[:0])
    with pytest.raises(ValueError, match="one watermark label"):
        dawn_verify(clean.substitute, imgs, labs[:-1])


# ----------------------------------------------------------------------------- composition and counting


def _protected(victim):
    _, head = split_classifier(victim)
    layer = HoneypotLayer.from_linear(head)
    torch.manual_seed(1)
    torch.nn.init.normal_(layer.mlp[2].weight, std=0.5)  # a head that answers differently from the victim
    model = install_honeypot(victim, layer)
    assert head_attribute(model)
    return model


def test_topk_and_rounding_compose_with_a_honeypot_model(world):
    protected = _protected(world["victim"])
    x = to_float(world["test"].images[:64])
    with torch.inference_mode():
        base = torch.softmax(protected(x), 1)
    assert not torch.allclose(base, world["p_test"][:64], atol=1e-3)
    api = DefendedOracle(protected, [Rounding(2), TopK(2)])
    out = api(x)
    assert torch.allclose(out, TopK(2)(Rounding(2)(base)), atol=1e-6)
    assert ((out > 0).sum(1) <= 2).all()
    nested = DefendedOracle(DefendedOracle(protected, Rounding(2)), TopK(2))
    assert torch.allclose(nested(x), out, atol=1e-6)
    assert api.describe() == "ModelOracle -> rounding(decimals=2) -> topk(k=2)"
    labels = DefendedOracle(protected, TopK(3), output=OutputMode("label"))(x)  # the outer output mode applies last
    assert torch.equal(labels.argmax(1), base.argmax(1)) and torch.equal(labels.sum(1), torch.ones(64))


def test_defended_oracle_counts_one_query_per_image_and_enforces_its_budget(world):
    inner = ModelOracle(world["victim"])
    api = DefendedOracle(inner, [ReverseSigmoid(0.3, 0.2), TopK(3)], budget=60)
    res = random_extraction(api, world["pool"].images, 50, "cnn_small", 10, FitConfig(epochs=1), seed=0)
    assert res.queries == 50 and api.queries == 50 and inner.queries == 50  # each oracle counts each image once
    with pytest.raises(RuntimeError, match="budget"):
        api(torch.rand(11, 3, 32, 32))
    assert api.queries == 50
    with pytest.raises(ValueError, match="shape"):
        api(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        api(torch.full((1, 3, 32, 32), float("nan")))
    assert api.queries == 50 and api.num_classes == 10
    with pytest.raises(TypeError):
        DefendedOracle("not a model", TopK(1))


# ----------------------------------------------------------------------------- bad input


def test_registry_builds_every_defence_and_rejects_unknown_names_and_parameters(world):
    sur = create_model("cnn_small", 10)
    built = {
        "none": make_defence("none"), "topk": make_defence("topk", k=3), "rounding": make_defence("rounding", decimals=1),
        "label": make_defence("label"), "gaussian": make_defence("noise", sigma=0.1),
        "reverse_sigmoid": make_defence("reverse-sigmoid", beta=0.5, gamma=0.1),
        "mad": make_defence("mad", epsilon=0.5, surrogate=sur), "mad_argmax": make_defence("mad_argmax", epsilon=0.5, surrogate=sur),
        "am": make_defence("am", tau=0.5, misinformation_model=sur), "dawn": make_defence("dawn", rate=0.05, key="k"),
    }
    assert isinstance(built["mad_argmax"], MAD) and built["mad_argmax"].argmax_preserving
    assert built["mad_argmax"].describe() == "mad_argmax(epsilon=0.5)"
    y, x = world["p_test"][:8], world["test"].images[:8]
    for name, d in built.items():
        out = d(y, x)
        assert out.shape == y.shape and torch.isfinite(out).all(), name
        if d.preserves_argmax:
            assert torch.equal(out.argmax(1), y.argmax(1)), name
    with pytest.raises(ValueError, match="unknown defence"):
        make_defence("obfuscate")
    with pytest.raises(ValueError, match="no parameter"):
        make_defence("topk", kk=3)
    with pytest.raises(ValueError, match="no parameter"):
        make_defence("mad_argmax", epsilon=1.0, surrogate=sur, argmax_preserving=False)


@pytest.mark.parametrize("build", [
    lambda s: TopK(0), lambda s: TopK(1.5), lambda s: Rounding(-1), lambda s: GaussianNoise(-0.1),
    lambda s: GaussianNoise(math.nan), lambda s: ReverseSigmoid(0.0, 0.2), lambda s: ReverseSigmoid(0.3, -1.0),
    lambda s: MAD(2.5, s), lambda s: MAD(-0.1, s), lambda s: MAD(1.0, None), lambda s: MAD(1.0, s, objective="cosine"),
    lambda s: AdaptiveMisinformation(0.0, 10.0, s), lambda s: AdaptiveMisinformation(0.5, 0.0, s),
    lambda s: AdaptiveMisinformation(0.5, 10.0, None), lambda s: DAWN(1.5, "k"), lambda s: DAWN(0.1, ""),
])
def test_bad_parameters_raise_value_error(build):
    with pytest.raises(ValueError):
        build(create_model("cnn_small", 10))


def test_defences_reject_bad_probabilities_and_missing_images(world):
    y = world["p_test"][:4]
    with pytest.raises(ValueError, match="shape"):
        TopK(1)(y[0])
    with pytest.raises(ValueError, match="NaN"):
        TopK(1)(torch.full((2, 10), float("nan")))
    with pytest.raises(ValueError, match="non-negative"):
        Rounding(2)(-y)
    with pytest.raises(ValueError, match="needs the queried images"):
        DAWN(0.1, "k")(y)
    with pytest.raises(ValueError, match="images must have shape"):
        DAWN(0.1, "k")(y, world["test"].images[:3])
    with pytest.raises(ValueError, match="at least 2"):
        train_misinformation_model("cnn_small", 10, world["train"].images[:1], world["train"].labels[:1])
