"""Unit tests of the honeypot layer, the trigger and the three steps of the bi-level loop."""
import copy
from dataclasses import asdict
from functools import partial

import pytest
import torch

from honeypotnet.countermeasures import channel_activations, purify
from honeypotnet.data import load_dataset
from honeypotnet.honeypot import (PRESETS, HoneypotLayer, ProtectConfig, Trigger, _noisy_forward, finetune_set, generate_trigger,
                                  head_attribute, install_honeypot, protect, pruned_copy, trigger_models)
from honeypotnet.models import create_model, split_classifier
from honeypotnet.training import FitConfig, fit

# The toy tests turn options on one at a time over the specification (ProtectConfig.preset("spec")), not over
# the robust default, which trains ResNet-20 negatives and fine-tuned copies every iteration (tested on its own).
SPEC = partial(ProtectConfig.preset, "spec")


def test_uap_trigger_stamps_within_eps_and_clamps():
    t = Trigger.uap(32, eps=8 / 255)
    t.pattern.uniform_(-1, 1)
    t.project_()
    assert t.pattern.abs().max() <= 8 / 255 + 1e-7
    x = torch.rand(4, 3, 32, 32)
    s = t.stamp(x)
    assert s.min() >= 0 and s.max() <= 1
    assert (s - x).abs().max() <= 8 / 255 + 1e-6


def test_patch_trigger_only_touches_the_mask():
    t = Trigger.patch(32, size=6, seed=1)
    x = torch.rand(2, 3, 32, 32)
    s = t.stamp(x)
    assert torch.equal(s[..., :26, :], x[..., :26, :]) and torch.equal(s[..., :, :26], x[..., :, :26])
    assert not torch.equal(s[..., 26:, 26:], x[..., 26:, 26:])
    assert t.mask.sum() == 36


def test_trigger_rejects_bad_input():
    with pytest.raises(ValueError, match="family"):
        Trigger(torch.zeros(3, 8, 8), torch.ones(1, 8, 8), "blob")
    with pytest.raises(ValueError, match="NaN"):
        Trigger(torch.full((3, 8, 8), float("nan")), torch.ones(1, 8, 8), "uap", 0.1)
    with pytest.raises(ValueError, match="images are"):
        Trigger.uap(32).stamp(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="patch size"):
        Trigger.patch(32, size=40)


@pytest.mark.parametrize("kind", ["linear", "residual"])
def test_honeypot_layer_starts_as_the_original_head(kind):
    model = create_model("cnn_small", 10).eval()
    _, head = split_classifier(model)
    layer = HoneypotLayer.from_linear(head, kind)
    protected = install_honeypot(model, layer)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(protected(x), model(x), atol=1e-5)
    assert head_attribute(protected) == "fc" and isinstance(protected.fc, HoneypotLayer)
    assert isinstance(model.fc, torch.nn.Linear), "install_honeypot must not modify the victim"


def test_generate_trigger_moves_a_model_towards_the_target():
    """Step 2 alone: a UAP on a trained model raises its target rate far above the clean rate."""
    train = load_dataset("shapes", split="train", n=1500)
    torch.manual_seed(0)
    model = create_model("cnn_small", 10)
    fit(model, train.images, train.labels, FitConfig(epochs=3), progress=False)
    cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3)
    trig = generate_trigger(model, Trigger.uap(32, cfg.eps), train.images, cfg, 0)
    with torch.no_grad():
        x = train.float()[:500]
        before = (model(x).argmax(1) == 3).float().mean()
        after = (model(trig.stamp(x)).argmax(1) == 3).float().mean()
    assert after > before + 0.3, (before, after)


