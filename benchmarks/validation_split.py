"""What the Tune benchmarks share: their command line, the bundled model, and the training part of a
dataset split the way `iris-segment evaluate --references 3` splits it: the references (the training
cases with the most classes), the corrected patients after them, and validation cases from the rest.
Held-out cases are never touched, so settings chosen on these can be judged on them afterwards."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from IrisSegmentLib.evaluation.dataset import EvaluationDataset
    from IrisSegmentLib.inference.predictor import IrisPredictor

RESULTS = Path(__file__).resolve().parent / "results"


def arguments(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset folder (imagesTr/labelsTr/dataset.json)")
    p.add_argument("--corrected", type=int, default=5, help="corrected patients, each tuned on separately")
    p.add_argument("--cases", type=int, default=20, help="validation cases scored (the last N training cases left)")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=RESULTS)
    return p


@dataclass
class ValidationSplit:
    predictor: IrisPredictor  # on the CPU
    model_note: str
    dataset: EvaluationDataset
    reference_ids: list[str]
    corrected_ids: list[str]
    validation_ids: list[str]


def validation_split(args: argparse.Namespace) -> ValidationSplit:
    from IrisSegmentLib.evaluation.dataset import load_dataset
    from IrisSegmentLib.evaluation.evaluate import heldout_and_training, pick_references
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import default_weights_path, load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.weights or default_weights_path(), "cpu")
    dataset = load_dataset(args.data)
    _, training = heldout_and_training(dataset)
    chosen = pick_references(dataset, training, 3 + args.corrected)
    validation_ids = [i for i in training if i not in chosen][-args.cases:]
    if len(chosen) <= 3 or not validation_ids:
        raise SystemExit(f"{dataset.name}: {len(training)} training cases are too few for 3 references, corrected patients and validation cases")
    return ValidationSplit(IrisPredictor(model), f"model {model.model_id}, step {model.provenance.get('steps', '?')}", dataset,
                           chosen[:3], chosen[3:], validation_ids)
