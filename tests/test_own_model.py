"""A user's own classifier and data: torchvision / timm models, nn.Sequential, explicit heads, state dicts,
normalisation, and images as tensors, Datasets or DataLoaders."""
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from honeypotnet.config import ProtectConfig
from honeypotnet.data import as_images, load_dataset
from honeypotnet.head import HoneypotLayer, as_plain_model, head_attribute, install_honeypot
from honeypotnet.models import Normalize, create_model, find_head, load_weights, split_classifier
from honeypotnet.protect import protect


def _splits_exactly(model, size=32, head=None):
    model.eval()
    f, h = split_classifier(model, head)
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        return torch.allclose(h(f(x)), model(x), atol=1e-5)


@pytest.mark.parametrize("name, path", [("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1"),
                                        ("resnet18", "fc")])
def test_torchvision_heads_are_found_and_split_exactly(name, path):
    model = torchvision.models.get_model(name, weights=None, num_classes=7)
    assert find_head(model)[0] == path and _splits_exactly(model)


def test_sequentials_wrappers_and_explicit_heads():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    assert find_head(seq)[0] == "4" and _splits_exactly(seq)
    wrapped = nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), torchvision.models.resnet18(num_classes=5))
    assert find_head(wrapped)[0] == "1.fc" and _splits_exactly(wrapped)
    mb = torchvision.models.mobilenet_v3_small(num_classes=6)
    assert find_head(mb, "classifier.-1")[0] == "classifier.3"
    assert find_head(mb, lambda m: m.classifier[3])[0] == "classifier.3"
    with pytest.raises(TypeError, match="not an nn.Linear"):
        find_head(mb, "classifier.1")
    with pytest.raises(ValueError, match="no submodule 'head'"):
        find_head(mb, "head")

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 2), nn.Linear(4, 2)

    with pytest.raises(TypeError, match="several candidate heads"):
        find_head(TwoHeads())


def test_timm_models_use_timms_own_classifier():
    pytest.importorskip("timm", reason="timm is an optional extra (installed by setup.sh)")
    model = create_model("timm:convnext_atto", 5)
    assert find_head(model)[0] == "1.head.fc" and _splits_exactly(model)