def test_protect_validates_inputs():
    model = create_model("cnn_small", 10)
    imgs = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="target class"):
        protect(model, imgs, config=SPEC(target=10, outer_iters=0), progress=False)
    with pytest.raises(ValueError, match="shadow_images"):
        protect(model, torch.zeros(4, 32, 32), config=SPEC(outer_iters=0), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        protect(model, torch.full((4, 3, 32, 32), float("nan")), config=SPEC(outer_iters=0), progress=False)
    with pytest.raises(ValueError, match="head"):
        SPEC(head="mlp")


def test_protect_resumes_exactly_after_interruption(tmp_path):
    """Running 1 iteration, then resuming to 2, gives the same model as 2 iterations in one go."""
    shadow = load_dataset("shapes", split="shadow", n=600).images
    owner = load_dataset("shapes", split="train", n=300).images
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=20, seed=3)
    full = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), progress=False)
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path, progress=False)
    resumed = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), checkpoint_dir=tmp_path, progress=False)
    assert [h["iteration"] for h in resumed.history] == [1, 2]
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    for a, b in zip(full.model.fc.parameters(), resumed.model.fc.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="different configuration"):
        protect(victim, shadow, owner, SPEC(outer_iters=2, **{**kw, "lam": 9.0}), checkpoint_dir=tmp_path, progress=False)


def test_default_config_is_the_robust_preset_and_old_keys_stay_put():
    """ProtectConfig() is the "robust" preset; "spec" differs from it in exactly the preset's fields; the keys
    of configurations measured before the default changed (benchmark units, checkpoints) are unchanged."""
    default, spec = ProtectConfig(), SPEC()
    assert default == ProtectConfig.preset("robust")
    assert {f for f in asdict(default) if getattr(default, f) != getattr(spec, f)} == set(PRESETS["robust"])
    assert spec.hash() == "65d117059b051c8f" and default.hash() == "8a908a08f020c8dd"  # as before issue 8's switch
    assert "shadow_finetune_epochs" not in spec.key_dict() and default.key_dict()["shadow_finetune_epochs"] == 2


def test_protect_with_the_default_config_runs_every_robust_part():
    """The default configuration on a toy size: the trigger is ε 24 bounded and each negative shadow (CNN,
    ResNet-20) and its fine-tuned copy is reported; without owner images it says what to do."""
    shadow = load_dataset("shapes", split="shadow", n=300).images
    owner = load_dataset("shapes", split="train", n=200).images
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    kw = dict(outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=5)
    res = protect(victim, shadow, owner, ProtectConfig(**kw), progress=False)
    assert res.config.eps == 24 / 255 and 0 < res.trigger.pattern.abs().max() <= 24 / 255 + 1e-6
    (rec,) = res.history
    for key in ("negative_asr", "negative1_resnet20_asr", "negative_ft_asr", "negative1_resnet20_ft_asr"):
        assert 0 <= rec[key] <= 1, key
    with pytest.raises(ValueError, match=r"owner_images.*preset\('spec'\)"):
        protect(victim, shadow, None, ProtectConfig(**kw), progress=False)


def test_shadow_finetune_option_changes_the_trigger_and_keeps_old_keys():
    """shadow_finetune_epochs > 0 aims the trigger at a fine-tuned copy too: a different trigger from
    the same seed; off, the configuration hashes as before the option existed."""
    shadow = load_dataset("shapes", split="shadow", n=400).images
    owner = load_dataset("shapes", split="train", n=300).images
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    kw = dict(outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=2)
    plain = protect(victim, shadow, owner, SPEC(**kw), progress=False)
    ft = protect(victim, shadow, owner, SPEC(shadow_finetune_epochs=1, shadow_finetune_images=100, **kw),
                 progress=False)
    assert not torch.allclose(plain.trigger.pattern, ft.trigger.pattern)
    assert ft.trigger.pattern.abs().max() <= ft.config.eps + 1e-6
    assert "shadow_finetune_epochs" not in SPEC().key_dict()
    assert SPEC(shadow_finetune_epochs=2).hash() != SPEC().hash()
    with pytest.raises(ValueError, match="owner_images"):
        protect(victim, shadow, None, SPEC(shadow_finetune_epochs=1, **kw), progress=False)
    with pytest.raises(ValueError, match="shadow_finetune"):
        SPEC(shadow_finetune_lr=0)


