r"""Model-extraction defences as oracle wrappers: the baselines HoneypotNet is compared with.

A :class:`Defence` post-processes what a model answers, one query (image) at a time:

    defence(probs, images) -> answers        probs (N,K) on the simplex, images (N,3,H,W) float in [0,1]

and :class:`DefendedOracle` puts a model (or any inner :class:`~honeypotnet.oracles.Oracle`) and a
chain of defences behind the ordinary Oracle interface, so every thief, verifier and benchmark
queries a defended API exactly as it queries an undefended one::

    api = DefendedOracle(victim, TopK(3))                         # top-3 probabilities
    api = DefendedOracle(bundle.model, [Rounding(2), TopK(3)])    # HoneypotNet, then rounding, then top-3
    api = DefendedOracle(victim, MAD(1.0, surrogate, argmax_preserving=True))
    api = make_defence("reverse_sigmoid", beta=0.3, gamma=0.2).wrap(victim)

HoneypotNet itself is not a post-processor: it *is* the served model (the protected model of a
bundle), so "HoneypotNet + top-k" is ``DefendedOracle(bundle.model, TopK(k))``.

Query counting: the outer DefendedOracle counts one query per image and enforces its budget
(Oracle base class). The inner oracle is called once per batch through its own ``__call__``, so
it counts the same images once on its own counter (no image is ever counted twice by one
oracle); put the budget on the outer oracle.

Defences (formulas in docs/defences.md):
  NoDefence                 y' = y
  TopK(k)                   the k largest probabilities, renormalised; the rest 0
  Rounding(decimals)        round(y, decimals) (not renormalised, as real APIs do)
  LabelOnly                 one-hot of argmax y
  GaussianNoise(sigma)      y + N(0, sigma^2 I), clipped at 0 and renormalised; seeded, and keyed on
                            the image bytes (the same image always gets the same noise)
  ReverseSigmoid(beta, gamma)   Lee et al. 2019: y' ∝ max(0, y - beta(sigmoid(gamma logit(y)) - 1/2))
  MAD(epsilon, surrogate)   Orekondy et al. 2020 (Prediction Poisoning): move y by at most epsilon
                            (L1) towards the vertex that maximises the angular deviation of the
                            surrogate's last-layer gradient; ``argmax_preserving=True`` = MAD-argmax
  AdaptiveMisinformation(tau, nu, misinformation_model)   Kariyappa & Qureshi 2020:
                            y' = (1 - a) y + a y_mis, a = sigmoid(nu (tau - max_k y_k))
  DAWN(rate, key)           Szyller et al. 2021: a keyed-hash-selected share `rate` of the queries
                            gets a wrong label (deterministic per image); `dawn_verify` tests a suspect
"""
from __future__ import annotations

import hashlib
import hmac
import inspect
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .models import create_model
from .oracles import ModelOracle, Oracle, OutputMode
from .ops import to_float, to_uint8
from .training import FitConfig, augment_batch, lr_schedule, predict_logits

__all__ = [
    "Defence", "DefendedOracle", "NoDefence", "TopK", "Rounding", "LabelOnly", "GaussianNoise", "ReverseSigmoid",
    "MAD", "AdaptiveMisinformation", "DAWN", "DawnVerification", "dawn_verify", "train_misinformation_model",
    "misinformation_loss", "make_defence", "DEFENCES",
]


# ============================================================================ base classes


