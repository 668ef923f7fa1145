"""Tune as shipped: Dice on validation cases against the number of optimiser steps.

A corrected case is one patient, so tuning is run separately on several of them, each time from
the one-shot task of the first reference; references, corrected patients and validation cases are
those of benchmarks/validation_split.py (evaluate tunes on the first three corrected patients).
Each setting runs the whole `IrisPredictor.tune` (joined context, augmented views, check on the
reference); "joined" is the joined context alone, before any optimiser step. It is how the default
number of steps (TUNING_STEPS) was chosen.

    python benchmarks/tuning.py --data ../shared/data/HeadNeck_CT [--corrected 5] [--cases 20] [--steps 0 5 10 20 30]
    python benchmarks/tuning.py --data ../shared/data/Abdomen_MRI --corrected 3   # 10 training cases: 4 left to score
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    from IrisSegmentLib.evaluation.dataset import read_case
    from IrisSegmentLib.evaluation.evaluate import mean_dice
    from validation_split import arguments, validation_split

    p = arguments(__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=[0, 5, 10, 20, 30], help="optimiser steps; 0: the joined context alone")
    args = p.parse_args()
    split = validation_split(args)
    predictor, model_note, dataset, corrected_ids = split.predictor, split.model_note, split.dataset, split.corrected_ids
    ref_id, validation_ids = split.reference_ids[0], split.validation_ids
    reference = read_case(dataset.case(ref_id))
    validation = [read_case(dataset.case(i)) for i in validation_ids]
    task = predictor.encode_reference(*reference)
    one_shot = mean_dice(predictor, task, validation)
    print(f"{dataset.name}: {model_note}; reference {ref_id}; corrected {corrected_ids}; {len(validation)} validation cases; one-shot Dice {one_shot:.4f}")

    gains: dict[int, list[float]] = {steps: [] for steps in args.steps}
    seconds: dict[int, list[float]] = {steps: [] for steps in args.steps}
    for corrected_id in corrected_ids:
        image, labels = read_case(dataset.case(corrected_id))
        for steps in args.steps:
            start = time.perf_counter()
            if steps == 0:  # what optimising starts from
                tuned = predictor.join(task, image, labels, [reference])
                if tuned is None:
                    raise SystemExit(f"{corrected_id}: its classes cannot be matched to the reference's by name")
            else:
                tuned = predictor.tune(task, image, labels, steps=steps, references=[reference])
            seconds[steps].append(time.perf_counter() - start)
            gains[steps].append(mean_dice(predictor, tuned, validation) - one_shot)
            print(f"  {corrected_id} {_name(steps)}: {gains[steps][-1]:+.4f} ({seconds[steps][-1]:.1f} s)", flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"tuning_{dataset.name}"
    command = " ".join(["python", "benchmarks/tuning.py", *sys.argv[1:]])
    stem.with_suffix(".json").write_text(json.dumps({
        "command": command, "dataset": dataset.name, "model": model_note, "reference": ref_id, "corrected": corrected_ids, "validation": validation_ids,
        "one_shot": one_shot, "gains": {str(s): g for s, g in gains.items()}, "seconds": {str(s): t for s, t in seconds.items()}}, indent=1))
    lines = ["| steps | mean Dice gain vs one-shot | patients better / worse | per corrected patient | tuning s |", "|---|---|---|---|---|"]
    lines += [f"| {_name(s)} | {np.mean(g):+.4f} | {sum(x > 0 for x in g)} / {sum(x < 0 for x in g)} | "
              f"{', '.join(f'{x:+.3f}' for x in g)} | {np.mean(seconds[s]):.1f} |" for s, g in gains.items()]
    stem.with_suffix(".md").write_text(
        f"# Tune on {dataset.name}\n\n`{command}`: {model_note}. Reference {ref_id}; tuned separately on {', '.join(corrected_ids)}; "
        f"scored on {len(validation)} validation cases (training part): {', '.join(validation_ids)}. One-shot mean Dice {one_shot:.4f}.\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in range(len(corrected_ids)):
        ax.plot(args.steps, [gains[s][n] for s in args.steps], color="lightgrey", marker=".")
    ax.plot(args.steps, [np.mean(gains[s]) for s in args.steps], color="black", marker="o", label="mean over corrected patients")
    ax.axhline(0.0, color="grey", linestyle="--", label="one-shot")
    ax.set_xlabel("optimiser steps (0: joined context alone)")
    ax.set_ylabel("validation Dice gain vs one-shot")
    ax.set_title(f"Tune on {dataset.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"saved {stem}.md/.json/.png")


def _name(steps: int) -> str:
    return "joined" if steps == 0 else f"{steps} steps"


if __name__ == "__main__":
    main()
