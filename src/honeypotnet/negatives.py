"""Negative models: innocent copies of the victim that the trigger step is kept off.

A negative shadow is extracted from the *unprotected* victim on the shadow set (one per architecture of
cfg.negative_archs); with cfg.negative_finetune_epochs > 0 each also gets a copy fine-tuned on the
simulated thief's labelled set every iteration (an innocent owner who fine-tuned). generate_trigger
minimises negative_weight · −log(1 − p_target) on all of them, so δ aims at what the honeypot taught
rather than at the target class's natural features, which every clean copy shares.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ProtectConfig
from .models import create_model
from .steps import finetuned_copy, simulate_extraction, stream


class NegativeShadows:
    """The negative shadows of one protect run (empty when cfg.negative_weight is 0)."""

    def __init__(self, cfg: ProtectConfig, num_classes: int, device: torch.device) -> None:
        self.cfg = cfg
        self.archs = cfg.negative_shadow_archs()
        self.models: list[nn.Module] = [create_model(a, num_classes).to(device) for a in self.archs]

    def names(self) -> list[str]:
        """History / checkpoint names: 'negative0_cnn', 'negative1_resnet20', ..."""
        return [f"negative{i}_{a}" for i, a in enumerate(self.archs)]

    def extract(self, victim_head: nn.Module, shadow_images: torch.Tensor, shadow_feats: torch.Tensor, iteration: int,
                progress: bool = False) -> None:
        """One more round of extraction from the unprotected victim (warm start), as the shadow gets."""
        for i, m in enumerate(self.models):
            simulate_extraction(m, victim_head, shadow_images, shadow_feats, self.cfg, iteration, stream_name="negative",
                                index=i, progress=progress)

    def finetuned(self, images: torch.Tensor | None, labels: torch.Tensor | None, iteration: int,
                  progress: bool = False) -> list[nn.Module]:
        """Each negative shadow's copy fine-tuned on the thief's labelled set ([] when that is off)."""
        if not self.cfg.negative_finetune_epochs:
            return []
        return [finetuned_copy(m, images, labels, epochs=self.cfg.negative_finetune_epochs,
                               lr=self.cfg.negative_finetune_lr, seed=stream(self.cfg, "negative-ft", iteration, i),
                               progress=progress, desc=f"negative fine-tune {iteration + 1}")
                for i, m in enumerate(self.models)]

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in zip(self.names(), self.models)}

    def load_state_dict(self, state: dict) -> None:
        for name, m in zip(self.names(), self.models):
            m.load_state_dict(state[name])
