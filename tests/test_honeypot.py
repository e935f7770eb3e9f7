"""Unit tests of the honeypot layer, the trigger and the three steps of the bi-level loop."""
import copy
from functools import partial

import pytest
import torch
from torch import nn

from honeypotnet.config import ProtectConfig
from honeypotnet.data import load_dataset
from honeypotnet.head import HoneypotLayer, head_attribute, install_honeypot
from honeypotnet.protect import protect
from honeypotnet.purify import purify
from honeypotnet.state import STATE_FILE, CheckpointError
from honeypotnet.steps import generate_trigger, noisy_forward
from honeypotnet.trigger import Trigger
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


def test_generate_trigger_moves_a_model_towards_the_target(near_copy):
    """Step 2 alone: a UAP on a trained model raises its target rate far above the clean rate."""
    train, model, _ = near_copy
    cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3)
    trig = generate_trigger([model], Trigger.uap(32, cfg.eps), train.images, cfg, 0)
    with torch.no_grad():
        x = train.float()[:500]
        before = (model(x).argmax(1) == 3).float().mean()
        after = (model(trig.stamp(x)).argmax(1) == 3).float().mean()
    assert after > before + 0.3, (before, after)


def test_trigger_step_split_into_chunks_is_the_same_step():
    """generate_trigger differentiates one model (and with `chunk`, one slice of the batch) at a time; the
    step is the sum of the same gradients, so a batch split into chunks gives the same trigger (blur, weight
    noise and two kinds of negatives on), and a chunk as large as the batch changes nothing."""
    torch.manual_seed(0)
    images = (torch.rand(300, 3, 32, 32) * 255).to(torch.uint8)
    models = [create_model(a, 10).eval() for a in ("cnn", "cnn", "resnet20", "cnn")]
    cfg = ProtectConfig().override({"trigger.passes": 1, "trigger.batch": 300, "trigger.blur_split": False})
    assert cfg.trigger_blur > 0 and cfg.negative_noise > 0 and cfg.negative_per_batch == 1

    def step(chunk):
        return generate_trigger(models[:2], Trigger.uap(32, cfg.eps), images, cfg, 0, models[2:], chunk=chunk).pattern

    whole = step(None)
    assert whole.abs().max() > 0
    assert torch.equal(step(300), whole)
    for chunk in (64, 7):  # sign steps: at most a rounding-level gradient entry may flip
        assert (step(chunk) != whole).float().mean() < 0.01
    # trigger.blur_split (the default) blurs the batch's second half instead of adding a blurred copy: the same
    # rows are blurred whatever the chunks, and it is another step than the blurred copy's
    cfg = cfg.override({"trigger.blur_split": True})
    split = step(None)
    assert torch.equal(step(300), split) and (split != whole).float().mean() > 0.01
    for chunk in (64, 7):
        assert (step(chunk) != split).float().mean() < 0.01


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
    # the default (robust) configuration simulates a thief's labelled set with the owner's images: without
    # them it says what to do (the default's end-to-end properties: tests/test_default_e2e.py)
    with pytest.raises(ValueError, match=r"owner_images.*preset\('spec'\)"):
        protect(model, imgs, None, ProtectConfig(outer_iters=1), progress=False)
    with pytest.raises(ValueError, match="owner_share.*owner_images"):
        protect(model, imgs, None, SPEC(shadow_owner_share=0.5, outer_iters=1), progress=False)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="owner_share"):
            SPEC(shadow_owner_share=bad)


def test_shadows_query_owner_images_with_owner_share(toy_victim):
    """shadow.owner_share > 0: the shadow also queries (and the trigger step runs over) that share of the
    owner images, so the same seeds give another shadow and another trigger; 0 leaves the run as it was."""
    victim, shadow, owner = toy_victim
    runs = {}
    for share in (0.0, 0.0, 1.0):
        cfg = SPEC(outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1, honeypot_steps=5, shadow_owner_share=share)
        runs.setdefault(share, []).append(protect(victim, shadow, owner.images, cfg, progress=False).trigger.pattern)
    assert torch.equal(runs[0.0][0], runs[0.0][1])  # deterministic, so a difference is the option's
    assert not torch.equal(runs[0.0][0], runs[1.0][0])


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


