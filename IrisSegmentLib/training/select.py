"""Pick the checkpoint to ship: score a run's checkpoints one-shot on validation cases.

Validation cases come from each set's training part (never its held-out part, which stays for the
final evaluation): the last cases in id order, skipping the references and the tuning case that
`iris-segment evaluate` picks. The reference is evaluate's first reference, so the score tracks what
the evaluation will measure without looking at the held-out cases. Training saw these cases, so the
score flatters every checkpoint alike; it ranks checkpoints, it does not estimate accuracy.

    python -m IrisSegmentLib.training.select --run runs/iris-cpu-v2 --data ../shared/data \
        --sets HeadNeck_CT Abdomen_MRI Hippocampus_MRI [--cases 8] [--last 4] [--weights FILE ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..evaluation.dataset import load_dataset, read_case
from ..evaluation.evaluate import heldout_and_training, mean_dice, pick_references
from ..inference.predictor import IrisPredictor
from ..model.weights import load_model
from ..volume import Volume

Case = tuple[Volume, Volume]  # (image, label map)


def validation_cases(data: Path, count: int) -> tuple[str, list[str]]:
    """(reference id, validation ids) for one dataset folder, both from its training part."""
    dataset = load_dataset(data)
    _, training = heldout_and_training(dataset)
    # evaluate uses up to 3 references and one tuning case; none of them validates.
    reserved = pick_references(dataset, training, min(4, len(training)))
    rest = [i for i in training if i not in reserved]
    if not rest:
        raise SystemExit(f"{dataset.name}: no training case is left for validation beside the references.")
    return reserved[0], rest[-count:]


def score_checkpoint(weights: Path, sets: dict[str, tuple[Case, list[Case]]]) -> dict[str, float]:
    """Mean one-shot Dice over classes and cases, per set ((reference, validation cases) already read)."""
    predictor = IrisPredictor(load_model(weights, "cpu"))
    return {name: mean_dice(predictor, predictor.encode_reference(*reference), cases) for name, (reference, cases) in sets.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="training run folder holding iris_step*.safetensors")
    p.add_argument("--data", type=Path, required=True, help="data root with one nnU-Net-layout folder per set")
    p.add_argument("--sets", nargs="+", required=True, help="image sets to validate on")
    p.add_argument("--cases", type=int, default=8, help="validation cases per set")
    p.add_argument("--last", type=int, default=4, help="score the last N checkpoints")
    p.add_argument("--weights", type=Path, nargs="*", default=[], help="more weights files to score (averaged checkpoints, the shipped model)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = sorted(args.run.glob("iris_step*.safetensors"))[-args.last:] + args.weights
    if not checkpoints:
        raise SystemExit(f"no iris_step*.safetensors in {args.run} and no --weights")
    chosen, sets = {}, {}
    for name in args.sets:
        ref_id, case_ids = validation_cases(args.data / name, args.cases)
        dataset = load_dataset(args.data / name)
        chosen[name] = (ref_id, case_ids)
        sets[name] = (read_case(dataset.case(ref_id)), [read_case(dataset.case(i)) for i in case_ids])
        print(f"{name}: reference {ref_id}; validation cases {', '.join(case_ids)}")
    rows = []
    for weights in checkpoints:
        scores = score_checkpoint(weights, sets)
        rows.append({"checkpoint": weights.name, **scores, "mean": float(np.mean(list(scores.values())))})
        print(f"{weights.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k != "checkpoint"), flush=True)
    best = max(rows, key=lambda r: r["mean"])
    lines = ["| checkpoint | " + " | ".join(sets) + " | mean |", "|---" * (len(sets) + 2) + "|"]
    lines += [f"| {r['checkpoint']} | " + " | ".join(f"{r[s]:.3f}" for s in sets) + f" | {r['mean']:.3f} |" for r in rows]
    (args.run / "validation.md").write_text(
        "# One-shot validation Dice per checkpoint\n\nCases from the training part (see "
        "`IrisSegmentLib/training/select.py`):\n\n"
        + "\n".join(f"- {n}: reference {r}; {', '.join(c)}" for n, (r, c) in chosen.items())
        + "\n\n" + "\n".join(lines) + f"\n\nBest: {best['checkpoint']}\n"
    )
    (args.run / "validation.json").write_text(json.dumps({"sets": {n: {"reference": r, "cases": c} for n, (r, c) in chosen.items()},
                                                          "rows": rows, "best": best["checkpoint"]}, indent=1))
    print("\n".join(lines))
    print(f"best: {best['checkpoint']} (written to {args.run / 'validation.md'})")


if __name__ == "__main__":
    main()
