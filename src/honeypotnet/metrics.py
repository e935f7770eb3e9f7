"""What a protection costs the model's honest users, from the two models' logits on the same labelled images.

    agreement          share of images whose top-1 class is the same (fidelity)
    mean_kl            mean KL(victim ‖ protected) of the answered distributions, nats
    calibration_error  expected calibration error (ECE, equal-width confidence bins) of one model
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over images of KL(softmax(reference) ‖ softmax(logits)) in nats (0 when the answers are the same)."""
    _check(reference_logits, logits)
    ref = F.log_softmax(reference_logits.float(), 1)
    return float(F.kl_div(F.log_softmax(logits.float(), 1), ref, log_target=True, reduction="none").sum(1).mean())


def calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: Σ_b |bin b| / N · |accuracy_b − mean confidence_b| over `bins` equal-width
    bins of the top-1 probability."""
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"{len(labels)} labels for {len(logits)} rows of logits")
    probs = torch.softmax(logits.float(), 1)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    which = (conf * bins).long().clamp(max=bins - 1)
    err = torch.zeros(())
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(err)


def benign_costs(victim_logits: torch.Tensor, protected_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """agreement, mean KL(victim ‖ protected), and both models' ECE on the same labelled images."""
    _check(victim_logits, protected_logits)
    return {"agreement": float((victim_logits.argmax(1) == protected_logits.argmax(1)).float().mean()),
            "kl": mean_kl(victim_logits, protected_logits),
            "ece_victim": calibration_error(victim_logits, labels),
            "ece_protected": calibration_error(protected_logits, labels)}


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"logits must be two (N, K) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
