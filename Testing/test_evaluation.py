"""Evaluation building blocks: metrics with known answers, the registration baseline on a real scan
moved by a known rigid motion, the nnU-Net dataset reader and held-out split, and the report files."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from IrisSegmentLib.errors import InputError
from IrisSegmentLib.evaluation.dataset import load_dataset, read_case, split_cases
from IrisSegmentLib.evaluation.metrics import ClassScore, dice, hd95, mean_scores, score_labels
from IrisSegmentLib.evaluation.registration import RegistrationSettings, register_and_warp, sitk_to_volume, volume_to_sitk
from IrisSegmentLib.evaluation.report import (
    CSV_COLUMNS, ResultRow, plot_overlay, pooled_markdown, read_csv, result_rows, summary_markdown, write_report,
)
from IrisSegmentLib.volume import Volume
from support import DATA, make_affine, needs_paths, rotation

SPLITS = Path(__file__).resolve().parents[1] / "Resources" / "splits.json"
HIPPOCAMPUS = DATA / "Hippocampus_MRI"


def _cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int = 10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# ---------------------------------------------------------------- metrics


def test_offset_cubes_have_known_dice_and_hd95() -> None:
    # 10-voxel cubes offset by 2 voxels at 2 mm: overlap 8/10, the far faces are 2 voxels = 4 mm apart.
    shape = (32, 32, 32)
    truth = _cube(shape, (10, 10, 10)).astype(np.uint8)
    prediction = _cube(shape, (12, 10, 10)).astype(np.uint8)
    scores = score_labels(Volume(prediction, np.diag([2.0, 2.0, 2.0, 1.0])), Volume(truth, np.diag([2.0, 2.0, 2.0, 1.0])))
    assert list(scores) == [1]
    assert scores[1].dice == pytest.approx(0.8)
    assert scores[1].hd95_mm == pytest.approx(4.0)


def test_hd95_uses_the_spacing_of_the_offset_axis() -> None:
    # Same 2-voxel offset, along k only: 3 mm slices make it 6 mm, 1 mm pixels would make it 2.
    shape = (32, 32, 32)
    truth, prediction = _cube(shape, (10, 10, 10)), _cube(shape, (10, 10, 12))
    assert hd95(prediction, truth, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert hd95(prediction, truth, (3.0, 3.0, 1.0)) == pytest.approx(2.0)


def test_classes_are_scored_separately_and_empty_cases_follow_the_convention() -> None:
    shape = (24, 24, 24)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    truth = np.zeros(shape, dtype=np.uint8)
    truth[_cube(shape, (2, 2, 2), 8)] = 1
    truth[_cube(shape, (12, 12, 12), 6)] = 3  # class 3 is missed by the prediction
    prediction = np.zeros(shape, dtype=np.uint8)
    prediction[_cube(shape, (2, 2, 2), 8)] = 1  # perfect
    prediction[_cube(shape, (12, 2, 2), 4)] = 5  # class 5 is invented
    scores = score_labels(Volume(prediction, affine), Volume(truth, affine))
    assert set(scores) == {1, 3, 5}  # absent-from-both class 2 is not scored by default
    assert scores[1] == ClassScore(1.0, 0.0)
    assert scores[3].dice == 0.0 and math.isnan(scores[3].hd95_mm)
    assert scores[5].dice == 0.0 and math.isnan(scores[5].hd95_mm)
    both_empty = score_labels(Volume(prediction, affine), Volume(truth, affine), classes=[2])[2]
    assert both_empty.dice == 1.0 and math.isnan(both_empty.hd95_mm)
    assert dice(np.zeros(shape), np.zeros(shape)) == 1.0


def test_scores_of_several_tunings_average_per_class_and_keep_undefined_distances_undefined() -> None:
    first = {1: ClassScore(0.8, 2.0), 2: ClassScore(0.0, float("nan"))}
    second = {1: ClassScore(0.6, 4.0), 2: ClassScore(0.3, 5.0)}
    mean = mean_scores([first, second])
    assert mean[1] == ClassScore(pytest.approx(0.7), pytest.approx(3.0))
    # one tuning found nothing: its Dice 0 counts, and the HD95 is undefined as for a single failed scoring
    assert mean[2].dice == pytest.approx(0.15) and math.isnan(mean[2].hd95_mm)
    single = mean_scores([first])
    assert single[1] == first[1] and single[2].dice == 0.0 and math.isnan(single[2].hd95_mm)


def test_scoring_refuses_label_maps_on_different_grids() -> None:
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    with pytest.raises(InputError, match="same voxel grid"):
        score_labels(Volume(labels, np.eye(4)), Volume(labels, np.diag([2.0, 1.0, 1.0, 1.0])))


# ---------------------------------------------------------------- registration


def test_sitk_conversion_keeps_voxels_and_world_positions() -> None:
    affine = make_affine(rotation(2, 30) @ rotation(0, -20), (0.7, 1.3, 2.5), (12.3, -45.6, 78.9))
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # all axes differ: a transpose cannot pass
    image = volume_to_sitk(Volume(array, affine))
    assert image.GetSize() == (5, 6, 7)
    for ijk in [(0, 0, 0), (4, 1, 6), (2, 5, 3)]:
        ras = affine[:3, :3] @ ijk + affine[:3, 3]
        lps = image.TransformIndexToPhysicalPoint(ijk)
        assert np.allclose(lps, (-ras[0], -ras[1], ras[2]))
        assert image[ijk] == array[ijk]
    back = sitk_to_volume(image)
    assert np.array_equal(back.array, array) and np.allclose(back.affine, affine)


def _hippocampus() -> tuple[Volume, Volume]:
    dataset = load_dataset(HIPPOCAMPUS)
    image, labels = read_case(dataset.case("hippocampus_001"))
    return Volume(image.array.astype(np.float32), image.affine, "hippocampus_001"), labels


@needs_paths(HIPPOCAMPUS)
def test_registration_recovers_a_known_rigid_motion() -> None:
    image, labels = _hippocampus()
    # Target: the same scan turned 15 degrees about k around its centre and shifted by (4, -3, 2) mm (1 mm voxels).
    turn = rotation(2, 15)
    centre = (np.asarray(image.shape) - 1) / 2
    offset = centre - turn @ centre + np.array([4.0, -3.0, 2.0])
    target_array = ndimage.affine_transform(image.array, turn, offset, order=1, mode="nearest")
    truth = ndimage.affine_transform(labels.array, turn, offset, order=0, mode="constant")
    target = Volume(target_array, image.affine, "moved")

    before = np.mean([dice(labels.array == c, truth == c) for c in (1, 2)])
    warped, seconds = register_and_warp(image, labels, target)
    after = np.mean([dice(warped.array == c, truth == c) for c in (1, 2)])

    assert warped.same_grid(target) and warped.array.dtype == labels.array.dtype
    assert warped.segments == labels.segments
    assert before < 0.6, before  # the motion really moves the hippocampus
    assert after > 0.8 and after > before + 0.25, (before, after)
    assert 0 < seconds < 60


def test_registration_is_deterministic() -> None:
    # A blob in a small volume; the target has it 3 voxels (6 mm) further along i.
    grid = np.stack(np.meshgrid(*[np.arange(20.0)] * 3, indexing="ij"))
    array = np.exp(-(((grid - np.array([8.0, 10.0, 9.0])[:, None, None, None]) / 4.0) ** 2).sum(0)).astype(np.float32) * 100
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = Volume((array > 40).astype(np.uint8), affine, segments={1: {"name": "blob"}})
    target = Volume(np.roll(array, 3, axis=0), affine)
    settings = RegistrationSettings(search_steps=2, affine_iterations=30, deformable_iterations=5)

    first, _ = register_and_warp(Volume(array, affine), labels, target, settings)
    second, _ = register_and_warp(Volume(array, affine), labels, target, settings)
    assert np.array_equal(first.array, second.array)
    assert dice(first.array == 1, np.roll(labels.array, 3, axis=0) == 1) > 0.9
    assert dice(labels.array == 1, np.roll(labels.array, 3, axis=0) == 1) < 0.7


def test_registration_failures_are_input_errors() -> None:
    with pytest.raises(InputError, match="seed"):
        RegistrationSettings(seed=0)
    affine = np.eye(4)
    labels = Volume(np.pad(np.ones((4, 4, 4), dtype=np.uint8), 6), affine)
    blank = Volume(np.zeros(labels.shape, dtype=np.float32), affine, "blank")
    with pytest.raises(InputError, match="blank"):
        register_and_warp(Volume(labels.array.astype(np.float32), affine), labels, blank, RegistrationSettings(search_steps=1))


# ---------------------------------------------------------------- dataset and split


def _write_dataset(root: Path, cases: list[str], labels: dict | None = None) -> Path:
    root.mkdir()
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    meta = {"name": "Toy", "channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "liver": 1, "spleen": 4}}
    (root / "dataset.json").write_text(json.dumps(meta))
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for number, case in enumerate(cases):
        label = np.zeros((6, 7, 8), dtype=np.uint8)
        label[1:3, 2:4, 3:5] = 1
        label[4, 5, 6] = 4
        nib.save(nib.Nifti1Image(np.full((6, 7, 8), number + 1, dtype=np.int16), affine), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{case}.nii.gz")
    return root


def test_dataset_reads_cases_paths_and_label_names(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "Toy", ["case_b", "case_a", "case_c"])
    dataset = load_dataset(root)
    assert dataset.name == "Toy" and dataset.modality == "CT"
    assert dataset.case_ids == ["case_a", "case_b", "case_c"]
    assert dataset.label_names == {1: "liver", 4: "spleen"}
    assert dataset.case("case_b").image_path == root / "imagesTr" / "case_b_0000.nii.gz"
    assert dataset.case("case_b").labels_path == root / "labelsTr" / "case_b.nii.gz"
    image, labels = read_case(dataset.case("case_b"))
    assert image.shape == labels.shape == (6, 7, 8)
    assert np.all(image.array == 1) and set(np.unique(labels.array)) == {0, 1, 4}
    with pytest.raises(InputError, match="no case"):
        dataset.case("case_z")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: (root / "dataset.json").unlink(), "no dataset.json"),
        (lambda root: shutil.rmtree(root / "labelsTr"), "no labelsTr"),
        (lambda root: (root / "labelsTr" / "case_a.nii.gz").unlink(), "image without a label map"),
        (lambda root: (root / "dataset.json").write_text('{"labels": {"tumor": [1, 2]}}'), "region-based"),
        (lambda root: (root / "dataset.json").write_text("{not json"), "JSON"),
    ],
)
def test_dataset_not_in_nnunet_layout_is_an_input_error(tmp_path: Path, breakage, message: str) -> None:
    root = _write_dataset(tmp_path / "Toy", ["case_a", "case_b"])
    breakage(root)
    with pytest.raises(InputError, match=message):
        load_dataset(root)


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_dataset(tmp_path / "nowhere")


def test_split_is_deterministic_disjoint_and_complete() -> None:
    ids = [f"case_{n:03d}" for n in range(37)]
    train, heldout = split_cases(ids, 0.2, seed=0)
    assert (train, heldout) == split_cases(list(reversed(ids)), 0.2, seed=0)  # input order does not matter
    assert not set(train) & set(heldout) and sorted(train + heldout) == ids
    assert len(heldout) == math.ceil(0.2 * 37) and train == sorted(train) and heldout == sorted(heldout)
    assert split_cases(ids, 0.2, seed=1)[1] != heldout
    assert split_cases(ids, 0.0)[1] == []
    assert split_cases(["only"], 0.5) == (["only"], [])  # one case stays a reference
    with pytest.raises(InputError, match="unique"):
        split_cases(["a", "b", "a"])
    with pytest.raises(InputError, match="fraction"):
        split_cases(ids, 1.0)


@pytest.mark.skipif(not SPLITS.is_file(), reason="needs Resources/splits.json")
@needs_paths(DATA)
def test_split_reproduces_the_committed_held_out_cases() -> None:
    committed = json.loads(SPLITS.read_text())["heldout"]
    for name, heldout in committed.items():
        dataset = load_dataset(DATA / name)
        assert split_cases(dataset.case_ids, 0.25, seed=0)[1] == sorted(heldout), name


# ---------------------------------------------------------------- report


def _rows() -> list[ResultRow]:
    names = {1: "liver", 2: "spleen"}
    rows = []
    for case, iris, registration in [("c1", (0.9, 0.7), (0.6, 0.5)), ("c2", (0.8, 0.5), (0.4, 0.0))]:
        rows += result_rows("Toy", case, "iris", {1: ClassScore(iris[0], 3.0), 2: ClassScore(iris[1], 5.0)}, names, 2.0)
        rows += result_rows(
            "Toy", case, "registration", {1: ClassScore(registration[0], 9.0), 2: ClassScore(registration[1], float("nan"))}, names, 30.0
        )
    return rows


def test_report_writes_csv_summary_and_plot(tmp_path: Path) -> None:
    rows = _rows()
    paths = write_report(rows, tmp_path / "report")

    with open(paths["csv"], newline="") as handle:
        table = list(csv.reader(handle))
    assert tuple(table[0]) == CSV_COLUMNS == ("dataset", "case", "method", "class", "dice", "hd95_mm", "seconds")
    assert len(table) == 1 + len(rows)
    assert table[1] == ["Toy", "c1", "iris", "liver", "0.9", "3.0", "2.0"]
    assert math.isnan(float(table[-1][5]))

    summary = paths["summary"].read_text()
    assert "| liver | 0.850 (2) | 0.500 (2) |" in summary  # mean Dice per class and method
    assert "| spleen | 0.600 (2) | 0.250 (2) |" in summary
    assert "| **mean over classes** | 0.725 | 0.375 |" in summary
    assert "| spleen | 5.000 (2) | n/a |" in summary  # HD95 undefined in every registration case
    assert "| **mean over classes** | 3.000 | 9.000 |" in summary  # only classes every method has an HD95 for
    assert "speed-up vs registration" in summary  # the slowest method is the default baseline
    assert "| iris | 2 | 2.00 | 15.0x |" in summary and "| registration | 2 | 30.00 | 1.0x |" in summary
    # paired per case against the first method: c1 0.55 - 0.80, c2 0.20 - 0.65
    assert "Paired against iris" in summary and "| registration | 2 | -0.350 | -0.450 to -0.250 | 0 / 2 |" in summary

    assert paths["dice_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["dice_plot"].stat().st_size > 5000
    with pytest.raises(InputError, match="baseline"):
        summary_markdown(rows, baseline="atlas")


def test_paired_interval_separates_a_steady_gain_from_case_to_case_noise() -> None:
    rng = np.random.default_rng(1)
    rows = []
    for n, base in enumerate(rng.uniform(0.4, 0.9, size=30)):
        for method, value in [("one-shot", base), ("steady", base + 0.02), ("noisy", base + (0.05 if n % 2 else -0.05))]:
            rows += result_rows("Toy", f"c{n}", method, {1: ClassScore(value, 1.0)}, {1: "organ"}, 1.0)
    paired = [line for line in summary_markdown(rows).splitlines() if " to " in line]  # the paired table's rows
    lines = {line.split(" | ")[0]: line for line in paired}
    assert "| +0.020 | +0.020 to +0.020 | 30 / 0 |" in lines["| steady"]
    low, high = (float(x) for x in lines["| noisy"].split(" | ")[3].split(" to "))
    assert low < 0 < high  # a gain on half the cases and a loss on the other half is no gain


def _pair_rows(dataset: str, differences: list[float], methods: tuple[str, ...] = ("one-shot", "tune")) -> list[ResultRow]:
    """One class per case: one-shot scores 0.5, the other methods 0.5 + the case's difference."""
    rows = []
    for n, difference in enumerate(differences):
        for method in methods:
            value = 0.5 if method == "one-shot" else 0.5 + difference
            rows += result_rows(dataset, f"{dataset}_{n}", method, {1: ClassScore(value, 1.0)}, {1: "organ"}, 1.0)
    return rows