def test_shadow_finetune_option_changes_the_trigger():
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
    assert SPEC(shadow_finetune_epochs=2).hash() != SPEC().hash()
    with pytest.raises(ValueError, match="owner_images"):
        protect(victim, shadow, None, SPEC(shadow_finetune_epochs=1, **kw), progress=False)
    with pytest.raises(ValueError, match="finetune_lr|learning rates"):
        SPEC(shadow_finetune_lr=0)


def test_shadow_prune_option_aims_the_trigger_at_a_fine_pruned_copy(toy_victim):
    """thief.prune_ratio r > 0: a copy of the shadow with the share r of its last feature channels masked (the least
    active on the labelled set, as countermeasures.fine_prune) and fine-tuned joins the trigger step: another trigger
    from the same seed, within eps; the copy's masked columns are exactly zero and the shadow is untouched; off, the
    configuration hashes as before the option existed; a ratio outside [0, 1) or no owner images is refused."""
    from honeypotnet.models import split_classifier
    from honeypotnet.steps import finetuned_copy

    victim, shadow, owner = toy_victim
    images, labels = owner.images[:200], owner.labels[:200]
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    copy_ = finetuned_copy(victim, images, labels, epochs=1, lr=0.02, seed=0, prune_ratio=0.5)
    weight = split_classifier(copy_)[1].weight
    zero = (weight == 0).all(0)
    assert int(zero.sum()) == round(0.5 * weight.shape[1])
    assert all(torch.equal(v, victim.state_dict()[k]) for k, v in before.items())
    kw = dict(outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=2,
              shadow_finetune_epochs=1, shadow_finetune_images=100)
    plain = protect(victim, shadow, owner.images, SPEC(**kw), progress=False)
    pruned = protect(victim, shadow, owner.images, SPEC(shadow_prune_ratio=0.3, **kw), progress=False)
    assert not torch.allclose(plain.trigger.pattern, pruned.trigger.pattern)
    assert pruned.trigger.pattern.abs().max() <= pruned.config.eps + 1e-6
    assert 0 <= pruned.history[-1]["shadow_pruned_asr"] <= 1 and "shadow_pruned_asr" not in plain.history[-1]
    assert SPEC().hash() == SPEC(shadow_prune_ratio=0.0).hash() != SPEC(shadow_prune_ratio=0.2).hash()
    assert ProtectConfig().override({"thief.prune_ratio": 0.2}).shadow_prune_ratio == 0.2
    with pytest.raises(ValueError, match="prune_ratio"):
        SPEC(shadow_prune_ratio=1.0)
    with pytest.raises(ValueError, match="owner_images"):
        protect(victim, shadow, None, SPEC(shadow_prune_ratio=0.2, outer_iters=1), progress=False)


def test_shadows_of_more_families_join_the_trigger_step_and_resume(toy_victim, tmp_path):
    """shadow.more_archs adds shadows of other families, extracted every iteration like the shadow and optimised
    against by the trigger step: another trigger from the same seed, their inherited ASR in the history, their state
    in the checkpoint (1 + 1 iterations resume to the 2-iteration run); off, the configuration hashes as before."""
    victim, shadow, owner = toy_victim
    owner = owner.images
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=4)
    plain = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), progress=False)
    cfg = SPEC(outer_iters=2, shadow_more_archs="vgg_small", **kw)
    more = protect(victim, shadow, owner, cfg, progress=False)
    assert not torch.allclose(plain.trigger.pattern, more.trigger.pattern)
    assert all(0 <= h["shadow1_vgg_small_asr"] <= 1 for h in more.history)
    protect(victim, shadow, owner, cfg.override({"loop.outer_iters": 1}), checkpoint_dir=tmp_path, progress=False)
    resumed = protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(more.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    assert SPEC().hash() == SPEC(shadow_more_archs="").hash() != cfg.hash()
    assert SPEC(shadow_more_archs=" mobilenetv2_small , cnn ").more_shadow_archs() == ["mobilenetv2_small", "cnn"]
    with pytest.raises(ValueError, match="unknown architecture"):
        SPEC(shadow_more_archs="cnn,no_such_net")


def test_blur_in_the_trigger_step_makes_the_trigger_survive_a_blur(near_copy):
    """trigger_blur=b also feeds each batch Gaussian-blurred (σ ~ U(b/4, b)) to the model: the trigger
    moves blurred stamped images (purify, σ 0.5) to the target clearly more often than the plain UAP
    does (measured at CI's 2 threads: 43 vs 32%; 1 thread: 45 vs 34%), keeps most of its unblurred effect
    (59 vs 66%), stays within ±eps, and
    the option leaves old configuration keys and hashes alone."""
    train, model, _ = near_copy
    x = train.float()[:500]

    def rate(z: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(z).argmax(1) == 3).float().mean())

    plain, blurred = {}, {}
    for b, split in ((0.0, False), (1.0, False), (1.0, True)):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, trigger_blur=b, trigger_blur_split=split)
        trig = generate_trigger([model], Trigger.uap(32, cfg.eps), train.images, cfg, 0)
        assert trig.pattern.abs().max() <= cfg.eps + 1e-6
        s = trig.stamp(x)
        plain[b, split], blurred[b, split] = rate(s), rate(purify(s, "blur", sigma=0.5))
    before = rate(x)
    for split in (False, True):  # blur_split: half of each batch blurred, no image added, the same effect
        assert blurred[1.0, split] > blurred[0.0, False] + 0.05, (blurred, plain)
        assert plain[1.0, split] > before + 0.3 and plain[1.0, split] > plain[0.0, False] - 0.15, (before, plain)
    assert SPEC(trigger_blur=0.75).hash() != SPEC().hash()
    for bad in (-0.5, float("nan"), 9.0):
        with pytest.raises(ValueError, match="trigger.blur"):
            SPEC(trigger_blur=bad)


