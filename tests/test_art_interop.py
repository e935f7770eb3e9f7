"""ART's own thieves (KnockoffNets, CopycatCNN) against our protected model: the backdoor must be
inherited by ART's stolen classifier too, and not show up in one stolen from the unprotected victim.

Uses conftest's `quick_demo` (the protected model of tests/test_pipeline.py, built once)."""
import numpy as np
import pytest
import torch

pytest.importorskip("art")

from honeypotnet.art_interop import art_steal, as_blackbox_classifier, as_pytorch_classifier  # noqa: E402
from honeypotnet.bundle import load_bundle, load_model  # noqa: E402
from honeypotnet.data import load_dataset  # noqa: E402
from honeypotnet.oracles import ModelOracle, OutputMode  # noqa: E402
from honeypotnet.ops import to_float  # noqa: E402
from honeypotnet.training import accuracy  # noqa: E402
from honeypotnet.verify import verify  # noqa: E402

BUDGET = 2000


@pytest.fixture(scope="module")
def setting(quick_demo):
    out, _ = quick_demo
    bundle = load_bundle(out / "bundle")
    victim, _ = load_model(out / "victim.safetensors")
    pool = load_dataset("shapes", split="pool", n=3000, seed=5).images
    test = load_dataset("shapes", split="test", n=1000, seed=0)
    return bundle, victim, pool, test


def _check(theft, bundle, test):
    v = verify(theft.substitute, bundle.trigger, test.images, test.labels, bundle.target, bundle.tau0)
    return v, accuracy(theft.substitute, test.images, test.labels)


def test_art_wrappers_answer_like_our_oracle(setting):
    bundle, _, pool, _ = setting
    x = to_float(pool[:7])
    ours = ModelOracle(bundle.model)(x).numpy()
    pt = as_pytorch_classifier(bundle.model, 10, probabilities=True).predict(x.numpy(), batch_size=3)
    oracle = ModelOracle(bundle.model, OutputMode("label"))
    bb = as_blackbox_classifier(oracle, 10).predict(x.numpy(), batch_size=3)
    assert np.allclose(pt, ours, atol=1e-5)
    assert (bb.argmax(1) == ours.argmax(1)).all() and set(np.unique(bb)) <= {0.0, 1.0} and (bb.sum(1) == 1).all()
    assert oracle.queries == 7  # every row of every batch counted once


def test_art_knockoffnets_on_pytorch_classifier_inherits_the_backdoor(setting):
    bundle, victim, pool, test = setting
    stolen = art_steal(bundle.model, pool, BUDGET, attack="knockoffnets", epochs=12, lr=3e-3, seed=0)
    clean = art_steal(victim, pool, BUDGET, attack="knockoffnets", epochs=12, lr=3e-3, seed=0)
    assert stolen.wrap == "pytorch" and stolen.queries == BUDGET and clean.queries == BUDGET
    vs, cta_s = _check(stolen, bundle, test)
    vc, cta_c = _check(clean, bundle, test)
    assert cta_s > 0.4 and cta_c > 0.4, (cta_s, cta_c)  # ART's thief learnt something (chance: 0.1)
    assert vs.stolen and not vc.stolen, (vs.asr, vc.asr, bundle.tau0)
    assert vs.asr >= vc.asr + 0.15, (vs.asr, vc.asr)


def test_art_copycat_on_blackbox_oracle_inherits_the_backdoor(setting):
    bundle, _, pool, test = setting
    oracle = ModelOracle(bundle.model)  # probabilities; CopycatCNN keeps only the argmax
    theft = art_steal(oracle, pool, BUDGET, attack="copycatcnn", num_classes=10, epochs=12, lr=3e-3, seed=1)
    assert theft.wrap == "blackbox" and oracle.queries == BUDGET and theft.queries == BUDGET
    v, cta = _check(theft, bundle, test)
    assert cta > 0.4 and v.stolen, (cta, v.asr, bundle.tau0)
    assert isinstance(theft.substitute, torch.nn.Module) and not theft.substitute.training


def test_art_steal_rejects_bad_input(setting):
    bundle, _, pool, _ = setting
    with pytest.raises(ValueError, match="unknown ART attack"):
        art_steal(bundle.model, pool, 10, attack="jbda")
    with pytest.raises(ValueError, match="black box"):
        art_steal(ModelOracle(bundle.model), pool, 10, wrap="pytorch", num_classes=10)
    with pytest.raises(ValueError, match="budget"):
        art_steal(bundle.model, pool, len(pool) + 1)
    with pytest.raises(ValueError, match="num_classes"):
        art_steal(ModelOracle(bundle.model), pool, 10)
