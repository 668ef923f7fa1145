"""Generalization: does the model follow its reference for structures it was never trained on?

A model that has memorised its ~15 training structures scores well on them whatever reference it is
shown, and ignores the reference for anything else. This benchmark separates the two, so that the
checkpoint that ships is chosen on what in-context segmentation promises. One row per set:

- unseen sets (Resources/splits.json "unseen_sets": sets never trained on):
  - self-segmentation: the reference is the target itself (the same case's image and labels), one-shot,
    on up to --cases cases spread evenly over the sorted case ids (all cases of smaller sets). This is
    the easiest in-context task there is: a model that cannot do it ignores its reference;
  - one-shot onto other cases of the set: the chosen --pairs cases (spread the same way) in a cycle,
    case i the reference of case i+1 and the last of the first;
  - registration (evaluation/registration.py, the project's baseline) on exactly these pairs;
  - a set of one case (Spleen_CT) has self-segmentation only ("n/a" for the rest).
  Registration of thin slabs (the 320 x 320 x ~22 fetal stacks) runs on both scans binned in-plane to
  64^3 voxels, the size registration.py's deformable stage is meant to run at (see `register`): as
  is, it would run at full resolution there, about 200 s a pair on one thread (--no-binning does).
  Cells_Confocal's label values are cell instances within a case that do not correspond across cases.
  Its self-segmentation makes every cell its own class, all in one call (a many-class test); for the
  cross-case pairs and registration all cells of a case are merged into one binary class "cells".
- unseen classes (TotalSeg_CT_example, TotalSeg_MR_example, trained on, but some of whose classes,
  splits.json "unseen_classes", are trained on in no set): self-segmentation with all classes in one
  call; the mean over the unseen classes present is reported besides the other means.
- in-distribution (HeadNeck_CT, Hippocampus_MRI, Abdomen_MRI): the reference that `iris-segment
  evaluate` picks (evaluation/evaluate.py pick_references: the training case with the most classes)
  segments the first --cases held-out cases one-shot; registration on the same pairs; and the
  reference's own self-segmentation.

Dice per case is the mean over the classes the case's truth holds (a class absent from the truth is not
scored), then averaged over cases. The success criterion of the issue counts classes of at least 1 cm^3;
Cells_Confocal's spacing is micrometres written as millimetres, so there a class counts from 1000 voxels.
The mean over all classes is reported too. Seconds per case: the model's encoding plus segmentation
(registration: its whole job), on --threads CPU threads, as measured whatever else runs on the machine.

The score that ranks checkpoints (`generalization_score`) is the mean over the unseen rows of
self-segmentation (>= 1 cm^3 classes) and one-shot Dice for unseen sets, and of the self-segmentation
Dice of the unseen classes for the unseen-class sets.

    python benchmarks/generalization.py [--weights FILE] [--sets Prostate_MR Spleen_CT] [--cases 6] [--pairs 6]
                                        [--threads 1] [--no-registration] [--tag NAME]

From another script (checkpoint selection): put benchmarks/ on sys.path, then
`from generalization import generalization_table, generalization_score`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"
SPLITS = ROOT / "Resources" / "splits.json"

UNSEEN_SET, UNSEEN_CLASSES, IN_DISTRIBUTION = "unseen set", "unseen classes", "in-distribution"
UNSEEN_CLASS_SETS = ["TotalSeg_CT_example", "TotalSeg_MR_example"]
IN_DISTRIBUTION_SETS = ["HeadNeck_CT", "Hippocampus_MRI", "Abdomen_MRI"]
INSTANCE_SETS = {"Cells_Confocal"}  # label values are instances within a case: merged into one class across cases
MERGED_NAME = "cells"
VOXEL_RULE_SETS = {"Cells_Confocal"}  # spacing in micrometres written as mm: a class counts from MIN_VOXELS
MIN_CM3 = 1.0
MIN_VOXELS = 1000
STRATEGIES = ("one-shot", "reference-fit", "fit-where-poor")


# ---------------------------------------------------------------- choices


def unseen_lists(splits: Path = SPLITS) -> tuple[list[str], list[str]]:
    """splits.json's "unseen_sets" and "unseen_classes"."""
    meta = json.loads(splits.read_text())
    missing = [key for key in ("unseen_sets", "unseen_classes") if key not in meta]
    if missing:
        raise SystemExit(f"{splits}: no {' or '.join(missing)} key; the generalization benchmark reads its sets from there")
    return list(meta["unseen_sets"]), list(meta["unseen_classes"])


