"""Stray islands: a class that is one object keeps only its largest connected piece.

The network sometimes fires on look-alike tissue far from the structure (a second left kidney
beside the spleen on CHAOS MRI); such islands can dominate a class's 95% Hausdorff distance
(Abdomen_MRI held-out cases, one-shot, step 3,750: mean HD95 76 mm as segmented, 18 mm with only the
largest piece of every class). Whether a class is one object is not assumed, since lesions or
bilateral structures labelled as one class are not, and a prediction that breaks a structure into
pieces would lose true parts: a context ensemble decides it per class on its own references
(calibration.choose_keep_largest), as it decides thresholds. scipy ships with 3D Slicer.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

_TOUCHING = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: pieces touching at a corner are one piece


def largest_piece(mask: torch.Tensor) -> torch.Tensor:
    """The largest connected piece of a boolean mask, on the mask's device (the mask itself when it
    has at most one piece)."""
    pieces, count = ndimage.label(mask.cpu().numpy(), structure=_TOUCHING)
    if count <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return torch.from_numpy(pieces == sizes.argmax()).to(mask.device)


def drop_islands(probabilities: torch.Tensor, thresholds: Sequence[float], keep_largest: Sequence[bool]) -> torch.Tensor:
    """Per-class probabilities (K, *grid) with every above-threshold voxel outside the largest piece
    of a flagged class set to 0; voxels below the threshold are left as they are, so the kept piece's
    border interpolates as before."""
    if not any(keep_largest):
        return probabilities
    out = probabilities.clone()
    for k, (threshold, flag) in enumerate(zip(thresholds, keep_largest)):
        if flag:
            mask = probabilities[k] > threshold
            out[k][mask & ~largest_piece(mask)] = 0
    return out
