"""Where matched voxels lie: the similarity map most matched pairs of a class agree on.

Feature matching (inference/matching.py) lets each target voxel vote with its most similar reference
voxels wherever they lie, so on a new patient a structure's look-alikes elsewhere vote for it too (the
maternal tissue around a fetal brain, the bladder wall beside the prostate). Around each class, the
target and reference voxels that are each other's most similar (mutual nearest neighbours) mostly pair
the same anatomy, and the pairs that do agree on one map from target to reference coordinates: RANSAC
finds it, and the matching then weighs each reference voxel's similarity by how far from it the map
sends the target voxel (MatchingMemory.match).

The map is a similarity (rotation, one scale, shift), not a general affine map: a thin stack (a fetal MR
of 22 slices) puts most samples of four pairs close to one plane, where an affine map's stretch across
the plane is a guess; a similarity is fixed by three pairs in any plane. On Fetal_Brain_MRI's one-shot
pairs affine maps were found for 3 of 6 pairs (Dice 0.542), similarities for all (0.680).
"""
from __future__ import annotations

import numpy as np

SAMPLE = 3  # point pairs that fix a 3D similarity
ITERATIONS = 500  # RANSAC draws; at a quarter of pairs inliers, one draw of 3 is clean 1 in 64: 500 miss it 4e-4 of the time
MIN_SCALE, MAX_SCALE = 0.6, 1.6  # how much larger or smaller one patient's anatomy may be than another's
SCORED_PAIRS = 2000  # the most pairs each draw is scored on (a random subset beyond); the refits use every pair
# How much larger or smaller than each other two maps may make one structure in the target and still agree. In the
# 3-reference Fetal_Brain_MRI ensembles (shipped model) the maps that agreed on where a brain lies made it 0.73-1.11x
# as large as the best-supported map did; the wrong maps of an older fetus's brain in a younger fetus 1.57-2.10x.
SIZE_RATIO = 1.4


def voxel_centres(affine: np.ndarray, shape: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """(prod(size), 3) RAS centres, in C order, of the cells of a `size` grid pooled evenly from the
    voxel grid of `shape` with index -> RAS `affine` (a stride-4 feature map of a working grid)."""
    stride = np.asarray(shape, dtype=np.float64) / np.asarray(size, dtype=np.float64)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), -1).reshape(-1, 3)
    index = index * stride + (stride - 1) / 2
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def apply_map(mapping: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) mapped by a (4, 3) map: [points, 1] @ mapping."""
    return points @ mapping[:3] + mapping[3]


def fit_similarity(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares similarity (Umeyama 1991) taking points `source` to `target` ((..., n, 3) each,
    batched over leading axes): (..., 4, 3) maps (`apply_map`) and their (...,) scales. A proper rotation
    always: a mirrored fit is not one anatomy."""
    source_mean, target_mean = source.mean(-2, keepdims=True), target.mean(-2, keepdims=True)
    centred = source - source_mean
    covariance = np.swapaxes(target - target_mean, -1, -2) @ centred / source.shape[-2]
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(singular.shape)
    signs[..., -1] = np.sign(np.linalg.det(u @ vt))
    rotation = u @ (signs[..., None] * vt)
    variance = np.square(centred).sum((-1, -2)) / source.shape[-2]
    scale = (singular * signs).sum(-1) / np.maximum(variance, 1e-12)
    linear = scale[..., None, None] * rotation
    mapping = np.zeros((*source.shape[:-2], 4, 3))
    mapping[..., :3, :] = np.swapaxes(linear, -1, -2)
    mapping[..., 3, :] = target_mean[..., 0, :] - (linear @ source_mean[..., 0, :, None])[..., 0]
    return mapping, scale


def ransac_similarity(source: np.ndarray, target: np.ndarray, tolerance: float, min_inliers: int, seed: int = 0) -> tuple[np.ndarray, int] | None:
    """The (4, 3) similarity map (source -> target, `apply_map`) that the most point pairs agree on within
    `tolerance`, refitted on them, and how many pairs agree with it; None when no map of scale MIN_SCALE
    to MAX_SCALE gathers `min_inliers` pairs. Deterministic for a seed."""
    n = len(source)
    if n < max(min_inliers, SAMPLE):
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, (ITERATIONS, SAMPLE))
    drawn = source[picks]
    spread = np.linalg.norm(np.cross(drawn[:, 1] - drawn[:, 0], drawn[:, 2] - drawn[:, 0]), axis=-1)  # 0: a repeated or collinear draw
    maps, scales = fit_similarity(drawn, target[picks])
    usable = (spread > 1e-6) & (scales >= MIN_SCALE) & (scales <= MAX_SCALE)
    if not usable.any():
        return None
    scored = rng.choice(n, SCORED_PAIRS, replace=False) if n > SCORED_PAIRS else np.arange(n)
    residuals = np.linalg.norm(source[None, scored] @ maps[usable, :3] + maps[usable, 3][:, None] - target[None, scored], axis=-1)
    best = np.linalg.norm(apply_map(maps[usable][int(np.argmax((residuals < tolerance).sum(1)))], source) - target, axis=1) < tolerance
    for _ in range(2):  # refit on the agreeing pairs, then take the pairs the refit agrees with
        if best.sum() < min_inliers:
            return None
        refit, scale = fit_similarity(source[best], target[best])
        if not MIN_SCALE <= float(scale) <= MAX_SCALE:
            return None
        best = np.linalg.norm(apply_map(refit, source) - target, axis=1) < tolerance
    return (refit, int(best.sum())) if best.sum() >= min_inliers else None


def inverse_map(mapping: np.ndarray) -> np.ndarray:
    """The (4, 3) map undoing `mapping` (`apply_map`)."""
    inverse = np.zeros((4, 3))
    inverse[:3] = np.linalg.inv(mapping[:3])
    inverse[3] = -mapping[3] @ inverse[:3]
    return inverse


def consensus(centres: np.ndarray, support: np.ndarray, radius: float, sizes: np.ndarray | None = None) -> np.ndarray:
    """Which of several maps (M,) agree with the best-supported group: maps agree when they put a
    structure's centre (`centres`, (M, 3), in one scan's coordinates) within `radius` of each other and,
    given its `sizes` (M,) there, make it no more than SIZE_RATIO larger or smaller than each other; the
    group is that of the map whose agreeing maps gather the most `support` (inlier pairs). Wrong maps
    seldom agree with each other, so the right ones win unless a wrong one alone outnumbers them."""
    agree = np.linalg.norm(centres[:, None] - centres[None], axis=-1) <= radius
    if sizes is not None:
        logs = np.log(np.asarray(sizes, dtype=np.float64))
        agree &= np.abs(logs[:, None] - logs[None]) <= np.log(SIZE_RATIO)
    return agree[int(np.argmax(agree @ np.asarray(support, dtype=np.float64)))]