def test_state_dicts_load_safely_and_mismatches_are_named(tmp_path):
    tv = torchvision.models.mobilenet_v3_small(num_classes=7)
    torch.save({"state_dict": {"module." + k: v for k, v in tv.state_dict().items()}}, tmp_path / "wrapped.pt")
    model = create_model("torchvision:mobilenet_v3_small", 7, weights=tmp_path / "wrapped.pt", normalize=None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tv.state_dict().values()))
    with pytest.raises(ValueError, match="is num_classes right"):
        create_model("torchvision:mobilenet_v3_small", 9, weights=tmp_path / "wrapped.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # code, not a state dict: weights_only refuses
    with pytest.raises(ValueError, match="not a readable state dict"):
        load_weights(torchvision.models.resnet18(), tmp_path / "pickled_module.pt")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        create_model("torchvision:resnet999", 3)


def test_protected_linear_head_goes_back_into_the_users_class():
    tv = torchvision.models.resnet18(num_classes=5).eval()
    protected = install_honeypot(tv, HoneypotLayer.from_linear(tv.fc, "linear"))
    assert head_attribute(protected) == "fc" and "fc.linear.weight" in protected.state_dict()
    mine = torchvision.models.resnet18(num_classes=5).eval()
    mine.load_state_dict(as_plain_model(protected).state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(mine(x), protected(x), atol=1e-6)
    with pytest.raises(ValueError, match="residual"):
        as_plain_model(install_honeypot(tv, HoneypotLayer.from_linear(tv.fc, "residual")))


def test_images_in_every_form_and_out_of_range_input_refused():
    ds = load_dataset("shapes", split="shadow", n=64)
    floats = ds.float()
    for form in (ds, ds.images, floats, TensorDataset(floats, torch.zeros(64)), DataLoader(TensorDataset(ds.images), batch_size=10)):
        x = as_images(form)
        assert x.shape == (64, 3, 32, 32)
    fake = torchvision.datasets.FakeData(12, (3, 16, 16), 3, transform=torchvision.transforms.ToTensor())
    assert as_images(fake).shape == (12, 3, 16, 16)
    with pytest.raises(ValueError, match=r"not \[0, 1\]"):
        as_images(floats * 2 - 1)  # normalised input: the model normalises, not the data
    with pytest.raises(ValueError, match="expected a tensor"):
        as_images([1, 2, 3])


def test_protect_takes_a_dataloader_and_a_torchvision_model_with_a_named_head():
    shadow = DataLoader(TensorDataset(load_dataset("shapes", split="shadow", n=200).images), batch_size=64)
    owner = load_dataset("shapes", split="train", n=100)
    torch.manual_seed(0)
    victim = nn.Sequential(Normalize((0.5,) * 3, (0.25,) * 3), torchvision.models.mobilenet_v3_small(num_classes=10))
    cfg = ProtectConfig.preset("spec", outer_iters=1, shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1,
                               honeypot_steps=5)
    res = protect(victim, shadow, owner, cfg, progress=False, head="1.classifier.-1")
    assert head_attribute(res.model) == "1.classifier.3" and len(res.history) == 1
    with pytest.raises(ValueError, match="resize both sets"):
        protect(victim, shadow, load_dataset("shapes", split="train", n=10, size=48), cfg, progress=False)


def test_caltech101_torchvision_victim_through_the_cli(caltech101_root, tmp_path, capsys):
    """Toy size of bench/own_model.py on the real 101-class data: a torchvision model trained, protected and
    verified through the CLI with --arch torchvision:NAME; verification data of another task is refused."""
    import json

    from honeypotnet.cli import main

    def call(*args):
        rc = main(["--quiet", *[str(a) for a in args]])
        return rc, capsys.readouterr().err

    data = ["--data-root", caltech101_root, "--image-size", "32"]
    victim = tmp_path / "victim.safetensors"
    rc, err = call("train", "--arch", "torchvision:mobilenet_v3_small", "--data", "imagefolder:train:400", *data,
                   "--epochs", "1", "--test-split", "", "--output", victim)
    assert rc == 0, err
    rc, err = call("protect", victim, "--shadow", "imagefolder:test:200", "--shadow-root", caltech101_root,
                   "--owner", "imagefolder:train:300", "--owner-root", caltech101_root, "--image-size", "32",
                   "--preset", "spec", "--set", "loop.outer_iters=1", "--set", "shadow.arch=cnn_small",
                   "--set", "shadow.epochs=1", "--set", "head.steps=5", "--references", "", "--force",
                   "--output", tmp_path / "bundle")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["num_classes"] == 101 and manifest["arch"] == "torchvision:mobilenet_v3_small"
    rc, err = call("verify", tmp_path / "bundle", victim, "--data", "imagefolder:test:300", "--data-root", caltech101_root,
                   "--tau0", "0.05",
                   "--json", tmp_path / "v.json")
    assert rc in (0, 1) and json.loads((tmp_path / "v.json").read_text())["n"] > 250
    rc, err = call("verify", tmp_path / "bundle", victim, "--data", "shapes:test", "--tau0", "0.05")
    assert rc == 2 and "10 classes but the bundle 101" in err


def test_head_study_variants_and_owner_extra_images():
    """bench.own_model's head variants: ProtectConfig fields are checked, owner.extra (the study's own field) names
    one of its kinds; the extra images are new uint8 images made from the owner's, the same for a seed."""
    from bench.own_model import owner_extra, parse_variant

    assert parse_variant("mix:head.mix_norm=3,owner.extra=mixup") == ("mix", ["head.mix_norm=3", "owner.extra=mixup"])
    for bad in ("x:owner.extra=noise", "x:head.nope=1", "x:owner.extra=mixup,owner.extra=augment", ":head.lam=1"):
        with pytest.raises(SystemExit):
            parse_variant(bad)
    owner = load_dataset("shapes", split="train", n=40).images
    for kind in ("mixup", "augment"):
        extra = owner_extra(owner, kind, seed=3)
        assert extra.dtype == torch.uint8 and extra.shape == owner.shape
        assert torch.equal(extra, owner_extra(owner, kind, seed=3)) and not torch.equal(extra, owner_extra(owner, kind, seed=4))
        new = sum(not any(torch.equal(e, o) for o in owner) for e in extra[:10])
        assert new >= 8, new  # made from owner images, not copies of them (a mixup may draw one image twice)
