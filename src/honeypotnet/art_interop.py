"""Interoperability with the Adversarial Robustness Toolbox (ART): its thieves against our models.

Optional extra: ``pip install 'honeypotnet[art]'`` (adversarial-robustness-toolbox >= 1.17).

* `as_pytorch_classifier(model, K)` — a (protected) model as ART's ``PyTorchClassifier``; with
  ``probabilities=True`` it answers softmax probabilities like an API (the victim side).
* `as_blackbox_classifier(oracle, K)` — any `honeypotnet.oracles.Oracle` (a local model, a served
  bundle over HTTP, with its output mode and query counter) as ART's ``BlackBoxClassifier``.
* `art_steal(victim, pool, budget, attack="knockoffnets"|"copycatcnn")` — run ART's
  ``KnockoffNets`` (random sampling) or ``CopycatCNN`` to steal `victim` into a fresh ART
  ``PyTorchClassifier`` over one of our registry models; returns the stolen ``nn.Module``, ready
  for `verify.verify`.

ART's ``ClassLabels`` postprocessor is not used (it mishandles batches of more than one row); a
label-only API is our `OutputMode("label")` on the oracle side, or ``use_probability=False``
(ART's default: its thieves train on argmax labels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .models import create_model
from .ops import to_float
from .oracles import ModelOracle, Oracle

ART_ATTACKS = ("knockoffnets", "copycatcnn")


def require_art():
    """The `art` package, or an ImportError that says how to install it."""
    try:
        import art  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Adversarial Robustness Toolbox is not installed: pip install 'honeypotnet[art]'") from e
    return art


class _ApiModule(nn.Module):
    """model -> softmax probabilities (what an API answers), counting every row it is asked."""

    def __init__(self, model: nn.Module, probabilities: bool = True) -> None:
        super().__init__()
        self.model, self.probabilities, self.queries = model, probabilities, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        out = self.model(x)
        return torch.softmax(out, dim=1) if self.probabilities else out


def as_pytorch_classifier(model: nn.Module, num_classes: int, input_shape: tuple[int, int, int] = (3, 32, 32), *,
                          probabilities: bool = False, optimizer: torch.optim.Optimizer | None = None,
                          loss: nn.Module | None = None, device_type: str = "cpu"):
    """ART ``PyTorchClassifier`` over `model` (float inputs in [0, 1], channels first; our models
    normalise internally, so ART's preprocessing is the identity). probabilities=True: predict()
    returns softmax probabilities (use it for a victim); False: logits (ART's convention for models
    it trains). `optimizer` is needed only to train it (ART's fit)."""
    require_art()
    from art.estimators.classification import PyTorchClassifier

    m = _ApiModule(model, probabilities) if probabilities else model
    return PyTorchClassifier(model=m, loss=loss or nn.CrossEntropyLoss(), optimizer=optimizer, input_shape=tuple(input_shape),
                             nb_classes=num_classes, clip_values=(0.0, 1.0), channels_first=True, device_type=device_type)


def as_blackbox_classifier(oracle: Oracle, num_classes: int, input_shape: tuple[int, int, int] = (3, 32, 32)):
    """ART ``BlackBoxClassifier`` whose predict_fn is `oracle` (float32 numpy (N,3,H,W) in [0, 1] ->
    the oracle's (N,K) answers). The oracle counts the queries and applies its output mode."""
    require_art()
    from art.estimators.classification import BlackBoxClassifier

    def predict_fn(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return oracle(t).float().numpy()

    return BlackBoxClassifier(predict_fn, tuple(input_shape), num_classes, clip_values=(0.0, 1.0))


@dataclass
class ArtTheft:
    substitute: nn.Module  # the stolen model (one of our registry models), eval mode
    classifier: object  # ART's PyTorchClassifier around it
    attack: str
    queries: int  # images the victim answered
    wrap: str  # how the victim was given to ART: "pytorch" or "blackbox"


def art_steal(victim: nn.Module | Oracle, pool: torch.Tensor | np.ndarray, budget: int, *, attack: str = "knockoffnets",
              wrap: str | None = None, arch: str = "cnn_small", num_classes: int | None = None, epochs: int = 10,
              batch_size: int = 64, lr: float = 3e-3, use_probability: bool = False, seed: int = 0,
              query_batch: int = 256, device_type: str = "cpu") -> ArtTheft:
    """Steal `victim` with ART's `attack` ("knockoffnets": KnockoffNets with random sampling, or
    "copycatcnn") from `budget` random images of `pool` (uint8 or float (N,3,H,W)).

    wrap: "pytorch" (an nn.Module victim as ART's PyTorchClassifier answering probabilities) or
    "blackbox" (an Oracle, or ModelOracle(victim), as ART's BlackBoxClassifier); default: by type.
    The thief is a fresh `arch` trained by ART's own loop (Adam at `lr`, `epochs` epochs, cross-entropy
    to the answers: argmax labels unless use_probability=True and the victim answers probabilities).
    ART draws the images with numpy's global RNG: it is seeded with `seed` and restored afterwards.
    device_type: ART's "cpu" or "gpu"."""
    require_art()
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    if attack not in ART_ATTACKS:
        raise ValueError(f"unknown ART attack {attack!r}; expected one of {ART_ATTACKS}")
    wrap = wrap or ("blackbox" if isinstance(victim, Oracle) else "pytorch")
    if wrap not in ("pytorch", "blackbox"):
        raise ValueError(f"wrap must be 'pytorch' or 'blackbox', got {wrap!r}")
    x = torch.as_tensor(pool)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"the pool must be images (N, 3, H, W), got shape {tuple(x.shape)}")
    if not 0 < budget <= len(x):
        raise ValueError(f"budget must be in 1..{len(x)} (the pool), got {budget}")
    x_np = to_float(x).numpy()
    shape = tuple(x_np.shape[1:])
    if num_classes is None:
        if isinstance(victim, Oracle):
            raise ValueError("num_classes is needed with an Oracle victim")
        with torch.no_grad():
            num_classes = int(victim.eval()(torch.from_numpy(x_np[:2])).shape[1])
    if wrap == "pytorch":
        if not isinstance(victim, nn.Module):
            raise ValueError("wrap='pytorch' needs an nn.Module victim (an Oracle is a black box: use wrap='blackbox')")
        victim_cls = as_pytorch_classifier(victim.eval(), num_classes, shape, probabilities=True, device_type=device_type)
        counter = victim_cls.model
        count = lambda: counter.queries  # noqa: E731
    else:
        oracle = victim if isinstance(victim, Oracle) else ModelOracle(victim)
        victim_cls = as_blackbox_classifier(oracle, num_classes, shape)
        start = oracle.queries
        count = lambda: oracle.queries - start  # noqa: E731
    if budget % batch_size == 1:  # ART's fit keeps a last batch of one image, which BatchNorm cannot train on
        batch_size += 1
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            model = create_model(arch, num_classes)
            thief = as_pytorch_classifier(model, num_classes, shape, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                                          device_type=device_type)
            cls = KnockoffNets if attack == "knockoffnets" else CopycatCNN
            kwargs = {"sampling_strategy": "random", "verbose": False} if attack == "knockoffnets" else {}
            a = cls(victim_cls, batch_size_fit=batch_size, batch_size_query=query_batch, nb_epochs=epochs,
                    nb_stolen=budget, use_probability=use_probability, **kwargs)
            stolen = a.extract(x_np, thieved_classifier=thief)
        finally:
            np.random.set_state(np_state)
    return ArtTheft(stolen.model.eval(), stolen, attack, count(), wrap)


__all__ = ["ART_ATTACKS", "ArtTheft", "art_steal", "as_blackbox_classifier", "as_pytorch_classifier", "require_art"]
