"""Per-class probability thresholds fitted on the references themselves, leave-one-out.

The network's probabilities are not calibrated for every task: on Hippocampus MRI the shipped
model under-segments at 0.5 (held-out Dice 0.755, 0.79 at 0.2). With several references, each one
can be segmented with the ensemble of the others and scored against its own labels: that shows,
per class, which threshold segments an unseen scan best. Only a context ensemble has this
information; a single reference cannot validate itself.
"""
from __future__ import annotations

import torch

# 0.10 .. 0.70: with two or three references, more extreme thresholds chase noise (on OpenKBP
# validation cases 0.05 / 0.8 lost 0.004 Dice against the plain ensemble where this range gained 0.004).
CANDIDATES = tuple(round(0.05 * i, 2) for i in range(2, 15))
DEFAULT = 0.5
MIN_GAIN = 0.01  # mean Dice a threshold must add over 0.5 on the references to be chosen


def mask_dice(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean masks on one grid; 0 when both are empty (no evidence either way). Plain
    torch, as evaluation.metrics (MONAI) is not available inside Slicer."""
    return 2 * int((predicted & truth).sum()) / max(1, int(predicted.sum()) + int(truth.sum()))


def dice_by_threshold(probabilities: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """probabilities, truth (K, *grid) -> Dice (K, len(CANDIDATES)) of `probabilities > t` per class;
    NaN for a class the truth does not hold (nothing to learn from it)."""
    curves = torch.full((len(truth), len(CANDIDATES)), float("nan"))
    for k, (p, t) in enumerate(zip(probabilities, truth.bool())):
        if not t.any():
            continue
        for j, threshold in enumerate(CANDIDATES):
            curves[k, j] = mask_dice(p > threshold, t)
    return curves


def choose_thresholds(curves: list[torch.Tensor], current: list[float]) -> list[float]:
    """Per class, the candidate with the best mean Dice over the held-out references (curves, each
    (K, len(CANDIDATES))) if it beats 0.5 by MIN_GAIN, else 0.5; `current` for a class that no
    held-out reference holds."""
    chosen = list(current)
    stacked = torch.stack(curves)
    at_default = CANDIDATES.index(DEFAULT)
    for k in range(stacked.shape[1]):
        seen = ~torch.isnan(stacked[:, k, 0])
        if not seen.any():
            continue
        mean = stacked[seen, k].mean(0)
        best = int(mean.argmax())
        if mean[best] >= mean[at_default] + MIN_GAIN:
            chosen[k] = CANDIDATES[best]
        else:
            chosen[k] = DEFAULT
    return chosen
