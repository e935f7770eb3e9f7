"""Tests for honeypotnet.models: registry, shapes, split_classifier, pretrained CIFAR ResNets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from honeypotnet.models import (
    _REGISTRY,
    CifarResNet,
    FeatureExtractor,
    ImageClassifier,
    Normalize,
    TorchvisionResNet,
    create_model,
    feature_dim,
    list_models,
    load_pretrained_cifar_resnet,
    register_model,
    split_classifier,
)

FAMILIES = ["vgg_small", "mobilenetv2_small", "convmixer"]  # families the protection itself never uses
ALL_MODELS = ["cnn", "cnn_small", "resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet56",
              "tv_resnet18", "tv_resnet34", *FAMILIES]
FEATURE_DIMS = {"cnn": 256, "cnn_small": 128, "resnet18": 512, "resnet34": 512, "tv_resnet18": 512, "tv_resnet34": 512,
                "resnet20": 64, "resnet32": 64, "resnet44": 64, "resnet56": 64,
                "vgg_small": 256, "mobilenetv2_small": 640, "convmixer": 128}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _checkpoint(shared_dir: Path, depth: int) -> Path:
    found = sorted((shared_dir / "weights" / "resnet-cifar10").glob(f"resnet{depth}-*.th"))
    if not found:
        from conftest import missing_shared

        missing_shared(f"no resnet{depth} checkpoint under {shared_dir}/weights/resnet-cifar10")
    return found[0]


def test_list_models() -> None:
    assert set(ALL_MODELS) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_and_split(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        features, head = split_classifier(model)
        z = features(x)
    assert y.shape == (2, 7)
    assert z.shape == (2, FEATURE_DIMS[name]) == (2, feature_dim(model))
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert head is getattr(model, "fc", None) or head is getattr(model, "linear", None)
    torch.testing.assert_close(head(z), y)
    assert isinstance(model.normalize, Normalize)
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()


@pytest.mark.parametrize("name", ["resnet18", "cnn_small", "resnet20", "tv_resnet18"])
def test_forward_64x64(name: str) -> None:
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("name", FAMILIES)
def test_other_families_train_split_and_stay_small(name: str) -> None:
    """The families a thief may pick outside the protection's own (VGG, MobileNetV2, ConvMixer): one
    training step moves the shared features' parameters and the head, the split model still equals
    the model after it, they are small (the thief trains them on CPU) and take 64 px inputs too."""
    model = create_model(name, num_classes=10)
    assert isinstance(model, ImageClassifier)
    assert sum(p.numel() for p in model.parameters()) < 1_500_000
    features, head = split_classifier(model)
    assert head is model.fc and feature_dim(model) == head.in_features
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model.train()(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    after = model.state_dict()
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    moved = [k for k in before if k.endswith(".weight") and not k.startswith("fc.") and not torch.equal(after[k], before[k])]
    assert moved
    assert {k for k, _ in features.named_parameters()} == {k for k, _ in model.named_parameters() if not k.startswith("fc.")}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(features(x)), model(x))
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert torch.equal(model.normalize.mean, before["normalize.mean"])  # buffers, not parameters


def test_imagenet_stem_is_torchvisions() -> None:
    """tv_resnet18 has torchvision's stem (7x7/2 conv + max-pool): the same parameter shapes as
    torchvision's resnet18, and a 64x64 input reaches layer4 at 2x2 (the CIFAR stem: 8x8)."""
    ours, ref = create_model("tv_resnet18", 10), tv_resnet18(num_classes=10)
    shapes = {k: v.shape for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    seen = {}
    for name in ("tv_resnet18", "resnet18"):
        m = create_model(name, 10).eval()
        m.layer4.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.shape[-1]))
        with torch.no_grad():
            m(torch.rand(1, 3, 64, 64))
    assert seen == {"tv_resnet18": 2, "resnet18": 8}
    with pytest.raises(ValueError, match="stem"):
        TorchvisionResNet([2, 2, 2, 2], stem="vgg")


def test_cifar_resnet_keys_match_akamaster_layout() -> None:
    keys = set(create_model("resnet20").state_dict())
    for k in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.2.bn2.bias",
              "layer3.2.conv2.weight", "linear.weight", "linear.bias"]:
        assert k in keys
    assert not any("shortcut" in k for k in keys)  # option A: parameter-free shortcuts
    n_blocks = {d: len({k.split(".")[1] for k in create_model(f"resnet{d}").state_dict() if k.startswith("layer2.")})
                for d in (20, 32, 44, 56)}
    assert n_blocks == {20: 3, 32: 5, 44: 7, 56: 9}


