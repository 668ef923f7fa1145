"""`iris-segment evaluate`: the model against the registration baseline on a labelled dataset.

Picks K reference cases from the training part of the dataset (the cases holding the most
classes), segments the held-out cases (Resources/splits.json for our development sets, otherwise a
seeded 25% split) with each requested strategy and, on the same cases, with affine + deformable
registration of the first reference. Writes per-case/per-class CSV, a markdown summary, a Dice bar
plot and a few slice overlays.

Strategies: one-shot (first reference), ensemble (all K, thresholds and island removal calibrated
leave-one-out on them), retrieval (pool of K, top-1 per class),
tune (one-shot embeddings tuned on one more training case whose labels stand in for a clinician's
correction; never on a held-out case). A model's seconds per case are its segmentation time plus
its one-time work (encoding the references, tuning) shared out over the evaluated cases, as when
one reference serves a series of scans; the summary lists the one-time seconds themselves.
Each case is scored on the classes its truth holds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..embeddings import TaskEmbedding
from ..errors import InputError
from ..io import read_label_map
from ..segments import present_labels
from ..training.data import load_split
from ..volume import Volume
from .dataset import EvaluationDataset, load_dataset, read_case, split_cases
from .metrics import score_labels
from .registration import register_and_warp
from .report import ResultRow, plot_overlay, result_rows, write_report


def heldout_and_training(dataset: EvaluationDataset) -> tuple[list[str], list[str]]:
    ids = dataset.case_ids
    split = load_split()
    fixed = split.get(dataset.name) or split.get(dataset.folder.name)
    if fixed:
        heldout = set(fixed) & set(ids)
        return sorted(heldout), [i for i in ids if i not in heldout]
    training, heldout = split_cases(ids, 0.25)
    return heldout, training


def pick_references(dataset: EvaluationDataset, training: list[str], count: int) -> list[str]:
    """The `count` training cases with the most classes labelled (ties: case id order)."""
    richness = {i: len(present_labels(read_label_map(dataset.case(i).labels_path).array)) for i in training}
    return sorted(training, key=lambda i: (-richness[i], i))[:count]


def classes_to_score(truth: Volume, label_values: list[int]) -> list[int]:
    """The task's classes that the case's truth holds: a class absent from the truth would score Dice 1
    when nothing is predicted, which flatters a method that misses everything (OARs are not in every
    OpenKBP case)."""
    return sorted(set(present_labels(truth.array)) & set(label_values))


def mean_dice(predictor, task: TaskEmbedding, cases: list[tuple[Volume, Volume]]) -> float:
    """Mean Dice over every (case, scored class) of `task` on (image, truth) pairs: one number to
    rank settings or checkpoints by."""
    scores = [s.dice for image, truth in cases
              for s in score_labels(predictor.segment(image, task), truth, classes_to_score(truth, task.label_values)).values()]
    return float(np.mean(scores))


def evaluate(
    data: Path, output: Path, predictor, strategies: list[str], references: int = 1, cases: int | None = None,
    baseline: bool = True, tune_steps: int = 30, overlays: int = 3,
) -> list[ResultRow]:
    dataset = load_dataset(data)
    heldout, training = heldout_and_training(dataset)
    if cases:
        heldout = heldout[:cases]
    need = max(references, 1) + (1 if "tune" in strategies else 0)
    if len(training) < need:
        raise InputError(f"{dataset.name}: {len(training)} training cases, {need} needed for {references} reference(s) and the strategies asked.")
    chosen = pick_references(dataset, training, need)
    ref_ids, tune_id = chosen[:references], (chosen[references] if "tune" in strategies else None)
    print(f"{dataset.name}: references {ref_ids}; {len(heldout)} held-out targets" + (f"; tuning case {tune_id}" if tune_id else ""))
    refs = [read_case(dataset.case(i)) for i in ref_ids]
    tasks, encode_seconds = [], []
    for image, labels in refs:
        start = time.perf_counter()
        tasks.append(predictor.encode_reference(image, labels))
        encode_seconds.append(time.perf_counter() - start)
    plans: dict[str, tuple[object, float]] = {}
    notes: list[str] = []
    if "one-shot" in strategies:
        plans["one-shot"] = (tasks[0], encode_seconds[0])
    if "ensemble" in strategies:
        start = time.perf_counter()
        ensemble = predictor.calibrated_ensemble(tasks, refs)
        plans[f"ensemble-{references}"] = (ensemble, sum(encode_seconds) + time.perf_counter() - start)
        notes.append(f"Ensemble calibrated on the references: {ensemble.calibration_note() or 'nothing changed'}.")
        print(f"  {notes[-1]}")
    if "retrieval" in strategies:
        plans[f"retrieval-{references}"] = (tasks, sum(encode_seconds))
    if "tune" in strategies:
        image, labels = read_case(dataset.case(tune_id))
        start = time.perf_counter()
        tuned = predictor.tune(tasks[0], image, labels, steps=tune_steps, references=refs[:1])
        if predictor.tuning_untuned:
            notes.append(f"Tuning kept untuned (tuned, they or a neighbour segmented the reference worse): {', '.join(predictor.tuning_untuned)}.")
            print(f"  {notes[-1]}")
        plans["one-shot+tune"] = (tuned, encode_seconds[0] + time.perf_counter() - start)
    rows: list[ResultRow] = []
    output.mkdir(parents=True, exist_ok=True)
    share = 1 / max(1, len(heldout))
    for n, case_id in enumerate(heldout):
        image, truth = read_case(dataset.case(case_id))
        classes = classes_to_score(truth, tasks[0].label_values)
        predictions = {}
        for method, (task, prep_seconds) in plans.items():
            start = time.perf_counter()
            if isinstance(task, list):
                prediction = predictor.segment_with_retrieval(image, task)
            else:
                prediction = predictor.segment(image, task)
            seconds = time.perf_counter() - start + prep_seconds * share
            predictions[method] = prediction
            rows += result_rows(dataset.name, case_id, method, score_labels(prediction, truth, classes), dataset.label_names, seconds)
        if baseline:
            warped, seconds = register_and_warp(*refs[0], image)
            predictions["registration"] = warped
            rows += result_rows(dataset.name, case_id, "registration", score_labels(warped, truth, classes), dataset.label_names, seconds)
        means = {m: np.mean([r.dice for r in rows if r.case == case_id and r.method == m]) for m in predictions}
        print(f"  {case_id}: " + ", ".join(f"{m} {d:.3f}" for m, d in means.items()), flush=True)
        if n < overlays:
            plot_overlay(image, truth, predictions, output / f"overlay_{case_id}.png", dataset.label_names, f"{dataset.name} {case_id}")
    notes.insert(0, f"Model seconds per case include its one-time work shared over the {len(heldout)} cases; one-time seconds: "
                 + ", ".join(f"{method} {prep:.2f}" for method, (_, prep) in plans.items()) + ".")
    write_report(rows, output, baseline="registration" if baseline else None, notes=notes)
    return rows


def run(args: argparse.Namespace, predictor) -> None:
    rows = evaluate(args.data, args.output, predictor, args.strategy, args.references, args.cases,
                    args.baseline == "registration", args.tune_steps, args.overlays)
    print((args.output / "summary.md").read_text())
    print(f"{len(rows)} rows; report in {args.output}")
