"""Augmented views of a corrected scan for in-context tuning: the masks must move with the image,
the motion must keep shapes in millimetres (no shear) on any grid shape, and the same correction
must tune to the same embeddings."""
from __future__ import annotations

import numpy as np
import torch

from engine_fixtures import case, model, predictor  # noqa: F401
from IrisSegmentLib.inference.views import augmented_views

SHAPE = (24, 64, 40)  # a working grid far from a cube, as for a head and neck target


def _ball(shape: tuple[int, int, int], radius: float) -> torch.Tensor:
    centre = [(s - 1) / 2 for s in shape]
    z, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) - c for s, c in zip(shape, centre)], indexing="ij")
    return (z**2 + y**2 + x**2 <= radius**2).float()


def _axis_spreads(mask: torch.Tensor) -> np.ndarray:
    """Standard deviations of the mask's voxel coordinates along its principal axes."""
    points = torch.nonzero(mask).double()
    return np.sqrt(np.linalg.eigvalsh(np.cov(points.T.numpy())))


def _off_centre_bar(shape: tuple[int, int, int]) -> torch.Tensor:
    """An elongated box far from the grid centre, touching the grid's edge: any rotation, shift or
    scaling moves it, and a view that reaches outside the grid cuts into it."""
    bar = torch.zeros(shape)
    bar[2:10, 40:64, 6:16] = 1
    return bar


def test_masks_move_with_the_image_and_stay_binary():
    bar = _off_centre_bar(SHAPE)
    truth = torch.stack([bar, 1 - bar])  # two classes: the bar and everything else
    views = augmented_views(bar[None], truth, count=6)
    assert len(views) == 6
    for image, masks in views:
        assert image.shape == (1, *SHAPE) and masks.shape == truth.shape and masks.dtype == truth.dtype
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(masks.sum(0), torch.ones(SHAPE)), "every voxel keeps exactly one class, outside the grid too"
        # The image is the bar too: after the same motion (and a brightness change) it still marks the mask.
        inside = image[0] > 0.5
        assert 2 * (inside & masks[0].bool()).sum() / (inside.sum() + masks[0].sum()) > 0.9
        assert 2 * (masks[0] * bar).sum() / (masks[0].sum() + bar.sum()) < 0.95, "every view moves the bar"


def test_views_keep_shapes_in_millimetres_whatever_the_grid_shape():
    """A ball stays a ball on a grid three times longer on one axis than on another: rotations and
    scaling act on voxels (isotropic millimetres), not on each axis's own [-1, 1] range."""
    ball = _ball(SHAPE, 9)
    spreads = _axis_spreads(ball)
    assert spreads.max() / spreads.min() < 1.02
    for _, masks in augmented_views(ball[None], ball[None], count=8):
        spreads = _axis_spreads(masks[0])
        assert spreads.max() / spreads.min() < 1.05


def test_views_are_seeded():
    ball = _ball(SHAPE, 9)
    first = augmented_views(ball[None], ball[None], count=2)
    again = augmented_views(ball[None], ball[None], count=2)
    other = augmented_views(ball[None], ball[None], count=2, seed=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])


def test_the_same_correction_tunes_to_the_same_embeddings(predictor):
    image, labels = case("001")
    target, corrected = case("003")
    task = predictor.encode_reference(image, labels)
    first = predictor.tune(task, target, corrected, steps=2)
    again = predictor.tune(task, target, corrected, steps=2)
    assert torch.equal(first.tokens, again.tokens)
    plain = predictor.tune(task, target, corrected, steps=2, views=0)
    assert not torch.equal(first.tokens, plain.tokens), "the views must take part in tuning"