@pytest.fixture(scope="module")
def near_copy():
    """The shapes training set, a shadow A (cnn_small, 3 epochs) and its near copy B (A fine-tuned one
    epoch on 500 images), both in eval mode: a UAP on A transfers to B. Trained once for the module; the
    tests only read them (generate_trigger leaves the models as they were)."""
    train = load_dataset("shapes", split="train", n=1500)
    torch.manual_seed(0)
    a = create_model("cnn_small", 10)
    fit(a, train.images, train.labels, FitConfig(epochs=3, seed=0), progress=False)
    b = copy.deepcopy(a)
    fit(b, train.images[:500], train.labels[:500], FitConfig(epochs=1, lr=0.01, seed=3), progress=False)
    return train, a.eval(), b.eval()


def test_negative_shadow_keeps_the_trigger_off_a_clean_model(near_copy):
    """negative_weight > 0 adds −log(1 − p_target) of a clean model to the trigger step. Shadow A and
    its near copy B (A fine-tuned one epoch, so a UAP on A transfers to B, as it does from a shadow
    to an innocent extracted copy): the plain UAP moves B to the target about as much as A; with the
    negative term on B it moves B far less, and A still more than B. Off, old keys are unchanged."""
    train, a, b = near_copy
    x = train.float()[:500]
    rate = {}
    for w in (0.0, 5.0):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, negative_weight=w)
        trig = generate_trigger([a], Trigger.uap(32, cfg.eps), train.images, cfg, 0, [b])
        assert trig.pattern.abs().max() <= cfg.eps + 1e-6
        with torch.no_grad():
            rate[w] = [float((m(trig.stamp(x)).argmax(1) == 3).float().mean()) for m in (a, b)]
    assert rate[0.0][1] > 0.3, rate  # the plain UAP transfers to the clean copy...
    assert rate[5.0][1] < rate[0.0][1] / 2, rate  # ...the negative shadow's far less
    assert rate[5.0][0] > rate[5.0][1] + 0.05, rate  # and it still aims at the shadow
    assert SPEC(negative_weight=1.0).hash() != SPEC().hash()
    with pytest.raises(ValueError, match="negatives.weight"):
        SPEC(negative_weight=float("nan"))