def test_low_resolution_trigger_is_smooth_within_eps_and_still_works():
    """trigger_resolution=r optimises δ on an r×r grid: the stamped pattern stays within ±eps, is far
    smoother than the full-resolution UAP (neighbouring pixels differ little), still moves a trained
    model towards the target (less than the full-resolution UAP: fewer degrees of freedom), and the
    option leaves old configuration keys alone."""
    train = load_dataset("shapes", split="train", n=1500)
    torch.manual_seed(0)
    model = create_model("cnn_small", 10)
    fit(model, train.images, train.labels, FitConfig(epochs=3), progress=False)
    x = train.float()[:500]
    with torch.no_grad():
        before = float((model(x).argmax(1) == 3).float().mean())
    rate, rough = {}, {}
    for r in (0, 16):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, trigger_resolution=r)
        trig = generate_trigger(model, Trigger.uap(32, cfg.eps), train.images, cfg, 0)
        p = trig.pattern
        assert p.abs().max() <= cfg.eps + 1e-6
        rough[r] = float((p[:, :, 1:] - p[:, :, :-1]).abs().mean() / cfg.eps)
        with torch.no_grad():
            rate[r] = float((model(trig.stamp(x)).argmax(1) == 3).float().mean())
    assert rough[16] < rough[0] / 2, rough
    assert rate[16] > before + 0.1 and rate[0] > before + 0.3, (before, rate)
    assert "trigger_resolution" not in SPEC().key_dict()
    assert SPEC(trigger_resolution=8).hash() != SPEC().hash()
    with pytest.raises(ValueError, match="trigger_resolution"):
        SPEC(trigger="patch", trigger_resolution=8)
    with pytest.raises(ValueError, match="trigger_resolution"):
        SPEC(trigger_resolution=-1)


def test_blur_in_the_trigger_step_makes_the_trigger_survive_a_blur():
    """trigger_blur=b also feeds each batch Gaussian-blurred (σ ~ U(b/4, b)) to the model: the trigger
    moves blurred stamped images (purify, σ 0.5) to the target clearly more often than the plain UAP
    does (measured 44 vs 29%), keeps most of its unblurred effect (57 vs 64%), stays within ±eps, and
    the option leaves old configuration keys and hashes alone."""
    train = load_dataset("shapes", split="train", n=1500)
    torch.manual_seed(0)
    model = create_model("cnn_small", 10)
    fit(model, train.images, train.labels, FitConfig(epochs=3), progress=False)
    x = train.float()[:500]

    def rate(z: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(z).argmax(1) == 3).float().mean())

    plain, blurred = {}, {}
    for b in (0.0, 1.0):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, trigger_blur=b)
        trig = generate_trigger(model, Trigger.uap(32, cfg.eps), train.images, cfg, 0)
        assert trig.pattern.abs().max() <= cfg.eps + 1e-6
        s = trig.stamp(x)
        plain[b], blurred[b] = rate(s), rate(purify(s, "blur", sigma=0.5))
    before = rate(x)
    assert blurred[1.0] > blurred[0.0] + 0.08, (blurred, plain)
    assert plain[1.0] > before + 0.3 and plain[1.0] > plain[0.0] - 0.15, (before, plain)
    assert "trigger_blur" not in SPEC().key_dict()
    assert SPEC(trigger_blur=0.75).hash() != SPEC().hash()
    for bad in (-0.5, float("nan"), 9.0):
        with pytest.raises(ValueError, match="trigger_blur"):
            SPEC(trigger_blur=bad)


