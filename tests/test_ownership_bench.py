"""bench.ownership's pure parts, without real data: the AUC, the replay of the sequential test, the
per-copy aggregation over orders, one queries-to-verdict run on a toy model, and the quiet verification's
scaled trigger and per-scale summary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.ownership import (auc, evade, evasive_hits, queries_to_verdict, quiet_summary, scaled, separation,
                             sequential_replay, stateful_run, summarize, window_limit)
from honeypotnet.models import create_model
from honeypotnet.trigger import Trigger
from honeypotnet.oracles import ModelOracle
from honeypotnet.verify import sequential_verify


def test_auc_known_cases():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0  # perfect separation
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0  # reversed
    assert auc([1, 1, 1], [1, 1]) == 0.5  # identical: every pair a tie
    assert auc([0, 1, 2, 3], [0, 1, 2, 3]) == 0.5
    # ties count a half: pos 1 vs neg {0, 1, 2}: 1 win, 1 tie, 1 loss -> 1.5 / 3
    assert auc([1], [0, 1, 2]) == pytest.approx(0.5)
    assert auc([2, 2], [1, 2]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert auc(a, b) == pytest.approx(brute)
    with pytest.raises(ValueError):
        auc([], [1])


def test_replay_matches_sequential_verify_on_a_set_answer_sequence():
    """sequential_replay on a 0/1 answer sequence reaches what the library's test reaches on a model whose
    answers are exactly that sequence (a lookup model over images that carry their own index)."""
    rng = np.random.default_rng(1)
    for asr, tau0 in ((0.9, 0.08), (0.6, 0.08), (0.02, 0.08), (0.15, 0.08), (0.7, 0.3)):
        hits = (rng.random(200) < asr).astype(float)
        got = sequential_replay(hits, tau0, 1e-6)
        ans = torch.as_tensor(hits)

        class Lookup(torch.nn.Module):  # image i's first pixel holds i/255 before stamping (a zero trigger)
            def forward(self, x):
                i = (x[:, 0, 0, 0] * 255).round().long()
                out = torch.zeros(len(x), 2)
                out[torch.arange(len(x)), 1 - ans[i].long()] = 1.0  # class 0 = the target
                return out

        images = torch.zeros(200, 3, 4, 4, dtype=torch.uint8)
        images[:, 0, 0, 0] = torch.arange(200, dtype=torch.uint8)
        trig = Trigger(torch.zeros(3, 4, 4), torch.ones(1, 4, 4), "uap", 1 / 255)
        v = sequential_verify(ModelOracle(Lookup()), trig, images, None, 0, tau0, 1e-6)
        lib = {"stolen": "flagged"}.get(v.sequential["decided"], v.sequential["decided"])
        assert (lib, v.sequential["stamped_queries"]) == got


def test_summarize_over_orders():
    s = summarize([("flagged", 10), ("flagged", 30), ("flagged", 20)])
    assert s["verdict"] == "flagged" and s["median"] == 20 and s["max"] == 30 and s["min"] == 10
    assert s["counts"] == {"flagged": 3, "cleared": 0, "undecided": 0} and s["orders"] == 3
    m = summarize([("flagged", 10), ("cleared", 40), ("flagged", 20), ("undecided", 900)])
    assert m["verdict"] == "mixed" and m["median"] == 30 and m["max"] == 900
    assert m["counts"] == {"flagged": 2, "cleared": 1, "undecided": 1}
    with pytest.raises(ValueError):
        summarize([])


def test_evasion_and_stateful_suspect():
    pred = np.array([0, 0, 1, 0])
    assert evasive_hits(pred, np.array([True, False, False, False]), 0).tolist() == [0, 1, 0, 1]
    k = window_limit(20, 0.1)
    assert k == 7  # P(Bin(20, 0.1) >= 6) = 1.1%: above 1%; >= 7: 0.2%
    hit = np.ones(100)
    never = stateful_run(hit, np.zeros(100, bool), np.zeros(100, bool), 0.08, 1e-6, limit=3)
    assert never["verdict"] == "flagged" and never["stamped"] == 10 and never["tripped_at"] is None
    # every stamped query flagged: the suspect trips after 3 and answers nothing more; 1:3 interleaving with
    # unflagged clean queries trips it later (at the 3rd stamped query, 9 queries in)
    alone = stateful_run(hit, np.ones(100, bool), np.zeros(100, bool), 0.08, 1e-6, limit=3)
    assert alone["tripped_at"] == 3 and alone["verdict"] == "cleared"
    mixed = stateful_run(hit, np.ones(100, bool), np.zeros(100, bool), 0.08, 1e-6, limit=3, clean_per_stamped=3)
    assert mixed["tripped_at"] == 9 and mixed["total"] == 4 * mixed["stamped"]


def test_queries_to_verdict_on_a_toy_model():
    """A tiny model whose head is biased to the target answers every image (stamped or not) with it: flagged,
    in the fewest queries, every order; a model that never answers it is cleared. The first order also runs
    through verify(sequential=True) and must agree."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (120, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(120) % 10
    trig = Trigger.uap(32, 8 / 255)
    trig.pattern.copy_(torch.empty(3, 32, 32).uniform_(-1, 1, generator=g))
    trig.project_()
    for bias, expect in ((10.0, "flagged"), (-10.0, "cleared")):
        model = create_model("cnn_small", 10).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    last = m
            last.bias[3] = bias
        q = queries_to_verdict(model, trig, images, labels, 3, 0.08, 1e-6, n_orders=5, seed=0)
        assert q["n"] == 108 and q["verdict"] == expect and q["counts"][expect] == 5
        assert 0 < q["median"] <= q["max"] <= 108 and q["max"] % 10 == 0
        assert q["verify_check"]["decided"] == expect
        assert q["asr"] == (1.0 if expect == "flagged" else 0.0)
        # quiet verification: the same model at half the trigger's amplitude (it ignores the trigger)
        h = queries_to_verdict(model, scaled(trig, 0.5), images, labels, 3, 0.08, 1e-6, n_orders=5, seed=0)
        assert h["verdict"] == expect and h["runs"] == q["runs"]


