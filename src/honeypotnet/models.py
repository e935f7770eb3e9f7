"""Image classifiers, a model registry, and splitting a classifier into (features, head).

Conventions shared by every model built here:

* Input: float images in [0, 1], shape ``(N, 3, H, W)``. Each model normalises internally with a
  :class:`Normalize` module (its first step); ``mean``/``std`` are buffers, so they are saved in
  the ``state_dict``.
* Output: logits, shape ``(N, K)``.
* The last layer is an ``nn.Linear`` stored as an attribute (``fc`` or ``linear``), applied to the
  flattened penultimate features ``(N, d)``. Models subclass :class:`ImageClassifier`, which
  exposes ``forward_features(x) -> (N, d)`` and ``head_attr`` (the name of that attribute), so
  ``model(x) == getattr(model, model.head_attr)(model.forward_features(x))``.

Registry names: ``resnet20 resnet32 resnet44 resnet56`` (CIFAR ResNets of He et al. 2016, option-A
shortcuts, checkpoint-compatible with akamaster/pytorch_resnet_cifar10), ``resnet18 resnet34``
(torchvision ResNets with a 3x3 stride-1 stem and no max-pool, for 32x32 or 64x64 inputs),
``cnn`` and ``cnn_small`` (a small plain CNN).

Example::

    model = create_model("resnet20", pretrained="../shared/weights/resnet-cifar10/resnet20-12fca82f.th")
    features, head = split_classifier(model)      # features(x): (N, 64); head: model.linear
"""
from __future__ import annotations

import os
import pickle
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock as _TVBasicBlock
from torchvision.models.resnet import ResNet as _TVResNet

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Normalize",
    "ImageClassifier",
    "CifarResNet",
    "CifarBasicBlock",
    "TorchvisionResNet",
    "SimpleCNN",
    "FeatureExtractor",
    "load_pretrained_cifar_resnet",
    "register_model",
    "create_model",
    "list_models",
    "split_classifier",
    "feature_dim",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``.

    Input ``(N, C, H, W)`` float in [0, 1]; output the same shape. ``mean`` and ``std`` are
    persistent buffers of shape ``(1, C, 1, 1)``, so they travel with ``.to()`` and are stored in
    the ``state_dict`` (keys ``<name>.mean`` and ``<name>.std``).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images of shape (N, {self.mean.shape[1]}, H, W), got {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        m = [round(v, 4) for v in self.mean.flatten().tolist()]
        s = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={m}, std={s}"


class ImageClassifier(nn.Module):
    """Base class: ``forward(x) = head(forward_features(x))``.

    Subclasses set ``head_attr`` (the attribute holding the final ``nn.Linear``) and implement
    :meth:`forward_features`. :func:`split_classifier` relies on this contract.
    """

    head_attr: str = "fc"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] → penultimate features ``(N, d)``."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """K, the head's ``out_features``."""
        return int(getattr(self, self.head_attr).out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] → logits ``(N, K)``."""
        return getattr(self, self.head_attr)(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-20/32/44/56 (He et al. 2016, option A), akamaster/pytorch_resnet_cifar10 layout
# --------------------------------------------------------------------------------------------
class _PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` with zero-padded extra channels. No parameters.

    ``(N, C_in, H, W) → (N, C_out, ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        extra = planes - in_planes
        if extra < 0:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_planes} → {planes})")
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_before, self.pad_after))


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU.

    ``(N, in_planes, H, W) → (N, planes, H/stride, W/stride)``. Parameter names (conv1, bn1,
    conv2, bn2) match akamaster/pytorch_resnet_cifar10; the shortcut has no parameters.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2:
                raise ValueError("option-A shortcut supports stride 2 only")
            self.shortcut = _PadShortcut(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ImageClassifier):
    """CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110, ...).

    conv1 3x3 16ch → bn1 → ReLU → layer1 (n blocks, 16ch) → layer2 (32ch, stride 2) → layer3
    (64ch, stride 2) → global average pool → ``linear`` (64 → K).
    Input ``(N, 3, H, W)`` in [0, 1] (trained at 32x32); features ``(N, 64)``; logits ``(N, K)``.
    Normalisation defaults to the ImageNet mean/std that akamaster's training used. State-dict
    keys equal that repository's checkpoint keys (minus ``module.``) plus ``normalize.mean`` /
    ``normalize.std`` (and BatchNorm ``num_batches_tracked``).
    """

    head_attr = "linear"

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.normalize = Normalize(mean, std)
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # akamaster's _weights_init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, 64)``."""
        x = self.normalize(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


_CKPT_KEY = re.compile(r"^layer([123])\.(\d+)\.")


def _read_cifar_resnet_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an akamaster checkpoint (or a bare state dict) and strip ``module.`` prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path}: not a CIFAR ResNet checkpoint (expected a dict with a 'state_dict' of tensors, "
            f"got {type(obj).__name__})"
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    required = ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "linear.weight", "linear.bias")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{path}: not a CIFAR ResNet checkpoint (missing keys {missing})")
    return state