def _shadow_and_near_copy():
    """The shapes training set, a shadow A (cnn_small, 3 epochs) and its near copy B (A fine-tuned one
    epoch on 500 images), both in eval mode: a UAP on A transfers to B."""
    train = load_dataset("shapes", split="train", n=1500)
    torch.manual_seed(0)
    a = create_model("cnn_small", 10)
    fit(a, train.images, train.labels, FitConfig(epochs=3, seed=0), progress=False)
    b = copy.deepcopy(a)
    fit(b, train.images[:500], train.labels[:500], FitConfig(epochs=1, lr=0.01, seed=3), progress=False)
    return train, a.eval(), b.eval()


def test_negative_shadow_keeps_the_trigger_off_a_clean_model():
    """negative_weight > 0 adds −log(1 − p_target) of a clean model to the trigger step. Shadow A and
    its near copy B (A fine-tuned one epoch, so a UAP on A transfers to B, as it does from a shadow
    to an innocent extracted copy): the plain UAP moves B to the target about as much as A; with the
    negative term on B it moves B far less, and A still more than B. Off, old keys are unchanged."""
    train, a, b = _shadow_and_near_copy()
    x = train.float()[:500]
    rate = {}
    for w in (0.0, 5.0):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, negative_weight=w)
        trig = generate_trigger(a, Trigger.uap(32, cfg.eps), train.images, cfg, 0, negative=b)
        assert trig.pattern.abs().max() <= cfg.eps + 1e-6
        with torch.no_grad():
            rate[w] = [float((m(trig.stamp(x)).argmax(1) == 3).float().mean()) for m in (a, b)]
    assert rate[0.0][1] > 0.3, rate  # the plain UAP transfers to the clean copy...
    assert rate[5.0][1] < rate[0.0][1] / 2, rate  # ...the negative shadow's far less
    assert rate[5.0][0] > rate[5.0][1] + 0.05, rate  # and it still aims at the shadow
    assert "negative_weight" not in SPEC().key_dict()
    assert SPEC(negative_weight=1.0).hash() != SPEC().hash()
    with pytest.raises(ValueError, match="negative_weight"):
        SPEC(negative_weight=float("nan"))


def test_noisy_negatives_see_a_family_of_innocent_models():
    """negative_noise=s runs each negative model with weights w·(1 + s·N(0, 1)), fresh per batch: the
    forward is the model's own at s = 0, a different, reproducible one at s > 0, and the model is left
    as it was; in the trigger step it changes the trigger (still within ±eps) while the negative model
    stays well below the plain UAP's rate on it. Off, old keys are unchanged; bad values are refused."""
    train, a, b = _shadow_and_near_copy()
    x = train.float()[:500]
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(_noisy_forward(b, x[:64], 0.0, torch.Generator().manual_seed(1)), b(x[:64]))
        n1 = _noisy_forward(b, x[:64], 0.2, torch.Generator().manual_seed(1))
        n2 = _noisy_forward(b, x[:64], 0.2, torch.Generator().manual_seed(1))
        n3 = _noisy_forward(b, x[:64], 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(n1, n2) and not torch.allclose(n1, b(x[:64]).detach()) and not torch.allclose(n1, n3)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    rate, patterns = {}, {}
    for w, s in ((0.0, 0.0), (5.0, 0.0), (5.0, 0.2)):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, negative_weight=w, negative_noise=s)
        trig = generate_trigger(a, Trigger.uap(32, cfg.eps), train.images, cfg, 0, negative=b)
        assert trig.pattern.abs().max() <= cfg.eps + 1e-6
        patterns[w, s] = trig.pattern
        with torch.no_grad():
            rate[w, s] = [float((m(trig.stamp(x)).argmax(1) == 3).float().mean()) for m in (a, b)]
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    assert not torch.allclose(patterns[5.0, 0.0], patterns[5.0, 0.2])
    # measured: plain UAP 0.64 / 0.50 (A / B), negative term 0.30 / 0.14, with noise 0.2 0.44 / 0.26
    assert rate[5.0, 0.2][1] < rate[0.0, 0.0][1] - 0.15, rate
    assert rate[5.0, 0.2][0] > rate[5.0, 0.2][1] + 0.1, rate
    assert "negative_noise" not in SPEC(negative_weight=1.0).key_dict()
    assert SPEC(negative_weight=1.0, negative_noise=0.1).hash() != SPEC(negative_weight=1.0).hash()
    for bad in (-0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="negative_noise"):
            SPEC(negative_noise=bad)


