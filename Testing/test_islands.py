"""Island removal: a class keeps only its largest connected piece when the context ensemble's own
references show that the other pieces are false positives.

As in test_calibration.py, the network is replaced where it matters by probability maps built from
each image's true labels (here plus a false island), so the right decision is known; references,
working grids and everything after the network are real."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import CLASS_NAMES, case, dice, model, predictor  # noqa: F401
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.errors import WeightsError
from IrisSegmentLib.inference import calibration
from IrisSegmentLib.inference.calibration import ISLAND_MIN_GAIN, choose_keep_largest, island_gains
from IrisSegmentLib.inference.islands import drop_islands
from IrisSegmentLib.inference.retrieval import ReferencePool
from IrisSegmentLib.model.serialization import load_tensors, save_tensors
from IrisSegmentLib.volume import Volume

ISLAND = (slice(8, 14),) * 3  # inside the target, away from the hippocampus
AROUND_ISLAND = (slice(6, 16),) * 3


def test_drop_islands_removes_only_the_smaller_pieces_of_flagged_classes():
    probabilities = torch.zeros(2, 12, 12, 12)
    probabilities[:, 1:6, 1:6, 1:6] = 0.9  # the structure
    probabilities[:, 9:11, 9:11, 9:11] = 0.8  # an island
    probabilities[:, 7, 7, 7] = 0.3  # below the threshold, between them
    kept = drop_islands(probabilities, [0.5, 0.5], [True, False])
    assert kept[0, 9:11, 9:11, 9:11].eq(0).all() and kept[0, 1:6, 1:6, 1:6].eq(0.9).all()
    assert kept[0, 7, 7, 7] == 0.3  # the kept piece's surroundings interpolate as before
    assert torch.equal(kept[1], probabilities[1])  # an unflagged class keeps every piece
    assert drop_islands(probabilities, [0.5, 0.5], [False, False]) is probabilities


def test_a_class_keeps_its_largest_piece_only_when_every_reference_agrees(monkeypatch):
    truth = torch.zeros(4, 12, 12, 12)
    truth[:3, 1:6, 1:6, 1:6] = 1
    truth[1, 8:11, 8:11, 8:11] = 1  # class 1 is truly two pieces (say, lesions)
    probabilities = truth.clone()
    probabilities[0, 9:11, 9:11, 9:11] = 1  # class 0: a false island
    gains = island_gains(probabilities, truth, [0.5] * 4)
    assert gains[0] > 0 and gains[1] < 0 and gains[2] == 0 and torch.isnan(gains[3])
    chosen = choose_keep_largest([gains, gains], current=[False, False, False, True])
    assert chosen == [True, False, False, True]  # no islands (class 2): no evidence; unseen (3): unchanged
    # A gain below ISLAND_MIN_GAIN is too little evidence to risk removing true pieces.
    assert choose_keep_largest([torch.tensor([ISLAND_MIN_GAIN / 2])], current=[False]) == [False]
    # With no bar (benchmarks/islands.py), any gain qualifies, but a class with no islands anywhere does not.
    monkeypatch.setattr(calibration, "ISLAND_MIN_GAIN", 0.0)
    assert choose_keep_largest([torch.tensor([0.001, 0.0]), torch.tensor([0.0, 0.0])], current=[False, False]) == [True, False]
    monkeypatch.undo()
    # One reference on which dropping the island would have cost Dice vetoes the others.
    assert choose_keep_largest([gains, -gains.clamp(min=0)], current=[False] * 4)[0] is False


@pytest.fixture
def probabilities_with_an_island(predictor, monkeypatch):
    """predictor.probabilities replaced by each image's true labels (0.9 inside, 0 outside) plus a
    false island of the posterior hippocampus near a corner of the working grid."""
    truths: dict[int, Volume] = {}

    def fake(image, task, progress=None, cancel=None, allow_modality_mismatch=False, matching=True, exact=True):
        _, grid = predictor._working_target(image, task.modality, task.spacing)
        labels = truths[id(image)]
        by_name = {s["name"]: v for v, s in labels.segments.items()}
        truth = predictor._truth_on_grid(labels, grid, [by_name[name] for name in task.class_names])
        assert not truth[(slice(None), *AROUND_ISLAND)].any()
        probabilities = 0.9 * truth
        for k, name in enumerate(task.class_names):
            if name == "hippocampus_posterior":
                probabilities[(k, *ISLAND)] = 0.9
        return probabilities, grid

    monkeypatch.setattr(predictor, "probabilities", fake)
    return truths


def test_the_ensemble_learns_to_drop_islands_and_segment_applies_it(predictor, probabilities_with_an_island):
    truths = probabilities_with_an_island
    image, labels = case("004")  # holds only the posterior part, under another label value: its class is row 1 of the ensemble
    posterior_only = (image, Volume(np.where(labels.array == 2, 5, 0).astype(np.uint8), labels.affine, "posterior only", {5: {"name": CLASS_NAMES[2]}}))
    references = [posterior_only, case("001"), case("003")]
    for image, labels in references:
        truths[id(image)] = labels
    tasks = [predictor.encode_reference(*r) for r in references]

    calibrated = predictor.calibrated_ensemble(tasks, references)
    assert calibrated.class_names == ["hippocampus_posterior", "hippocampus_anterior"]
    assert calibrated.label_values == [5, 1] and calibrated.keep_largest == [True, False]

    target, truth = case("007")
    truth = Volume(np.where(truth.array == 2, 5, truth.array).astype(np.uint8), truth.affine, truth.name, {1: {"name": CLASS_NAMES[1]}, 5: {"name": CLASS_NAMES[2]}})
    truths[id(target)] = truth
    plain = predictor.segment(target, TaskEmbedding.ensemble(tasks))
    cleaned = predictor.segment(target, calibrated)
    assert (plain.array == 5).sum() > (cleaned.array == 5).sum()  # the island is gone
    assert dice(cleaned.array, truth.array, 5) > dice(plain.array, truth.array, 5)
    assert np.array_equal(cleaned.array == 1, plain.array == 1)

    # Tuning's check on the references judges the label map segment makes, islands dropped.
    checked, _ = predictor._dice_on(calibrated, [(target, truth)])
    assert checked[0] > predictor._dice_on(TaskEmbedding.ensemble(tasks), [(target, truth)])[0][0]
    assert checked[0] == pytest.approx(dice(cleaned.array, truth.array, 5), abs=0.05)

    # Retrieval from a pool of these references segments with the ensemble's settings.
    retrieved = ReferencePool([calibrated]).closest(calibrated)
    assert retrieved.keep_largest == [True, False] and retrieved.thresholds == calibrated.thresholds


def test_a_single_reference_keeps_every_piece(predictor):
    reference = case("001")
    task = predictor.encode_reference(*reference)
    assert predictor.calibrated_ensemble([task], [reference]).keep_largest == [False, False]


def test_island_flags_travel_with_the_task(predictor, tmp_path):
    task = TaskEmbedding.ensemble([predictor.encode_reference(*case("001"))])
    task.keep_largest = [True, False]
    task.save(tmp_path / "task.safetensors")
    loaded = TaskEmbedding.load(tmp_path / "task.safetensors")
    assert loaded.keep_largest == [True, False]
    assert loaded.calibration_note() == "largest piece only: hippocampus_anterior"
    assert TaskEmbedding.load(tmp_path / "task.safetensors").select(["hippocampus_posterior"]).calibration_note() == ""
    assert loaded.select(["hippocampus_anterior"]).keep_largest == [True]
    assert predictor.tune(loaded, *case("003"), steps=1).keep_largest == [True, False]  # a structure's shape survives tuning

    # Ensembles follow the majority of references (a tie keeps every piece).
    other = TaskEmbedding.ensemble([predictor.encode_reference(*case("003")), predictor.encode_reference(*case("004"))])
    assert TaskEmbedding.ensemble([loaded, other]).keep_largest == [False, False]
    assert TaskEmbedding.ensemble([loaded, loaded, other]).keep_largest == [False, False]
    assert TaskEmbedding.ensemble([loaded, loaded, loaded, other]).keep_largest == [True, False]

    # Task files written before island removal keep every piece; a flag that is not true/false is corruption.
    tensors, meta = load_tensors(tmp_path / "task.safetensors")
    save_tensors(tmp_path / "old.safetensors", tensors, {k: v for k, v in meta.items() if k != "keep_largest"})
    assert TaskEmbedding.load(tmp_path / "old.safetensors").keep_largest == [False, False]
    save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "keep_largest": "[1, 0]"})
    with pytest.raises(WeightsError, match="corrupt"):
        TaskEmbedding.load(tmp_path / "bad.safetensors")