def test_pooling_weighs_cases_and_datasets_and_keeps_each_set_whole() -> None:
    # A large set gaining 0.1 on every case and a small one losing 0.1 on its single case.
    rows = _pair_rows("Large", [0.1] * 4, ("one-shot", "tune", "registration")) + _pair_rows("Small", [-0.1])
    pooled = pooled_markdown(rows)
    lines = {line.split(" | ")[0]: line for line in pooled.splitlines() if " to " in line}
    # over cases (0.4 - 0.1) / 5; over datasets (0.1 - 0.1) / 2; a resample redraws each set's own
    # cases, so with no spread inside a set both intervals are a point
    assert "| 2 | 5 | +0.060 | +0.060 to +0.060 | +0.000 | +0.000 to +0.000 | 4 / 1 |" in lines["| tune"]
    assert "| 1 | 4 |" in lines["| registration"]  # pooled over the set that has it
    assert "- Small: tune -0.100 (1)" in pooled
    with pytest.raises(InputError, match="'atlas' is not in the reports of Large, Small"):
        pooled_markdown(rows, first="atlas")


def test_pooled_interval_widens_with_a_small_noisy_set() -> None:
    steady = _pair_rows("Steady", [0.02] * 40)
    noisy = _pair_rows("Noisy", [0.06, -0.05, 0.05, -0.06])
    lines = [line for line in pooled_markdown(steady + noisy).splitlines() if line.startswith("| tune")]
    cells = lines[0].split(" | ")
    over_cases, over_sets = (tuple(float(x) for x in cells[i].split(" to ")) for i in (4, 6))
    assert over_cases[0] > 0  # 40 steady cases carry the case-weighted mean
    # the noisy set weighs 1/2 in the mean over datasets, 4/44 in the mean over cases
    assert over_sets[1] - over_sets[0] > 2 * (over_cases[1] - over_cases[0])