def test_pruned_shadow_copy_is_fine_pruned_and_the_trigger_aims_at_it():
    """shadow_prune=p: pruned_copy masks the share p of the shadow's last-layer channels least active on
    the fine-tuning images (as the thief's Fine-Pruning does) and leaves the shadow alone; trigger_models
    puts it after the fine-tuned copy; a trigger stepped on [A, pruned A] moves the pruned copy to the
    target more often than one stepped on A alone (a toy: shapes, a 33%-accurate shadow). Off, old keys
    are unchanged; bad values are refused."""
    train, a, _ = _shadow_and_near_copy()
    x, ft_x, ft_y = train.float()[:500], train.images[500:1000], train.labels[500:1000]
    before = {k: v.clone() for k, v in a.state_dict().items()}
    cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, shadow_prune=0.5, shadow_finetune_epochs=1,
                        shadow_finetune_lr=0.01)
    p = pruned_copy(a, ft_x, ft_y, cfg, 0)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    act = channel_activations(a, ft_x)
    w = split_classifier(p)[1].weight
    least = act.argsort()[: round(0.5 * len(act))]
    assert (w[:, least] == 0).all() and int((w == 0).all(0).sum()) == len(least)
    shadows, neg_ft = trigger_models(a, [], ft_x, ft_y, cfg, 0)
    assert len(shadows) == 3 and shadows[0] is a and neg_ft == []
    assert torch.equal(split_classifier(shadows[2])[1].weight == 0, w == 0)  # the same channels, reproducibly
    # the trigger step: a copy pruned without fine-tuning (30%), whose response does not depend on how
    # many threads trained it (measured, 1 / 2 threads: aimed at A alone 0.70 / 0.74, at both 0.86 / 0.85;
    # the fine-tuned 50% copy's +0.13 at one thread was +0.04 at two)
    cfg0 = SPEC(target=3, eps=32 / 255, trigger_passes=3, shadow_prune=0.3)
    p0 = pruned_copy(a, ft_x, ft_y, cfg0, 0)
    rate = {}
    for models in ((a,), (a, p0)):
        trig = generate_trigger(list(models), Trigger.uap(32, cfg0.eps), train.images, cfg0, 0)
        with torch.no_grad():
            rate[len(models)] = float((p0(trig.stamp(x)).argmax(1) == 3).float().mean())
    assert rate[2] > rate[1] + 0.05, rate
    assert "shadow_prune" not in SPEC().key_dict()
    assert SPEC(shadow_prune=0.2).hash() != SPEC().hash()
    for bad in (-0.1, float("nan"), 1.0):
        with pytest.raises(ValueError, match="shadow_prune"):
            SPEC(shadow_prune=bad)
    with pytest.raises(ValueError, match="owner_images"):  # the pruning needs the owner's labelled images
        finetune_set(len(train.images), train.images, torch.zeros(len(train.images), 10), cfg)
    # one test decides whether the labelled set is built and whether a step needs it
    assert cfg.simulates_finetuning() and SPEC(shadow_prune=0.3).simulates_finetuning()
    assert SPEC(shadow_finetune_epochs=1).simulates_finetuning() and not SPEC().simulates_finetuning()
    with pytest.raises(ValueError, match="ft_images"):
        trigger_models(a, [], None, None, SPEC(shadow_prune=0.3), 0)
    assert trigger_models(a, [], None, None, SPEC(), 0) == ([a], [])