def test_negatives_per_batch_draws_some_negatives_and_all_of_them_is_the_default(near_copy):
    """negatives.per_batch k: each trigger batch sees k of the negative models (the term scaled by n/k);
    k = n is exactly the default (every negative model), k = 1 another trigger that still keeps off them."""
    train, a, b = near_copy
    x = train.float()[:500]
    b2 = copy.deepcopy(b)  # a second, slightly different innocent model
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in b2.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    negs = [b, b2]
    trig = {}
    for k in (0, 2, 1):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, negative_weight=5.0, negative_per_batch=k)
        trig[k] = generate_trigger([a], Trigger.uap(32, cfg.eps), train.images, cfg, 0, negs)
    cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3)
    trig["plain"] = generate_trigger([a], Trigger.uap(32, cfg.eps), train.images, cfg, 0)
    assert torch.equal(trig[0].pattern, trig[2].pattern) and not torch.equal(trig[0].pattern, trig[1].pattern)
    with torch.no_grad():
        rate = {k: float((b(trig[k].stamp(x)).argmax(1) == 3).float().mean()) for k in ("plain", 0, 1)}
    assert rate[1] < rate["plain"] / 2, rate  # one negative per batch still keeps the trigger off the clean copy
    with pytest.raises(ValueError, match="per_batch"):
        SPEC(negative_per_batch=-1)


class _Counted(nn.Module):
    """A model that counts its forward passes (the negatives' draw per trigger batch)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("blur,split", [(0.0, False), (0.75, False), (0.75, True)])
def test_negatives_per_batch_holds_in_every_batch_whatever_the_blur(blur, split):
    """negatives.per_batch 1 draws one negative model in every trigger batch, with and without the blur and
    its split (a blur_split once left every negative in every batch after the first, at the per-batch scale)."""
    torch.manual_seed(0)
    negs = [_Counted(create_model("cnn_small", 10)) for _ in range(4)]
    shadow = _Counted(create_model("cnn_small", 10))
    images = (torch.rand(320, 3, 32, 32) * 255).to(torch.uint8)
    cfg = SPEC(negative_weight=1.0, negative_per_batch=1, trigger_blur=blur, trigger_blur_split=split,
               trigger_passes=1, trigger_batch=32, negative_noise=0.0)
    generate_trigger([shadow], Trigger.uap(32, 16 / 255), images, cfg, 0, negs)
    assert shadow.calls == 10 and sum(n.calls for n in negs) == 10, [n.calls for n in negs]
    assert sum(n.calls > 0 for n in negs) > 1  # drawn at random, not always the same one


def test_noisy_negatives_see_a_family_of_innocent_models(near_copy):
    """negative_noise=s runs each negative model with weights w·(1 + s·N(0, 1)), fresh per batch: the
    forward is the model's own at s = 0, a different, reproducible one at s > 0, and the model is left
    as it was; in the trigger step it changes the trigger (still within ±eps) while the negative model
    stays well below the plain UAP's rate on it. Off, old keys are unchanged; bad values are refused."""
    train, a, b = near_copy
    x = train.float()[:500]
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(noisy_forward(b, x[:64], 0.0, torch.Generator().manual_seed(1)), b(x[:64]))
        n1 = noisy_forward(b, x[:64], 0.2, torch.Generator().manual_seed(1))
        n2 = noisy_forward(b, x[:64], 0.2, torch.Generator().manual_seed(1))
        n3 = noisy_forward(b, x[:64], 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(n1, n2) and not torch.allclose(n1, b(x[:64]).detach()) and not torch.allclose(n1, n3)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    rate, patterns = {}, {}
    for w, s in ((0.0, 0.0), (5.0, 0.0), (5.0, 0.2)):
        cfg = SPEC(target=3, eps=32 / 255, trigger_passes=3, negative_weight=w, negative_noise=s)
        trig = generate_trigger([a], Trigger.uap(32, cfg.eps), train.images, cfg, 0, [b])
        assert trig.pattern.abs().max() <= cfg.eps + 1e-6
        patterns[w, s] = trig.pattern
        with torch.no_grad():
            rate[w, s] = [float((m(trig.stamp(x)).argmax(1) == 3).float().mean()) for m in (a, b)]
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    assert not torch.allclose(patterns[5.0, 0.0], patterns[5.0, 0.2])
    # measured (A / B) at CI's 2 threads: plain UAP 0.66 / 0.52, negative term 0.35 / 0.17, with noise 0.2
    # 0.31 / 0.19; at 1 thread 0.66 / 0.53, 0.31 / 0.15, 0.30 / 0.20; A before any trigger 0.05
    assert rate[5.0, 0.2][1] < rate[0.0, 0.0][1] - 0.15, rate
    assert rate[5.0, 0.2][0] > float((a(x).argmax(1) == 3).float().mean()) + 0.15, rate  # still aims at A
    assert SPEC(negative_weight=1.0, negative_noise=0.1).hash() != SPEC(negative_weight=1.0).hash()
    for bad in (-0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="negatives.noise"):
            SPEC(negative_noise=bad)


def test_protect_with_negative_shadow_records_and_resumes(tmp_path):
    shadow = load_dataset("shapes", split="shadow", n=400).images
    owner = load_dataset("shapes", split="train", n=300).images
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=2, negative_weight=1.0)
    full = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), progress=False)
    assert all(0 <= h["negative0_cnn_small_asr"] <= 1 for h in full.history) and len(full.history) == 2
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path, progress=False)
    assert "negative0_cnn_small" in torch.load(tmp_path / STATE_FILE, weights_only=True)
    resumed = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    key = "negative0_cnn_small_asr"
    assert [h[key] for h in resumed.history] == pytest.approx([h[key] for h in full.history], abs=1e-6)


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
        assert 0 <= h["negative0_cnn_small_asr"] <= 1 and 0 <= h["negative1_resnet20_asr"] <= 1
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "protect_state.pt", weights_only=True)
    assert {"negative0_cnn_small", "negative1_resnet20"} <= set(state)
    assert any("layer" in k for k in state["negative1_resnet20"])
    resumed = protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    # old keys are unchanged while it holds its default; an unknown architecture is refused up front;
    # without a negative weight (or with the victim alone) no negative shadow is trained
    assert SPEC(negative_weight=1.0, negative_archs="cnn,resnet20").hash() != SPEC(negative_weight=1.0).hash()
    for w in (1.0, 0.0):  # checked even while it has no effect
        with pytest.raises(ValueError, match="vgg99"):
            SPEC(negative_weight=w, negative_archs="cnn,vgg99")
    assert SPEC(negative_archs="resnet20").negative_shadow_archs() == []


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
    assert all(0 <= h["negative0_cnn_small_ft_asr"] <= 1 for h in full.history)
    assert "negative0_cnn_small_ft_asr" not in plain.history[0]
    assert not torch.allclose(full.trigger.pattern, plain.trigger.pattern)
    # after one iteration the negative shadow is the one the plain run has (its copy was fine-tuned,
    # not the shadow itself)
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path / "plain", progress=False)
    protect(victim, shadow, owner, SPEC(outer_iters=1, negative_finetune_epochs=1, negative_finetune_lr=0.1, **kw),
            checkpoint_dir=tmp_path, progress=False)
    neg_plain = torch.load(tmp_path / "plain" / STATE_FILE, weights_only=True)["negative0_cnn_small"]
    neg_ft = torch.load(tmp_path / STATE_FILE, weights_only=True)["negative0_cnn_small"]
    assert all(torch.equal(neg_plain[k], neg_ft[k]) for k in neg_plain)
    resumed = protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    with pytest.raises(ValueError, match="negatives.finetune_epochs"):
        SPEC(negative_finetune_epochs=2)  # no negative shadow to fine-tune
    with pytest.raises(ValueError, match="negatives.finetune_epochs"):
        SPEC(negative_weight=1.0, negative_finetune_epochs=-1)
    with pytest.raises(ValueError, match="owner_images"):
        protect(victim, shadow, None, cfg, progress=False)