def test_feature_extractor_shares_parameters_but_not_head() -> None:
    model = create_model("cnn_small")
    features, head = split_classifier(model)
    assert isinstance(features, FeatureExtractor)
    model_params = {id(p) for p in model.parameters()}
    feat_params = {id(p) for p in features.parameters()}
    head_params = {id(p) for p in head.parameters()}
    assert feat_params | head_params == model_params and not feat_params & head_params
    features.requires_grad_(False)
    assert all(p.requires_grad for p in head.parameters())
    assert not model.features[0][0].weight.requires_grad
    features.eval()
    assert not model.features[0][1].training
    with torch.no_grad():
        model.fc.weight.zero_()
    torch.testing.assert_close(head.weight, torch.zeros_like(head.weight))  # same object, not a copy
    assert set(features.state_dict()) == {k for k in model.state_dict() if not k.startswith("fc.")}


def test_split_generic_torchvision_model() -> None:
    model = tv_resnet18(num_classes=4).eval()  # not an ImageClassifier: swap path
    features, head = split_classifier(model)
    assert head is model.fc and feature_dim(model) == 512
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(features(x)), model(x))
    assert model.fc is head  # restored after the feature pass


def test_split_sequential_classifier_and_errors() -> None:
    class SeqHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())
            self.classifier = nn.Sequential(nn.Linear(6, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.body(x))

    model = SeqHead()
    features, head = split_classifier(model)
    assert head is model.classifier[0]
    x = torch.rand(2, 3, 2, 2)
    torch.testing.assert_close(head(features(x)), model(x))

    # an nn.Sequential ending in a Linear, and a classifier attribute ending in one (torchvision's Dropout +
    # Linear), split at that last Linear
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    features2, head2 = split_classifier(seq)
    assert head2 is seq[1]
    torch.testing.assert_close(head2(features2(x)), seq(x))
    dropout_head = SeqHead().eval()
    dropout_head.classifier = nn.Sequential(nn.Dropout(), nn.Linear(6, 3))
    assert split_classifier(dropout_head)[1] is dropout_head.classifier[1]
    with pytest.raises(TypeError, match="no final nn.Linear"):
        split_classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.ReLU()))
    with pytest.raises(TypeError):
        split_classifier(features)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnet21")


def test_register_model_and_duplicates() -> None:
    name = "_test_tiny_cnn"
    try:
        @register_model(name)
        def _tiny(num_classes: int = 10, **kwargs) -> nn.Module:
            return create_model("cnn_small", num_classes=num_classes, widths=(4, 8), **kwargs)

        assert name in list_models()
        assert create_model(name.upper(), num_classes=3)(torch.rand(1, 3, 32, 32)).shape == (1, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("cnn")(lambda num_classes=10: nn.Identity())
    finally:
        _REGISTRY.pop(name, None)  # keep the global registry clean for other tests
    assert name not in list_models()


def test_normalize() -> None:
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    x = torch.ones(1, 3, 2, 2)
    out = norm(x)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 1.5, 1.0]))
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(ValueError):
        norm(torch.ones(1, 1, 2, 2))


def test_invalid_depth_and_bad_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CifarResNet(depth=21)
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        load_pretrained_cifar_resnet(junk)
    wrong = tmp_path / "wrong.th"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, wrong)
    with pytest.raises(ValueError, match="not a CIFAR ResNet"):
        load_pretrained_cifar_resnet(wrong)
    with pytest.raises(FileNotFoundError):
        load_pretrained_cifar_resnet(tmp_path / "missing.th")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    """A checkpoint in akamaster's format ('module.' keys, no num_batches_tracked) loads strictly."""
    src = CifarResNet(depth=20, num_classes=10).eval()
    state = {f"module.{k}": v for k, v in src.state_dict().items()
             if not k.startswith("normalize.") and not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet20-test.th"
    torch.save({"best_prec1": 0.0, "state_dict": state}, path)
    loaded = load_pretrained_cifar_resnet(path)
    assert loaded.depth == 20 and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x))
    with pytest.raises(ValueError, match="ResNet-20"):
        load_pretrained_cifar_resnet(path, depth=32)
    with pytest.raises(ValueError):
        create_model("resnet32", pretrained=str(path))


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_pretrained_loads_strict(shared_dir: Path, depth: int) -> None:
    path = _checkpoint(shared_dir, depth)
    model = create_model(f"resnet{depth}", pretrained=str(path))
    assert isinstance(model, CifarResNet) and isinstance(model, ImageClassifier)
    assert model.depth == depth and model.num_classes == 10
    assert load_pretrained_cifar_resnet(path).depth == depth  # depth inferred from the file


def test_pretrained_resnet20_accuracy(shared_dir: Path, cifar10_jpeg_root: Path) -> None:
    from honeypotnet.data import load_dataset

    model = create_model("resnet20", pretrained=str(_checkpoint(shared_dir, 20)))
    data = load_dataset("imagefolder", cifar10_jpeg_root, "test")
    assert len(data) == 10_000
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data), 500):
            x = data.images[i:i + 500].float().div_(255.0)
            correct += int((model(x).argmax(1) == data.labels[i:i + 500]).sum())
    acc = correct / len(data)
    assert acc >= 0.78, f"ResNet-20 accuracy on CIFAR-10 JPEG test split: {acc:.4f}"