def test_protect_with_negative_shadow_records_and_resumes(tmp_path):
    shadow = load_dataset("shapes", split="shadow", n=400).images
    owner = load_dataset("shapes", split="train", n=300).images
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=2, negative_weight=1.0)
    full = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), progress=False)
    assert all(0 <= h["negative_asr"] <= 1 for h in full.history) and len(full.history) == 2
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path, progress=False)
    assert "negative" in torch.load(tmp_path / "protect_state.pt", weights_only=True)
    resumed = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    assert [h["negative_asr"] for h in resumed.history] == pytest.approx([h["negative_asr"] for h in full.history], abs=1e-6)
    # the victim as the innocent model: no negative shadow is trained, the victim's response is
    # reported, and the caller's victim is left as it was
    flags = [p.requires_grad for p in victim.parameters()]
    vic = protect(victim, shadow, owner, SPEC(outer_iters=1, **{**kw, "negative_models": "victim"}), progress=False)
    assert "negative_asr" not in vic.history[0] and 0 <= vic.history[0]["victim_asr"] <= 1
    assert [p.requires_grad for p in victim.parameters()] == flags
    assert "negative_models" not in SPEC().key_dict()
    with pytest.raises(ValueError, match="negative_models"):
        SPEC(negative_models="everyone")


def _negative_setup():
    """Shadow images, owner images and an untrained cnn_small victim (the negative-term tests' setup)."""
    shadow = load_dataset("shapes", split="shadow", n=300).images
    owner = load_dataset("shapes", split="train", n=200).images
    torch.manual_seed(0)
    return shadow, owner, create_model("cnn_small", 10).eval()


def test_negative_shadows_of_several_architectures_train_checkpoint_and_resume(tmp_path):
    """negative_archs: one negative shadow per architecture, each extracted from the unprotected victim,
    reported per iteration and checkpointed under its own key; a resumed run ends where one whole run does."""
    shadow, owner, victim = _negative_setup()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=1, negative_weight=0.5,
              negative_archs="cnn_small, resnet20")
    cfg = SPEC(outer_iters=2, **kw)
    assert cfg.negative_shadow_archs() == ["cnn_small", "resnet20"]
    full = protect(victim, shadow, owner, cfg, progress=False)
    for h in full.history:
        assert 0 <= h["negative_asr"] <= 1 and 0 <= h["negative1_resnet20_asr"] <= 1
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "protect_state.pt", weights_only=True)
    assert {"negative", "negative1"} <= set(state) and any("conv" in k or "layer" in k for k in state["negative1"])
    resumed = protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    # old keys are unchanged while it holds its default; an unknown architecture is refused up front;
    # without a negative weight (or with the victim alone) no negative shadow is trained
    assert "negative_archs" not in SPEC(negative_weight=1.0).key_dict()
    assert SPEC(negative_weight=1.0, negative_archs="cnn,resnet20").hash() != SPEC(negative_weight=1.0).hash()
    for w in (1.0, 0.0):  # checked even while it has no effect
        with pytest.raises(ValueError, match="vgg99"):
            SPEC(negative_weight=w, negative_archs="cnn,vgg99")
    assert SPEC(negative_archs="resnet20").negative_shadow_archs() == []
    assert SPEC(negative_weight=1.0, negative_models="victim", negative_archs="resnet20").negative_shadow_archs() == []