def test_negatives_once_trains_the_innocent_models_once_and_resumes(tmp_path):
    """negatives.once N: the negative shadows are extracted N epochs before the first iteration and never
    again, their fine-tuned copies made once; the state after three iterations holds the negatives of the
    first; a resumed run (which re-makes the copies from the same stream) ends where one whole run does;
    and the option changes the trigger (the default re-extracts every iteration)."""
    shadow, owner, victim = _negative_setup()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=5, negative_weight=1.0,
              negative_archs="cnn_small", negative_finetune_epochs=1, shadow_finetune_images=100)
    cfg = SPEC(outer_iters=3, negative_once=2, **kw)
    seconds = []
    full = protect(victim, shadow, owner, cfg, progress=False, callback=lambda e: seconds.append(e.seconds))
    assert all(0 <= h["negative0_cnn_small_ft_asr"] <= 1 for h in full.history)
    protect(victim, shadow, owner, SPEC(outer_iters=1, negative_once=2, **kw), checkpoint_dir=tmp_path, progress=False)
    first = torch.load(tmp_path / STATE_FILE, weights_only=True)["negative0_cnn_small"]
    resumed = protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    last = torch.load(tmp_path / STATE_FILE, weights_only=True)["negative0_cnn_small"]
    assert all(torch.equal(first[k], last[k]) for k in first)
    assert torch.allclose(full.trigger.pattern, resumed.trigger.pattern, atol=1e-6)
    # the extraction and the copies cost only the first iteration
    assert seconds[0]["negatives"] > 10 * max(s["negatives"] for s in seconds[1:])
    every = protect(victim, shadow, owner, SPEC(outer_iters=3, **kw), progress=False)
    assert not torch.allclose(every.trigger.pattern, full.trigger.pattern)
    # a new option set to its old behaviour leaves the hash (checkpoints, benchmark units) of earlier runs as it was
    # (the robust preset before it extracted its negatives once: its checkpoints and units stay valid)
    before = ProtectConfig.preset("robust", negative_once=0, negative_per_batch=0, trigger_blur_split=False)
    assert before.hash() == "3b71f7a320caa484" and SPEC().hash() == "58d3313fa6a74fc8"
    assert "once" not in before.identity()["negatives"] and cfg.identity()["negatives"]["once"] == 2
    assert ProtectConfig().identity()["negatives"]["once"] == 24
    assert "blur_split" in SPEC(trigger_blur_split=True).identity()["trigger"]
    assert cfg.hash() != SPEC(outer_iters=3, **kw).hash() != SPEC(trigger_blur_split=True).hash()
    with pytest.raises(ValueError, match="negatives.once"):
        SPEC(negative_once=-1)


