"""Per-class thresholds and island removal fitted on the references themselves, leave-one-out.

The network's probabilities are not calibrated for every task: on Hippocampus MRI the shipped
model under-segments at 0.5 (held-out Dice 0.755, 0.79 at 0.2). With several references, each one
can be segmented with the ensemble of the others and scored against its own labels: that shows,
per class, which threshold segments an unseen scan best, and whether dropping all but the largest
piece of the class (inference/islands.py) only ever removes false positives. Only a context
ensemble has this information; a single reference cannot validate itself.
"""
from __future__ import annotations

import torch

from .islands import largest_piece

# 0.10 .. 0.70: with two or three references, more extreme thresholds chase noise (on OpenKBP
# validation cases 0.05 / 0.8 lost 0.004 Dice against the plain ensemble where this range gained 0.004).
CANDIDATES = tuple(round(0.05 * i, 2) for i in range(2, 15))
DEFAULT = 0.5
MIN_GAIN = 0.01  # mean Dice a threshold must add on the references to be chosen
ISLAND_MIN_GAIN = 0.01  # mean Dice island removal must add (why not less: choose_keep_largest)


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
    (K, len(CANDIDATES))) among those that segment no held-out reference worse than 0.5 does and
    beat 0.5 by MIN_GAIN on average; else 0.5. `current` for a class that no held-out reference
    holds. The same bar as island removal: on OpenKBP the larynx at 0.70 gained 0.012 on average
    over the three references but lost on one, and cost the ensemble 0.017 Dice on the held-out
    cases (0.414 -> 0.397)."""
    chosen = list(current)
    stacked = torch.stack(curves)
    at_default = CANDIDATES.index(DEFAULT)
    for k in range(stacked.shape[1]):
        seen = ~torch.isnan(stacked[:, k, 0])
        if not seen.any():
            continue
        gains = stacked[seen, k] - stacked[seen, k, at_default : at_default + 1]
        mean = torch.where((gains >= 0).all(0), gains.mean(0), torch.tensor(float("-inf")))
        best = int(mean.argmax())
        chosen[k] = CANDIDATES[best] if mean[best] >= MIN_GAIN else DEFAULT
    return chosen


def island_gains(probabilities: torch.Tensor, truth: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """probabilities, truth (K, *grid) -> per class, the Dice gained by keeping only the largest
    piece of `probabilities > threshold`; NaN for a class the truth does not hold."""
    gains = torch.full((len(truth),), float("nan"))
    for k, (p, t, threshold) in enumerate(zip(probabilities, truth.bool(), thresholds)):
        if not t.any():
            continue
        mask = p > threshold
        gains[k] = mask_dice(largest_piece(mask), t) - mask_dice(mask, t)
    return gains


def choose_keep_largest(gains: list[torch.Tensor], current: list[bool]) -> list[bool]:
    """Per class, keep only the largest piece when, on every held-out reference holding the class,
    the dropped pieces were false positives (Dice never fell) and the mean gain reaches
    ISLAND_MIN_GAIN; `current` for a class no held-out reference holds. Strict on purpose: removing a
    true piece is the worse error, and a structure whose prediction breaks into pieces (the spinal
    cord on OpenKBP gained 0.0015 on the references, then lost 0.02 on validation cases) must not
    qualify.

    Any gain instead of 0.01 was measured at step 9,000 (benchmarks/islands.py, validation cases)
    and not adopted. On CHAOS MRI it flagged the liver, kidneys and spleen, whose islands were worth
    0.001-0.002 Dice on a tuned pair's two scans and up to 0.06 on other patients: Tune gained +0.013
    over one-shot instead of +0.006, and its HD95 fell from 22.5 to 7.3 mm (3 corrected patients, 4
    cases). On OpenKBP it flagged the spinal cord again: Tune +0.0131 -> +0.0129, HD95 17.5 -> 18.3
    mm (5 patients, 20 cases). Checked once on the held-out cases, it did not carry over: Abdomen
    Tune -0.000 -> +0.001 (HD95 18.5 -> 18.1 mm) and ensemble +0.007 -> +0.008 (4 cases); HeadNeck
    Tune +0.020 -> +0.018 (HD95 22.0 -> 23.3 mm) and ensemble +0.016 -> +0.014, the ensemble's cord
    0.635 -> 0.628 (51 cases)."""
    chosen = list(current)
    stacked = torch.stack(gains)
    for k in range(stacked.shape[1]):
        seen = stacked[~torch.isnan(stacked[:, k]), k]
        if len(seen):
            chosen[k] = bool((seen >= 0).all() and (seen > 0).any() and seen.mean() >= ISLAND_MIN_GAIN)
    return chosen
