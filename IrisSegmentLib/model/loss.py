"""Dice + binary cross-entropy on per-class sigmoid logits: the training and the tuning objective.

Kept in plain torch (no MONAI) because in-context tuning runs inside Slicer, where the engine
may rely on torch and numpy only; Testing/ checks it against MONAI's DiceLoss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """logits, target: (B, K, *spatial) with target in {0, 1}. Soft Dice per (case, class), averaged, plus mean BCE."""
    target = target.to(logits.dtype)
    probs = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    dice = 1 - (2 * intersection + 1e-5) / (denominator + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    per_class = dice + bce
    if class_weight is not None:
        weight = class_weight.expand_as(per_class)
        return (per_class * weight).sum() / weight.sum().clamp_min(1e-6)
    return per_class.mean()