def _infer_cifar_resnet_depth(state: dict[str, torch.Tensor], path: Any) -> int:
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
    for k in state:
        m = _CKPT_KEY.match(k)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    counts = {layer: len(ix) for layer, ix in blocks.items()}
    n = counts[1]
    if n == 0 or any(c != n for c in counts.values()) or any(ix != set(range(n)) for ix in blocks.values()):
        raise ValueError(f"{path}: not a CIFAR ResNet checkpoint (blocks per stage: {counts})")
    return 6 * n + 2


def load_pretrained_cifar_resnet(path: str | os.PathLike[str], depth: int | None = None) -> CifarResNet:
    """Load an akamaster/pytorch_resnet_cifar10 checkpoint (``resnet{20,32,44,56}-*.th``).

    The file holds ``{'best_prec1': float, 'state_dict': {'module.<key>': tensor}}``; a bare state
    dict (with or without ``module.``) is accepted too. ``depth`` is inferred from the number of
    blocks per stage when not given; the number of classes from ``linear.weight``. Loading is
    strict: the only keys filled in from the fresh model are the ones such checkpoints never carry
    (``normalize.mean``/``normalize.std`` — the ImageNet statistics that repository trained with —
    and BatchNorm ``num_batches_tracked``). Returns the model in eval mode.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not such
    a checkpoint or does not match ``depth``.
    """
    state = _read_cifar_resnet_state(path)
    found = _infer_cifar_resnet_depth(state, path)
    if depth is not None and depth != found:
        raise ValueError(f"{path}: checkpoint is a ResNet-{found}, but depth={depth} was requested")
    num_classes = int(state["linear.weight"].shape[0])
    model = CifarResNet(depth=found, num_classes=num_classes)
    own = model.state_dict()
    for k, v in own.items():
        if k not in state and (k.startswith("normalize.") or k.endswith(".num_batches_tracked")):
            state[k] = v
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not match a CIFAR ResNet-{found}: {e}") from e
    return model.eval()


# --------------------------------------------------------------------------------------------
# torchvision ResNet-18/34 with a CIFAR stem
# --------------------------------------------------------------------------------------------
class TorchvisionResNet(ImageClassifier, _TVResNet):
    """torchvision ResNet (BasicBlock), by default with a CIFAR stem: conv1 3x3 stride 1 padding 1
    and no max-pool.

    For 32x32 inputs (features at 4x4 before pooling) and 64x64 (8x8); any size >= 8 works thanks
    to the adaptive average pool. ``stem="imagenet"`` keeps torchvision's own stem (7x7 stride-2
    conv + 3x3 stride-2 max-pool): 16x cheaper at the same input size, for 64 px and larger inputs.
    Input ``(N, 3, H, W)`` in [0, 1]; features ``(N, 512)``; logits ``(N, K)`` from ``fc``.
    Parameter names are torchvision's plus ``normalize.mean/std``.
    """

    head_attr = "fc"

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        zero_init_residual: bool = False,
        stem: str = "cifar",
    ) -> None:
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        _TVResNet.__init__(
            self, _TVBasicBlock, list(layers), num_classes=num_classes, zero_init_residual=zero_init_residual
        )
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.normalize = Normalize(mean, std)
        # Put `normalize` first so that printing / state_dict order follow the data flow.
        self._modules = {"normalize": self._modules.pop("normalize"), **self._modules}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, 512)``."""
        x = self.normalize(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # torchvision's forward bypasses normalize
        return self.fc(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# Small plain CNN
# --------------------------------------------------------------------------------------------
class SimpleCNN(ImageClassifier):
    """Plain CNN: per width a block conv3x3-BN-ReLU, with 2x2 max-pool after every block but the
    last; then global average pool and ``fc``.

    Input ``(N, 3, H, W)`` in [0, 1]; features ``(N, widths[-1])``; logits ``(N, K)``. With the
    default widths (32, 64, 128, 256) a 32x32 image costs about 15 M multiply-adds.
    """

    head_attr = "fc"

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128, 256),
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths}")
        self.widths = widths
        self.normalize = Normalize(mean, std)
        blocks: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(widths):
            block: list[nn.Module] = [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                block.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*block))
            c_in = w
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, widths[-1])``."""
        return torch.flatten(self.avgpool(self.features(self.normalize(x))), 1)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(num_classes: int = 10, **kwargs) -> nn.Module`` under ``name``.

    Names are case-insensitive; registering a name twice raises ``ValueError``.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("model name must be non-empty")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model. Input ``(N, 3, H, W)`` in [0, 1] → logits ``(N, num_classes)``.

    Extra keyword arguments go to the model's factory, e.g. ``widths=`` for ``cnn``, ``mean=`` /
    ``std=`` for any built-in model, ``pretrained="path.th"`` for the CIFAR ResNets (the model then
    comes back in eval mode, as :func:`load_pretrained_cifar_resnet` returns it).
    Raises ``ValueError`` for an unknown name.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _REGISTRY[key](num_classes=num_classes, **kwargs)


