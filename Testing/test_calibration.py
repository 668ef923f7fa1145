"""Per-class thresholds of a context ensemble, fitted leave-one-out on its references.

The network is replaced, where it matters, by probability maps of known calibration (under-confident:
0.3 inside the truth, 0.12 outside), so the right threshold is known; the references, their label
values, the working grids and everything after the network are real."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import CLASS_NAMES, case, dice, model, predictor  # noqa: F401
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.errors import WeightsError
from IrisSegmentLib.inference.calibration import CANDIDATES, MIN_GAIN, choose_thresholds, dice_by_threshold
from IrisSegmentLib.model.serialization import load_tensors, save_tensors
from IrisSegmentLib.preprocessing.grid import Grid, labels_on_grid
from IrisSegmentLib.volume import Volume

INSIDE, OUTSIDE = 0.3, 0.12


def test_a_voxel_takes_the_most_probable_class_above_its_own_threshold():
    probabilities = torch.tensor([[0.4, 0.2, 0.6, 0.1], [0.6, 0.8, 0.3, 0.2]], dtype=torch.float32).reshape(2, 4, 1, 1)
    grid = Grid((4, 1, 1), np.eye(4))
    labels = labels_on_grid(probabilities, grid.affine, grid, [3, 7], threshold=[0.3, 0.7])
    # class 7 is more probable in voxel 0 but below its 0.7; voxel 3 passes neither threshold
    assert labels.ravel().tolist() == [3, 7, 3, 0]
    assert labels_on_grid(probabilities, grid.affine, grid, [3, 7], threshold=0.5).ravel().tolist() == [7, 7, 3, 0]


def test_thresholds_are_chosen_where_the_held_out_references_gain():
    truth = torch.zeros(3, 10, 10, 10)
    truth[:, 2:6, 2:6, 2:6] = 1
    truth[2] = 0  # the third class is in no held-out reference
    probabilities = torch.where(truth.bool(), torch.tensor(INSIDE), torch.tensor(OUTSIDE))
    probabilities[1] = torch.where(truth[1].bool(), torch.tensor(0.9), torch.tensor(0.0))  # already right at 0.5
    curves = dice_by_threshold(probabilities, truth)
    assert curves.shape == (3, len(CANDIDATES)) and torch.isnan(curves[2]).all()
    chosen = choose_thresholds([curves, curves], current=[0.5, 0.5, 0.35])
    assert OUTSIDE < chosen[0] < INSIDE  # under-confident class: a lower threshold
    assert chosen[1] == 0.5 and chosen[2] == 0.35  # no gain: 0.5; never seen: unchanged

    # A gain below MIN_GAIN is noise, not a reason to move away from 0.5.
    flat = torch.full((1, len(CANDIDATES)), 0.80)
    flat[0, 0] = 0.80 + MIN_GAIN / 2
    assert choose_thresholds([flat], current=[0.4]) == [0.5]


def test_a_threshold_that_loses_on_any_held_out_reference_is_not_chosen():
    high, mid = CANDIDATES.index(0.7), CANDIDATES.index(0.6)

    def curve(at_high: float, at_mid: float = 0.6) -> torch.Tensor:
        flat = torch.full((1, len(CANDIDATES)), 0.6)  # Dice 0.6 at every other threshold, 0.5 included
        flat[0, high], flat[0, mid] = at_high, at_mid
        return flat

    # 0.7 gains 0.05 on average but loses on the second reference (as the OpenKBP larynx did):
    # the best threshold that loses nowhere is taken (0.6, +0.015 on average) ...
    assert choose_thresholds([curve(0.71, 0.63), curve(0.59)], current=[0.5]) == [0.6]
    # ... or 0.5 when none is left; 0.7 when it loses nowhere.
    assert choose_thresholds([curve(0.71), curve(0.59)], current=[0.5]) == [0.5]
    assert choose_thresholds([curve(0.71), curve(0.62)], current=[0.5]) == [0.7]


@pytest.fixture
def known_probabilities(predictor, monkeypatch):
    """predictor.probabilities replaced by under-confident maps of each image's true labels; records,
    per call, the image and the sources of the task it was given."""
    truths: dict[int, Volume] = {}
    calls: list[tuple[str, list[str]]] = []

    def fake(image, task, progress=None, cancel=None, allow_modality_mismatch=False, matching=True, exact=True):
        _, grid = predictor._working_target(image, task.modality, task.spacing)
        labels = truths[id(image)]
        by_name = {s["name"]: v for v, s in labels.segments.items()}
        truth = predictor._truth_on_grid(labels, grid, [by_name[name] for name in task.class_names])
        calls.append((image.name, list(task.sources)))
        return torch.where(truth.bool(), torch.tensor(INSIDE), torch.tensor(OUTSIDE)), grid

    monkeypatch.setattr(predictor, "probabilities", fake)
    return truths, calls


def test_calibrated_ensemble_learns_each_threshold_without_its_own_reference(predictor, known_probabilities):
    truths, calls = known_probabilities
    a, b = case("001"), case("003")
    image, labels = case("004")  # holds only the posterior part, under another label value
    c = (image, Volume(np.where(labels.array == 2, 5, 0).astype(np.uint8), labels.affine, "posterior only", {5: {"name": CLASS_NAMES[2]}}))
    references = [a, b, c]
    tasks = [predictor.encode_reference(*r, matching=False) for r in references]  # no judging pass to record
    for image, labels in references:
        truths[id(image)] = labels

    calibrated = predictor.calibrated_ensemble(tasks, references)

    plain = TaskEmbedding.ensemble(tasks)
    assert torch.equal(calibrated.tokens, plain.tokens) and calibrated.label_values == plain.label_values == [1, 2]
    assert all(OUTSIDE < t < INSIDE for t in calibrated.thresholds)
    assert [image for image, _ in calls] == [r[0].name for r in references]  # each reference segmented once
    for (image, sources), own in zip(calls, tasks):
        assert own.sources[0] not in sources and sources, f"{image} was segmented with its own embedding"

    target, truth = case("007")
    truths[id(target)] = truth
    calibrated_result = predictor.segment(target, calibrated)
    for value in (1, 2):
        assert dice(calibrated_result.array, truth.array, value) > 0.85
    assert not predictor.segment(target, plain).array.any()  # at 0.5, under-confident maps segment nothing


def test_a_single_reference_cannot_calibrate_itself(predictor):
    reference = case("001")
    task = predictor.encode_reference(*reference)
    assert predictor.calibrated_ensemble([task], [reference]).thresholds == [0.5, 0.5]


def test_thresholds_travel_with_the_task(predictor, tmp_path):
    task = TaskEmbedding.ensemble([predictor.encode_reference(*case("001"))])
    task.thresholds = [0.25, 0.6]
    task.save(tmp_path / "task.safetensors")
    loaded = TaskEmbedding.load(tmp_path / "task.safetensors")
    assert loaded.thresholds == [0.25, 0.6]
    assert loaded.select(["hippocampus_posterior"]).thresholds == [0.6]

    other = TaskEmbedding.ensemble([predictor.encode_reference(*case("003")), predictor.encode_reference(*case("004"))])
    assert TaskEmbedding.ensemble([loaded, other]).thresholds == pytest.approx([(0.25 + 2 * 0.5) / 3, (0.6 + 2 * 0.5) / 3])

    # Task files written before thresholds existed load at 0.5; a threshold outside (0, 1) is corruption.
    tensors, meta = load_tensors(tmp_path / "task.safetensors")
    save_tensors(tmp_path / "old.safetensors", tensors, {k: v for k, v in meta.items() if k != "thresholds"})
    assert TaskEmbedding.load(tmp_path / "old.safetensors").thresholds == [0.5, 0.5]
    save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "thresholds": "[0.25, 1.5]"})
    with pytest.raises(WeightsError, match="corrupt"):
        TaskEmbedding.load(tmp_path / "bad.safetensors")


def test_tuning_returns_to_threshold_one_half(predictor):
    """Tuning fits the probabilities to a correction at 0.5, so thresholds calibrated before no longer apply."""
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    task.thresholds = [0.2, 0.3]
    tuned = predictor.tune(task, *case("003"), steps=1)
    assert tuned.thresholds == [0.5, 0.5] and task.thresholds == [0.2, 0.3]
