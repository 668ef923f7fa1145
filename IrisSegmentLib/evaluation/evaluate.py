"""`iris-segment evaluate`: the model against the registration baseline on a labelled dataset.

Picks K reference cases from the training part of the dataset (the cases holding the most
classes), segments the held-out cases (Resources/splits.json for our development sets, otherwise a
seeded 25% split) with each requested strategy and, on the same cases, with affine + deformable
registration of the first reference. Writes per-case/per-class CSV, a markdown summary, a Dice bar
plot and a few slice overlays.

Strategies: one-shot (first reference), ensemble (all K, thresholds and island removal calibrated
leave-one-out on them), retrieval (pool of K, top-1 per class),
tune (one-shot embeddings tuned on one more training case whose labels stand in for a clinician's
correction, never a held-out case: the case joins the context, calibrated with the first
reference, and the embeddings are optimised from there; IrisPredictor.tune). One corrected case is
one patient and one annotator, so tuning is repeated separately on `tuning_cases` of them (the
training cases with the most classes after the references) and its scores are the mean over these
tunings; the overlays show the first. A model's seconds per case are its segmentation time plus
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
from .metrics import ClassScore, mean_scores, score_labels
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


def class_scores(predictor, task: TaskEmbedding, cases: list[tuple[Volume, Volume]]) -> list[ClassScore]:
    """The scores of every (case, scored class) of `task` on (image, truth) pairs."""
    return [s for image, truth in cases
            for s in score_labels(predictor.segment(image, task), truth, classes_to_score(truth, task.label_values)).values()]


def mean_dice(predictor, task: TaskEmbedding, cases: list[tuple[Volume, Volume]]) -> float:
    """Mean Dice over every (case, scored class): one number to rank settings or checkpoints by."""
    return float(np.mean([s.dice for s in class_scores(predictor, task, cases)]))


def evaluate(
    data: Path, output: Path, predictor, strategies: list[str], references: int = 1, cases: int | None = None,
    baseline: bool = True, tune_steps: int | None = None, overlays: int = 3, tuning_cases: int = 3,
) -> list[ResultRow]:
    dataset = load_dataset(data)
    heldout, training = heldout_and_training(dataset)
    if cases:
        heldout = heldout[:cases]
    if references < 1:
        raise InputError("at least one reference case is needed: set --references to 1 or more.")
    if "tune" in strategies and tuning_cases < 1:
        raise InputError("tuning needs at least one corrected case: set --tuning-cases to 1 or more.")
    need = references + (tuning_cases if "tune" in strategies else 0)
    if len(training) < need:
        raise InputError(f"{dataset.name}: {len(training)} training cases, {need} needed for {references} reference(s) and the strategies asked.")
    chosen = pick_references(dataset, training, need)
    ref_ids, tune_ids = chosen[:references], chosen[references:]
    print(f"{dataset.name}: references {ref_ids}; {len(heldout)} held-out targets" + (f"; tuning cases {tune_ids}" if tune_ids else ""))
    refs = [read_case(dataset.case(i)) for i in ref_ids]
    tasks, encode_seconds = [], []
    for image, labels in refs:
        start = time.perf_counter()
        tasks.append(predictor.encode_reference(image, labels))
        encode_seconds.append(time.perf_counter() - start)
    # method -> (alternatives whose scores are averaged, each a task or a retrieval pool (a list); one-time seconds)
    plans: dict[str, tuple[list, float]] = {}
    notes: list[str] = []
    if "one-shot" in strategies:
        plans["one-shot"] = ([tasks[0]], encode_seconds[0])
    if "ensemble" in strategies:
        start = time.perf_counter()
        ensemble = predictor.calibrated_ensemble(tasks, refs)
        plans[f"ensemble-{references}"] = ([ensemble], sum(encode_seconds) + time.perf_counter() - start)
        notes.append(f"Ensemble calibrated on the references: {ensemble.calibration_note() or 'nothing changed'}.")
        print(f"  {notes[-1]}")
    if "retrieval" in strategies:
        plans[f"retrieval-{references}"] = ([tasks], sum(encode_seconds))
    if "tune" in strategies:
        tuned, tuning_seconds = [], []
        for tune_id in tune_ids:
            image, labels = read_case(dataset.case(tune_id))
            start = time.perf_counter()
            tuned.append(predictor.tune(tasks[0], image, labels, steps=tune_steps, references=refs[:1]))
            tuning_seconds.append(time.perf_counter() - start)
            untuned = ", ".join(predictor.tuning_untuned) or "none"
            notes.append(f"Tuned on {tune_id}; kept untuned (tuned, they or a neighbour segmented the reference worse): {untuned}.")
            print(f"  {notes[-1]}")
        plans["one-shot+tune"] = (tuned, encode_seconds[0] + float(np.mean(tuning_seconds)))
    rows: list[ResultRow] = []
    output.mkdir(parents=True, exist_ok=True)
    share = 1 / max(1, len(heldout))
    dice_by_alternative: dict[str, list[list[float]]] = {m: [[] for _ in alternatives] for m, (alternatives, _) in plans.items()}  # for the tuning note
    for n, case_id in enumerate(heldout):
        image, truth = read_case(dataset.case(case_id))
        classes = classes_to_score(truth, tasks[0].label_values)
        predictions = {}
        for method, (alternatives, prep_seconds) in plans.items():
            scores, seconds = [], []
            for alternative, task in enumerate(alternatives):
                start = time.perf_counter()
                if isinstance(task, list):
                    prediction = predictor.segment_with_retrieval(image, task)
                else:
                    prediction = predictor.segment(image, task)
                seconds.append(time.perf_counter() - start)
                scores.append(score_labels(prediction, truth, classes))
                dice_by_alternative[method][alternative] += [score.dice for score in scores[-1].values()]
                predictions.setdefault(method, prediction)
            rows += result_rows(dataset.name, case_id, method, mean_scores(scores), dataset.label_names, float(np.mean(seconds)) + prep_seconds * share)
        if baseline:
            warped, seconds = register_and_warp(*refs[0], image)
            predictions["registration"] = warped
            rows += result_rows(dataset.name, case_id, "registration", score_labels(warped, truth, classes), dataset.label_names, seconds)
        means = {m: np.mean([r.dice for r in rows if r.case == case_id and r.method == m]) for m in predictions}
        print(f"  {case_id}: " + ", ".join(f"{m} {d:.3f}" for m, d in means.items()), flush=True)
        if n < overlays:
            plot_overlay(image, truth, predictions, output / f"overlay_{case_id}.png", dataset.label_names, f"{dataset.name} {case_id}")
    if "tune" in strategies:
        per_tuning = [f"{tune_id} {np.mean(values):.3f}" for tune_id, values in zip(tune_ids, dice_by_alternative["one-shot+tune"])]
        before = f"; one-shot {np.mean(dice_by_alternative['one-shot'][0]):.3f}" if "one-shot" in plans else ""
        notes.append(f"One-shot+tune by corrected case (mean Dice over every scored case and class): {', '.join(per_tuning)}{before}.")
    notes.insert(0, f"Model seconds per case include its one-time work shared over the {len(heldout)} cases; one-time seconds: "
                 + ", ".join(f"{method} {prep:.2f}" for method, (_, prep) in plans.items())
                 + (f" (one-shot+tune: encoding plus the mean tuning time; its scores are the mean over the {len(tune_ids)} tunings)" if "tune" in strategies else "") + ".")
    write_report(rows, output, baseline="registration" if baseline else None, notes=notes)
    return rows


def run(args: argparse.Namespace, predictor) -> None:
    rows = evaluate(args.data, args.output, predictor, args.strategy, args.references, args.cases,
                    args.baseline == "registration", args.tune_steps, args.overlays, args.tuning_cases)
    print((args.output / "summary.md").read_text())
    print(f"{len(rows)} rows; report in {args.output}")