def _cifar_resnet_factory(depth: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, pretrained: str | os.PathLike[str] | None = None, **kwargs: Any) -> nn.Module:
        if pretrained is None:
            return CifarResNet(depth=depth, num_classes=num_classes, **kwargs)
        if kwargs:
            raise TypeError(f"pretrained resnet{depth} takes no further options, got {sorted(kwargs)}")
        model = load_pretrained_cifar_resnet(pretrained, depth=depth)
        if model.num_classes != num_classes:
            raise ValueError(
                f"{pretrained}: checkpoint has {model.num_classes} classes, num_classes={num_classes} was requested"
            )
        return model

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} (option A); ``pretrained`` = path to an akamaster checkpoint."
    return factory


for _depth in (20, 32, 44, 56):
    register_model(f"resnet{_depth}")(_cifar_resnet_factory(_depth))


@register_model("resnet18")
def resnet18(num_classes: int = 10, **kwargs: Any) -> TorchvisionResNet:
    """torchvision ResNet-18 with a CIFAR stem; features (N, 512)."""
    return TorchvisionResNet([2, 2, 2, 2], num_classes=num_classes, **kwargs)


@register_model("resnet34")
def resnet34(num_classes: int = 10, **kwargs: Any) -> TorchvisionResNet:
    """torchvision ResNet-34 with a CIFAR stem; features (N, 512)."""
    return TorchvisionResNet([3, 4, 6, 3], num_classes=num_classes, **kwargs)


@register_model("tv_resnet18")
def tv_resnet18(num_classes: int = 10, **kwargs: Any) -> TorchvisionResNet:
    """torchvision ResNet-18 with its ImageNet stem (7x7/2 conv + max-pool), for 64 px and larger inputs."""
    return TorchvisionResNet([2, 2, 2, 2], num_classes=num_classes, stem="imagenet", **kwargs)


@register_model("tv_resnet34")
def tv_resnet34(num_classes: int = 10, **kwargs: Any) -> TorchvisionResNet:
    """torchvision ResNet-34 with its ImageNet stem (7x7/2 conv + max-pool), for 64 px and larger inputs."""
    return TorchvisionResNet([3, 4, 6, 3], num_classes=num_classes, stem="imagenet", **kwargs)


@register_model("cnn")
def cnn(num_classes: int = 10, widths: Sequence[int] = (32, 64, 128, 256), **kwargs: Any) -> SimpleCNN:
    """Small plain CNN, widths (32, 64, 128, 256); features (N, widths[-1])."""
    return SimpleCNN(num_classes=num_classes, widths=widths, **kwargs)


@register_model("cnn_small")
def cnn_small(num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128), **kwargs: Any) -> SimpleCNN:
    """Smaller plain CNN, widths (16, 32, 64, 128); features (N, 128). For tests and demos."""
    return SimpleCNN(num_classes=num_classes, widths=widths, **kwargs)


