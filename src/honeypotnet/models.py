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
``cnn`` and ``cnn_small`` (a small plain CNN); and three families the protection itself never uses
(for thieves a defence cannot have been tuned to): ``vgg_small`` (VGG-style conv stacks),
``mobilenetv2_small`` (MobileNetV2 inverted residuals, width 0.5, adapted to 32 px) and ``convmixer``
(ConvMixer, patch 2).

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
from torchvision.models.mobilenetv2 import InvertedResidual as _TVInvertedResidual
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
    "VGGSmall",
    "MobileNetV2Small",
    "ConvMixer",
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
class _PooledConvNet(ImageClassifier):
    """The tail SimpleCNN and VGGSmall share: ``normalize`` → ``features`` → global average pool → ``fc``,
    with Kaiming-initialised convolutions."""

    head_attr = "fc"

    def _finish(self, features: nn.Sequential, width: int, num_classes: int) -> None:
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, width of the last convolution)``."""
        return torch.flatten(self.avgpool(self.features(self.normalize(x))), 1)


class SimpleCNN(_PooledConvNet):
    """Plain CNN: per width a block conv3x3-BN-ReLU, with 2x2 max-pool after every block but the
    last; then global average pool and ``fc``.

    Input ``(N, 3, H, W)`` in [0, 1]; features ``(N, widths[-1])``; logits ``(N, K)``. With the
    default widths (32, 64, 128, 256) a 32x32 image costs about 15 M multiply-adds.
    """

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
        self._finish(nn.Sequential(*blocks), c_in, num_classes)


# --------------------------------------------------------------------------------------------
# Families the protection never uses: VGG, MobileNetV2, ConvMixer (small, for 32 px)
# --------------------------------------------------------------------------------------------
class VGGSmall(_PooledConvNet):
    """VGG-style CNN: conv3x3-BN-ReLU per integer in ``cfg``, 2x2 max-pool per ``"M"``; then global
    average pool and ``fc``.

    Input ``(N, 3, H, W)`` in [0, 1]; features ``(N, c)`` with ``c`` the last width; logits ``(N, K)``.
    The default cfg ``(64, 64, M, 128, 128, M, 256, 256, M)`` has about 1.15 M parameters and costs
    about 150 M multiply-adds per 32x32 image.
    """

    def __init__(
        self,
        num_classes: int = 10,
        cfg: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, "M"),
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        cfg = tuple(cfg)
        if not any(isinstance(v, int) for v in cfg) or any(
            not (v == "M" or (isinstance(v, int) and v > 0)) for v in cfg
        ):
            raise ValueError(f"cfg must hold positive widths and 'M' (max-pool), at least one width; got {cfg}")
        self.cfg = cfg
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c_in = int(v)
        self._finish(nn.Sequential(*layers), c_in, num_classes)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor``, never below 90% of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MobileNetV2Small(ImageClassifier):
    """MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs: a stride-1 3x3 stem, and the
    ImageNet network's five stride-2 steps reduced to three, in the 24-, 32- and 64-channel stages
    (32 → 16 → 8 → 4). Inverted residual blocks (1x1 expansion, 3x3 depthwise, ReLU6, linear 1x1
    projection, residual when shapes allow) are torchvision's own. Keeping the expanded 32x32 maps
    of the first stages (stride 1 there too) would cost twice the multiply-adds and, on CPU, several
    times the training time, for a thief that is meant to be cheap.

    ``width_mult`` scales every stage's width (rounded to multiples of 8); ``last_channel`` is the
    final 1x1 conv's width (the feature dimension). Input ``(N, 3, H, W)`` in [0, 1]; features
    ``(N, last_channel)``; logits ``(N, K)`` from ``fc``. With the defaults (width 0.5, 640
    features): about 0.59 M parameters and 12 M multiply-adds per 32x32 image.
    """

    head_attr = "fc"
    # (expansion t, channels c, blocks n, stride of the first block s): ImageNet's setting with a
    # stride-1 stem and stride 1 in the 160-channel stage
    SETTING: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1))

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 0.5,
        last_channel: int = 640,
        dropout: float = 0.0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if width_mult <= 0 or last_channel <= 0:
            raise ValueError(f"width_mult and last_channel must be positive, got {width_mult}, {last_channel}")
        self.width_mult = float(width_mult)
        self.normalize = Normalize(mean, std)
        c_in = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, c_in, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(inplace=True))]
        for t, c, n, s in self.SETTING:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(_TVInvertedResidual(c_in, c_out, s if i == 0 else 1, expand_ratio=t))
                c_in = c_out
        layers.append(nn.Sequential(
            nn.Conv2d(c_in, last_channel, 1, bias=False), nn.BatchNorm2d(last_channel), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last_channel, num_classes)
        for m in self.modules():  # torchvision's MobileNetV2 initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, last_channel)`` (dropout, if any, applied in training)."""
        return self.dropout(torch.flatten(self.avgpool(self.features(self.normalize(x))), 1))


