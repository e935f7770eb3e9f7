"""Oracles: "images in -> probability vectors out", with a query counter.

Every extraction attack and every verification talks to an `Oracle`, whether the model is a
local `nn.Module`, a protected bundle, or (later) a remote HTTP endpoint. One image = one query.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .names import OUTPUT_MODES
from .ops import to_float
from .training import predict_logits


@dataclass(frozen=True)
class OutputMode:
    """What the API returns: full probabilities, top-k probabilities (rest zero, renormalised
    over the top-k), probabilities rounded to `decimals`, or the top-1 label as a one-hot vector."""

    mode: str = "probs"
    k: int = 1
    decimals: int = 2

    def __post_init__(self) -> None:
        if self.mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output mode {self.mode!r}; expected one of {OUTPUT_MODES}")
        if self.k < 1 or self.decimals < 0:
            raise ValueError("output mode needs k >= 1 and decimals >= 0")

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """Post-process probabilities (N,K) -> what the API answers (N,K)."""
        if self.mode == "probs":
            return probs
        if self.mode == "label":
            return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        if self.mode == "topk":
            k = min(self.k, probs.shape[1])
            vals, idx = probs.topk(k, dim=1)
            out = torch.zeros_like(probs).scatter_(1, idx, vals)
            return out / out.sum(1, keepdim=True).clamp_min(1e-12)
        scale = 10.0**self.decimals
        return torch.round(probs * scale) / scale


class Oracle:
    """Base class. Subclasses implement `_answer(x) -> (N,K) probabilities` for float x in [0,1]."""

    num_classes: int

    def __init__(self, output: OutputMode | None = None, budget: int | None = None) -> None:
        self.output = output or OutputMode()
        self.budget = budget
        self.queries = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Query a batch: x float (N,3,H,W) in [0,1] or uint8; returns (N,K) float on CPU."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"oracle input must have shape (N, 3, H, W), got {tuple(x.shape)}")
        x = to_float(x)
        if not torch.isfinite(x).all():
            raise ValueError("oracle input contains NaN or inf")
        if self.budget is not None and self.queries + len(x) > self.budget:
            raise RuntimeError(f"query budget exhausted: {self.queries} used of {self.budget}, asked for {len(x)} more")
        self.queries += len(x)
        return self.output.apply(self._answer(x.clamp(0, 1)))

    def predict_labels(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Top-1 labels (N,), queried in batches."""
        return torch.cat([self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])

    def _answer(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ModelOracle(Oracle):
    """A local model behind an API: softmax of its logits, post-processed by `output`."""

    def __init__(self, model: nn.Module, output: OutputMode | None = None, budget: int | None = None,
                 batch_size: int = 500, temperature: float = 1.0) -> None:
        super().__init__(output, budget)
        self.model = model.eval()
        self.batch_size = batch_size
        self.temperature = temperature
        self.num_classes = -1  # known after the first query

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        logits = predict_logits(self.model, x, self.batch_size)
        self.num_classes = logits.shape[1]
        return torch.softmax(logits / self.temperature, dim=1)

