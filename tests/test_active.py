"""Active extraction (ActiveThief strategies) on the embedded data: each strategy must pick what it
claims to pick (not a random draw), pay exactly one query per image, and resume without paying twice.

The selection properties are measured here independently of the code under test: entropy from the
substitute's logits, coverage radius from its features, the logit margin for DFAL."""
import json

import pytest
import torch

from honeypotnet.active import (STRATEGIES, deepfool_distances, extract, kcenter_greedy, round_sizes, select)
from honeypotnet.attacks import random_extraction
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model, split_classifier
from honeypotnet.oracles import ModelOracle
from honeypotnet.ops import to_float
from honeypotnet.training import FitConfig, fit, predict_logits

BUDGET, INITIAL, ROUNDS = 600, 200, 2
FAST = FitConfig(epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def world():
    """A victim (cnn_small, ~97% on shapes), the thief's pool, and a substitute trained on 300 answers."""
    torch.manual_seed(0)
    train = load_dataset("shapes", split="train", n=2000, seed=0)
    victim = create_model("cnn_small", 10)
    fit(victim, train.images, train.labels, FitConfig(epochs=8, seed=0), progress=False)
    pool = load_dataset("shapes", split="pool", n=2000, seed=0).images
    bought = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))[:300]
    answers = ModelOracle(victim)(to_float(pool[bought]))
    torch.manual_seed(1)
    sub = create_model("cnn_small", 10)
    fit(sub, pool[bought], answers, FitConfig(epochs=10, batch_size=64, seed=1), progress=False)
    return victim, pool, sub, bought


def _free(pool, bought):
    mask = torch.ones(len(pool), dtype=torch.bool)
    mask[bought] = False
    return mask.nonzero().flatten()


def _random_draws(free, n, k=20):
    g = torch.Generator().manual_seed(123)
    return [free[torch.randperm(len(free), generator=g)[:n]] for _ in range(k)]


def test_round_sizes_cover_the_budget_exactly():
    assert round_sizes(1000, 5) == [100, 180, 180, 180, 180, 180]
    assert round_sizes(10, 3, initial=4) == [4, 2, 2, 2]
    assert sum(round_sizes(997, 4, initial=13)) == 997
    for bad in [dict(budget=0, rounds=2), dict(budget=10, rounds=0), dict(budget=10, rounds=2, initial=10)]:
        with pytest.raises(ValueError):
            round_sizes(**bad)


def test_entropy_picks_the_most_uncertain_images(world):
    _, pool, sub, bought = world
    idx, info = select("entropy", sub, pool, bought, 200)
    free = _free(pool, bought)
    assert len(set(idx.tolist())) == 200 and not set(idx.tolist()) & set(bought.tolist())
    p = torch.softmax(predict_logits(sub, pool), 1)
    ent = -(p * p.clamp_min(1e-30).log()).sum(1)
    # the 200 most uncertain of 1700: all above the 85th percentile; a random draw is not
    assert ent[idx].min() >= torch.quantile(ent[free], 0.85) - 1e-5
    assert ent[idx].mean() > max(ent[r].mean() for r in _random_draws(free, 200)) + 0.05
    assert info["picked_mean"] > info["candidates_mean"]


def test_kcenter_covers_the_pool_better_than_random(world):
    _, pool, sub, bought = world
    idx, info = select("kcenter", sub, pool, bought, 200)
    free = _free(pool, bought)
    features, _ = split_classifier(sub)
    with torch.no_grad():
        feats = features(to_float(pool)).float()

    def radius(picked):
        centers = torch.cat([feats[bought], feats[picked]])
        return float(torch.cdist(feats[free], centers).min(1).values.max())

    r_kc = radius(idx)
    r_random = sorted(radius(r) for r in _random_draws(free, 200, k=10))
    assert r_kc < 0.8 * r_random[0], (r_kc, r_random)
    assert info["radius_after"] < info["radius_before"]


def test_kcenter_greedy_is_the_farthest_first_traversal():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [5.0, 0.0], [9.0, 0.0]])
    picked = kcenter_greedy(pts, torch.tensor([[0.0, 0.0]]), 2)
    assert picked.tolist() == [2, 3]  # 10 is farthest from 0; then 5 (distance 5 to both centers)


def test_dfal_picks_images_near_the_decision_boundary(world):
    _, pool, sub, bought = world
    idx, info = select("dfal", sub, pool, bought, 200, generator=torch.Generator().manual_seed(0))
    free = _free(pool, bought)
    top2 = predict_logits(sub, pool).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    assert not set(idx.tolist()) & set(bought.tolist())
    assert margin[idx].mean() < 0.7 * min(margin[r].mean() for r in _random_draws(free, 200)), margin[idx].mean()
    assert info["picked_mean"] < info["candidates_mean"]


def test_deepfool_distance_is_exact_for_a_linear_classifier():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    with torch.no_grad():
        lin[1].weight.mul_(5.0)
    x = 0.4 + 0.2 * torch.rand(16, 3, 4, 4)  # mid-range pixels: the clamp to [0, 1] does not bind
    d = deepfool_distances(lin, x, max_iter=3, top_classes=2, overshoot=0.0)
    logits = lin(x).detach()
    w = lin[1].weight.detach()
    k = logits.argmax(1)
    exact = torch.stack([min((logits[i, j] - logits[i, k[i]]).abs() / (w[j] - w[k[i]]).norm()
                             for j in range(3) if j != k[i]) for i in range(16)])
    assert torch.allclose(d, exact, rtol=0.02, atol=2e-3), (d, exact)


