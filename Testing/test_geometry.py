"""Placing matched votes (IrisSegmentLib/inference/geometry.py): the similarity map most matched pairs agree
on, found among outliers and from pairs near one plane, refused when it mirrors anatomy or scales it beyond
what patients differ by; and, in an ensemble, the maps that agree on where a structure lies."""
from __future__ import annotations

import numpy as np

from IrisSegmentLib.inference.geometry import apply_map, consensus, fit_similarity, inverse_map, ransac_similarity, voxel_centres


def _rotation(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _pairs(linear: np.ndarray, shift: np.ndarray, n: int = 200, outliers: float = 0.6, thickness: float = 60.0,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Point pairs (source, target) in a slab `thickness` mm thick (along z), a share `outliers` of them random."""
    rng = np.random.default_rng(seed)
    source = rng.uniform(-60, 60, (n, 3)) * np.array([1.0, 1.0, thickness / 120])
    target = source @ linear.T + shift + rng.normal(0, 0.5, (n, 3))
    wrong = rng.random(n) < outliers
    target[wrong] = rng.uniform(-80, 80, (int(wrong.sum()), 3))
    return source, target


def test_the_map_most_pairs_agree_on_is_found_among_more_outliers_than_inliers() -> None:
    linear, shift = 1.2 * _rotation(25), np.array([30.0, -12.0, 7.0])
    source, target = _pairs(linear, shift)
    fitted = ransac_similarity(source, target, tolerance=4.0, min_inliers=8)
    assert fitted is not None
    found, inliers = fitted
    assert inliers == int((np.linalg.norm(apply_map(found, source) - target, axis=1) < 4.0).sum())
    assert inliers >= 0.95 * int((np.linalg.norm(source @ linear.T + shift - target, axis=1) < 4.0).sum())  # the true map's
    probe = np.array([[0.0, 0.0, 0.0], [50.0, -20.0, 10.0]])
    assert np.abs(apply_map(found, probe) - (probe @ linear.T + shift)).max() < 1.5
    assert np.array_equal(found, ransac_similarity(source, target, tolerance=4.0, min_inliers=8)[0])  # the same for the same seed


def test_pairs_from_a_thin_stack_still_fix_the_map() -> None:
    """A fetal MR stack is a slab a few cm thick: the map must still come out right across it."""
    linear, shift = 1.1 * _rotation(-40), np.array([5.0, 20.0, -3.0])
    source, target = _pairs(linear, shift, thickness=4.0, outliers=0.5)
    fitted = ransac_similarity(source, target, tolerance=3.0, min_inliers=8)
    assert fitted is not None
    found = fitted[0]
    off_plane = np.array([[0.0, 0.0, 30.0]])
    assert np.abs(apply_map(found, off_plane) - (off_plane @ linear.T + shift)).max() < 3.0


def test_no_map_is_returned_for_a_mirror_a_wild_scale_or_too_few_agreeing_pairs() -> None:
    mirror = np.diag([-1.0, 1.0, 1.0])  # left for right is not one anatomy: the identity agrees with it on the plane x = 0 only
    source, target = _pairs(mirror, np.zeros(3), outliers=0.0, thickness=120.0)
    assert ransac_similarity(source, target, tolerance=2.0, min_inliers=20) is None
    assert np.linalg.det(fit_similarity(source, target)[0][:3]) > 0
    source, target = _pairs(2.5 * np.eye(3), np.zeros(3), outliers=0.0)
    assert ransac_similarity(source, target, tolerance=4.0, min_inliers=8) is None
    source, target = _pairs(np.eye(3), np.zeros(3), n=6, outliers=0.0)
    assert ransac_similarity(source, target, tolerance=4.0, min_inliers=8) is None
    rng = np.random.default_rng(1)
    assert ransac_similarity(rng.uniform(-60, 60, (200, 3)), rng.uniform(-60, 60, (200, 3)), tolerance=2.0, min_inliers=20) is None


def test_the_least_squares_fit_recovers_a_similarity_in_a_batch() -> None:
    rng = np.random.default_rng(2)
    source = rng.uniform(-50, 50, (2, 10, 3))
    target = np.stack([source[0] @ (0.8 * _rotation(10)).T + 1.0, source[1] @ (1.3 * _rotation(-70)).T - 4.0])
    maps, scales = fit_similarity(source, target)
    assert maps.shape == (2, 4, 3) and np.allclose(scales, [0.8, 1.3])
    assert np.allclose(apply_map(maps[1], source[1]), target[1])


def test_voxel_centres_are_those_of_the_pooled_cells_in_world_coordinates() -> None:
    affine = np.array([[0.0, 0.0, 2.0, 10.0], [0.0, -2.0, 0.0, 20.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 0.0, 1.0]])
    centres = voxel_centres(affine, (8, 8, 16), (2, 2, 4))
    assert centres.shape == (16, 3)
    first_cell_index = np.array([1.5, 1.5, 1.5])  # the middle of working voxels 0..3
    assert np.allclose(centres[0], affine[:3, :3] @ first_cell_index + affine[:3, 3])
    assert np.allclose(centres[1] - centres[0], affine[:3, :3] @ np.array([0.0, 0.0, 4.0]))  # C order: the last axis first


def test_an_inverse_map_undoes_its_map() -> None:
    rng = np.random.default_rng(3)
    source = rng.uniform(-50, 50, (10, 3))
    mapping, _ = fit_similarity(source, source @ (0.9 * _rotation(35)).T + np.array([4.0, -8.0, 2.0]))
    assert np.allclose(apply_map(inverse_map(mapping), apply_map(mapping, source)), source)


def test_the_maps_that_agree_outvote_a_better_supported_stray() -> None:
    """Three references of an ensemble put a brain's centre at about one place, a fourth's map 100 mm away
    with more inliers than any one of them: the three are kept, the stray is not."""
    centres = np.array([[0.0, 0.0, 0.0], [8.0, -5.0, 3.0], [-6.0, 4.0, 0.0], [100.0, 0.0, 0.0]])
    assert consensus(centres, np.array([20, 15, 12, 30]), radius=40.0).tolist() == [True, True, True, False]
    assert consensus(centres[[0, 3]], np.array([23, 16]), radius=40.0).tolist() == [True, False]  # two disagree: the better supported


def test_maps_that_make_a_structure_much_larger_or_smaller_than_the_best_supported_one_do_not_agree_with_it() -> None:
    """A younger fetus (a 5 cm brain) segmented with three references: the right map puts the brain 40 mm
    from where a wrong one does, within the radius of agreement, but the wrong one (an older fetus's brain
    mapped at the wrong scale) makes it twice as large; a third wrong map lies elsewhere. Counting places
    alone, the right and the wrong map agree and both vote; counting sizes too, the right one votes alone."""
    centres = np.array([[0.0, 0.0, 0.0], [-30.0, -5.0, -25.0], [80.0, -45.0, -120.0]])
    support, sizes = np.array([55, 39, 37]), np.array([50.0, 100.0, 80.0])
    assert consensus(centres, support, radius=67.0).tolist() == [True, True, False]
    assert consensus(centres, support, radius=67.0, sizes=sizes).tolist() == [True, False, False]
    assert consensus(centres[:2], support[:2], radius=67.0, sizes=np.array([50.0, 62.0])).tolist() == [True, True]  # anatomy varies a little