def test_report_csv_reads_back_and_a_foreign_csv_is_refused(tmp_path: Path) -> None:
    rows = _rows()
    paths = write_report(rows, tmp_path / "report")
    back = read_csv(paths["csv"])
    assert [r.dice for r in back] == [r.dice for r in rows] and back[0] == rows[0]
    assert math.isnan(back[-1].hd95_mm)
    foreign = tmp_path / "other.csv"
    foreign.write_text("case,dice\nc1,0.9\n")
    with pytest.raises(InputError, match="not an IrisSegment results CSV"):
        read_csv(foreign)
    for row in ("Toy,c1,iris,liver,high,1.0,2.0", "Toy,c1,iris,liver,0.9,1.0"):  # not a number; a column short
        broken = tmp_path / "broken.csv"
        broken.write_text(",".join(CSV_COLUMNS) + "\n" + row + "\n")
        with pytest.raises(InputError, match="7 columns with numbers"):
            read_csv(broken)
    with pytest.raises(InputError, match="not found"):
        read_csv(tmp_path / "absent.csv")


def test_overlay_writes_a_png_per_case(tmp_path: Path) -> None:
    shape = (20, 22, 18)
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    image = Volume(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[_cube(shape, (4, 4, 4), 6)] = 1
    truth[_cube(shape, (12, 12, 10), 5)] = 2
    prediction = np.roll(truth, 2, axis=0)
    path = tmp_path / "c1.png"
    plot_overlay(image, Volume(truth, affine), {"iris": Volume(prediction, affine), "registration": Volume(truth, affine)}, path, {1: "a", 2: "b"}, "c1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(InputError, match="voxel grid"):
        plot_overlay(image, Volume(truth, affine), {"iris": Volume(prediction, np.eye(4))}, tmp_path / "bad.png")



# ---------------------------------------------------------------- the whole evaluate command


@needs_paths(DATA / "Hippocampus_MRI")
def test_evaluate_scores_model_and_registration_on_the_same_held_out_cases(tmp_path: Path, capsys) -> None:
    from engine_fixtures import random_model

    from IrisSegmentLib.evaluation.evaluate import evaluate
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.training.data import load_split

    rows = evaluate(DATA / "Hippocampus_MRI", tmp_path / "report", IrisPredictor(random_model(0)),
                    ["one-shot", "ensemble", "tune"], references=2, cases=2, tune_steps=2, overlays=1, tuning_cases=2)
    heldout = load_split()["Hippocampus_MRI"][:2]
    methods = {"one-shot", "ensemble-2", "one-shot+tune", "registration"}
    assert {r.method for r in rows} == methods
    assert {r.case for r in rows} == set(heldout), "only held-out cases are scored"
    for method in methods:  # every method scores every class of every case
        assert sorted((r.case, r.class_name) for r in rows if r.method == method) == sorted(
            (case, name) for case in heldout for name in ("hippocampus_anterior", "hippocampus_posterior")
        )
    assert all(0.0 <= r.dice <= 1.0 and r.seconds > 0 for r in rows)
    with open(tmp_path / "report" / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "speed-up vs registration" in summary and "one-time seconds" in summary
    assert "Ensemble calibrated on the references: " in summary  # what calibration chose is on record
    references = re.search(r"references \[(.*?)\]", capsys.readouterr().out).group(1).replace("'", "").split(", ")
    tuned_on = re.findall(r"Tuned on (\S+);", summary)  # tuned separately on each corrected case: no reference, none held out
    assert len(references) == 2 and len(set(tuned_on)) == 2
    assert not set(tuned_on) & (set(load_split()["Hippocampus_MRI"]) | set(references))
    assert "mean over the 2 tunings" in summary and all(f"{case} 0." in summary for case in tuned_on)
    assert "Paired against one-shot" in summary
    assert (tmp_path / "report" / "dice_per_class.png").is_file()
    assert (tmp_path / "report" / f"overlay_{heldout[0]}.png").is_file()


@needs_paths(DATA / "Hippocampus_MRI")
def test_evaluate_with_one_reference_tunes_on_other_cases_and_refuses_none(tmp_path: Path, capsys) -> None:
    from engine_fixtures import random_model

    from IrisSegmentLib.evaluation.evaluate import evaluate
    from IrisSegmentLib.inference.predictor import IrisPredictor

    predictor = IrisPredictor(random_model(0))
    evaluate(DATA / "Hippocampus_MRI", tmp_path / "report", predictor, ["one-shot", "tune"], references=1, cases=1,
             baseline=False, tune_steps=1, overlays=0, tuning_cases=1)
    reference = re.search(r"references \['(.*?)'\]", capsys.readouterr().out).group(1)
    tuned_on = re.findall(r"Tuned on (\S+);", (tmp_path / "report" / "summary.md").read_text())
    assert len(tuned_on) == 1 and tuned_on[0] != reference
    with pytest.raises(InputError, match="at least one reference"):
        evaluate(DATA / "Hippocampus_MRI", tmp_path / "none", predictor, ["one-shot"], references=0)
    with pytest.raises(InputError, match="tuning-cases"):
        evaluate(DATA / "Hippocampus_MRI", tmp_path / "none", predictor, ["tune"], tuning_cases=0)