class Defence:
    """A post-processor of a model's answers. Subclasses implement ``_apply(probs, images)``.

    Class attributes: ``name`` (registry name), ``needs_images`` (the defence looks at the queried
    images, not only at the probabilities), ``preserves_argmax`` (its claim: the top-1 label of
    every answer is the model's top-1 label)."""

    name = "defence"
    needs_images = False
    preserves_argmax = False

    def __call__(self, probs: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """probs (N,K) probabilities; images (N,3,H,W) uint8 or float in [0,1] (required when
        ``needs_images``). Returns the answers (N,K), float32, on the CPU."""
        if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or probs.shape[1] < 2:
            raise ValueError(f"{self.name}: probabilities must have shape (N, K) with K >= 2, "
                             f"got {tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}")
        probs = probs.detach().float().cpu()
        if not torch.isfinite(probs).all():
            raise ValueError(f"{self.name}: probabilities contain NaN or inf")
        if (probs < -1e-6).any():
            raise ValueError(f"{self.name}: probabilities must be non-negative")
        if images is not None:
            if images.ndim != 4 or images.shape[1] != 3 or len(images) != len(probs):
                raise ValueError(f"{self.name}: images must have shape ({len(probs)}, 3, H, W), got {tuple(images.shape)}")
            images = to_float(images)
            if not torch.isfinite(images).all():
                raise ValueError(f"{self.name}: images contain NaN or inf")
        elif self.needs_images:
            raise ValueError(f"{self.name} needs the queried images, not only the probabilities")
        if len(probs) == 0:
            return probs.clone()
        return self._apply(probs.clamp_min(0), images)

    def _apply(self, probs: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def params(self) -> dict:
        """The defence's settings (JSON-friendly; models are described by their class name)."""
        return {}

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({p})" if p else self.name

    def wrap(self, inner: Oracle | nn.Module, output: OutputMode | None = None, budget: int | None = None) -> "DefendedOracle":
        """This defence in front of a model or an oracle."""
        return DefendedOracle(inner, self, output=output, budget=budget)

    def __repr__(self) -> str:
        return self.describe()


class DefendedOracle(Oracle):
    """An API that answers with ``defences[-1](... defences[0](inner(x)) ...)``.

    inner: a model (wrapped as ``ModelOracle(model)``) or any Oracle (its output mode applies first).
    defences: one Defence or a sequence, applied in order. output/budget: the outer API's output
    mode (applied last) and query budget; one image = one query."""

    def __init__(self, inner: Oracle | nn.Module, defences: Defence | Sequence[Defence] = (),
                 output: OutputMode | None = None, budget: int | None = None) -> None:
        super().__init__(output, budget)
        if isinstance(inner, nn.Module):
            inner = ModelOracle(inner)
        if not isinstance(inner, Oracle):
            raise TypeError(f"DefendedOracle needs an Oracle or an nn.Module, got {type(inner).__name__}")
        chain = [defences] if isinstance(defences, Defence) else list(defences)
        for d in chain:
            if not isinstance(d, Defence):
                raise TypeError(f"not a Defence: {d!r}")
        self.inner, self.defences = inner, chain

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.inner.num_classes

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.inner(x)
        for d in self.defences:
            probs = d(probs, x)
        return probs

    def describe(self) -> str:
        return " -> ".join([type(self.inner).__name__, *(d.describe() for d in self.defences)])


# ============================================================================ output-only defences


class NoDefence(Defence):
    """y' = y (the undefended API, for tables and compositions)."""

    name = "none"
    preserves_argmax = True

    def _apply(self, probs, images):
        return probs.clone()


class TopK(Defence):
    """The k largest probabilities, renormalised to sum 1; the others 0 (top-1 = label only)."""

    name = "topk"
    preserves_argmax = True

    def __init__(self, k: int = 1) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"topk: k must be an integer >= 1, got {k!r}")
        self.k = k

    def params(self) -> dict:
        return {"k": self.k}

    def _apply(self, probs, images):
        return OutputMode("topk", k=self.k).apply(probs)


class Rounding(Defence):
    """Probabilities rounded to `decimals` places (not renormalised: what a rounding API returns).
    Ties created by rounding can change the top-1 label (argmax then picks the lowest index)."""

    name = "rounding"

    def __init__(self, decimals: int = 2) -> None:
        if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0:
            raise ValueError(f"rounding: decimals must be an integer >= 0, got {decimals!r}")
        self.decimals = decimals

    def params(self) -> dict:
        return {"decimals": self.decimals}

    def _apply(self, probs, images):
        return OutputMode("rounded", decimals=self.decimals).apply(probs)


class LabelOnly(Defence):
    """The top-1 label as a one-hot vector."""

    name = "label"
    preserves_argmax = True

    def _apply(self, probs, images):
        return OutputMode("label").apply(probs)


class GaussianNoise(Defence):
    """y' = max(0, y + n) / sum, n ~ N(0, sigma^2 I).

    The noise is seeded; when the images are given (always, behind a DefendedOracle) it is keyed on
    (seed, image bytes), so the same image always gets the same noise (repeating a query does not
    average the noise away, and the answers do not depend on batching). renormalise=False returns
    y + n clipped to [0, 1] (off the simplex)."""

    name = "gaussian"

    def __init__(self, sigma: float = 0.05, renormalise: bool = True, seed: int = 0) -> None:
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"gaussian: sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma, self.renormalise, self.seed = float(sigma), bool(renormalise), int(seed)
        self._stream = torch.Generator().manual_seed(self.seed)

    def params(self) -> dict:
        return {"sigma": self.sigma, "renormalise": self.renormalise, "seed": self.seed}

    def noise(self, n: int, k: int, images: torch.Tensor | None) -> torch.Tensor:
        if images is None:
            return torch.randn(n, k, generator=self._stream)
        out = torch.empty(n, k)
        g = torch.Generator()
        for i, img in enumerate(to_uint8(images)):
            h = hashlib.blake2b(img.contiguous().numpy().tobytes(), digest_size=8, key=str(self.seed).encode())
            g.manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
            out[i] = torch.randn(k, generator=g)
        return out

    def _apply(self, probs, images):
        y = probs + self.sigma * self.noise(*probs.shape, images)
        if not self.renormalise:
            return y.clamp(0, 1)
        y = y.clamp_min(0)
        s = y.sum(1, keepdim=True)
        # a row whose noise removed every entry (only possible for huge sigma) keeps its original answer
        return torch.where(s > 0, y / s.clamp_min(1e-12), probs)


class ReverseSigmoid(Defence):
    """Reverse Sigmoid (Lee et al., "Defending against NN model stealing attacks using deceptive
    perturbations", IEEE S&P Workshops 2019, Eq. 3-4):

        r(y) = beta * (sigmoid(gamma * logit(y)) - 1/2),     y' = max(0, y - r(y)) / sum

    logit(y) = log(y / (1 - y)) with y clipped to [1e-9, 1 - 1e-9]. r is positive for y > 1/2 and
    negative below, so large probabilities are pushed down and small ones up, non-monotonically:
    the gradients a thief gets from y' point the wrong way. For beta*gamma >= 1, or when several
    probabilities are moderate, the formula alone can change the top-1 label; with
    ``keep_argmax=True`` (default) the model's top-1 class and the perturbed top-1 class swap
    their values in those rows, so every answer keeps the model's label (benign top-1 accuracy
    unchanged, as the paper intends); ``keep_argmax=False`` is the bare formula."""

    name = "reverse_sigmoid"
    preserves_argmax = True

    def __init__(self, beta: float = 0.3, gamma: float = 0.2, keep_argmax: bool = True) -> None:
        for n, v in (("beta", beta), ("gamma", gamma)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"reverse_sigmoid: {n} must be a finite number > 0, got {v!r}")
        self.beta, self.gamma, self.keep_argmax = float(beta), float(gamma), bool(keep_argmax)
        self.preserves_argmax = self.keep_argmax

    def params(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma, "keep_argmax": self.keep_argmax}

    def _apply(self, probs, images):
        y = probs.double()
        yc = y.clamp(1e-9, 1 - 1e-9)
        r = self.beta * (torch.sigmoid(self.gamma * torch.log(yc / (1 - yc))) - 0.5)
        out = (y - r).clamp_min(0)
        s = out.sum(1, keepdim=True)
        out = torch.where(s > 0, out / s.clamp_min(1e-300), y)
        if self.keep_argmax:
            top, new = y.argmax(1), out.argmax(1)
            rows = (top != new).nonzero().flatten()
            if len(rows):
                a, b = out[rows, top[rows]].clone(), out[rows, new[rows]].clone()
                out[rows, top[rows]], out[rows, new[rows]] = b, a
        return out.float()


# ============================================================================ MAD (Prediction Poisoning)


class MAD(Defence):
    r"""Maximizing Angular Deviation (Orekondy, Schiele, Fritz, "Prediction Poisoning: Towards
    Defenses Against DNN Model Stealing Attacks", ICLR 2020).

    The thief trains on the answer ỹ; its update direction is a(ỹ) = G^T ỹ with G (K x D) the
    Jacobian of the log-probabilities of the thief's model w.r.t. its parameters. MAD answers the ỹ
    with ||ỹ - y||_1 <= epsilon, on the simplex, that maximises the angular deviation
    || a(ỹ)/||a(ỹ)|| - a(y)/||a(y)|| ||^2, with a *surrogate* model standing in for the thief's.

    The paper's heuristic, as here: (1) G from the surrogate's last (Linear) layer, (2) the target
    y* = the best candidate among the extremes of the simplex: the K vertices e_k (MAD), or, for
    MAD-argmax (``argmax_preserving=True``), the uniform distributions over every class set that
    contains y's top-1 class (top class up-weighted by 1e-5, so it stays the argmax; all 2^(K-1)
    sets for K <= 12, a greedy growth of the set above), (3) the line search
    ỹ = (1 - α) y + α y*, α = min(1, epsilon / ||y* - y||_1), which stays on the simplex, meets the
    L1 budget, and for MAD-argmax keeps the top-1 label (y and y* share it).

    With the last layer z = W h + b, row k of G is (e_k - p) h^T (p = the surrogate's softmax), so
    G^T ỹ = (ỹ - p) h^T for any ỹ on the simplex, and the angle between G^T ỹ and G^T y is the
    angle between ỹ - p and y - p in R^K: the objective needs only the surrogate's probabilities,
    and is evaluated in closed form for a whole batch and every candidate at once
    (``mad_jacobian`` gives the explicit G, for checking). ``objective="distance"`` is the
    un-normalised surrogate ||G^T (ỹ - y)||^2 = ||h||^2 ||ỹ - y||^2 of the reference code's default.

    surrogate: a classifier (N,3,H,W) -> logits (N,K); the paper's choice and the benchmark's is a
    randomly initialised model of a plausible thief architecture."""

    name = "mad"
    needs_images = True

    def __init__(self, epsilon: float = 1.0, surrogate: nn.Module | None = None, argmax_preserving: bool = False,
                 objective: str = "angle", batch_size: int = 256) -> None:
        if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or not 0 <= epsilon <= 2:
            raise ValueError(f"mad: epsilon (an L1 distance between distributions) must lie in [0, 2], got {epsilon!r}")
        if not isinstance(surrogate, nn.Module):
            raise ValueError("mad: needs a surrogate model (an nn.Module), e.g. a randomly initialised thief architecture")
        if objective not in ("angle", "distance"):
            raise ValueError(f"mad: objective must be 'angle' or 'distance', got {objective!r}")
        if batch_size < 1:
            raise ValueError("mad: batch_size must be >= 1")
        self.epsilon, self.surrogate, self.argmax_preserving = float(epsilon), surrogate.eval(), bool(argmax_preserving)
        self.objective, self.batch_size = objective, int(batch_size)
        self.preserves_argmax = self.argmax_preserving

    def params(self) -> dict:
        return {"epsilon": self.epsilon, "argmax_preserving": self.argmax_preserving, "objective": self.objective,
                "surrogate": type(self.surrogate).__name__}

    def describe(self) -> str:
        return f"{'mad_argmax' if self.argmax_preserving else 'mad'}(epsilon={self.epsilon})"

    # -- the objective, for candidates c (N,M,K), answers y (N,K), surrogate probabilities p (N,K)
    def _objective(self, c: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.objective == "distance":
            return ((c - y[:, None]) ** 2).sum(-1)
        a = F.normalize(y - p, dim=1, eps=1e-12)[:, None]
        ac = F.normalize(c - p[:, None], dim=2, eps=1e-12)
        return ((ac - a) ** 2).sum(-1)

    @staticmethod
    def _vertex_sets(k: int) -> torch.Tensor:
        """All 2^(k-1) 0/1 rows over k-1 classes (the sets added to the top-1 class)."""
        return torch.tensor(list(itertools.product([0.0, 1.0], repeat=k - 1)), dtype=torch.float64)

    def target(self, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """y* (N,K) for answers y and surrogate probabilities p (both (N,K), float64)."""
        n, k = y.shape
        if not self.argmax_preserving:
            cand = torch.eye(k, dtype=y.dtype).expand(n, k, k)
            best = self._objective(cand, y, p).argmax(1)
            return torch.eye(k, dtype=y.dtype)[best]
        top = y.argmax(1)
        if k <= 12:
            sets = self._vertex_sets(k)  # (M, k-1)
            others = torch.stack([torch.cat([torch.arange(t), torch.arange(t + 1, k)]) for t in range(k)])  # (k, k-1)
            ystar = torch.empty_like(y)
            for t in top.unique().tolist():
                rows = (top == t).nonzero().flatten()
                cand = torch.zeros(len(sets), k, dtype=y.dtype)
                cand[:, others[t]] = sets
                cand[:, t] = 1 + 1e-5
                cand = cand / cand.sum(1, keepdim=True)
                obj = self._objective(cand.expand(len(rows), *cand.shape), y[rows], p[rows])
                ystar[rows] = cand[obj.argmax(1)]
            return ystar
        # greedy growth of the class set (K > 12: 2^(K-1) sets are too many), as in the reference code
        mask = F.one_hot(top, k).to(y.dtype)
        best_val = torch.full((n,), -math.inf, dtype=y.dtype)
        ystar = torch.zeros_like(y)
        eye = torch.eye(k, dtype=y.dtype)
        for _ in range(k - 1):
            cand = (mask[:, None] + eye[None]).clamp_max(1)  # (n,k,k): add class j
            cand = cand + 1e-5 * F.one_hot(top, k).to(y.dtype)[:, None]
            cand = cand / cand.sum(2, keepdim=True)
            obj = self._objective(cand, y, p).masked_fill(mask.bool(), -math.inf)
            val, j = obj.max(1)
            better = val > best_val
            chosen = cand[torch.arange(n), j]
            ystar[better] = chosen[better]
            best_val = torch.maximum(best_val, val)
            mask = (mask + F.one_hot(j, k).to(y.dtype)).clamp_max(1)
        return ystar

    def surrogate_probs(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(predict_logits(self.surrogate, images, self.batch_size).double(), dim=1)

    def _apply(self, probs, images):
        y = probs.double()
        y = y / y.sum(1, keepdim=True).clamp_min(1e-12)  # MAD works on the simplex
        if self.epsilon == 0:
            return y.float()
        p = self.surrogate_probs(images)
        if p.shape != y.shape:
            raise ValueError(f"mad: the surrogate answers {p.shape[1]} classes, the model {y.shape[1]}")
        ystar = self.target(y, p)
        dist = (ystar - y).abs().sum(1, keepdim=True)
        alpha = (self.epsilon / dist.clamp_min(1e-12)).clamp(max=1.0)
        return ((1 - alpha) * y + alpha * ystar).float()


def mad_jacobian(surrogate: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """G (K x D) for one image (3,H,W): row k = d log p_k / d W of the surrogate's last Linear
    layer's weight W (D = K*d), by autograd. For checking MAD's closed form, not used by it."""
    from .models import split_classifier

    _, head = split_classifier(surrogate)
    x = to_float(image[None]).to(head.weight.device)
    logp = torch.log_softmax(surrogate.eval()(x), dim=1)[0]
    rows = [torch.autograd.grad(logp[k], head.weight, retain_graph=True)[0].flatten() for k in range(len(logp))]
    return torch.stack(rows).detach().cpu()


# ============================================================================ Adaptive Misinformation


class AdaptiveMisinformation(Defence):
    """Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with
    Adaptive Misinformation", CVPR 2020).

        a = sigmoid(nu * (tau - max_k y_k)),      y' = (1 - a) y + a y_mis(x)

    max_k y_k (maximum softmax probability) is the out-of-distribution score: in-distribution
    queries (confident) are answered almost unchanged, OOD queries (what a thief with a surrogate
    pool sends) get the answer of a *misinformation model*, trained to put low probability on the
    correct class (`train_misinformation_model`). tau: the confidence threshold; nu: sharpness."""

    name = "adaptive_misinformation"
    needs_images = True

    def __init__(self, tau: float = 0.5, nu: float = 1000.0, misinformation_model: nn.Module | None = None,
                 batch_size: int = 500) -> None:
        if not isinstance(tau, (int, float)) or not 0 < tau <= 1:
            raise ValueError(f"adaptive_misinformation: tau must lie in (0, 1], got {tau!r}")
        if not isinstance(nu, (int, float)) or not math.isfinite(nu) or nu <= 0:
            raise ValueError(f"adaptive_misinformation: nu must be a finite number > 0, got {nu!r}")
        if not isinstance(misinformation_model, nn.Module):
            raise ValueError("adaptive_misinformation: needs a misinformation model (see train_misinformation_model)")
        self.tau, self.nu, self.model, self.batch_size = float(tau), float(nu), misinformation_model.eval(), batch_size
        self.last_alpha: torch.Tensor | None = None  # a of the last batch, for inspection

    def params(self) -> dict:
        return {"tau": self.tau, "nu": self.nu, "misinformation_model": type(self.model).__name__}

    def _apply(self, probs, images):
        a = torch.sigmoid(self.nu * (self.tau - probs.max(1).values))[:, None]
        self.last_alpha = a.flatten().clone()
        y_mis = torch.softmax(predict_logits(self.model, images, self.batch_size), dim=1)
        if y_mis.shape != probs.shape:
            raise ValueError(f"adaptive_misinformation: the misinformation model answers {y_mis.shape[1]} classes, "
                             f"the model {probs.shape[1]}")
        return (1 - a) * probs + a * y_mis


def misinformation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean of -log(1 - p_y): low probability on the correct class (computed stably in log space:
    log(1 - p_y) = logsumexp(z_{k != y}) - logsumexp(z))."""
    masked = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return (torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)).mean()


def train_misinformation_model(arch: str | nn.Module, num_classes: int, images: torch.Tensor, labels: torch.Tensor,
                               cfg: FitConfig | None = None, *, progress: bool = False, device=None) -> nn.Module:
    """The misinformation model of Adaptive Misinformation: trained on the owner's labelled images
    (uint8 (N,3,H,W), labels int64 (N,)) to minimise -log(1 - p_true). Same optimiser, schedule and
    augmentation as `training.fit`. The loss's gradient w.r.t. the true logit is only p_true (small
    from the start), hence the default learning rate 0.2, four times fit's default."""
    cfg = cfg or FitConfig(epochs=10, lr=0.2)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or len(images) < 2:
        raise ValueError(f"need at least 2 images and one label per image, got {len(images)} images, labels {tuple(labels.shape)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    if isinstance(arch, str):
        torch.manual_seed(cfg.seed)
        model = create_model(arch, num_classes)
    else:
        model = arch
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(images) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, cfg.epochs * steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.epochs), desc="misinformation model", disable=None if progress else True, leave=False):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue
            x = to_float(images[idx], device)
            if cfg.augment:
                x = augment_batch(x, gen)
            loss = misinformation_loss(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ============================================================================ DAWN


class DAWN(Defence):
    """DAWN, Dynamic Adversarial Watermarking of Neural networks (Szyller, Atli, Marchal, Asokan,
    ACM MM 2021).

    For every query image x, h = HMAC-SHA256(key, bytes of x as uint8). If the first 8 bytes of h,
    read as a fraction of 2^64, are below `rate`, the query is *watermarked*: the answer's top-1
    class t is replaced by w = (t + 1 + (next 8 bytes of h mod (K-1))) mod K, a wrong label, by
    swapping the probabilities of t and w (so w is the top-1 of the answer; a label-only API shows
    w). Selection and label depend only on the key and the image: the same image always gets the
    same answer, and no one without the key can tell which queries were watermarked.

    Every watermarked (image, w) pair served is recorded (`watermark_images`, `watermark_labels`);
    `dawn_verify` then tests whether a suspect model reproduces those wrong labels."""

    name = "dawn"
    needs_images = True

    def __init__(self, rate: float = 0.01, key: str | bytes = b"", record: bool = True) -> None:
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"dawn: rate must lie in [0, 1], got {rate!r}")
        if isinstance(key, str):
            key = key.encode()
        if not isinstance(key, bytes) or not key:
            raise ValueError("dawn: needs a non-empty secret key (str or bytes)")
        self.rate, self._key, self.record = float(rate), key, bool(record)
        self.served = 0
        self._wm: dict[bytes, tuple[torch.Tensor, int]] = {}

    def params(self) -> dict:
        return {"rate": self.rate}  # the key is secret

    def _digest(self, img_u8: torch.Tensor) -> bytes:
        shape = ",".join(map(str, img_u8.shape)).encode()
        return hmac.new(self._key, shape + b"|" + img_u8.contiguous().numpy().tobytes(), hashlib.sha256).digest()

    def selection(self, images: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected (N,) bool, offset (N,) in 1..K-1) for images (N,3,H,W) uint8 or float in [0,1]."""
        if num_classes < 2:
            raise ValueError("dawn needs at least 2 classes")
        sel, off = [], []
        threshold = self.rate * 2.0**64
        for img in to_uint8(images):
            h = self._digest(img)
            sel.append(int.from_bytes(h[:8], "big") < threshold)
            off.append(1 + int.from_bytes(h[8:16], "big") % (num_classes - 1))
        return torch.tensor(sel, dtype=torch.bool), torch.tensor(off, dtype=torch.long)

    def _apply(self, probs, images):
        n, k = probs.shape
        sel, off = self.selection(images, k)
        out = probs.clone()
        top = probs.argmax(1)
        rows = sel.nonzero().flatten()
        if len(rows):
            w = (top[rows] + off[rows]) % k
            a, b = out[rows, top[rows]].clone(), out[rows, w].clone()
            out[rows, top[rows]], out[rows, w] = b, a
            tie = out[rows].argmax(1) != w  # the true top-1 had a tie: answer the watermark as a one-hot
            if tie.any():
                out[rows[tie]] = F.one_hot(w[tie], k).float()
            if self.record:
                u8 = to_uint8(images[rows])
                for img, lab in zip(u8, w.tolist()):
                    self._wm.setdefault(self._digest(img), (img.clone(), lab))
        self.served += n
        return out

    @property
    def watermark_images(self) -> torch.Tensor:
        """uint8 (M,3,H,W): the distinct watermarked images served so far."""
        if not self._wm:
            return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return torch.stack([img for img, _ in self._wm.values()])

    @property
    def watermark_labels(self) -> torch.Tensor:
        """int64 (M,): the wrong labels they were answered with."""
        return torch.tensor([lab for _, lab in self._wm.values()], dtype=torch.long)

    def state(self) -> dict:
        """What the owner keeps to verify later (no key needed for the test itself)."""
        return {"images": self.watermark_images, "labels": self.watermark_labels, "served": self.served, "rate": self.rate}


@dataclass
class DawnVerification:
    n: int  # watermarked images queried
    agreements: int  # suspect answers equal to the watermark (wrong) label
    agreement_rate: float
    null_rate: float  # H0: agreement rate <= null_rate
    p_value: float
    alpha: float
    stolen: bool
    null: str = ""  # how null_rate was set

    @property
    def verdict(self) -> str:
        return "STOLEN (watermark present)" if self.stolen else "not flagged"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def dawn_verify(suspect: Oracle | nn.Module, watermark_images: torch.Tensor, watermark_labels: torch.Tensor, *,
                null_rate: float | None = None, alpha: float = 1e-3, batch_size: int = 500) -> DawnVerification:
    """DAWN's ownership test: query the suspect on the watermarked images and count answers equal to
    the watermark labels; one-sided exact binomial test of H0: agreement rate <= null_rate.

    Default null_rate = 1/(K-1), a bound that holds for any model trained without DAWN's answers:
    the watermark label is the served top-1 shifted by a keyed-hash offset, uniform over the K-1
    other classes and independent of a model that never saw the key's answers, so such a model
    agrees with probability P(its label != served label)/(K-1) <= 1/(K-1) per image, independently
    across distinct images. Pass a measured rate (e.g. a Clopper–Pearson upper bound over clean
    models) for a less conservative test."""
    from .verify import binomial_p_value  # verify imports attacks; keep this module light to import

    if watermark_images.ndim != 4 or watermark_images.shape[1] != 3:
        raise ValueError(f"watermark images must have shape (M, 3, H, W), got {tuple(watermark_images.shape)}")
    if watermark_labels.ndim != 1 or len(watermark_labels) != len(watermark_images):
        raise ValueError("one watermark label per watermark image expected")
    if len(watermark_images) == 0:
        raise ValueError("no watermarked images: DAWN watermarked none of the queries it served")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    oracle = suspect if isinstance(suspect, Oracle) else ModelOracle(suspect)
    answers = [oracle(to_float(watermark_images[i : i + batch_size])) for i in range(0, len(watermark_images), batch_size)]
    preds, k = torch.cat([a.argmax(1) for a in answers]), int(answers[0].shape[1])
    if null_rate is None:
        null_rate, null = 1.0 / (k - 1), f"1/(K-1) = 1/{k - 1}: bound for any model trained without the watermarked answers"
    else:
        null = "given"
    if not 0 < null_rate < 1:
        raise ValueError(f"null_rate must be in (0, 1), got {null_rate}")
    hits = int((preds == watermark_labels.to(preds.device)).sum())
    n = len(preds)
    p = binomial_p_value(hits, n, null_rate)
    return DawnVerification(n, hits, hits / n, float(null_rate), p, alpha, p < alpha, null)


# ============================================================================ registry


DEFENCES: dict[str, type[Defence]] = {
    "none": NoDefence, "topk": TopK, "rounding": Rounding, "label": LabelOnly, "gaussian": GaussianNoise,
    "reverse_sigmoid": ReverseSigmoid, "mad": MAD, "mad_argmax": MAD, "adaptive_misinformation": AdaptiveMisinformation,
    "dawn": DAWN,
}
_ALIASES = {"noise": "gaussian", "top_k": "topk", "label_only": "label", "round": "rounding", "am": "adaptive_misinformation",
            "reversesigmoid": "reverse_sigmoid", "rs": "reverse_sigmoid"}


def make_defence(name: str, **params) -> Defence:
    """A defence by registry name (see DEFENCES; "mad_argmax" = MAD(argmax_preserving=True)).
    Unknown names and parameters raise ValueError naming the valid ones."""
    key = str(name).lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DEFENCES:
        raise ValueError(f"unknown defence {name!r}; valid names: {', '.join(DEFENCES)}")
    cls = DEFENCES[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    if key == "mad_argmax":
        accepted.remove("argmax_preserving")
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"defence {key!r} has no parameter(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted) or 'none'}")
    if key == "mad_argmax":
        params["argmax_preserving"] = True
    return cls(**params)
