"""Negative models: innocent copies of the victim that the trigger step is kept off.

A negative shadow is extracted from the *unprotected* victim on the shadow set (one per architecture of
cfg.negative_archs); with cfg.negative_finetune_epochs > 0 each also gets a copy fine-tuned on the
simulated thief's labelled set every iteration (an innocent owner who fine-tuned). With cfg.negative_once
N > 0 they are extracted once (N epochs) and their copies fine-tuned once, before the first iteration,
since nothing of them depends on the honeypot. generate_trigger
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
        self._copies: list[nn.Module] | None = None  # the fine-tuned copies, with cfg.negative_once

    def names(self) -> list[str]:
        """History / checkpoint names: 'negative0_cnn', 'negative1_resnet20', ..."""
        return [f"negative{i}_{a}" for i, a in enumerate(self.archs)]

    def extract(self, victim_head: nn.Module, shadow_images: torch.Tensor, shadow_feats: torch.Tensor, iteration: int,
                progress: bool = False) -> None:
        """One more round of extraction from the unprotected victim (warm start), as the shadow gets; with
        cfg.negative_once, the whole extraction (cfg.negative_once epochs) at iteration 0 and nothing after."""
        once = self.cfg.negative_once
        if once and iteration > 0:
            return
        for i, m in enumerate(self.models):
            simulate_extraction(m, victim_head, shadow_images, shadow_feats, self.cfg, iteration, stream_name="negative",
                                index=i, progress=progress, epochs=once or None)

    def finetuned(self, images: torch.Tensor | None, labels: torch.Tensor | None, iteration: int,
                  progress: bool = False) -> list[nn.Module]:
        """Each negative shadow's copy fine-tuned on the thief's labelled set ([] when that is off). With
        cfg.negative_once the copies are made once (from iteration 0's stream, so a resumed run makes the same
        ones) and returned again at every later call."""
        if not self.cfg.negative_finetune_epochs:
            return []
        if self.cfg.negative_once:
            if self._copies is None:
                self._copies = self._finetune(images, labels, 0, progress)
            return self._copies
        return self._finetune(images, labels, iteration, progress)

    def _finetune(self, images, labels, iteration: int, progress: bool) -> list[nn.Module]:
        return [finetuned_copy(m, images, labels, epochs=self.cfg.negative_finetune_epochs,
                               lr=self.cfg.negative_finetune_lr, seed=stream(self.cfg, "negative-ft", iteration, i),
                               progress=progress, desc=f"negative fine-tune {iteration + 1}")
                for i, m in enumerate(self.models)]

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in zip(self.names(), self.models)}

    def load_state_dict(self, state: dict) -> None:
        for name, m in zip(self.names(), self.models):
            m.load_state_dict(state[name])
        self._copies = None