class _Residual(nn.Module):
    """``x + fn(x)``."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class ConvMixer(ImageClassifier):
    """ConvMixer (Trockman & Kolter 2022): a patch embedding (conv with kernel = stride = ``patch``,
    GELU, BN), then ``depth`` blocks of [residual: depthwise ``kernel`` x ``kernel`` conv, GELU, BN]
    followed by [pointwise conv, GELU, BN]; global average pool and ``fc``.

    All blocks keep the patch grid's resolution (16x16 for 32 px inputs and patch 2). Input
    ``(N, 3, H, W)`` in [0, 1]; features ``(N, dim)``; logits ``(N, K)``. The defaults (dim 128,
    depth 6, kernel 5, patch 2) have about 0.12 M parameters and cost about 30 M multiply-adds per
    32x32 image.
    """

    head_attr = "fc"

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 6,
        kernel_size: int = 5,
        patch_size: int = 2,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if dim <= 0 or depth < 0 or kernel_size <= 0 or patch_size <= 0:
            raise ValueError(f"ConvMixer needs dim, kernel_size, patch_size > 0 and depth >= 0, got "
                             f"{dim}, {kernel_size}, {patch_size}, {depth}")
        self.dim, self.depth = dim, depth
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(3, dim, patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                _Residual(nn.Sequential(nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                                        nn.GELU(), nn.BatchNorm2d(dim))),
                nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))
            for _ in range(depth)])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, dim)``."""
        return torch.flatten(self.avgpool(self.blocks(self.stem(self.normalize(x)))), 1)


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
    if isinstance(name, str) and ":" in name:
        return _create_foreign(name, num_classes, **kwargs)
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}, torchvision:NAME, timm:NAME")
    return _REGISTRY[key](num_classes=num_classes, **kwargs)


