"""Where matched voxels lie: the affine map most matched pairs of a class agree on.

Feature matching (inference/matching.py) lets each target voxel vote with its most similar reference
voxels wherever they lie, so on a new patient a structure's look-alikes elsewhere vote for it too (the
maternal tissue around a fetal brain, the bladder wall beside the prostate). Around each class, the
target and reference voxels that are each other's most similar (mutual nearest neighbours) mostly pair
the same anatomy, and the pairs that do agree on one affine map from target to reference coordinates:
RANSAC finds it, and the matching then weighs each reference voxel's similarity by how far from it the
map sends the target voxel (MatchingMemory.match).
"""
from __future__ import annotations

import numpy as np

SAMPLE = 4  # point pairs that fix a 3D affine map
ITERATIONS = 500  # RANSAC draws; at a third of pairs inliers, one draw of 4 is clean 1 in 81: 500 miss it 2e-3 of the time
MIN_SCALE, MAX_SCALE = 0.6, 1.6  # the stretch one patient's anatomy may need to fit another's (singular values)


def voxel_centres(affine: np.ndarray, shape: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """(prod(size), 3) RAS centres, in C order, of the cells of a `size` grid pooled evenly from the
    voxel grid of `shape` with index -> RAS `affine` (a stride-4 feature map of a working grid)."""
    stride = np.asarray(shape, dtype=np.float64) / np.asarray(size, dtype=np.float64)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), -1).reshape(-1, 3)
    index = index * stride + (stride - 1) / 2
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) mapped by a (4, 3) affine: [points, 1] @ affine."""
    return points @ affine[:3] + affine[3]


def ransac_affine(source: np.ndarray, target: np.ndarray, tolerance: float, min_inliers: int, seed: int = 0) -> np.ndarray | None:
    """The (4, 3) affine map (source -> target, `apply_affine`) that the most point pairs agree on within
    `tolerance`, refitted on them; None when no plausible map (no mirroring, stretch within MIN_SCALE to
    MAX_SCALE) gathers `min_inliers` pairs. Deterministic for a seed."""
    n = len(source)
    if n < max(min_inliers, SAMPLE):
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, (ITERATIONS, SAMPLE))  # a draw that repeats a pair is singular and skipped below
    design = np.concatenate([source[picks], np.ones((ITERATIONS, SAMPLE, 1))], -1)  # (I, 4, 4)
    solvable = np.abs(np.linalg.det(design)) > 1e-6 * max(1.0, float(np.abs(source).max())) ** 3
    maps = np.zeros((ITERATIONS, 4, 3))
    maps[solvable] = np.linalg.solve(design[solvable], target[picks][solvable])
    plausible = solvable & _plausible(maps[:, :3])
    if not plausible.any():
        return None
    residuals = np.linalg.norm(source[None] @ maps[plausible, :3] + maps[plausible, 3][:, None] - target[None], axis=-1)
    inliers = residuals < tolerance
    best = inliers[int(np.argmax(inliers.sum(1)))]
    for _ in range(2):  # refit on the agreeing pairs, then take the pairs the refit agrees with
        if best.sum() < min_inliers:
            return None
        refit = np.linalg.lstsq(np.c_[source[best], np.ones(int(best.sum()))], target[best], rcond=None)[0]
        if not _plausible(refit[None, :3])[0]:
            return None
        best = np.linalg.norm(apply_affine(refit, source) - target, axis=1) < tolerance
    return refit if best.sum() >= min_inliers else None


def _plausible(linear: np.ndarray) -> np.ndarray:
    """(I,) for (I, 3, 3) linear parts: no mirroring and every stretch within MIN_SCALE to MAX_SCALE."""
    scales = np.linalg.svd(linear, compute_uv=False)
    return (np.linalg.det(linear) > 0) & (scales.min(1) >= MIN_SCALE) & (scales.max(1) <= MAX_SCALE)
