"""The default configuration (the robust preset) end to end at toy size: the properties the method promises.

Victim: the quick demo's own (conftest `quick_demo`: a small CNN trained on the embedded shapes). Protect with ProtectConfig() — every robust part on: ε 24/255,
trigger blur on half of each batch, the simulated thief's fine-tuned shadow, CNN and ResNet-20 negative shadows
extracted once with fine-tuned copies and weight noise, one per trigger batch — changing only the loop's sizes. Then a thief steals the protected model, the
same thief the unprotected one (an innocent copy), and the owner verifies both against a calibrated null.
"""
from dataclasses import fields

import pytest
import torch

from honeypotnet.attacks import random_extraction
from honeypotnet.config import ProtectConfig
from honeypotnet.data import load_dataset
from honeypotnet.bundle import load_model
from honeypotnet.oracles import ModelOracle
from honeypotnet.protect import protect
from honeypotnet.training import FitConfig, predict_logits
from honeypotnet.verify import calibrate_null, verify

# the loop's sizes only: one trigger pass over 1,000 shadow images, and the negatives' one extraction as long as
# the shadow's training over the loop (the default's 24 epochs are its 3 per iteration x 8; here 2 x 3). The thieves
# are the small CNN (the "cnn" thief costs 2.4x as long: 15 s against 6.5 s). Measured at 2 threads: tau0 5.0%,
# stolen copy ASR 95.3% ("cnn" thief: 90.2%), innocent copy 0.0%; protect 25 s, about 45 s in all
SIZES = dict(outer_iters=3, shadow_arch="cnn_small", shadow_epochs=2, honeypot_steps=200, shadow_finetune_images=500,
             trigger_passes=1, negative_once=6)


@pytest.fixture(scope="module")
def default_run(quick_demo):
    owner = load_dataset("shapes", split="train", n=4000, seed=0)  # the quick demo's victim's training set
    victim, _ = load_model(quick_demo[0] / "victim.safetensors")
    victim.eval()
    shadow = load_dataset("shapes", split="shadow", n=1000, seed=0)
    cfg = ProtectConfig().override(SIZES)  # the default, at toy sizes: nothing else changed
    assert {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(ProtectConfig(), f.name)} <= set(SIZES)
    res = protect(victim, shadow.images, owner.images[:1000], cfg, progress=False)
    null = calibrate_null(victim, res.trigger, shadow.images, owner.images[-1500:], owner.labels[-1500:], cfg.target,
                          archs=["cnn"], fit_config=FitConfig(epochs=6, seed=100))
    pool = load_dataset("shapes", split="pool", n=3000, seed=0).images
    fit_cfg = FitConfig(epochs=10, seed=7)
    stolen = random_extraction(ModelOracle(res.model), pool, 3000, "cnn_small", 10, fit_cfg, seed=0).substitute
    clean = random_extraction(ModelOracle(victim), pool, 3000, "cnn_small", 10, fit_cfg, seed=0).substitute
    test = load_dataset("shapes", split="test", n=1000, seed=0)
    return victim, res, null, stolen, clean, test


def test_default_keeps_fidelity(default_run):
    victim, res, _, _, _, test = default_run
    same = (predict_logits(victim, test.images).argmax(1) == predict_logits(res.model, test.images).argmax(1))
    assert float(same.float().mean()) >= 0.95
    assert res.config.trigger_blur > 0 and res.config.negative_shadow_archs() == ["cnn", "resnet20"]
    assert 0 < float(res.trigger.pattern.abs().max()) <= 24 / 255 + 1e-6
    assert {"negative1_resnet20_ft_asr", "negative0_cnn_asr"} <= set(res.history[-1])


def test_default_stolen_copy_is_flagged_and_innocent_copy_cleared(default_run):
    _, res, null, stolen, clean, test = default_run
    v_stolen = verify(stolen, res.trigger, test.images, test.labels, res.config.target, null.tau0)
    v_clean = verify(clean, res.trigger, test.images, test.labels, res.config.target, null.tau0)
    assert v_stolen.stolen and v_stolen.asr > 0.5, v_stolen
    assert not v_clean.stolen and v_clean.asr <= null.tau0, v_clean
    assert not v_stolen.warnings and not v_clean.warnings
