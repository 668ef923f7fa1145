"""benchmarks/generalization.py's own rules on tiny synthetic volumes: which cases and pairs it
takes, how cell instances are merged, which classes the size rule counts, when registration bins a
thin slab, and the score that ranks checkpoints; and the label propagation of benchmarks/matching_prior.py."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from IrisSegmentLib.volume import Volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generalization as g  # noqa: E402


def test_cases_are_spread_evenly_and_do_not_depend_on_the_order_given() -> None:
    ids = [f"case_{i}" for i in range(9)]
    chosen = g.evenly_spaced(list(reversed(ids)), 6)
    assert chosen == ["case_0", "case_2", "case_3", "case_5", "case_6", "case_8"]
    assert g.evenly_spaced(ids, 6) == chosen
    assert g.evenly_spaced(ids, 20) == ids  # a small set: all of it
    assert g.evenly_spaced(ids, 1) == ["case_0"]
    for count in range(1, 9):  # never the same case twice
        assert len(set(g.evenly_spaced(ids, count))) == count


def test_pairs_run_in_a_cycle_and_a_single_case_has_none() -> None:
    assert g.cyclic_pairs(["a", "b", "c"]) == [("a", "b"), ("b", "c"), ("c", "a")]
    assert g.cyclic_pairs(["a", "b"]) == [("a", "b"), ("b", "a")]
    assert g.cyclic_pairs(["a"]) == []


def test_an_ensemble_takes_the_pairs_reference_and_the_cases_before_it_never_the_target() -> None:
    ids = ["a", "b", "c", "d", "e"]
    assert g.ensemble_references(ids, "c", "d", 3) == ["c", "b", "a"]
    assert g.ensemble_references(ids, "a", "b", 3) == ["a", "e", "d"]  # round the cycle
    assert g.ensemble_references(["a", "b", "c"], "c", "a", 3) == ["c", "b"]  # too short a cycle: fewer


def test_cell_instances_merge_into_one_named_class_on_the_same_grid() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.uint16)
    labels[0, 0, :3], labels[2, 2, 2], labels[5, 5, 5] = 1, 7, 300
    affine = np.diag([0.3, 0.1, 0.1, 1.0])
    cells = g.merged(Volume(labels, affine, name="ovule", segments={1: {"name": "cell_1"}, 7: {"name": "cell_7"}}))
    assert cells.array.dtype == np.uint8
    assert np.array_equal(cells.array, (labels > 0).astype(np.uint8))
    assert cells.segments == {1: {"name": "cells"}}
    assert np.array_equal(cells.affine, affine) and cells.name == "ovule"


def test_the_size_rule_counts_classes_from_one_cubic_centimetre_or_from_1000_voxels() -> None:
    # 2 mm voxels are 8 mm^3: 125 voxels make 1 cm^3 exactly, 124 do not.
    assert g.counts_by_size(125, (2.0, 2.0, 2.0), voxel_rule=False)
    assert not g.counts_by_size(124, (2.0, 2.0, 2.0), voxel_rule=False)
    # Micrometres written as mm: 1000 voxels count whatever the (tiny) nominal volume.
    assert g.counts_by_size(1000, (0.284, 0.127, 0.127), voxel_rule=True)
    assert not g.counts_by_size(999, (0.284, 0.127, 0.127), voxel_rule=True)
    assert not g.counts_by_size(1000, (0.284, 0.127, 0.127), voxel_rule=False)


def test_class_records_score_each_class_and_the_means_follow_the_size_rule_and_unseen_classes() -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    truth = np.zeros((20, 20, 20), dtype=np.uint8)
    truth[:5, :5, :5] = 1  # 125 voxels: 1 cm^3, counted
    truth[10:12, 10:12, 10:12] = 2  # 8 voxels: too small
    prediction = np.zeros_like(truth)
    prediction[:5, :5, :5] = 1  # class 1 perfect, class 2 missed
    records = g.class_records(Volume(prediction, affine), Volume(truth, affine), {1: "liver", 2: "Gallbladder"}, [1, 2], {"gallbladder"}, False)
    by_name = {r["name"]: r for r in records}
    assert by_name["liver"]["dice"] == pytest.approx(1.0) and by_name["liver"]["counted"] and not by_name["liver"]["unseen_class"]
    assert by_name["Gallbladder"]["dice"] == 0.0 and not by_name["Gallbladder"]["counted"] and by_name["Gallbladder"]["unseen_class"]
    assert by_name["Gallbladder"]["predicted_voxels"] == 0 and by_name["liver"]["cm3"] == pytest.approx(1.0)
    assert g.case_mean(records) == pytest.approx(0.5)
    assert g.case_mean(records, "counted") == pytest.approx(1.0)
    assert g.case_mean(records, "unseen") == 0.0
    assert g.case_mean([r for r in records if r["name"] == "liver"], "unseen") is None


def test_registration_bins_thin_slabs_only() -> None:
    affine = np.diag([1.125, 1.125, 3.3, 1.0])
    assert g._bin_factor(Volume(np.zeros((320, 320, 22), dtype=np.int16), affine)) == 3  # 107 x 107 x 22 <= 64^3
    assert g._bin_factor(Volume(np.zeros((128, 128, 128), dtype=np.int16), affine)) == 1  # its pyramid gets there
    assert g._bin_factor(Volume(np.zeros((64, 64, 60), dtype=np.int16), affine)) == 1


def test_the_score_averages_unseen_rows_only_and_skips_what_a_row_lacks() -> None:
    def row(kind: str, **summary) -> dict:
        base = {"self_counted": None, "one_shot": None, "self_unseen_classes": None}
        return {"kind": kind, "summary": {**base, **summary}}

    table = {"rows": [
        row(g.UNSEEN_SET, self_counted=0.8, one_shot=0.4),
        row(g.UNSEEN_SET, self_counted=0.6),  # one case: no one-shot
        row(g.UNSEEN_CLASSES, self_counted=0.9, self_unseen_classes=0.2),
        row(g.IN_DISTRIBUTION, self_counted=1.0, one_shot=1.0),
    ]}
    assert g.generalization_score(table) == pytest.approx(np.mean([0.8, 0.4, 0.6, 0.2]))


# ---------------------------------------------------------------- campaign.py: which checkpoint ships
def _scored(step: int, score: float, in_distribution: dict[str, float], strategy: str = "one-shot") -> dict:
    """A generalization table as generalization.py writes it, reduced to what campaign.py reads."""
    rows = [{"set": "Prostate_MR", "kind": g.UNSEEN_SET, "summary": {"self_counted": score, "one_shot": score / 2}},
            {"set": "TotalSeg_CT_example", "kind": g.UNSEEN_CLASSES, "summary": {"self_unseen_classes": None}}]
    rows += [{"set": name, "kind": g.IN_DISTRIBUTION, "summary": {"one_shot": dice}} for name, dice in in_distribution.items()]
    return {"model": f"model abc, step {step} (x.safetensors)", "strategy": strategy, "score": score, "rows": rows}


def test_a_checkpoint_ships_only_above_the_baseline_everywhere_that_counts(tmp_path):
    import json

    import campaign

    shipped = {"HeadNeck_CT": 0.670, "Hippocampus_MRI": 0.825, "Abdomen_MRI": 0.859}
    tables = {
        "shipped": _scored(9000, 0.075, shipped),
        "better": _scored(4000, 0.160, {**shipped, "HeadNeck_CT": 0.676}),
        "forgets": _scored(3000, 0.159, {**shipped, "Abdomen_MRI": 0.850}),
        "no_gain": _scored(2000, 0.075, shipped),
        "fitted": _scored(1000, 0.300, shipped, strategy="fit-where-poor"),
    }
    for tag, table in tables.items():
        (tmp_path / f"generalization_{tag}.json").write_text(json.dumps(table))
    result = campaign.campaign_table("shipped", ["better", "forgets", "no_gain"], tmp_path)
    verdicts = {row["tag"]: row["verdict"] for row in result["rows"]}
    assert verdicts["better"] == "ships"
    assert verdicts["forgets"] == "Abdomen_MRI 0.850 < 0.859"
    assert verdicts["no_gain"] == "score not above the baseline's"
    assert [row["step"] for row in result["rows"]] == [9000, 4000, 3000, 2000]
    with pytest.raises(SystemExit, match="do not compare"):
        campaign.campaign_table("shipped", ["fitted"], tmp_path)
    campaign.main(["--baseline", "shipped", "--tags", "better", "forgets", "--name", "test", "--results", str(tmp_path)])
    text = (tmp_path / "campaign_test.md").read_text()
    [header] = [line for line in text.splitlines() if line.startswith("| tag |")]
    assert "| better | 4000 | 0.160 |" in text and "Prostate_MR one-shot" in header
    assert "TotalSeg_CT_example unseen classes" not in header  # a column with no value in any row is left out
    assert (tmp_path / "campaign_test.png").stat().st_size > 0