@pytest.mark.parametrize("strategy", ["entropy", "kcenter", "dfal"])
def test_active_extraction_pays_one_query_per_image(world, strategy):
    victim, pool, _, _ = world
    oracle = ModelOracle(victim)
    res = extract(oracle, pool, BUDGET, "cnn_small", 10, strategy, rounds=ROUNDS, initial=INITIAL, fit_config=FAST,
                  round_epochs=4, seed=0)
    assert oracle.queries == BUDGET and res.queries == BUDGET
    assert len(res.indices) == BUDGET and len(torch.unique(res.indices)) == BUDGET
    assert torch.equal(res.query_images, pool[res.indices]) and res.answers.shape == (BUDGET, 10)
    # the initial seed is the random thief's first draw
    ref = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:INITIAL]
    assert torch.equal(res.indices[:INITIAL], ref)
    assert [r["bought"] for r in res.rounds] == round_sizes(BUDGET, ROUNDS, INITIAL)
    for r in res.rounds[1:]:  # the strategy's own score: mean rank of the picked among the candidates (random: 0.5)
        if strategy == "dfal":
            assert r["picked_mean"] < r["candidates_mean"] and r["picked_percentile"] < 0.3, r
        else:
            assert r["picked_mean"] > r["candidates_mean"] and r["picked_percentile"] > 0.65, r
    assert res.strategy == strategy and not res.substitute.training


def test_random_strategy_is_the_knockoffnets_reference(world):
    victim, pool, _, _ = world
    a = extract(ModelOracle(victim), pool, 300, "cnn_small", 10, "random", fit_config=FitConfig(epochs=1), seed=4)
    b = random_extraction(ModelOracle(victim), pool, 300, "cnn_small", 10, FitConfig(epochs=1), seed=4)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.answers, b.answers)
    with pytest.raises(ValueError, match="unknown strategy"):
        extract(ModelOracle(victim), pool, 300, "cnn_small", 10, "margin")
    with pytest.raises(ValueError, match="exceeds the pool"):
        extract(ModelOracle(victim), pool, len(pool) + 1, "cnn_small", 10, "entropy")
    assert STRATEGIES == ("random", "entropy", "kcenter", "dfal")


def test_killed_active_extraction_resumes_without_paying_twice(world, tmp_path):
    victim, pool, _, _ = world
    kw = dict(rounds=ROUNDS, initial=INITIAL, fit_config=FAST, round_epochs=4, seed=0, query_batch=30)
    first = ModelOracle(victim, budget=450)  # the API cuts the thief off in the middle of round 2
    with pytest.raises(RuntimeError, match="budget exhausted"):
        extract(first, pool, BUDGET, "cnn_small", 10, "entropy", work_dir=tmp_path, **kw)
    assert 400 < first.queries < BUDGET
    second = ModelOracle(victim)
    res = extract(second, pool, BUDGET, "cnn_small", 10, "entropy", work_dir=tmp_path, **kw)
    assert first.queries + second.queries == BUDGET and res.queries == second.queries
    plain = extract(ModelOracle(victim), pool, BUDGET, "cnn_small", 10, "entropy", **kw)
    assert torch.equal(res.indices, plain.indices)  # the same images as an uninterrupted thief
    assert torch.allclose(res.answers, plain.answers)
    third = ModelOracle(victim)
    extract(third, pool, BUDGET, "cnn_small", 10, "entropy", work_dir=tmp_path, **kw)
    assert third.queries == 0  # everything was already bought
    with pytest.raises(ValueError, match="different extraction"):
        extract(ModelOracle(victim), pool, BUDGET, "cnn_small", 10, "kcenter", work_dir=tmp_path, **kw)


def test_cli_extract_with_strategy_and_output_mode(quick_demo, tmp_path, capsys):
    out, _ = quick_demo
    sub = tmp_path / "sub.safetensors"
    from honeypotnet.cli import main

    rc = main(["extract", str(out / "bundle"), "--pool", "shapes:pool", "--strategy", "kcenter", "--rounds", "2",
               "--initial", "100", "--round-epochs", "1", "--output-mode", "topk", "--k", "3", "--budget", "300",
               "--epochs", "1", "--pool-limit", "1000", "--eval", "shapes", "--output", str(sub)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(sub.with_suffix(".json").read_text())
    assert res["strategy"] == "kcenter" and res["queries"] == 300 and res["output_mode"] == "topk" and res["top_k"] == 3
    assert [x["bought"] for x in res["rounds"]] == [100, 100, 100] and 0 <= res["substitute_accuracy"] <= 1

    for args, msg in [(["--strategy", "bald"], "invalid choice"), (["--output-mode", "logits"], "invalid choice"),
                      (["--strategy", "dfal", "--rounds", "0"], "rounds"), (["--output-mode", "topk", "--k", "0"], "k >= 1")]:
        try:
            rc = main(["extract", str(out / "bundle"), "--pool", "shapes:pool", "--budget", "100", "--pool-limit", "500",
                       "--output", str(tmp_path / "x.safetensors"), *args])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (args, err)
