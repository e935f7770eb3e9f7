"""Model extraction (the thief), against any Oracle.

KnockoffNets-style random extraction: draw `budget` images at random from the thief's pool, query
the oracle once per image, train a fresh substitute on the answers (soft cross-entropy = KL to the
answered distribution; a label-only API gives one-hot answers, i.e. plain cross-entropy).

Active thieves (ActiveThief: entropy, k-center, DFAL selection in rounds) live in
`honeypotnet.active` (`active.extract(..., strategy=...)`, `active.STRATEGIES`), built on this
module. Counter-measures of a thief who suspects a backdoor are in
`honeypotnet.countermeasures`; ART's attacks in `honeypotnet.art_interop`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import create_model
from .oracles import Oracle
from .ops import atomic_torch_save, to_float
from .training import FitConfig, fit


@dataclass
class ExtractionResult:
    substitute: nn.Module
    query_images: torch.Tensor  # uint8 (B,3,H,W): what the thief sent
    answers: torch.Tensor  # (B,K): what the oracle returned
    queries: int  # queries paid by this call (a resumed run pays only for what was missing)
    history: list[float] = field(default_factory=list)
    indices: torch.Tensor | None = None  # pool indices bought, in buying order
    strategy: str = "random"
    rounds: list[dict] = field(default_factory=list)  # active strategies: one record per round


def query_oracle(oracle: Oracle, images: torch.Tensor, batch_size: int = 256, progress: bool = False,
                 cache: str | os.PathLike | None = None) -> torch.Tensor:
    """Answers (N,K) of `oracle` for uint8 images (N,3,H,W), batch by batch.

    cache: a file where the answers gathered so far are saved after every batch, so a killed
    extraction resumes without paying for the same queries twice."""
    answers: list[torch.Tensor] = []
    path = Path(cache) if cache else None
    if path and path.exists():
        state = torch.load(path, weights_only=True)
        if state["n"] == len(images) and torch.equal(state["first"], images[:1]):
            answers = list(state["answers"].split(batch_size))
    done = sum(len(a) for a in answers)
    bar = tqdm(total=len(images), initial=done, desc="queries", disable=None if progress else True, leave=False)
    for i in range(done, len(images), batch_size):
        answers.append(oracle(to_float(images[i : i + batch_size])).float().cpu())
        bar.update(len(answers[-1]))
        if path:
            atomic_torch_save({"n": len(images), "first": images[:1], "answers": torch.cat(answers)}, path)
    bar.close()
    return torch.cat(answers)


def train_substitute(arch: str | nn.Module, num_classes: int, images: torch.Tensor, answers: torch.Tensor,
                     fit_config: FitConfig | None = None, *, progress: bool = False,
                     checkpoint: str | os.PathLike | None = None, device=None, desc: str = "substitute") -> nn.Module:
    """A fresh substitute (registry name or module) trained on (images, answers); `desc` labels its
    progress bar."""
    cfg = fit_config or FitConfig()
    if isinstance(arch, str):
        torch.manual_seed(cfg.seed)
        model = create_model(arch, num_classes)
    else:
        model = arch
    if device is not None:
        model.to(device)
    targets = answers.argmax(1) if is_one_hot(answers) else answers
    fit(model, images, targets, cfg, progress=progress, checkpoint=checkpoint, desc=desc)
    return model.eval()


def is_one_hot(a: torch.Tensor) -> bool:
    return bool(((a == 0) | (a == 1)).all() and (a.sum(1) == 1).all())


def random_extraction(oracle: Oracle, pool: torch.Tensor, budget: int, arch: str | nn.Module, num_classes: int,
                      fit_config: FitConfig | None = None, *, seed: int = 0, progress: bool = False,
                      work_dir: str | os.PathLike | None = None, device=None) -> ExtractionResult:
    """KnockoffNets (random strategy): `budget` random pool images, one query each, then train.

    work_dir: where query answers and the training checkpoint are kept for resuming."""
    if budget <= 0:
        raise ValueError(f"query budget must be positive, got {budget}")
    if budget > len(pool):
        raise ValueError(f"query budget {budget} exceeds the pool of {len(pool)} images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=g)[:budget]
    images = pool[idx]
    wd = Path(work_dir) if work_dir else None
    before = oracle.queries
    answers = query_oracle(oracle, images, progress=progress, cache=wd / "answers.pt" if wd else None)
    sub = train_substitute(arch, num_classes, images, answers, fit_config, progress=progress,
                           checkpoint=wd / "substitute_ckpt.pt" if wd else None, device=device)
    return ExtractionResult(sub, images, answers, oracle.queries - before, indices=idx, strategy="random")