# ------------------------------------------------------------------------------------------------ resume, RNG


def _toy_run():
    shadow = load_dataset("shapes", split="shadow", n=300).images
    owner = load_dataset("shapes", split="train", n=200).images
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    kw = dict(shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=4)
    return shadow, owner, victim, kw


def test_resume_skips_finished_iterations_and_runs_none_when_done(tmp_path):
    """A resumed run calls the loop only for the iterations left (counted through the public callback):
    1 of 2 after an interruption after the first, 0 when all are done (and it returns the saved result)."""
    shadow, owner, victim, kw = _toy_run()
    events = []
    protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), checkpoint_dir=tmp_path, progress=False,
            callback=events.append)
    assert [e.iteration for e in events] == [1] and set(events[0].seconds) >= {"shadow", "trigger", "honeypot"}
    events.clear()
    two = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), checkpoint_dir=tmp_path, progress=False,
                  callback=events.append)
    assert [e.iteration for e in events] == [2]
    events.clear()
    again = protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), checkpoint_dir=tmp_path, progress=False,
                    callback=events.append)
    assert events == [] and again.history == two.history
    assert torch.equal(again.trigger.pattern, two.trigger.pattern)


def test_a_truncated_or_corrupted_checkpoint_is_refused_and_left_alone(tmp_path):
    shadow, owner, victim, kw = _toy_run()
    cfg = SPEC(outer_iters=1, **kw)
    protect(victim, shadow, owner, cfg, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / STATE_FILE
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"not a checkpoint", data[:100] + bytes(200) + data[300:]):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="damaged"):
            protect(victim, shadow, owner, SPEC(outer_iters=2, **kw), checkpoint_dir=tmp_path, progress=False)
        assert path.read_bytes() == damaged  # refused, not overwritten


def test_protect_leaves_the_callers_random_state_alone():
    shadow, owner, victim, kw = _toy_run()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the same run
    b = protect(victim, shadow, owner, SPEC(outer_iters=1, **kw), progress=False)
    assert torch.equal(a.trigger.pattern, b.trigger.pattern)


def test_random_streams_are_distinct_per_name_iteration_and_seed():
    from honeypotnet.ops import rng, seed_of

    seeds = {seed_of(s, name, it) for s in (0, 1) for name in ("shadow", "trigger", "honeypot") for it in range(8)}
    assert len(seeds) == 2 * 3 * 8  # e.g. "trigger" at iteration 6 and "honeypot" at 0 differ
    assert seed_of(0, "trigger", 6) == seed_of(0, "trigger", 6)
    assert torch.equal(torch.rand(3, generator=rng(0, "x")), torch.rand(3, generator=rng(0, "x")))
