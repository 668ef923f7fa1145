"""Placing matched votes (IrisSegmentLib/inference/geometry.py): the affine map most matched pairs agree
on, found among outliers, refused when it mirrors or stretches anatomy beyond what patients differ by."""
from __future__ import annotations

import numpy as np

from IrisSegmentLib.inference.geometry import apply_affine, ransac_affine, voxel_centres


def _rotation(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _pairs(linear: np.ndarray, shift: np.ndarray, n: int = 200, outliers: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point pairs of which a share `outliers` are random: (source, target, which are true)."""
    rng = np.random.default_rng(seed)
    source = rng.uniform(-60, 60, (n, 3))
    target = source @ linear.T + shift + rng.normal(0, 0.5, (n, 3))
    wrong = rng.random(n) < outliers
    target[wrong] = rng.uniform(-80, 80, (int(wrong.sum()), 3))
    return source, target, ~wrong


def test_the_map_most_pairs_agree_on_is_found_among_more_outliers_than_inliers() -> None:
    linear, shift = 1.2 * _rotation(25), np.array([30.0, -12.0, 7.0])
    source, target, true = _pairs(linear, shift)
    found = ransac_affine(source, target, tolerance=4.0, min_inliers=8)
    assert found is not None
    probe = np.array([[0.0, 0.0, 0.0], [50.0, -20.0, 10.0]])
    assert np.abs(apply_affine(found, probe) - (probe @ linear.T + shift)).max() < 1.5
    assert np.array_equal(found, ransac_affine(source, target, tolerance=4.0, min_inliers=8))  # the same for the same seed


def test_no_map_is_returned_for_a_mirror_a_wild_stretch_or_too_few_agreeing_pairs() -> None:
    mirror = np.diag([-1.0, 1.0, 1.0])
    source, target, _ = _pairs(mirror, np.zeros(3), outliers=0.0)
    assert ransac_affine(source, target, tolerance=4.0, min_inliers=8) is None  # left for right is not one anatomy
    source, target, _ = _pairs(2.5 * np.eye(3), np.zeros(3), outliers=0.0)
    assert ransac_affine(source, target, tolerance=4.0, min_inliers=8) is None
    source, target, _ = _pairs(np.eye(3), np.zeros(3), n=6, outliers=0.0)
    assert ransac_affine(source, target, tolerance=4.0, min_inliers=8) is None
    rng = np.random.default_rng(1)
    assert ransac_affine(rng.uniform(-60, 60, (200, 3)), rng.uniform(-60, 60, (200, 3)), tolerance=2.0, min_inliers=20) is None


def test_voxel_centres_are_those_of_the_pooled_cells_in_world_coordinates() -> None:
    affine = np.array([[0.0, 0.0, 2.0, 10.0], [0.0, -2.0, 0.0, 20.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]])
    centres = voxel_centres(affine, (8, 8, 16), (2, 2, 4))
    assert centres.shape == (16, 3)
    first_cell_index = np.array([1.5, 1.5, 1.5])  # the middle of working voxels 0..3
    assert np.allclose(centres[0], affine[:3, :3] @ first_cell_index + affine[:3, 3])
    assert np.allclose(centres[1] - centres[0], affine[:3, :3] @ np.array([0.0, 0.0, 4.0]))  # C order: the last axis first
