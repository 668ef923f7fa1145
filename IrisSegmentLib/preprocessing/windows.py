"""Sliding windows over a working grid too large for one pass, with Gaussian blending."""
from __future__ import annotations

import math

import torch


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows of `window` voxels covering `length` with at least `overlap`."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / (window * (1 - overlap))) + 1
    return sorted({round(i * (length - window) / (count - 1)) for i in range(count)})


def windows(shape: tuple[int, ...], window: int, overlap: float = 0.5) -> list[tuple[slice, slice, slice]]:
    per_axis = [[slice(s, s + min(window, n)) for s in window_starts(n, window, overlap)] for n in shape]
    return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def gaussian_weight(size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Importance map that trusts window centres over borders (sigma = 1/8 of the size, as nnU-Net)."""
    axes = [torch.exp(-0.5 * ((torch.arange(n, device=device) - (n - 1) / 2) / (n / 8)) ** 2) for n in size]
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (weight / weight.max()).clamp_min(1e-3)
