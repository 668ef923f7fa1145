"""Island removal's decision rule: Dice and HD95 on validation cases, with and without a minimum gain.

A context (three references, or a reference and a corrected scan joined by Tune) keeps only the
largest piece of a class when, leave-one-out on its own labelled scans, the other pieces were
false positives, and they gained at least ISLAND_MIN_GAIN Dice on average
(inference/calibration.py). This compares the shipped bar of 0.01 Dice with none (any gain), for the
3-reference ensemble and for Tune on several corrected patients, each tuned separately. Scores
are taken on validation cases from the training part, never on held-out ones; references,
corrected patients and validation cases are those of benchmarks/validation_split.py.

    python benchmarks/islands.py --data ../shared/data/HeadNeck_CT [--corrected 5] [--cases 20]
    python benchmarks/islands.py --data ../shared/data/Abdomen_MRI --corrected 3   # 10 training cases: 4 left to score
"""
from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    from IrisSegmentLib.evaluation.dataset import read_case
    from IrisSegmentLib.evaluation.evaluate import class_scores
    from IrisSegmentLib.inference import calibration
    from validation_split import arguments, validation_split

    shipped = calibration.ISLAND_MIN_GAIN
    rules = {f"bar {shipped:g} (shipped)": shipped, "any gain": 0.0}  # ISLAND_MIN_GAIN of each rule
    args = arguments(__doc__).parse_args()
    split = validation_split(args)
    predictor, model_note, dataset = split.predictor, split.model_note, split.dataset
    ref_ids, corrected_ids, validation_ids = split.reference_ids, split.corrected_ids, split.validation_ids
    references = [read_case(dataset.case(i)) for i in ref_ids]
    validation = [read_case(dataset.case(i)) for i in validation_ids]
    tasks = [predictor.encode_reference(*r) for r in references]

    def scored(task) -> tuple[float, float]:
        scores = class_scores(predictor, task, validation)
        return float(np.mean([s.dice for s in scores])), float(np.nanmean([s.hd95_mm for s in scores]))

    def flagged(task) -> str:
        return ", ".join(name for name, flag in zip(task.class_names, task.keep_largest) if flag) or "none"

    one_shot, one_shot_hd95 = scored(tasks[0])
    print(f"{dataset.name}: {model_note}; references {ref_ids}; corrected {corrected_ids}; {len(validation)} validation cases; "
          f"one-shot Dice {one_shot:.4f}, HD95 {one_shot_hd95:.1f} mm")
    results = {}
    corrected = [read_case(dataset.case(i)) for i in corrected_ids]
    for rule, min_gain in rules.items():
        calibration.ISLAND_MIN_GAIN = min_gain
        ensemble = predictor.calibrated_ensemble(tasks, references)
        dice, hd95 = scored(ensemble)
        row = {"ensemble": [dice - one_shot, hd95, flagged(ensemble)], "tune": []}
        print(f"  {rule}: ensemble {dice - one_shot:+.4f}, HD95 {hd95:.1f} mm, largest piece only: {row['ensemble'][2]}", flush=True)
        for corrected_id, (image, labels) in zip(corrected_ids, corrected):
            tuned = predictor.tune(tasks[0], image, labels, references=references[:1])
            dice, hd95 = scored(tuned)
            row["tune"].append([dice - one_shot, hd95, flagged(tuned)])
            print(f"  {rule}: tuned on {corrected_id} {dice - one_shot:+.4f}, HD95 {hd95:.1f} mm, largest piece only: {row['tune'][-1][2]}", flush=True)
        results[rule] = row

    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"islands_{dataset.name}"
    command = " ".join(["python", "benchmarks/islands.py", *sys.argv[1:]])
    stem.with_suffix(".json").write_text(json.dumps({
        "command": command, "dataset": dataset.name, "model": model_note, "references": ref_ids, "corrected": corrected_ids,
        "validation": validation_ids, "one_shot": [one_shot, one_shot_hd95], "results": results}, indent=1))
    lines = ["| rule | ensemble-3 Dice gain | ensemble-3 HD95 mm | tune: mean Dice gain | patients better / worse | per corrected patient | tune HD95 mm |",
             "|---|---|---|---|---|---|---|"]
    for rule, row in results.items():
        gains = [t[0] for t in row["tune"]]
        lines.append(f"| {rule} | {row['ensemble'][0]:+.4f} | {row['ensemble'][1]:.1f} | {np.mean(gains):+.4f} | "
                     f"{sum(g > 0 for g in gains)} / {sum(g < 0 for g in gains)} | {', '.join(f'{g:+.3f}' for g in gains)} | "
                     f"{np.mean([t[1] for t in row['tune']]):.1f} |")
    flags = [f"- {rule}: ensemble {row['ensemble'][2]}; tuned " + "; ".join(f"{i} {t[2]}" for i, t in zip(corrected_ids, row["tune"]))
             for rule, row in results.items()]
    stem.with_suffix(".md").write_text(
        f"# Island removal on {dataset.name}\n\n`{command}`: {model_note}. References {', '.join(ref_ids)} (one-shot and tune start from "
        f"the first); tuned separately on {', '.join(corrected_ids)}; scored on {len(validation)} validation cases (training part): "
        f"{', '.join(validation_ids)}. One-shot mean Dice {one_shot:.4f}, HD95 {one_shot_hd95:.1f} mm. Gains are against one-shot.\n\n"
        + "\n".join(lines) + "\n\nLargest piece only:\n\n" + "\n".join(flags) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    positions = np.arange(len(results))
    ax.bar(positions - 0.2, [row["ensemble"][0] for row in results.values()], 0.4, label="ensemble-3")
    ax.bar(positions + 0.2, [np.mean([t[0] for t in row["tune"]]) for row in results.values()], 0.4, label="tune (mean over patients)")
    ax.set_xticks(positions, list(results))
    ax.axhline(0.0, color="grey", linestyle="--")
    ax.set_ylabel("validation Dice gain vs one-shot")
    ax.set_title(f"Island removal rule, {dataset.name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"saved {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