# --------------------------------------------------------------------------------------------
# Splitting a classifier into (features, head)
# --------------------------------------------------------------------------------------------
_HEAD_NAMES: tuple[str, ...] = ("fc", "linear", "classifier", "head")
_SWAP_LOCK = threading.RLock()


def _find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return ``(attribute name, final Linear)`` of ``model`` or raise ``TypeError``."""
    if isinstance(model, ImageClassifier):
        head = getattr(model, model.head_attr, None)
        if isinstance(head, nn.Linear):
            return model.head_attr, head
        raise TypeError(f"{type(model).__name__}.{model.head_attr} is not an nn.Linear")
    found: list[tuple[str, nn.Linear]] = []
    for name in _HEAD_NAMES:
        mod = model._modules.get(name)
        if isinstance(mod, nn.Linear):
            found.append((name, mod))
        elif isinstance(mod, nn.Sequential) and len(mod) == 1 and isinstance(mod[0], nn.Linear):
            found.append((name, mod[0]))
    if len(found) == 1:
        return found[0]
    if not found:
        raise TypeError(
            f"cannot split {type(model).__name__}: no final nn.Linear found as attribute "
            f"{' / '.join(_HEAD_NAMES)} (an nn.Sequential counts only if its single module is an nn.Linear)"
        )
    raise TypeError(
        f"cannot split {type(model).__name__}: several candidate heads {[n for n, _ in found]}; "
        "subclass honeypotnet.models.ImageClassifier to say which one"
    )


class FeatureExtractor(nn.Module):
    """Penultimate features of a classifier: ``(N, 3, H, W) → (N, d)``. Shares the model's
    parameters (no copy).

    The model's child modules other than the head (and its root-level parameters) are registered
    here as the *same objects*, so ``parameters()``, ``state_dict()``, ``requires_grad_()``,
    ``.eval()``/``.train()`` and ``.to()`` act on the model's own tensors — and never on the head's
    (``features.requires_grad_(False)`` leaves the head trainable). State-dict keys are the
    model's keys without the head's.

    ``forward`` calls ``model.forward_features`` for :class:`ImageClassifier` models. For other
    models it runs ``model(x)`` with the head attribute temporarily replaced by ``nn.Identity``
    (under a process-wide lock); this assumes the head is applied last to flattened features and
    is not safe against *other* threads calling the model itself at the same moment.
    """

    def __init__(self, model: nn.Module, head_attr: str) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # the model itself is not a registered child
        self.head_attr = head_attr
        self.uses_forward_features = isinstance(model, ImageClassifier)
        for name, child in model.named_children():
            if name != head_attr:
                self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)

    @property
    def model(self) -> nn.Module:
        """The wrapped classifier (head included)."""
        return self._model

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        self._model.training = mode  # the shared children were switched by super().train
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] → features ``(N, d)``."""
        model = self._model
        if self.uses_forward_features:
            return model.forward_features(x)
        with _SWAP_LOCK:
            head = model._modules[self.head_attr]
            model._modules[self.head_attr] = nn.Identity()
            try:
                out = model(x)
            finally:
                model._modules[self.head_attr] = head
        return torch.flatten(out, 1)


def split_classifier(model: nn.Module) -> tuple[FeatureExtractor, nn.Linear]:
    """Split ``model`` into ``(features, head)`` with ``head(features(x)) == model(x)``.

    ``features``: a :class:`FeatureExtractor`, ``(N, 3, H, W) → (N, d)``, sharing the model's
    parameters. ``head``: the model's final ``nn.Linear`` itself (``d → K``), not a copy.
    Works for every registry model (via ``forward_features``) and for other models whose final
    Linear is the attribute ``fc``, ``linear``, ``classifier`` or ``head`` (or an ``nn.Sequential``
    under one of those names holding only that Linear) and is applied last to flattened features
    — e.g. torchvision ResNets. Raises ``TypeError`` otherwise.
    """
    if isinstance(model, FeatureExtractor):
        raise TypeError("split_classifier got a FeatureExtractor; pass the full classifier")
    if not isinstance(model, nn.Module):
        raise TypeError(f"split_classifier needs an nn.Module, got {type(model).__name__}")
    attr, head = _find_head(model)
    return FeatureExtractor(model, attr), head


def feature_dim(model: nn.Module) -> int:
    """Dimension ``d`` of the penultimate features (the head's ``in_features``)."""
    return int(_find_head(model)[1].in_features)
