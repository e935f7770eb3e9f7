"""The honeypot layer H and its installation in place of the victim's last layer h."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .models import create_model, find_head, resolve_module, set_module


class HoneypotLayer(nn.Module):
    """Drop-in replacement of the last Linear layer h (d -> K).

    kind "linear":   H(z) = W z + b, initialised from h (the paper's form).
    kind "residual": H(z) = h'(z) + g(z), h' initialised from h, g a d->hidden->K MLP whose last
                     layer starts at zero, so H starts exactly equal to h.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "residual", hidden: int = 256) -> None:
        super().__init__()
        if kind not in ("linear", "residual"):
            raise ValueError(f"unknown honeypot head {kind!r}; expected 'linear' or 'residual'")
        self.kind, self.hidden = kind, hidden
        self.in_features, self.out_features = in_features, num_classes
        self.linear = nn.Linear(in_features, num_classes)
        self.mlp = None
        if kind == "residual":
            self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    @classmethod
    def from_linear(cls, head: nn.Linear, kind: str = "residual", hidden: int = 256) -> "HoneypotLayer":
        layer = cls(head.in_features, head.out_features, kind, hidden).to(head.weight.device)
        with torch.no_grad():
            layer.linear.weight.copy_(head.weight)
            layer.linear.bias.copy_(head.bias if head.bias is not None else torch.zeros(head.out_features))
        return layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N,d) -> logits (N,K)."""
        out = self.linear(z)
        return out + self.mlp(z) if self.mlp is not None else out


def head_attribute(model: nn.Module) -> str:
    """Dotted path of the model's last layer: an installed HoneypotLayer, else its final Linear (find_head)."""
    installed = [name for name, m in model.named_modules() if isinstance(m, HoneypotLayer)]
    if len(installed) == 1:
        return installed[0]
    return find_head(model)[0]


def install_honeypot(victim: nn.Module, layer: HoneypotLayer, head: str | None = None) -> nn.Module:
    """A copy of `victim` whose last layer (at `head`, else found) is `layer`: the protected model F_H = H ∘ f."""
    protected = copy.deepcopy(victim)
    path = find_head(protected, head)[0] if head is not None else head_attribute(protected)
    set_module(protected, path, layer)
    return protected.eval()


def as_plain_model(protected: nn.Module) -> nn.Module:
    """A copy of a protected model whose honeypot layer is a plain nn.Linear again, so its state dict loads
    into the user's own class (torchvision's resnet18, ...): possible for the 'linear' head only (the
    residual head adds an MLP no Linear can hold: export it to ONNX / TorchScript instead)."""
    path = head_attribute(protected)
    layer = resolve_module(protected, path)[1]
    if not isinstance(layer, HoneypotLayer):
        raise ValueError("the model has no honeypot layer")
    if layer.kind != "linear":
        raise ValueError(f"a '{layer.kind}' honeypot layer is not a plain Linear: protect with head.kind='linear' "
                         "to load the weights into your own class, or export the model (honeypotnet export)")
    plain = copy.deepcopy(protected)
    set_module(plain, path, copy.deepcopy(layer.linear))
    return plain.eval()


def build_protected(arch: str, num_classes: int, kind: str, hidden: int, path: str | None = None,
                    normalize=None) -> nn.Module:
    """An empty protected model (for loading saved weights): the architecture `arch` (a registry name, or
    "torchvision:NAME" / "timm:NAME" with its input normalisation `normalize`, (mean, std) or None) with a
    honeypot layer at `path` (default: where find_head puts it)."""
    kwargs = {"normalize": normalize} if ":" in arch else {}
    victim = create_model(arch, num_classes, **kwargs)
    path, head = find_head(victim, path)
    return install_honeypot(victim, HoneypotLayer(head.in_features, num_classes, kind, hidden), path)
