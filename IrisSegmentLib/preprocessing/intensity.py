"""Per-modality intensity normalisation, computed on the whole scan before any crop.

Statistics come from the full original image so that a reference cropped around its labels and
a whole target are normalised alike.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

MODALITIES = ("CT", "MR")
CT_WINDOW = (-991.0, 500.0)          # HU clip of the Iris preprocessing
MR_PERCENTILES = (2.0, 98.0)


def detect_modality(array: np.ndarray) -> str:
    """CT when a real share of voxels sits at air density (<= -500 HU); MR (or other non-HU) otherwise."""
    sample = array.ravel()[:: max(1, array.size // 1_000_000)]
    return "CT" if np.mean(sample <= -500) >= 0.01 else "MR"


def resolve_modality(array: np.ndarray, modality: str | None) -> str:
    if modality in (None, "", "auto"):
        return detect_modality(array)
    name = modality.upper().replace("MRI", "MR")
    if name not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}: use one of auto, CT, MR.")
    return name


def normalize(array: np.ndarray, modality: str) -> np.ndarray:
    """CT: clip to the HU window then z-score; MR: clip to the 2nd-98th percentile then z-score."""
    data = np.asarray(array, dtype=np.float32)
    if modality == "CT":
        data = np.clip(data, *CT_WINDOW)
    else:
        sample = data.ravel()[:: max(1, data.size // 2_000_000)]
        low, high = (float(v) for v in np.percentile(sample, MR_PERCENTILES))  # numpy scalars would promote to float64
        data = np.clip(data, low, high)
    std = float(data.std())
    if std < 1e-6:
        raise InputError("the image is constant (no contrast): check that the right volume was selected.")
    return (data - float(data.mean())) / std


def foreground_box(array: np.ndarray, modality: str, margin: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Index bounding box (lo, hi inclusive) of the body: above -500 HU for CT, above 10% of the
    99th percentile for MR. Cropping the target to it spends the working grid on anatomy, not air."""
    if modality == "CT":
        body = array > -500
    else:
        sample = array.ravel()[:: max(1, array.size // 2_000_000)]
        body = array > 0.1 * float(np.percentile(sample, 99))
    if not body.any():
        return np.zeros(3, int), np.array(array.shape) - 1
    idx = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.array([max(0, i[0] - margin) for i in idx])
    hi = np.array([min(s - 1, i[-1] + margin) for i, s in zip(idx, array.shape)])
    return lo, hi