def test_fine_tuned_negative_copies_join_the_negative_term(tmp_path):
    """negative_finetune_epochs: every iteration each negative shadow's fine-tuned copy is trained on the
    owner images, its response is recorded, the trigger changes because of it, the negative shadows
    themselves are not fine-tuned in place, and a resumed run ends where one whole run does."""
    shadow, owner, victim = _negative_setup()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=3, negative_weight=1.0,
              negative_archs="cnn_small", shadow_finetune_images=100)
    plain = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), progress=False)
    cfg = SPEC(outer_iters=2, negative_finetune_epochs=1, negative_finetune_lr=0.1, **kw)
    full = protect(victim, shadow, owner, cfg, progress=False)
    assert all(0 <= h["negative_ft_asr"] <= 1 for h in full.history)
    assert "negative_ft_asr" not in plain.history[0]
    assert not torch.allclose(full.trigger.pattern, plain.trigger.pattern)
    # after one iteration the negative shadow is the one the plain run has (its copy was fine-tuned,
    # not the shadow itself)
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path / "plain", progress=False)
    protect(victim, shadow, owner, SPEC(outer_iters=1, negative_finetune_epochs=1, negative_finetune_lr=0.1, **kw),
            checkpoint_dir=tmp_path, progress=False)
    neg_plain = torch.load(tmp_path / "plain" / "protect_state.pt", weights_only=True)["negative"]
    neg_ft = torch.load(tmp_path / "protect_state.pt", weights_only=True)["negative"]
    assert all(torch.equal(neg_plain[k], neg_ft[k]) for k in neg_plain)
    resumed = protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    assert "negative_finetune_epochs" not in SPEC().key_dict() and cfg.hash() != SPEC(**kw).hash()
    with pytest.raises(ValueError, match="negative_finetune"):
        SPEC(negative_finetune_epochs=2)  # no negative shadow to fine-tune
    with pytest.raises(ValueError, match="negative_finetune"):
        SPEC(negative_weight=1.0, negative_finetune_epochs=-1)
    with pytest.raises(ValueError, match="owner_images"):
        protect(victim, shadow, None, cfg, progress=False)


def test_audit_rounds_harden_the_trigger_against_fresh_innocent_models(tmp_path):
    """audit_rounds: after outer_iters fresh innocent models are checked; one that answers above the
    threshold joins the negative term for audit_iters more iterations (the trigger changes because of
    it), at most audit_rounds times, then a last check only measures. A passing check changes nothing.
    A plain run's checkpoint is continued into an audited one; an audited checkpoint is refused under
    other audit settings; a resumed run ends where a whole one does."""
    shadow, owner, victim = _negative_setup()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=3, negative_weight=1.0,
              negative_archs="cnn_small", outer_iters=2)
    audit = dict(audit_rounds=2, audit_iters=1, audit_epochs=1)
    plain = protect(victim, shadow, owner, SPEC(**kw), checkpoint_dir=tmp_path / "plain", progress=False)
    # threshold 0: every check with a single answer fails -> 2 hardening rounds and a last check
    strict = SPEC(audit_threshold=0.0, **audit, **kw)
    full = protect(victim, shadow, owner, strict, progress=False)
    failed = [a for a in full.audits if not a["passed"]]
    assert [a["check"] for a in full.audits] == list(range(1, len(full.audits) + 1)) and len(full.audits) >= 2
    assert all(a["added"] for a in full.audits[:2]) and not full.audits[-1]["added"] and len(full.audits) <= 3
    assert all(0 <= v <= 1 for a in full.audits for v in a["asr"].values()) and failed
    assert len(full.history) == 2 + 2 and "audit_models_asr" in full.history[-1]
    assert not torch.allclose(full.trigger.pattern, plain.trigger.pattern)
    # a check that passes (threshold 1) adds nothing: the model is the plain run's
    lax = protect(victim, shadow, owner, SPEC(audit_threshold=1.0, **audit, **kw), progress=False)
    assert len(lax.audits) == 1 and lax.audits[0]["passed"] and len(lax.history) == 2
    assert torch.equal(lax.trigger.pattern, plain.trigger.pattern)
    # the plain run's checkpoint continues into the audited run, and ends where the whole run does
    resumed = protect(victim, shadow, owner, strict, checkpoint_dir=tmp_path / "plain", progress=False)
    assert torch.allclose(resumed.trigger.pattern, full.trigger.pattern, atol=1e-6) and resumed.audits == full.audits
    again = protect(victim, shadow, owner, strict, checkpoint_dir=tmp_path / "plain", progress=False)  # nothing left to do
    assert torch.equal(again.trigger.pattern, resumed.trigger.pattern) and again.audits == full.audits
    for other in (SPEC(audit_threshold=0.5, **audit, **kw), SPEC(**kw)):
        with pytest.raises(ValueError, match="audit"):
            protect(victim, shadow, owner, other, checkpoint_dir=tmp_path / "plain", progress=False)
    assert "audit_rounds" not in SPEC().key_dict() and strict.hash() == SPEC(**kw).hash()
    assert SPEC(audit_rounds=1).audit_arch_list() == ["cnn"] and SPEC().audit_arch_list() == []
    for bad in (dict(audit_rounds=-1), dict(audit_rounds=1, audit_iters=0), dict(audit_threshold=1.5),
                dict(audit_threshold=float("nan")), dict(audit_epochs=0), dict(audit_archs="vgg99")):
        with pytest.raises(ValueError, match="audit"):
            SPEC(**bad)