def _create_foreign(spec: str, num_classes: int, *, weights: str | os.PathLike | None = None,
                    normalize: tuple[Sequence[float], Sequence[float]] | None | str = "imagenet",
                    pretrained: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """"torchvision:NAME" / "timm:NAME": the library's architecture with `num_classes` outputs, the user's
    state dict from `weights` (or `pretrained`), wrapped as nn.Sequential(Normalize(mean, std), model) so it
    takes [0, 1] images like every model here (normalize="imagenet" by default, None for a model that
    normalises itself, or (mean, std))."""
    lib, _, arch = spec.partition(":")
    weights = weights if weights is not None else pretrained
    if lib == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except (ValueError, KeyError) as e:
            raise ValueError(f"unknown torchvision model {arch!r}: {e}") from None
    elif lib == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"{spec} needs timm: pip install 'honeypotnet[timm]' (or pip install timm)") from None
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model {arch!r}")
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"unknown model source {lib!r} in {spec!r}; use torchvision:NAME or timm:NAME")
    if weights is not None:
        load_weights(model, weights)
    if normalize is None:
        return model.eval()
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else normalize
    return nn.Sequential(Normalize(mean, std), model).eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a user's state dict into `model` (strict), safely: .safetensors, or a torch file read with
    weights_only=True (.pt / .pth / .th / .bin; a {"state_dict": ...} or {"model": ...} wrapper and a
    "module." prefix from DataParallel are accepted). A clear ValueError for anything else."""
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt, pickled code, not a tensor file
        raise ValueError(f"{path}: not a readable state dict ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not fit {type(model).__name__} (is num_classes right?): "
                         f"{str(e).splitlines()[-1].strip()[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {result.missing_keys[:5]}"
                         f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
                         f"{'...' if len(result.unexpected_keys) > 5 else ''} (is the architecture or num_classes right?)")
    return model


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


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, **kwargs: Any) -> VGGSmall:
    """VGG-style CNN (64, 64, M, 128, 128, M, 256, 256, M); features (N, 256). A family the protection never uses."""
    return VGGSmall(num_classes=num_classes, **kwargs)


@register_model("mobilenetv2_small")
def mobilenetv2_small(num_classes: int = 10, **kwargs: Any) -> MobileNetV2Small:
    """MobileNetV2, width 0.5, for 32 px (stride-1 stem, three downsamplings); features (N, 640)."""
    return MobileNetV2Small(num_classes=num_classes, **kwargs)


@register_model("convmixer")
def convmixer(num_classes: int = 10, **kwargs: Any) -> ConvMixer:
    """ConvMixer-128/6 (kernel 5, patch 2); features (N, 128)."""
    return ConvMixer(num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------
# Splitting a classifier into (features, head)
# --------------------------------------------------------------------------------------------
HEAD_NAMES: tuple[str, ...] = ("fc", "linear", "classifier", "head")
_SWAP_LOCK = threading.RLock()


def resolve_module(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The submodule at dotted `path` ("classifier.3", "classifier.-1", "1.fc") and its canonical path
    (negative indices of Sequential/ModuleList resolved). Raises ValueError naming what is missing."""
    mod, parts = model, []
    for part in [p for p in str(path).split(".") if p != ""]:
        if isinstance(mod, (nn.Sequential, nn.ModuleList)) and re.fullmatch(r"-?\d+", part):
            idx = int(part)
            if not -len(mod) <= idx < len(mod):
                raise ValueError(f"head path {path!r}: index {idx} out of range for {type(mod).__name__} of {len(mod)}")
            part = str(idx % len(mod))
        child = mod._modules.get(part)
        if child is None:
            raise ValueError(f"head path {path!r}: {type(mod).__name__} has no submodule {part!r} "
                             f"(it has {', '.join(mod._modules) or 'none'})")
        mod = child
        parts.append(part)
    if not parts:
        raise ValueError("head path is empty")
    return ".".join(parts), mod


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the canonical dotted `path` of `model` (in place)."""
    parent_path, _, name = path.rpartition(".")
    parent = resolve_module(model, parent_path)[1] if parent_path else model
    parent._modules[name] = module


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target and name), None)


def find_head(model: nn.Module, head: str | Callable[[nn.Module], nn.Module] | None = None) -> tuple[str, nn.Linear]:
    """``(dotted path, final Linear)`` of a classifier, or ``TypeError`` saying how to name it.

    head: the path of the last Linear ("classifier.3", "classifier.-1", "fc"), or a callable returning
    it (e.g. ``lambda m: m.get_classifier()``); None finds it:
    registry models (``ImageClassifier.head_attr``); timm models (``get_classifier()``); an attribute
    fc / linear / classifier / head that is a Linear, or an nn.Sequential ending in one (torchvision's
    MobileNet / EfficientNet ``classifier[-1]``); an nn.Sequential ending in a Linear, or whose last
    module is such a classifier (``nn.Sequential(Normalize(...), model)``)."""
    if head is not None:
        if callable(head) and not isinstance(head, nn.Module):
            found = head(model)
            path = _path_of(model, found) if isinstance(found, nn.Module) else None
            if path is None:
                raise TypeError(f"the head callable returned {type(found).__name__}, not a submodule of the model")
            mod = found
        else:
            path, mod = resolve_module(model, head)
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"head {path!r} is {type(mod).__name__}, not an nn.Linear")
        return path, mod
    if isinstance(model, ImageClassifier):
        mod = getattr(model, model.head_attr, None)
        if isinstance(mod, nn.Linear):
            return model.head_attr, mod
        raise TypeError(f"{type(model).__name__}.{model.head_attr} is not an nn.Linear")
    get = getattr(model, "get_classifier", None)  # timm
    if callable(get):
        try:
            mod = get()
        except Exception:  # noqa: BLE001 - not timm's contract after all
            mod = None
        path = _path_of(model, mod) if isinstance(mod, nn.Linear) else None
        if path is not None:
            return path, mod
    found: list[tuple[str, nn.Linear]] = []
    for name in HEAD_NAMES:
        mod = model._modules.get(name)
        if isinstance(mod, nn.Linear):
            found.append((name, mod))
        elif isinstance(mod, nn.Sequential) and len(mod) and isinstance(mod[-1], nn.Linear):
            found.append((f"{name}.{len(mod) - 1}", mod[-1]))
    if len(found) == 1:
        return found[0]
    if not found and isinstance(model, nn.Sequential) and len(model):
        last = model[-1]
        if isinstance(last, nn.Linear):
            return str(len(model) - 1), last
        try:
            path, mod = find_head(last)
            return f"{len(model) - 1}.{path}", mod
        except TypeError:
            pass
    if not found:
        raise TypeError(
            f"cannot split {type(model).__name__}: no final nn.Linear found (looked for registry models, timm's "
            f"get_classifier(), attributes {' / '.join(HEAD_NAMES)} holding a Linear or a Sequential ending in one, "
            "and an nn.Sequential ending in a Linear); name it: head='classifier.3' (its path) or a callable")
    raise TypeError(f"cannot split {type(model).__name__}: several candidate heads {[n for n, _ in found]}; "
                    "name one with head='PATH'")


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
        self.head_attr = head_attr  # dotted path of the head ("fc", "classifier.3")
        self.uses_forward_features = isinstance(model, ImageClassifier) and head_attr == model.head_attr
        for name, child in model.named_children():
            if name != head_attr:  # a nested head's parameters stay reachable through its parent
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
            head = resolve_module(model, self.head_attr)[1]
            set_module(model, self.head_attr, nn.Identity())
            try:
                out = model(x)
            finally:
                set_module(model, self.head_attr, head)
        return torch.flatten(out, 1)


def split_classifier(model: nn.Module, head: str | Callable[[nn.Module], nn.Module] | None = None
                     ) -> tuple[FeatureExtractor, nn.Linear]:
    """Split ``model`` into ``(features, head)`` with ``head(features(x)) == model(x)``.

    ``features``: a :class:`FeatureExtractor`, ``(N, 3, H, W) → (N, d)``, sharing the model's
    parameters. ``head``: the model's final ``nn.Linear`` itself (``d → K``), not a copy.
    The head is found by :func:`find_head` (or named: ``head="classifier.3"`` or a callable); it must
    be applied last, to flattened features (torchvision and timm classifiers are). Raises ``TypeError``
    otherwise.
    """
    if isinstance(model, FeatureExtractor):
        raise TypeError("split_classifier got a FeatureExtractor; pass the full classifier")
    if not isinstance(model, nn.Module):
        raise TypeError(f"split_classifier needs an nn.Module, got {type(model).__name__}")
    attr, lin = find_head(model, head)
    return FeatureExtractor(model, attr), lin


def feature_dim(model: nn.Module) -> int:
    """Dimension ``d`` of the penultimate features (the head's ``in_features``)."""
    return int(find_head(model)[1].in_features)
