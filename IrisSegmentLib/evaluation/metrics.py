"""Per-class overlap (Dice) and boundary (95% Hausdorff, mm) scores between two label maps.

HD95 comes from MONAI so the numbers match what the segmentation literature reports with the
same tool; only the empty-mask cases are decided here, because MONAI warns and returns inf/NaN
for them and a report needs one documented convention:

- truth and prediction both empty: Dice 1.0 (nothing to find, nothing found), HD95 NaN;
- exactly one of them empty: Dice 0.0, HD95 NaN (no surface to measure from).

NaN HD95 values are skipped when averaging (see ``report``), so they never pass for "0 mm".
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from ..errors import InputError
from ..volume import Volume


@dataclass(frozen=True)
class ClassScore:
    """Scores of one class: Dice in [0, 1] and HD95 in millimetres (NaN when undefined)."""

    dice: float
    hd95_mm: float


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (see module docstring)."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks.

    ``spacing`` is the voxel size along the array axes. NaN when either mask is empty.
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if not prediction.any() or not truth.any():
        return float("nan")
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        distance = compute_hausdorff_distance(
            torch.from_numpy(prediction[None, None]),
            torch.from_numpy(truth[None, None]),
            include_background=True,  # the single channel is the class itself, not background
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(distance.item())


def score_labels(prediction: Volume, truth: Volume, classes: Iterable[int] | None = None) -> dict[int, ClassScore]:
    """Dice and HD95 for each class of two label maps on the same voxel grid.

    ``classes`` defaults to every non-zero label present in either map, so a class the method
    invented or missed is scored, while classes absent from both do not inflate the mean Dice.
    """
    if not prediction.same_grid(truth, tolerance_mm=1e-2):
        raise InputError(
            f"prediction {prediction.name!r} (shape {prediction.shape}) and truth {truth.name!r} "
            f"(shape {truth.shape}) are not on the same voxel grid: resample the prediction onto the truth first."
        )
    pred = np.asarray(prediction.array)
    true = np.asarray(truth.array)
    if classes is None:
        classes = sorted((set(np.unique(pred).tolist()) | set(np.unique(true).tolist())) - {0})
    spacing = truth.spacing
    scores: dict[int, ClassScore] = {}
    for value in classes:
        pred_mask = pred == value
        true_mask = true == value
        scores[int(value)] = ClassScore(dice(pred_mask, true_mask), hd95(pred_mask, true_mask, spacing))
    return scores


def mean_scores(alternatives: Sequence[dict[int, ClassScore]]) -> dict[int, ClassScore]:
    """Per class, the mean of several scorings of one case (one per tuned task, say). HD95 is
    undefined (NaN) if it is in any of them, so that a report counts the failure as it would for a
    single scoring rather than averaging it away."""
    return {
        value: ClassScore(float(np.mean([s[value].dice for s in alternatives])), float(np.mean([s[value].hd95_mm for s in alternatives])))
        for value in alternatives[0]
    }