def test_scaled_trigger():
    g = torch.Generator().manual_seed(0)
    trig = Trigger.uap(8, 16 / 255)
    trig.pattern.copy_(torch.empty(3, 8, 8).uniform_(-1, 1, generator=g))
    trig.project_()
    same = scaled(trig, 1)
    assert torch.equal(same.pattern, trig.pattern) and same.eps == trig.eps and same.family == "uap"
    x = torch.rand(5, 3, 8, 8, generator=g)
    for s in (0.75, 0.5, 0.25):
        q = scaled(trig, s)
        # not clipped by the projection onto s·eps (beyond float32 rounding of the bound)
        assert torch.allclose(q.pattern, s * trig.pattern, rtol=1e-6, atol=0)
        assert q.eps == pytest.approx(s * trig.eps) and torch.equal(q.mask, trig.mask)
        assert (q.stamp(x) - x).abs().max() <= s * trig.eps + 1e-7
    assert float(trig.pattern.abs().max()) == pytest.approx(16 / 255) and trig.eps == 16 / 255  # the original untouched
    patch = Trigger.patch(8, 3)
    half = scaled(patch, 0.5)
    assert half.eps == 1.0 and torch.equal(half.pattern, 0.5 * patch.pattern)
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            scaled(trig, bad)


def test_quiet_evasion_and_summary():
    """evade picks the best detector either way round and thresholds it on the suspect's own clean images;
    quiet_summary counts flagged copies and twins and judges the goal on every detector."""
    rng = np.random.default_rng(0)
    clean, hold = rng.normal(0, 1, 200), rng.normal(0, 1, 100)
    stamped = clean + 10  # the blind detector "x" and a perfect one, "y", reversed
    aucs = {"x": 0.5, "y": 0.0}
    e = evade(aucs, {"x": clean, "y": -stamped}, {"x": clean, "y": -clean}, {"x": hold, "y": -hold},
              np.zeros(200, dtype=int), 0, 0.1)
    assert e["best"] == "y" and e["direction"] == -1.0 and e["flag_stamped"].all()
    assert e["hits_evaded"].sum() == 0 and 0.05 < e["flag_clean"].mean() < 0.2
    assert separation({"a": 0.3, "b": 0.55}) == pytest.approx(0.7)
    runs = lambda v, n: {"counts": {"flagged": n if v == "flagged" else 0, "cleared": n if v == "cleared" else 0,
                                    "undecided": 0}, "orders": n, "median": 20.0, "max": 30, "verdict": v, "asr": 0.5}
    entry = {"copies": [{"oracle": "protected", **runs("flagged", 3)}, {"oracle": "clean", **runs("cleared", 3)}],
             "stealth": [{"aucs": {"laplacian": 0.55, "learned": 0.45, "adaptive": 0.58}, "separation": 0.58,
                          "per_query": {"verdict": "flagged"}}]}
    u = quiet_summary(entry, True)
    assert u["stolen_flagged"] == 1 and u["clean_flagged"] == 0 and u["goal"] is True
    assert u["auc_range"]["learned"] == [0.45, 0.45] and u["evaded"]["flagged"] == 1
    entry["stealth"][0]["separation"] = 0.7
    assert quiet_summary(entry, True)["goal"] is False and quiet_summary(entry, False)["goal"] is None


def test_arsenal_copies_join_the_reproduction_they_stole_from(tmp_path):
    """bench.arsenal's thieves (not its counter-measure rows) are read with their own folder, named under the
    arsenal run, against the reproduction's bundle; an arsenal run made from another reproduction is refused."""
    import json

    from bench.ownership import arsenal_copies, label_of

    rep, ars = tmp_path / "rep", tmp_path / "ars"
    rep.mkdir()
    row = {"oracle": "protected", "budget": 100, "output": "probs", "asr": 0.9, "stolen": True}
    rows = {"families": [{**row, "rel": "thief-protected-vgg", "arch": "cnn", "family": "vgg_small", "trainer": "fit"},
                         {**row, "rel": "thief-protected-adam", "arch": "cnn", "family": "cnn", "trainer": "adam"},
                         {**row, "rel": "thief-protected-unfinished", "arch": "cnn", "family": "convmixer"}],
            "counter": [{**row, "rel": "cm-finetune", "arch": "cnn"}]}
    for r in [*rows["families"][:2], *rows["counter"]]:
        (ars / r["rel"]).mkdir(parents=True)
        (ars / r["rel"] / "substitute.safetensors").write_bytes(b"x")
    results = {"from_reproduce": str(rep), "reproduce_seed": 2, "bundle": {"protection": "robust"}, **rows}
    (ars / "results.json").write_text(json.dumps(results))
    got = arsenal_copies(rep, ars)
    assert [c["rel"] for c in got] == ["ars/thief-protected-vgg", "ars/thief-protected-adam"]
    assert {c["bundle"] for c in got} == {"seed2/protect-robust/bundle"}
    assert got[0]["dir"] == str(ars / "thief-protected-vgg")
    assert [label_of(c) for c in got] == ["vgg_small, arsenal", "cnn, adam loop, arsenal"]
    (ars / "results.json").write_text(json.dumps({**results, "from_reproduce": str(tmp_path / "other")}))
    with pytest.raises(SystemExit, match="stole from"):
        arsenal_copies(rep, ars)