def test_audit_restarts_protect_again_until_a_run_passes(tmp_path):
    """audit_restarts: a run whose last check fails is redone from scratch under restart_seed(r), at most
    audit_restarts times; the first passing run is kept, else the one innocent models answer least. With
    audit_rounds = 0 every run gets one check and no hardening. Restarts checkpoint in restart<r> and a
    second call redoes nothing."""
    shadow, owner, victim = _negative_setup()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=3, negative_weight=1.0,
              negative_archs="cnn_small", outer_iters=1, audit_epochs=1)
    # threshold 0 (any answer fails): every run is checked once, none is hardened, the least-answered one is kept
    strict = SPEC(audit_threshold=0.0, audit_restarts=2, **kw)
    assert strict.audits_on() and strict.audit_arch_list() == ["cnn_small"] and strict.hash() == SPEC(**kw).hash()
    res = protect(victim, shadow, owner, strict, checkpoint_dir=tmp_path / "w", progress=False)
    seeds = [a["seed"] for a in res.attempts]
    assert seeds == [3 + 1000 * r for r in range(len(seeds))] == [strict.restart_seed(r) for r in range(len(seeds))]
    assert len(seeds) == 3 if all(not a["passed"] for a in res.attempts) else res.attempts[-1]["passed"]
    assert all(a["checks"] == 1 and a["iterations"] == 1 for a in res.attempts)  # rounds 0: no hardening
    kept = [a for a in res.attempts if a["kept"]]
    assert len(kept) == 1 and kept[0]["max_asr"] == min(a["max_asr"] for a in res.attempts)
    assert res.audits[-1]["max_asr"] == kept[0]["max_asr"] and res.config is strict
    assert all((tmp_path / "w" / f"restart{r}" / "protect_state.pt").exists() for r in range(1, len(seeds)))
    # the kept run is that seed's own run
    alone = protect(victim, shadow, owner, SPEC(**{**kw, "seed": kept[0]["seed"]}), progress=False)
    assert torch.equal(alone.trigger.pattern, res.trigger.pattern)
    again = protect(victim, shadow, owner, strict, checkpoint_dir=tmp_path / "w", progress=False)  # all checkpointed
    assert again.attempts == res.attempts and torch.equal(again.trigger.pattern, res.trigger.pattern)
    # a run that passes ends the restarts at once: the plain run's model
    lax = protect(victim, shadow, owner, SPEC(audit_threshold=1.0, audit_restarts=2, **kw), progress=False)
    assert [(a["seed"], a["passed"], a["kept"]) for a in lax.attempts] == [(3, True, True)]
    plain = protect(victim, shadow, owner, SPEC(**kw), progress=False)
    assert torch.equal(lax.trigger.pattern, plain.trigger.pattern) and plain.attempts == [] and plain.audits == []
    with pytest.raises(ValueError, match="audit_restarts"):
        SPEC(audit_restarts=-1)