def all_sets(splits: Path = SPLITS) -> dict[str, str]:
    """Every set of the benchmark -> its kind, in table order."""
    unseen, _ = unseen_lists(splits)
    return {**{s: UNSEEN_SET for s in unseen}, **{s: UNSEEN_CLASSES for s in UNSEEN_CLASS_SETS},
            **{s: IN_DISTRIBUTION for s in IN_DISTRIBUTION_SETS}}


def evenly_spaced(ids: list[str], count: int) -> list[str]:
    """`count` of the sorted ids, spread evenly from the first to the last (all of them when there are
    no more than `count`)."""
    ids = sorted(ids)
    if count >= len(ids):
        return ids
    if count <= 0:
        return []
    return [ids[i] for i in np.floor(np.linspace(0, len(ids) - 1, count) + 0.5).astype(int)]


def cyclic_pairs(ids: list[str]) -> list[tuple[str, str]]:
    """(reference, target) pairs: each case the reference of the next, the last of the first."""
    return [(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))] if len(ids) >= 2 else []


def ensemble_references(ids: list[str], reference: str, target: str, size: int) -> list[str]:
    """The references of the ensemble that segments `target` in place of the one-shot pair's `reference`:
    that reference and the cases before it in the cycle of `ids`, `size` in all, never the target
    (fewer when the cycle is too short)."""
    start = ids.index(reference)
    chosen = [ids[(start - n) % len(ids)] for n in range(len(ids))]
    return [case for case in chosen if case != target][:size]


# ---------------------------------------------------------------- label maps and class sizes


def merged(labels, name: str = MERGED_NAME):
    """A label map whose every labelled voxel is one class (value 1) called `name`."""
    from IrisSegmentLib.volume import Volume

    return Volume((np.asarray(labels.array) > 0).astype(np.uint8), labels.affine.copy(), name=labels.name, segments={1: {"name": name}})


def counts_by_size(voxels: int, spacing, voxel_rule: bool) -> bool:
    """The class-size rule: at least MIN_CM3 cm^3, or MIN_VOXELS voxels where spacing is not in mm."""
    return voxels >= MIN_VOXELS if voxel_rule else voxels * float(np.prod(spacing)) / 1000.0 >= MIN_CM3


def class_records(prediction, truth, names: dict[int, str], values: list[int], unseen: set[str], voxel_rule: bool) -> list[dict]:
    """Per scored class: Dice, HD95, its size in the truth, whether the size rule counts it, the voxels
    predicted, and whether it is an unseen class."""
    from IrisSegmentLib.evaluation.metrics import score_labels

    scores = score_labels(prediction, truth, values)
    true, pred = np.asarray(truth.array), np.asarray(prediction.array)
    voxel_mm3 = float(np.prod(truth.spacing))
    records = []
    for value, score in scores.items():
        voxels = int(np.count_nonzero(true == value))
        name = names.get(value, f"label_{value}")
        records.append({
            "value": value, "name": name, "dice": score.dice, "voxels": voxels,
            "hd95_mm": None if np.isnan(score.hd95_mm) else score.hd95_mm,  # undefined with an empty mask; JSON has no NaN
            "cm3": voxels * voxel_mm3 / 1000.0, "counted": counts_by_size(voxels, truth.spacing, voxel_rule),
            "predicted_voxels": int(np.count_nonzero(pred == value)), "unseen_class": name.lower() in unseen,
        })
    return records


def case_mean(records: list[dict], which: str = "all") -> float | None:
    """Mean Dice over a case's classes: all, those the size rule counts, or the unseen classes; None if none."""
    keep = [r["dice"] for r in records if which == "all" or (which == "counted" and r["counted"]) or (which == "unseen" and r["unseen_class"])]
    return float(np.mean(keep)) if keep else None


