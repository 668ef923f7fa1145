"""In-context tuning: held-out Dice against the learning rate and number of steps.

Tuning optimises only the task embeddings (network frozen) on one corrected case. This script
encodes the evaluation reference of a dataset (as `iris-segment evaluate` picks it), tunes its
embeddings on the next training case for each (learning rate, steps) setting, and scores the tuned
embeddings on held-out cases, beside the untuned one-shot. It is how the predictor's default
tuning settings were chosen. Tuning runs as when the step size was chosen: without augmented views
(views=0) and from the reference's embeddings alone (join_context=False); the views and the
corrected scan joining the context came later (IrisPredictor.tune).

    python benchmarks/tuning.py --data ../shared/data/Hippocampus_MRI [--cases 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def main() -> None:
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.evaluation.evaluate import heldout_and_training, mean_dice, pick_references
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import default_weights_path, load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a dataset folder (imagesTr/labelsTr/dataset.json)")
    p.add_argument("--cases", type=int, default=20, help="held-out cases scored (first N)")
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-3, 2e-2, 5e-2, 1e-1, 2e-1])
    p.add_argument("--steps", type=int, nargs="+", default=[30, 60])
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=ROOT / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.weights or default_weights_path(), "cpu")
    predictor = IrisPredictor(model)
    model_note = f"model {model.model_id}, step {model.provenance.get('steps', '?')}"
    dataset = load_dataset(args.data)
    heldout, training = heldout_and_training(dataset)
    ref_id, tune_id = pick_references(dataset, training, 2)
    targets = [read_case(dataset.case(i)) for i in heldout[: args.cases]]
    task = predictor.encode_reference(*read_case(dataset.case(ref_id)))
    tune_image, tune_labels = read_case(dataset.case(tune_id))

    rows = [{"lr": 0.0, "steps": 0, "dice": mean_dice(predictor, task, targets), "tune_seconds": 0.0, "final_loss": None}]
    print(f"{dataset.name}: {model_note}; reference {ref_id}, tuning case {tune_id}, {len(targets)} held-out cases")
    print(f"one-shot (no tuning): Dice {rows[0]['dice']:.3f}")
    for steps in args.steps:
        for lr in args.lrs:
            start = time.perf_counter()
            tuned = predictor.tune(task, tune_image, tune_labels, steps=steps, learning_rate=lr, views=0, join_context=False)
            seconds = time.perf_counter() - start
            rows.append({"lr": lr, "steps": steps, "dice": mean_dice(predictor, tuned, targets), "tune_seconds": seconds,
                         "final_loss": predictor.tuning_losses[-1], "first_loss": predictor.tuning_losses[0]})
            r = rows[-1]
            print(f"lr {lr:g} steps {steps}: Dice {r['dice']:.3f} ({r['dice'] - rows[0]['dice']:+.3f}); "
                  f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f}; {seconds:.1f} s", flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"tuning_{dataset.name}"
    stem.with_suffix(".json").write_text(json.dumps({"dataset": dataset.name, "model": model_note, "reference": ref_id, "tuning_case": tune_id,
                                                     "heldout_cases": heldout[: args.cases], "rows": rows}, indent=1))
    lines = ["| steps | lr | held-out Dice | vs one-shot | tuning loss first -> last | tuning s |", "|---|---|---|---|---|---|"]
    lines.append(f"| 0 | - | {rows[0]['dice']:.3f} | - | - | - |")
    lines += [f"| {r['steps']} | {r['lr']:g} | {r['dice']:.3f} | {r['dice'] - rows[0]['dice']:+.3f} | "
              f"{r['first_loss']:.3f} -> {r['final_loss']:.3f} | {r['tune_seconds']:.1f} |" for r in rows[1:]]
    stem.with_suffix(".md").write_text(f"# Tuning on {dataset.name}\n\n{model_note}. Reference {ref_id}, tuned on {tune_id}, "
                                       f"scored on {len(targets)} held-out cases.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for steps in args.steps:
        sel = [r for r in rows[1:] if r["steps"] == steps]
        ax.plot([r["lr"] for r in sel], [r["dice"] for r in sel], marker="o", label=f"{steps} steps")
    ax.axhline(rows[0]["dice"], color="grey", linestyle="--", label="one-shot")
    ax.set_xscale("log")
    ax.set_xlabel("tuning learning rate")
    ax.set_ylabel("held-out mean Dice")
    ax.set_title(f"Tuning on {dataset.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"saved {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
