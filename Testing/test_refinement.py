"""The second, finer pass for thin classes: which classes get one, what a task file keeps of it, and that
it changes the result only inside its crops, on the target's own grid.

A random network segments nothing meaningful; these tests check the machinery (benchmarks/refinement.py
measures what the pass gains with the shipped model). Most encode with check_refinement=False, so that
whether the random network's second pass happens to help on the reference does not decide what they see."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine_fixtures import CallCounter, case, model, predictor  # noqa: F401
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.errors import WeightsError
from IrisSegmentLib.inference.predictor import REFINE_FACTOR, REFINE_MARGIN
from IrisSegmentLib.model.serialization import load_tensors, save_tensors
from IrisSegmentLib.preprocessing.grid import Grid, Overlay, aligned_grid, labels_on_grid
from IrisSegmentLib.volume import Volume

SIDE = 160  # voxels of 1 mm: the small test network's 64-voxel working grid is 2.5 mm here


@pytest.fixture(scope="module")
def rod_and_ball() -> tuple[Volume, Volume]:
    """A 1 mm scan holding a ball 80 mm across (label 1, thick) and a rod 5 mm across (label 2, thin at
    2.5 mm working voxels), each brighter than the noisy background."""
    rng = np.random.default_rng(0)
    i, j, k = np.indices((SIDE,) * 3)
    ball = (i - 60) ** 2 + (j - 80) ** 2 + (k - 80) ** 2 <= 40**2
    rod = ((j - 130) ** 2 + (k - 120) ** 2 <= 2.5**2) & (i > 40) & (i < 120)
    image = rng.normal(100, 10, (SIDE,) * 3) + 200 * ball + 300 * rod
    labels = np.where(rod, 2, np.where(ball, 1, 0)).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-80, -80, -80)
    segments = {1: {"name": "ball"}, 2: {"name": "rod"}}
    return Volume(image.astype(np.float32), affine, "rod and ball"), Volume(labels, affine.copy(), "rod and ball labels", segments)


def test_only_thin_classes_get_a_finer_pass_and_only_where_the_scan_is_finer(predictor, model, rod_and_ball):
    with CallCounter(model.task_encoder) as task_encoder:
        task = predictor.encode_reference(*rod_and_ball, check_refinement=False, matching=False)
    assert task.spacing == pytest.approx(2.5)
    assert task.fine_spacings == [0.0, pytest.approx(2.5 / REFINE_FACTOR)]  # the rod, not the ball
    assert task.refined == [1]
    assert task_encoder.calls == 2  # the whole reference, then the rod's crop
    assert torch.count_nonzero(task.fine_tokens[0]) == 0 and torch.count_nonzero(task.fine_tokens[1]) > 0
    assert not torch.equal(task.fine_tokens[1], task.tokens[1])

    # A hippocampus crop (1 mm voxels) is worked on at 0.75 mm already: nothing finer to see.
    small = predictor.encode_reference(*case("001"), check_refinement=False, matching=False)
    assert small.fine_spacings == [0.0, 0.0] and small.refined == []


def test_a_task_file_keeps_the_finer_pass_and_older_files_load_without_one(predictor, rod_and_ball, tmp_path):
    task = predictor.encode_reference(*rod_and_ball, check_refinement=False, matching=False)
    path = tmp_path / "task.safetensors"
    task.save(path)
    loaded = TaskEmbedding.load(path)
    assert loaded.fine_spacings == task.fine_spacings
    assert torch.equal(loaded.fine_tokens, task.fine_tokens)

    tensors, meta = load_tensors(path)
    older = tmp_path / "older.safetensors"  # written before the finer pass existed
    save_tensors(older, {"tokens": tensors["tokens"]}, {k: v for k, v in meta.items() if k != "fine_spacings"})
    assert TaskEmbedding.load(older).refined == []

    broken = tmp_path / "broken.safetensors"
    save_tensors(broken, {"tokens": tensors["tokens"], "fine_tokens": torch.full_like(tensors["fine_tokens"], float("nan"))}, meta)
    with pytest.raises(WeightsError, match="NaN"):
        TaskEmbedding.load(broken)


def test_ensembles_and_selections_carry_the_finer_pass(predictor, rod_and_ball):
    a = predictor.encode_reference(*rod_and_ball, check_refinement=False, matching=False)
    image, labels = rod_and_ball
    b = predictor.encode_reference(Volume(image.array[::-1].copy(), image.affine, "flipped"), Volume(labels.array[::-1].copy(), labels.affine, "flipped", labels.segments),
                                   check_refinement=False, matching=False)
    both = TaskEmbedding.ensemble([a, b])
    torch.testing.assert_close(both.fine_tokens[1], (a.fine_tokens[1] + b.fine_tokens[1]) / 2, rtol=0, atol=1e-6)
    assert both.fine_spacings == a.fine_spacings

    no_fine = replace(a, fine_tokens=torch.zeros_like(a.fine_tokens), fine_spacings=[0.0, 0.0])
    mixed = TaskEmbedding.ensemble([no_fine, b])  # only b saw the rod at the finer spacing: its tokens, not a mean with zeros
    assert torch.equal(mixed.fine_tokens[1], b.fine_tokens[1]) and mixed.refined == [1]

    rod_only = a.select(["rod"])
    assert rod_only.refined == [0] and torch.equal(rod_only.fine_tokens[0], a.fine_tokens[1])


def test_an_overlay_replaces_its_classes_only_inside_its_own_grid():
    onto = Grid((20, 20, 20), np.eye(4))
    coarse = torch.zeros((2, 20, 20, 20))
    coarse[0, :, :, :13] = 0.9  # class 3
    coarse[1, 5:15, 5:15, 12:18] = 0.8  # class 7, coarsely
    fine_grid = aligned_grid(np.array([10.0, 10.0, 14.5]), 0.5, (16, 16, 16))  # voxel centres 6.25..13.75 (x, y), 10.75..18.25 (z)
    fine = torch.zeros((1, 16, 16, 16))
    fine[0, 4:12, 4:12, 4:12] = 0.95  # class 7 smaller than the first pass said
    first = labels_on_grid(coarse, onto.affine, onto, [3, 7])
    refined = labels_on_grid(coarse, onto.affine, onto, [3, 7], overlays=[Overlay([1], fine, fine_grid)])
    inside = np.zeros(onto.shape, dtype=bool)
    inside[7:14, 7:14, 11:19] = True  # the target voxels surrounded by fine voxel centres
    assert np.array_equal(first[~inside], refined[~inside])  # outside it nothing changed
    assert (refined[9:12, 9:12, 13:17] == 7).all()  # the refined core
    assert first[10, 10, 17] == 7 and refined[10, 10, 17] == 0  # its rim, dropped by the finer pass
    assert np.array_equal(first == 3, refined == 3)  # a class without an overlay keeps its probabilities inside it too


def test_the_second_pass_segments_on_the_target_grid_in_extra_decoder_passes(predictor, model, rod_and_ball):
    task = predictor.encode_reference(*rod_and_ball, check_refinement=False, matching=False)
    task = replace(task, thresholds=[0.5, 1e-6])  # the random network's rod: found wherever it fires at all
    scan = rod_and_ball[0]
    shift = np.eye(4)
    shift[:3, 3] = (30, 106, 96)
    image = Volume(scan.array[30:130, 106:154, 96:144].copy(), scan.affine @ shift, "around the rod")  # short enough for one crop
    with CallCounter(model.decoder) as decoder:
        first = predictor.segment(image, task, refine=False)
        passes = decoder.calls
        refined = predictor.segment(image, task, refine=True)
    assert decoder.calls == 2 * passes + 1  # the first pass again, plus one crop
    assert refined.shape == image.shape and np.array_equal(refined.affine, image.affine)
    assert set(np.unique(refined.array)) <= {0, 1, 2}
    assert not np.array_equal(first.array == 2, refined.array == 2)
    assert np.array_equal(predictor.segment(image, task, refine=True).array, refined.array)  # deterministic

    unfound = replace(task, thresholds=[0.5, 1 - 1e-6])  # the first pass finds no rod: no crop to refine
    with CallCounter(model.decoder) as decoder:
        predictor.segment(image, unfound, refine=True)
    assert decoder.calls == passes


def test_tuning_fits_the_fine_tokens_of_the_corrected_thin_classes(predictor, rod_and_ball):
    """Otherwise the second pass would put back, inside its crops, what tuning corrected in the first."""
    task = predictor.encode_reference(*rod_and_ball, check_refinement=False, matching=False)
    tuned = predictor.tune(task, *rod_and_ball, steps=2, views=0, join_context=False)
    assert not torch.equal(tuned.fine_tokens[1], task.fine_tokens[1])  # the rod's crop was fitted
    assert torch.equal(tuned.fine_tokens[0], task.fine_tokens[0])  # the ball has no finer pass: nothing to fit
    assert tuned.fine_spacings == task.fine_spacings


def test_a_thin_class_keeps_its_second_pass_only_where_it_segments_the_reference_better(predictor, rod_and_ball):
    image, labels = rod_and_ball
    thin = np.zeros_like(labels.array)  # a second thin class: a slab 4 mm thick across the ball
    thin[58:62, 50:110, 50:110] = 3
    many = Volume(np.where(thin > 0, thin, labels.array), labels.affine, "three", {**labels.segments, 3: {"name": "slab"}})
    unchecked = predictor.encode_reference(image, many, check_refinement=False, matching=False)
    assert unchecked.refined == [1, 2]
    checked = predictor.encode_reference(image, many, matching=False)
    first_pass, both_passes = (predictor.segment(image, unchecked, refine=refine).array for refine in (False, True))
    for row in unchecked.refined:
        value = unchecked.label_values[row]
        truth = many.array == value
        first, both = dice_of(first_pass == value, truth), dice_of(both_passes == value, truth)
        kept = checked.fine_spacings[row] > 0
        assert kept == (both > first), (row, first, both)
        assert torch.equal(checked.fine_tokens[row], unchecked.fine_tokens[row] if kept else torch.zeros_like(unchecked.fine_tokens[row]))
    assert checked.fine_spacings[0] == 0  # the ball was never a candidate


def test_a_matched_thin_class_keeps_its_second_pass_only_where_the_matched_passes_segment_the_reference_better(predictor, rod_and_ball):
    """The random network knows nothing, so the matching decides every class; its second pass is judged
    by segmenting the reference with the matching, as the target will be."""
    image, labels = rod_and_ball
    thin = np.zeros_like(labels.array)
    thin[58:62, 50:110, 50:110] = 3
    many = Volume(np.where(thin > 0, thin, labels.array), labels.affine, "three", {**labels.segments, 3: {"name": "slab"}})
    unchecked = predictor.encode_reference(image, many, check_refinement=False)
    assert unchecked.match_weights == [1.0, 1.0, 1.0] and unchecked.refined == [1, 2]
    checked = predictor.encode_reference(image, many)
    first_pass, both_passes = (predictor.segment(image, unchecked, refine=refine).array for refine in (False, True))
    for row in unchecked.refined:
        value = unchecked.label_values[row]
        first, both = dice_of(first_pass == value, many.array == value), dice_of(both_passes == value, many.array == value)
        assert (checked.fine_spacings[row] > 0) == (both > first), (row, first, both)


def test_second_pass_crops_start_on_the_stride_lattice_and_hold_their_classes_with_the_margin(predictor):
    """Crops at one spacing cut where the reference's were cut, wherever the class lies: the first voxel of
    every crop sits on the world lattice of total-stride voxels, and each class is inside its crop with
    REFINE_MARGIN voxels to spare."""
    rng = np.random.default_rng(3)
    spacing, stride = 1.25, predictor.config.total_stride
    boxes = {}
    for row in range(6):
        low = rng.uniform(-100, 100, 3)
        boxes[row] = (low, low + rng.uniform(3, 40, 3))
    crops = predictor._fine_crops(boxes, spacing)
    assert sorted(row for _, rows in crops for row in rows) == list(range(6))
    for crop, rows in crops:
        lattice = crop.affine[:3, 3] / (spacing * stride)
        assert np.allclose(lattice, np.round(lattice), atol=1e-6)
        low, high = crop.world_bounds()
        for row in rows:
            assert (boxes[row][0] >= low + REFINE_MARGIN * spacing - 1e-6).all() and (boxes[row][1] <= high - REFINE_MARGIN * spacing + 1e-6).all()


def test_the_network_is_judged_on_its_reference_without_the_matching_in_either_pass(predictor, rod_and_ball, monkeypatch):
    """The reference matches itself exactly, so a judge of the network alone that let the matching into the
    second pass would keep a second pass the network does not earn (HeadNeck's larynx: 0.531 to 0.337 over
    the held-out cases when it did)."""
    image, labels = rod_and_ball
    matched = predictor.encode_reference(image, labels, check_refinement=False)
    assert matched.refined == [1] and matched.fine_memory is not None and matched.match_weights == [1.0, 1.0]
    plain = replace(matched, memory=None, fine_memory=None, match_weights=[0.0, 0.0])
    _, grid = predictor.probabilities(image, matched, matching=False)
    kept = predictor._truth_on_grid(labels, grid, matched.label_values)  # a first pass that found the rod where it is
    alone, network, with_matching = (predictor._overlays(image, task, kept, grid, None, None, matching)[0].probabilities
                                     for task, matching in ((matched, False), (plain, True), (matched, True)))
    assert torch.equal(alone, network) and not torch.allclose(alone, with_matching)

    asked = []
    overlays = predictor._overlays
    monkeypatch.setattr(predictor, "_overlays", lambda *args: asked.append(args[-1]) or overlays(*args))
    for matching in (False, True):
        predictor._reference_dice(matched, image, labels, matching=matching, cancel=None)
    assert asked == [False, True]


def dice_of(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, float(a.sum() + b.sum()))