def mean_of(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------- segmenting


def segment_pair(predictor, strategy: str, reference, target, matching: bool = True):
    """The strategy's segmentation of `target` from one labelled `reference` (image, labels): every
    reference class the engine can encode in one call (specks below its least class size are left out
    and score as missed). one-shot: the reference's embeddings as encoded; reference-fit: every class
    fitted to the reference first (IrisPredictor.fit_to_reference); fit-where-poor: only the classes the
    reference's own segmentation gets below FIT_BELOW Dice (fit_to_reference's default). With `matching`
    the task keeps the reference's matching memory as encode_reference does by default; without, the
    network alone segments."""
    task = predictor.encode_reference(*reference, skip_small=True, matching=matching)
    if strategy == "one-shot":
        return predictor.segment(target, task)
    if strategy == "reference-fit":
        return predictor.segment(target, predictor.fit_to_reference(task, *reference, below=None))
    if strategy == "fit-where-poor":
        return predictor.segment(target, predictor.fit_to_reference(task, *reference))
    raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def segment_with_ensemble(predictor, references: list, target, matching: bool = True):
    """The calibrated context ensemble (IrisPredictor.calibrated_ensemble) of the references, each encoded
    as one-shot encodes it, segmenting `target`."""
    tasks = [predictor.encode_reference(*reference, skip_small=True, matching=matching) for reference in references]
    return predictor.segment(target, predictor.calibrated_ensemble(tasks, references))


def _empty_like(target):
    from IrisSegmentLib.volume import Volume

    return Volume(np.zeros(target.shape, dtype=np.uint8), target.affine.copy(), name="failed")


def _run(job: Callable, target, failures: list[str], what: str):
    """(prediction, seconds) of a job; a job the engine refuses (InputError) scores as an empty
    prediction, and the reason is kept in `failures`."""
    from IrisSegmentLib.errors import InputError

    start = time.perf_counter()
    try:
        result = job()
    except InputError as exc:
        failures.append(f"{what}: {exc}")
        return _empty_like(target), time.perf_counter() - start
    if isinstance(result, tuple):  # register_and_warp returns (labels, its own seconds)
        return result
    return result, time.perf_counter() - start


def _bin_factor(volume) -> int:
    """1 when registration.py's pyramid brings `volume` to at most its deformable limit (64^3 voxels),
    else the smallest integer by which binning its axes longer than 64 voxels does (thin slabs)."""
    from IrisSegmentLib.evaluation.registration import _DEFORMABLE_MAX_VOXELS, _shrink_factors, volume_to_sitk

    if np.prod(volume.shape) / _shrink_factors(volume_to_sitk(volume))[0] ** 3 <= _DEFORMABLE_MAX_VOXELS:
        return 1
    factor = 2
    while np.prod([s // factor if s > 64 else s for s in volume.shape]) > _DEFORMABLE_MAX_VOXELS:
        factor += 1
    return factor


def _binned(volume, factor: int, labels=None):
    """`volume` binned (mean) by `factor` along its axes longer than 64 voxels; with `labels` (on
    `volume`'s grid), those labels taken by nearest neighbour onto the binned grid instead."""
    import SimpleITK as sitk

    from IrisSegmentLib.evaluation.registration import sitk_to_volume, volume_to_sitk

    image = sitk.BinShrink(sitk.Cast(volume_to_sitk(volume), sitk.sitkFloat32), [factor if s > 64 else 1 for s in volume.shape])
    if labels is None:
        return sitk_to_volume(image, name=volume.name)
    source = volume_to_sitk(labels)
    return sitk_to_volume(sitk.Resample(source, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, source.GetPixelID()),
                          name=labels.name, segments=labels.segments)


def register(reference, target, settings, binned: list[str] | None = None, allow_binning: bool = True):
    """The registration baseline (register_and_warp) from `reference` (image, labels) onto `target`:
    (labels on the target's grid, seconds).

    register_and_warp runs its deformable stage only on pyramid levels of at most 64^3 voxels, but its
    pyramid stops when the smallest axis would go below 16 voxels: on a thin slab (a 320 x 320 x 22 fetal
    stack) that leaves the full resolution, about 200 s a pair on one thread. There both scans are
    binned along their long axes by the smallest integer that brings them to 64^3 voxels (3 for the fetal
    stacks: 3.4 x 3.4 x 3.3 mm), registered as usual, and the warped labels are taken back onto the
    target's grid by nearest neighbour. `binned` collects a note for each such pair. Binning changes
    the baseline's result as well as its time (fetal_run1 -> fetal_run3: 0.25 Dice in 208 s at full
    resolution, 0.89 in 17 s binned), so in-distribution sets, whose registration numbers are in the
    model card, are registered as is (`allow_binning` False)."""
    import SimpleITK as sitk

    from IrisSegmentLib.evaluation.registration import register_and_warp, sitk_to_volume, volume_to_sitk

    (image, labels), ref_factor, target_factor = reference, _bin_factor(reference[0]), _bin_factor(target)
    if not allow_binning or ref_factor == target_factor == 1:
        return register_and_warp(image, labels, target, settings)
    start = time.perf_counter()
    coarse_target = _binned(target, target_factor) if target_factor > 1 else target
    coarse_reference = (_binned(image, ref_factor), _binned(image, ref_factor, labels)) if ref_factor > 1 else (image, labels)
    warped, _ = register_and_warp(*coarse_reference, coarse_target, settings)
    if target_factor > 1:
        source, grid = volume_to_sitk(warped), volume_to_sitk(target)
        warped = sitk_to_volume(sitk.Resample(source, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, source.GetPixelID()),
                                name=warped.name, segments=warped.segments)
        warped.affine = target.affine.copy()
    if binned is not None:
        binned.append(f"reference binned by {ref_factor}, target by {target_factor}")
    return warped, time.perf_counter() - start


# ---------------------------------------------------------------- one set


def evaluate_set(predictor, dataset_folder: Path, kind: str, unseen: set[str], cases: int, pairs: int, registration: bool,
                 strategy: str, threads: int, log: Callable[[str], None] = print, binning: bool = True, matching: bool = True,
                 ensemble: int = 0) -> dict:
    """Self-segmentation, one-shot and registration records of one set (see the module docstring)."""
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.evaluation.evaluate import classes_to_score, heldout_and_training, pick_references
    from IrisSegmentLib.evaluation.registration import RegistrationSettings

    dataset = load_dataset(dataset_folder)
    name = dataset_folder.name
    instances, voxel_rule = name in INSTANCE_SETS, name in VOXEL_RULE_SETS
    settings = RegistrationSettings(threads=threads)
    loaded: dict[str, tuple] = {}

    def case(case_id: str, merge: bool = False):
        if case_id not in loaded:
            loaded[case_id] = read_case(dataset.case(case_id))
        image, labels = loaded[case_id]
        return (image, merged(labels)) if merge else (image, labels)

    names = {1: MERGED_NAME} if instances else dataset.label_names
    if kind == IN_DISTRIBUTION:
        heldout, training = heldout_and_training(dataset)
        reference_id = pick_references(dataset, training, 1)[0]
        self_ids, pair_ids = [reference_id], [(reference_id, t) for t in heldout[:cases]]
        picked = [reference_id] + [r for r in pick_references(dataset, training, ensemble) if r != reference_id] if ensemble > 1 else []
        ensemble_of = {target: picked[:ensemble] for _, target in pair_ids}
    else:
        self_ids = evenly_spaced(dataset.case_ids, cases)
        cycle = evenly_spaced(dataset.case_ids, pairs)
        pair_ids = cyclic_pairs(cycle)
        ensemble_of = {target: ensemble_references(cycle, reference, target, ensemble) for reference, target in pair_ids}
    row: dict = {"set": name, "kind": kind, "self": [], "one_shot": [], "registration": [], "ensemble": [], "failures": [],
                 "size_rule": f">= {MIN_VOXELS} voxels" if voxel_rule else f">= {MIN_CM3:g} cm^3",
                 "merged_across_cases": instances}

    for case_id in self_ids:
        image, labels = case(case_id)
        prediction, seconds = _run(lambda: segment_pair(predictor, strategy, (image, labels), image, matching), image, row["failures"], f"self {case_id}")
        records = class_records(prediction, labels, dataset.label_names, classes_to_score(labels, sorted(dataset.label_names)),
                                unseen, voxel_rule)
        row["self"].append({"case": case_id, "seconds": seconds, "classes": records})
        log(f"  {name} self {case_id}: Dice {case_mean(records):.3f} over {len(records)} classes "
            f"({_fmt(case_mean(records, 'counted'))} over {sum(r['counted'] for r in records)} counted), {seconds:.1f} s")

    for reference_id, target_id in pair_ids:
        reference = case(reference_id, merge=instances)
        target_image, truth = case(target_id, merge=instances)
        values = classes_to_score(truth, sorted(names))
        jobs = [("one_shot", lambda: segment_pair(predictor, strategy, reference, target_image, matching))]
        if registration:
            jobs.append(("registration", lambda: register(reference, target_image, settings, binned, binning and kind != IN_DISTRIBUTION)))
        if ensemble > 1 and len(ensemble_of[target_id]) == ensemble:
            members = [case(r, merge=instances) for r in ensemble_of[target_id]]
            jobs.append(("ensemble", lambda: segment_with_ensemble(predictor, members, target_image, matching)))
        line, binned = [], []
        for method, job in jobs:
            prediction, seconds = _run(job, target_image, row["failures"], f"{method} {reference_id} -> {target_id}")
            records = class_records(prediction, truth, names, values, unseen, voxel_rule)
            row[method].append({"reference": ensemble_of[target_id] if method == "ensemble" else reference_id, "target": target_id,
                                "seconds": seconds, "classes": records})
            if method == "registration" and binned:
                row[method][-1]["binned"] = binned[-1]
            line.append(f"{method.replace('_', '-')} {case_mean(records):.3f} ({seconds:.1f} s)")
        log(f"  {name} {reference_id} -> {target_id}: " + ", ".join(line))
    for failure in row["failures"]:
        log(f"  {name} failed: {failure}")
    row["summary"] = summarize(row, registration)
    return row


def summarize(row: dict, registration: bool = True) -> dict:
    """The table's numbers for one set's records."""
    model_jobs = row["self"] + row["one_shot"]
    self_empty = sorted({f"{r['name']} ({c['case']})" for c in row["self"] for r in c["classes"] if r["predicted_voxels"] == 0})
    return {
        "self_counted": mean_of([case_mean(c["classes"], "counted") for c in row["self"]]),
        "self_all": mean_of([case_mean(c["classes"]) for c in row["self"]]),
        "self_unseen_classes": mean_of([case_mean(c["classes"], "unseen") for c in row["self"]]),
        "unseen_classes_present": sorted({r["name"] for c in row["self"] for r in c["classes"] if r["unseen_class"]}),
        "one_shot": mean_of([case_mean(p["classes"]) for p in row["one_shot"]]),
        "registration": mean_of([case_mean(p["classes"]) for p in row["registration"]]) if registration else None,
        "registration_run": registration,
        "ensemble": mean_of([case_mean(p["classes"]) for p in row.get("ensemble", [])]),
        "one_shot_where_ensembled": mean_of([case_mean(p["classes"]) for p in row["one_shot"]
                                             if any(e["target"] == p["target"] for e in row.get("ensemble", []))]),
        "self_cases": len(row["self"]),
        "self_classes": sum(len(c["classes"]) for c in row["self"]),
        "self_classes_counted": sum(r["counted"] for c in row["self"] for r in c["classes"]),
        "pairs": len(row["one_shot"]),
        "model_seconds_per_case": mean_of([j["seconds"] for j in model_jobs]),
        "registration_seconds_per_case": mean_of([j["seconds"] for j in row["registration"]]),
        "self_empty_classes": self_empty,
        "model_refused": sum(not f.startswith("registration") for f in row["failures"]),
        "model_jobs": len(model_jobs),
        "registration_failed": sum(f.startswith("registration") for f in row["failures"]),
    }


# ---------------------------------------------------------------- the whole table


def generalization_score(table: dict) -> float | None:
    """One number to rank checkpoints by: the mean over the unseen rows of self-segmentation (classes
    the size rule counts) and one-shot Dice for unseen sets, and of the unseen classes' self-segmentation
    Dice for the unseen-class sets (values a row does not have are left out)."""
    parts = []
    for row in table["rows"]:
        s = row["summary"]
        if row["kind"] == UNSEEN_SET:
            parts += [s["self_counted"], s["one_shot"]]
        elif row["kind"] == UNSEEN_CLASSES:
            parts.append(s["self_unseen_classes"])
    return mean_of(parts)


def generalization_table(weights: str | Path | None = None, sets: list[str] | None = None, data: Path = DATA, cases: int = 6,
                         pairs: int = 6, threads: int = 1, registration: bool = True, strategy: str = "one-shot",
                         log: Callable[[str], None] = print, binning: bool = True, matching: bool = True, ensemble: int = 0) -> dict:
    """Every row of the benchmark for one weights file (None: the bundled model), with per-case and
    per-class records, and its score (`generalization_score`)."""
    import torch

    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import load_model

    if strategy not in STRATEGIES:
        raise SystemExit(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    kinds = all_sets()
    sets = list(kinds) if not sets else sets
    unknown = [s for s in sets if s not in kinds]
    if unknown:
        raise SystemExit(f"unknown set(s) {unknown}; the benchmark's sets are {list(kinds)}")
    missing = [s for s in sets if not (Path(data) / s).is_dir()]
    if missing:
        raise SystemExit(f"set folder(s) {missing} not found under {data}")
    _, unseen_classes = unseen_lists()
    torch.set_num_threads(threads)
    model = load_model(weights, "cpu")
    predictor = IrisPredictor(model)
    note = f"model {model.model_id}, step {model.provenance.get('steps', '?')} ({model.weights_path})"
    log(f"{note}; strategy {strategy}{'' if matching else ', network alone'}; {threads} thread(s)")
    start = time.perf_counter()
    rows = []
    for name in [s for s in kinds if s in sets]:  # table order
        set_start = time.perf_counter()
        rows.append(evaluate_set(predictor, Path(data) / name, kinds[name], {c.lower() for c in unseen_classes}, cases, pairs,
                                 registration, strategy, threads, log, binning, matching, ensemble))
        rows[-1]["wall_seconds"] = time.perf_counter() - set_start
    table = {"model": note, "model_id": model.model_id, "weights": str(model.weights_path), "strategy": strategy, "matching": matching, "ensemble": ensemble,
             "cases": cases, "pairs": pairs, "threads": threads, "registration": registration, "binning": binning, "unseen_classes": unseen_classes,
             "rows": rows, "wall_seconds": time.perf_counter() - start}
    table["score"] = generalization_score(table)
    return table


# ---------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(table: dict) -> str:
    header = ["set", "kind", "self-seg Dice (≥1 cm³ classes)", "self-seg Dice (all classes)", "one-shot Dice", "registration Dice",
              "self cases", "pairs", "s/case model / registration"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table["rows"]:
        s = row["summary"]
        rule = " ¹" if row["size_rule"].endswith("voxels") else ""
        merged_note = " ²" if row["merged_across_cases"] else ""
        registration = _fmt(s["registration"]) if s["registration_run"] or not s["pairs"] else "not run"
        registration += " ⁴" if any("binned" in p for p in row["registration"]) else ""
        seconds = f"{_fmt(s['model_seconds_per_case'], 2)} / {_fmt(s['registration_seconds_per_case'], 2)}"
        refused = [f"model refused {s['model_refused']} of {s['model_jobs']}"] if s["model_refused"] else []
        refused += [f"registration failed {s['registration_failed']} of {s['pairs']}"] if s["registration_failed"] else []
        label = row["set"] + (f" ({'; '.join(refused)}) ³" if refused else "")
        lines.append(f"| {label} | {row['kind']} | {_fmt(s['self_counted'])}{rule} | {_fmt(s['self_all'])} | "
                     f"{_fmt(s['one_shot'])}{merged_note} | {registration}{merged_note if s['pairs'] else ''} | {s['self_cases']} | {s['pairs']} | {seconds} |")
    unseen_rows = [row for row in table["rows"] if row["kind"] == UNSEEN_CLASSES]
    if unseen_rows:
        lines += ["", "Unseen classes inside trained sets (self-segmentation, all of the set's classes in one call):", "",
                  "| set | all classes | ≥1 cm³ classes | unseen classes present | Dice per unseen class |", "|---|---:|---:|---:|---|"]
        for row in unseen_rows:
            s = row["summary"]
            per_class = ", ".join(f"{r['name']} {r['dice']:.3f} ({r['cm3']:.1f} cm³)" for c in row["self"] for r in c["classes"] if r["unseen_class"])
            lines.append(f"| {row['set']} | {_fmt(s['self_all'])} ({s['self_classes']}) | {_fmt(s['self_counted'])} ({s['self_classes_counted']}) | "
                         f"{_fmt(s['self_unseen_classes'])} ({len(s['unseen_classes_present'])}) | {per_class or 'none present'} |")
    if table.get("ensemble", 0) > 1:
        lines += ["", f"Context ensembles of {table['ensemble']} references (calibrated), on the one-shot targets that had enough references:", "",
                  "| set | targets | one-shot Dice | ensemble Dice |", "|---|---:|---:|---:|"]
        for row in table["rows"]:
            s = row["summary"]
            if row["ensemble"]:
                lines.append(f"| {row['set']} | {len(row['ensemble'])} | {_fmt(s['one_shot_where_ensembled'])} | {_fmt(s['ensemble'])} |")
    lines += ["", f"Score (mean over the unseen rows of self-seg ≥1 cm³ and one-shot, and of the unseen classes' self-seg): "
              f"**{_fmt(table['score'])}**."]
    lines += ["", "¹ Cells_Confocal's spacing is micrometres written as millimetres: its classes count from "
              f"{MIN_VOXELS} voxels, not 1 cm³. Self-segmentation there makes every cell of a case its own class (all in one call).",
              f"² Cells are instances within a case, not the same across cases: for the cross-case pairs all cells are merged into one class \"{MERGED_NAME}\".",
              "³ A case the engine refuses (InputError), or a registration that fails, is scored as an empty prediction (Dice 0); "
              "the reasons are listed below.",
              "⁴ Thin slabs: registration ran on both scans binned along their long axes to 64³ voxels (benchmarks/generalization.py "
              "`register`); as is, registration.py runs its deformable stage at full resolution there (about 200 s a pair on one thread). "
              "In-distribution sets (Abdomen_MRI is thin too) are registered as is, as in the model card.",
              "n/a: a set of one case has no cross-case pair (self-segmentation only). Dice per case is the mean over the classes its truth "
              "holds, then averaged over cases. Self-seg of an in-distribution set is that of its one-shot reference. "
              "Seconds: model = encode + segment per case; on a shared machine, compare them only within one run."]
    details = []
    for row in table["rows"]:
        s = row["summary"]
        pairs = ", ".join(f"{p['reference']}→{p['target']}" for p in row["one_shot"])
        details.append(f"- {row['set']}: self on {', '.join(c['case'] for c in row['self'])}"
                       f" ({s['self_classes']} classes, {s['self_classes_counted']} counted)" + (f"; pairs {pairs}" if pairs else ""))
        if s["self_empty_classes"]:
            details.append(f"  - classes predicted empty in self-segmentation ({len(s['self_empty_classes'])}): {', '.join(s['self_empty_classes'])}")
        for failure in row["failures"]:
            details.append(f"  - failed (scored as an empty prediction): {failure}")
    return "\n".join(lines + ["", "Cases and pairs:", ""] + details)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.0 + 1.1 * len(rows)), 4.8))
    x = np.arange(len(rows))
    bars = [("self_counted", "self-seg (≥1 cm³ classes)", "tab:blue"), ("one_shot", "one-shot onto other cases", "tab:orange"),
            ("registration", "registration, same pairs", "tab:gray")]
    width = 0.26
    for n, (key, label, color) in enumerate(bars):
        offset = (n - 1) * width
        values = [row["summary"][key] for row in rows]
        ax.bar(x[[v is not None for v in values]] + offset, [v for v in values if v is not None], width, label=label, color=color)
        for xi, v in zip(x, values):
            if v is None:
                ax.text(xi + offset, 0.01, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color=color)
    for xi, row in zip(x, rows):
        if row["summary"]["model_refused"]:
            top = max([row["summary"][key] or 0.0 for key, _, _ in bars])
            ax.text(xi, max(top + 0.03, 0.1), f"model refused\n{row['summary']['model_refused']} of {row['summary']['model_jobs']}", ha="center",
                    va="bottom", fontsize=6, color="tab:red")
    unseen = [(xi, row["summary"]["self_unseen_classes"]) for xi, row in zip(x, rows) if row["summary"]["self_unseen_classes"] is not None]
    if unseen:
        ax.plot([u[0] - width for u in unseen], [u[1] for u in unseen], "kD", markersize=5, label="self-seg, unseen classes only")
    kinds = [row["kind"] for row in rows]
    for xi in range(1, len(rows)):
        if kinds[xi] != kinds[xi - 1]:
            ax.axvline(xi - 0.5, color="black", linewidth=0.8, linestyle="--")
    for kind in dict.fromkeys(kinds):
        where = [xi for xi, k in zip(x, kinds) if k == kind]
        ax.text(float(np.mean(where)), 1.04, kind, ha="center", va="bottom", fontsize=8, style="italic")
    ax.set_xticks(x, [row["set"] for row in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("mean Dice")
    ax.set_title(f"Generalization ({table['strategy']}{'' if table.get('matching', True) else ', network alone'}): {Path(table['weights']).name}, score {_fmt(table['score'])}", fontsize=9, pad=18)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def default_tag(weights: Path | None) -> str:
    """"shipped" for the bundled model, else the weights file's name without its suffix."""
    from IrisSegmentLib.model.weights import default_weights_path

    if weights is None or Path(weights).resolve() == default_weights_path().resolve():
        return "shipped"
    return Path(weights).name.split(".")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights file (default: the bundled model)")
    p.add_argument("--data", type=Path, default=DATA, help="folder of the nnU-Net-layout sets (default ../shared/data)")
    p.add_argument("--sets", nargs="+", default=None, help="a subset of the sets (default: all, in table order)")
    p.add_argument("--cases", type=int, default=6, help="self-segmented cases per unseen set; held-out targets per in-distribution set")
    p.add_argument("--pairs", type=int, default=6, help="cross-case pairs per unseen set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None, help="output name generalization_<tag> (default: 'shipped' or the weights file's name)")
    p.add_argument("--no-registration", action="store_true", help="skip the registration baseline (quick checkpoint comparisons)")
    p.add_argument("--no-binning", action="store_true", help="register thin slabs of unseen sets at full resolution too (slow: ~200 s a fetal pair)")
    p.add_argument("--strategy", choices=STRATEGIES, default="one-shot")
    p.add_argument("--no-matching", action="store_true", help="the network alone: tasks without reference matching (inference/matching.py)")
    p.add_argument("--ensemble", type=int, default=0, metavar="N",
                   help="also segment each one-shot target with a calibrated ensemble of N references (the pair's and the cases before "
                        "it in the cycle; in-distribution: evaluate's N picks), on the same targets")
    p.add_argument("--known-share", type=float, default=None,
                   help="matching's share of the classes the network knows (default: the engine's KNOWN_MATCH_WEIGHT)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.cases < 1 or args.pairs < 0:
        raise SystemExit("--cases must be at least 1 and --pairs at least 0")
    if args.known_share is not None:
        if not 0 <= args.known_share <= 1:
            raise SystemExit("--known-share is a share: 0 to 1")
        import IrisSegmentLib.inference.predictor as engine

        engine.KNOWN_MATCH_WEIGHT = args.known_share
    table = generalization_table(args.weights, args.sets, args.data, args.cases, args.pairs, args.threads, not args.no_registration, args.strategy,
                                 binning=not args.no_binning, matching=not args.no_matching, ensemble=args.ensemble)
    table["command"] = " ".join(["python", "benchmarks/generalization.py", *sys.argv[1:]])
    save_results(args.output / f"generalization_{args.tag or default_tag(args.weights)}", "Generalization to unseen structures",
                 f"strategy {table['strategy']}{'' if table['matching'] else ', network alone (no reference matching)'}", table, markdown(table), plot)


def save_results(stem: Path, title: str, settings: str, table: dict, text: str, plot_to: Callable[[dict, Path], None]) -> None:
    """A benchmark's <stem>.md (title, command, model, `settings`, time, then `text`), .json (`table`) and
    .png (`plot_to`); `table` holds command, model, threads and wall_seconds."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(
        f"# {title}\n\n`{table['command']}`: {table['model']}; {settings}; "
        f"{table['threads']} thread(s); {table['wall_seconds'] / 60:.1f} min in all.\n\n{text}\n")
    stem.with_suffix(".json").write_text(json.dumps(table, indent=1))
    plot_to(table, stem.with_suffix(".png"))
    print(text)
    print(f"{table['wall_seconds'] / 60:.1f} min; saved {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
