"""Augmented views of a corrected scan for in-context tuning, meant to make the tuned embeddings fit
the structure more than the one scan's pose and brightness.

Tuned on the corrected scan alone, the embeddings also fit its exact pose and contrast, which the
next patient does not share. Tuning therefore also sees, at every step, new views of the scan:
rotated, uniformly scaled and shifted (ranges of the training's spatial augmentation) with its
brightness varied. Chosen on 20 validation cases per set (mean over separate tunings on different
corrected cases, against one-shot): OpenKBP head and neck -0.009 Dice without views, -0.004 with
two per step (5 tuning cases); Hippocampus +0.017 -> +0.018 (3). On the held-out cases (mean of 3
tunings): HeadNeck 0.549 -> 0.553, Hippocampus 0.825 -> 0.826, Abdomen 0.855 either way. A small
gain on its own (measured before tuning started from the joined context, which is what made tuning
on one patient help HeadNeck: IrisPredictor.tune, Resources/MODEL_CARD.md).
Plain torch: tuning runs inside Slicer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION = math.radians(10)  # per axis, as in training (training/augment.py)
MAX_SCALE = 0.1  # 0.9 .. 1.1
MAX_SHIFT = 0.05  # of the grid's half-extent
MAX_BRIGHTNESS = 0.1  # x 0.9 .. 1.1 and + up to 0.1 SD on the z-scored image


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrix about the three axes by `angles` (radians)."""
    matrix = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles.tolist()):
        i, j = [a for a in range(3) if a != axis]
        turn = torch.eye(3, dtype=torch.float64)
        turn[i, i] = turn[j, j] = math.cos(angle)
        turn[i, j], turn[j, i] = -math.sin(angle), math.sin(angle)
        matrix = turn @ matrix
    return matrix


def augmented_views(pixels: torch.Tensor, truth: torch.Tensor, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random views of a scan on an isotropic working grid: pixels (1, D, H, W), the
    normalised image; truth (K, D, H, W), its class masks. Each view is rotated, uniformly scaled and
    shifted about the grid centre (in millimetres, without shear, whatever the grid's shape), the
    image resampled linearly and the masks by nearest neighbour, both repeating their edge where the
    view reaches outside the grid (so image and masks agree there); then the image's brightness is
    varied. Seeded: the same seed gives the same views."""
    generator = torch.Generator().manual_seed(seed)
    shape = pixels.shape[1:]
    # affine_grid's normalised coordinates run over each axis's own length (x = W first):
    # conjugating by the half-extents makes the transform isotropic in voxels.
    half = torch.diag(torch.tensor([shape[2], shape[1], shape[0]], dtype=torch.float64) / 2)

    def uniform(size: int, limit: float) -> torch.Tensor:
        return (torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * limit

    views = []
    for _ in range(count):
        linear = _rotation(uniform(3, MAX_ROTATION)) * (1 + float(uniform(1, MAX_SCALE)))
        theta = torch.cat([torch.linalg.inv(half) @ linear @ half, uniform(3, MAX_SHIFT)[:, None]], 1)
        sampling = F.affine_grid(theta[None].to(pixels), [1, 1, *shape], align_corners=False)
        image = F.grid_sample(pixels[None], sampling, mode="bilinear", padding_mode="border", align_corners=False)[0]
        masks = F.grid_sample(truth[None].to(pixels.dtype), sampling, mode="nearest", padding_mode="border", align_corners=False)[0]
        image = image * (1 + float(uniform(1, MAX_BRIGHTNESS))) + float(uniform(1, MAX_BRIGHTNESS))
        views.append((image, masks.to(truth.dtype)))
    return views
