"""The negative shadows' disk cache (protect(cache_dir=), negatives.NegativeCache): a run that loads them is
the run that trained them, bit for bit; the key covers what the extraction reads and nothing else; a damaged
entry is trained again, never half-loaded."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from honeypotnet.config import ProtectConfig
from honeypotnet.data import load_dataset
from honeypotnet.models import create_model, split_classifier
from honeypotnet.negatives import NegativeCache, NegativeShadows
from honeypotnet.ops import batched_forward
from honeypotnet.protect import protect

SPEC = partial(ProtectConfig.preset, "spec")
KW = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=5, negative_weight=1.0,
          negative_archs="cnn_small", negative_once=2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    shadow = load_dataset("shapes", split="shadow", n=300).images
    owner = load_dataset("shapes", split="train", n=200).images
    torch.manual_seed(0)
    return shadow, owner, create_model("cnn_small", 10).eval()


def _same(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) \
        and torch.equal(a.trigger.pattern, b.trigger.pattern) and a.history == b.history


def test_a_run_that_loads_the_negatives_is_the_run_that_trained_them(setup, tmp_path):
    shadow, owner, victim = setup
    cfg = SPEC(outer_iters=2, **KW)
    plain = protect(victim, shadow, owner, cfg, progress=False)
    first = protect(victim, shadow, owner, cfg, progress=False, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("negative-cnn_small-*.safetensors")
    written = entry.stat().st_ino  # a write replaces the file (atomically), a load only marks it used
    second = protect(victim, shadow, owner, cfg, progress=False, cache_dir=tmp_path)
    assert _same(plain, first) and _same(first, second)
    assert entry.stat().st_ino == written  # read, not written again
    # what the second run used is the file: other weights under its name make another protection
    torch.manual_seed(123)
    from safetensors.torch import save_file
    save_file(create_model("cnn_small", 10).state_dict(), str(entry))
    other = protect(victim, shadow, owner, cfg, progress=False, cache_dir=tmp_path)
    assert not torch.equal(other.trigger.pattern, first.trigger.pattern)
    # another trigger or head setting reuses the entry; without negatives.once nothing is cached
    protect(victim, shadow, owner, SPEC(outer_iters=1, **{**KW, "negative_once": 0}), progress=False,
            cache_dir=tmp_path / "every")
    assert not (tmp_path / "every").exists()


def test_another_owner_set_reuses_the_negatives_unless_the_shadows_query_it(setup, tmp_path):
    """The extraction reads the victim and the images the shadows query: with shadow.owner_share 0 those are the
    shadow set alone, so a run on other owner images loads the entry, and is the run that would have trained it."""
    shadow, owner, victim = setup
    other_owner = load_dataset("shapes", split="train", n=200, seed=1).images
    assert not torch.equal(other_owner, owner)
    cfg = SPEC(outer_iters=1, **KW)
    protect(victim, shadow, owner, cfg, progress=False, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("negative-cnn_small-*.safetensors")
    written = entry.stat().st_ino
    loaded = protect(victim, shadow, other_owner, cfg, progress=False, cache_dir=tmp_path)
    assert entry.stat().st_ino == written and len(list(tmp_path.glob("*.safetensors"))) == 1  # read, nothing new
    assert _same(loaded, protect(victim, shadow, other_owner, cfg, progress=False))  # = trained from scratch
    # the shadows query a share of the owner images: those are read by the extraction, so they are in the key
    shared = SPEC(outer_iters=1, **{**KW, "shadow_owner_share": 0.5})
    protect(victim, shadow, owner, shared, progress=False, cache_dir=tmp_path)
    protect(victim, shadow, other_owner, shared, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def _extract(setup, cfg, cache):
    shadow, _, victim = setup
    features, head = split_classifier(victim)
    feats = batched_forward(features, shadow)
    torch.manual_seed(0)  # the models' initial weights, as protect seeds them
    neg = NegativeShadows(cfg, 10, CPU, cache)
    neg.extract(head, shadow, feats, 0)
    return neg


def test_the_key_covers_what_the_extraction_reads_and_nothing_else(setup, tmp_path):
    shadow = setup[0]
    cache = NegativeCache(tmp_path, "data-a", len(shadow), 10, CPU)
    cfg = SPEC(**KW)
    first = _extract(setup, cfg, cache)
    assert first.cached == [False]
    again = _extract(setup, cfg, cache)
    assert again.cached == [True]
    a, b = first.models[0].state_dict(), again.models[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the trigger, the head, the loop and the negative term's weight do not touch the extraction
    for change in (dict(eps=8 / 255), dict(lam=5.0), dict(outer_iters=7), dict(negative_weight=3.0),
                   dict(negative_per_batch=1), dict(trigger_blur_split=True)):
        assert _extract(setup, SPEC(**{**KW, **change}), cache).cached == [True], change
    # the seed, the extraction's settings, the images / victim and how many are queried do
    for change in (dict(seed=6), dict(shadow_lr=0.02), dict(shadow_batch=64), dict(negative_once=3)):
        assert _extract(setup, SPEC(**{**KW, **change}), cache).cached == [False], change
    assert _extract(setup, cfg, NegativeCache(tmp_path, "data-b", len(shadow), 10, CPU)).cached == [False]
    assert _extract(setup, cfg, NegativeCache(tmp_path, "data-a", len(shadow) - 1, 10, CPU)).cached == [False]
    # several architectures: one entry each
    two = SPEC(**{**KW, "negative_archs": "cnn_small,cnn_small"})
    assert _extract(setup, two, cache).cached == [True, False]  # the second sits at another position
    assert _extract(setup, two, cache).cached == [True, True]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-model", "nan"])
def test_a_damaged_entry_is_trained_again_and_rewritten(setup, tmp_path, damage):
    shadow = setup[0]
    cache = NegativeCache(tmp_path, "data", len(shadow), 10, CPU)
    cfg = SPEC(**KW)
    good = _extract(setup, cfg, cache).models[0].state_dict()
    (entry,) = tmp_path.glob("*.safetensors")
    from safetensors.torch import save_file
    if damage == "garbage":
        entry.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "other-model":
        save_file(create_model("cnn", 10).state_dict(), str(entry))
    else:
        state = {k: v.contiguous().clone() for k, v in good.items()}
        next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
        save_file(state, str(entry))
    with pytest.warns(RuntimeWarning, match="training it again"):
        redone = _extract(setup, cfg, cache)
    assert redone.cached == [False]
    assert all(torch.equal(good[k], redone.models[0].state_dict()[k]) for k in good)
    assert _extract(setup, cfg, cache).cached == [True]  # rewritten whole


def test_an_unwritable_cache_costs_time_not_the_run(setup, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would be")
    cache = NegativeCache(blocker / "negatives", "data", len(setup[0]), 10, CPU)
    with pytest.warns(RuntimeWarning, match="could not cache"):
        neg = _extract(setup, SPEC(**KW), cache)
    assert neg.cached == [False]


def test_the_cache_keeps_the_most_recently_used_entries(setup, tmp_path):
    """A machine that protects many victims keeps `keep` entries: writing one more deletes the least
    recently used, and a load counts as a use."""
    import os

    cache = NegativeCache(tmp_path, "data", len(setup[0]), 10, CPU, keep=2)
    model = create_model("cnn_small", 10)
    for i, key in enumerate(("a", "b")):
        cache.save(model, key, "cnn_small")
        os.utime(cache.path(key, "cnn_small"), ns=(10**18 + i, 10**18 + i))  # a written before b
    assert cache.entries() == [cache.path("b", "cnn_small"), cache.path("a", "cnn_small")]
    assert cache.load(create_model("cnn_small", 10), "a", "cnn_small")  # a is now the most recent
    cache.save(model, "c", "cnn_small")
    assert sorted(p.name for p in cache.entries()) == sorted(cache.path(k, "cnn_small").name for k in ("a", "c"))
    assert not cache.path("b", "cnn_small").exists()
    assert cache.prune() == []  # within the bound
    with pytest.raises(ValueError, match="keep"):
        NegativeCache(tmp_path, "data", 1, 10, CPU, keep=0)
