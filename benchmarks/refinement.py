"""Small structures: Dice and HD95 of thin classes with and without the second, finer pass.

`IrisPredictor.segment` works on one grid fitted to the whole target; a structure a few working
voxels across (esophagus, spinal cord, adrenal glands) loses its shape there. The second pass
(`refine=True`) segments each thin class again in a crop around what the first pass found, at half
the working spacing, with tokens the reference gave for the class seen the same way. This benchmark
segments the same targets both ways:

- HeadNeck_CT (in-distribution): the reference `iris-segment evaluate` picks, one-shot onto the first
  --cases held-out cases;
- TotalSeg_CT_example (41 classes) and TotalSeg_MR_example: self-segmentation, every class in one call.

Per set it prints mean Dice and HD95 (mm) per class, both ways, the mean over the thin classes (those
that have a finer pass) and over all classes of at least 1 cm^3, and the seconds per target; it saves
refinement_<tag>.md/.json/.png under benchmarks/results/.

    python benchmarks/refinement.py [--weights FILE] [--cases 6] [--threads 1] [--tag NAME]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import DATA, RESULTS, _fmt, class_records, default_tag, mean_of, save_results  # noqa: E402

SETS = {"HeadNeck_CT": "one-shot", "TotalSeg_CT_example": "self", "TotalSeg_MR_example": "self"}
WAYS = ("first pass", "refined")


def _pairs(dataset, kind: str, cases: int) -> list[tuple[str, str]]:
    from IrisSegmentLib.evaluation.evaluate import heldout_and_training, pick_references

    if kind == "self":
        return [(case, case) for case in dataset.case_ids[:cases]]
    heldout, training = heldout_and_training(dataset)
    reference = pick_references(dataset, training, 1)[0]
    return [(reference, target) for target in heldout[:cases]]


def evaluate_set(predictor, folder: Path, kind: str, cases: int, log=print) -> dict:
    """Both ways on every pair of one set: per pair and way, per-class records and seconds."""
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.evaluation.evaluate import classes_to_score

    dataset = load_dataset(folder)
    row: dict = {"set": folder.name, "kind": kind, "pairs": []}
    for reference_id, target_id in _pairs(dataset, kind, cases):
        reference = read_case(dataset.case(reference_id))
        image, truth = read_case(dataset.case(target_id))
        start = time.perf_counter()
        task = predictor.encode_reference(*reference, skip_small=True)
        encode_seconds = time.perf_counter() - start
        thin = [task.class_names[r] for r in task.refined]
        values = classes_to_score(truth, sorted(dataset.label_names))
        pair = {"reference": reference_id, "target": target_id, "encode_seconds": encode_seconds, "thin": thin, "ways": {}}
        for way in WAYS:
            start = time.perf_counter()
            prediction = predictor.segment(image, task, refine=way == "refined")
            seconds = time.perf_counter() - start
            records = class_records(prediction, truth, dataset.label_names, values, set(), voxel_rule=False)
            pair["ways"][way] = {"seconds": seconds, "classes": records}
        row["pairs"].append(pair)
        means = {way: mean_of([r["dice"] for r in pair["ways"][way]["classes"] if r["name"] in thin]) for way in WAYS}
        log(f"  {folder.name} {reference_id} -> {target_id}: {len(thin)} thin classes, Dice {_fmt(means['first pass'])} -> "
            f"{_fmt(means['refined'])}; {pair['ways']['first pass']['seconds']:.1f} s -> {pair['ways']['refined']['seconds']:.1f} s")
    row["summary"] = summarize(row)
    return row


def summarize(row: dict) -> dict:
    """Per class and way mean Dice / HD95 over the pairs; means over thin and over counted classes."""
    per_class: dict[str, dict] = {}
    for pair in row["pairs"]:
        for way in WAYS:
            for r in pair["ways"][way]["classes"]:
                entry = per_class.setdefault(r["name"], {"thin": r["name"] in pair["thin"], "counted": r["counted"], **{w: {"dice": [], "hd95": []} for w in WAYS}})
                entry[way]["dice"].append(r["dice"])
                entry[way]["hd95"].append(r["hd95_mm"])
    classes = {
        name: {"thin": e["thin"], "counted": e["counted"],
               **{way: {"dice": mean_of(e[way]["dice"]), "hd95_mm": mean_of(e[way]["hd95"])} for way in WAYS}}
        for name, e in per_class.items()
    }

    def mean(which: str, way: str, metric: str):
        return mean_of([c[way][metric] for c in classes.values() if c[which]])

    return {
        "classes": classes,
        "thin": {way: {"dice": mean("thin", way, "dice"), "hd95_mm": mean("thin", way, "hd95_mm")} for way in WAYS},
        "counted": {way: {"dice": mean("counted", way, "dice"), "hd95_mm": mean("counted", way, "hd95_mm")} for way in WAYS},
        "seconds": {way: float(np.mean([p["ways"][way]["seconds"] for p in row["pairs"]])) for way in WAYS},
        "encode_seconds": float(np.mean([p["encode_seconds"] for p in row["pairs"]])),
    }


def markdown(table: dict) -> str:
    lines = ["| set | pairs | thin classes | Dice thin (first -> refined) | HD95 mm thin | Dice >= 1 cm^3 | HD95 mm >= 1 cm^3 | s/target | encode s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        s = row["summary"]
        thin_count = sum(c["thin"] for c in s["classes"].values())
        lines.append(
            f"| {row['set']} ({row['kind']}) | {len(row['pairs'])} | {thin_count} of {len(s['classes'])} | "
            f"{_fmt(s['thin']['first pass']['dice'])} -> {_fmt(s['thin']['refined']['dice'])} | "
            f"{_fmt(s['thin']['first pass']['hd95_mm'], 1)} -> {_fmt(s['thin']['refined']['hd95_mm'], 1)} | "
            f"{_fmt(s['counted']['first pass']['dice'])} -> {_fmt(s['counted']['refined']['dice'])} | "
            f"{_fmt(s['counted']['first pass']['hd95_mm'], 1)} -> {_fmt(s['counted']['refined']['hd95_mm'], 1)} | "
            f"{s['seconds']['first pass']:.1f} -> {s['seconds']['refined']:.1f} | {s['encode_seconds']:.1f} |")
    for row in table["rows"]:
        lines += ["", f"{row['set']}, per class (mean over pairs; HD95 over pairs where both masks are non-empty):", "",
                  "| class | thin | Dice first | Dice refined | HD95 first | HD95 refined |", "|---|---|---|---|---|---|"]
        for name, c in row["summary"]["classes"].items():
            lines.append(f"| {name} | {'yes' if c['thin'] else ''} | {_fmt(c['first pass']['dice'])} | {_fmt(c['refined']['dice'])} | "
                         f"{_fmt(c['first pass']['hd95_mm'], 1)} | {_fmt(c['refined']['hd95_mm'], 1)} |")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    x = np.arange(len(rows))
    for ax, metric, label in ((axes[0], "dice", "mean Dice, thin classes"), (axes[1], "hd95_mm", "mean HD95 (mm), thin classes")):
        for n, (way, color) in enumerate(zip(WAYS, ("tab:gray", "tab:blue"))):
            values = [row["summary"]["thin"][way][metric] for row in rows]
            ax.bar(x + (n - 0.5) * 0.38, [v or 0.0 for v in values], 0.38, label=way, color=color)
        ax.set_xticks(x, [row["set"] for row in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
    axes[0].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Second pass for thin classes: {Path(table['weights']).name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights file (default: the bundled model)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--cases", type=int, default=6, help="held-out targets of HeadNeck_CT (TotalSeg sets have one case)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    import torch

    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.weights, "cpu")
    predictor = IrisPredictor(model)
    start = time.perf_counter()
    rows = [evaluate_set(predictor, args.data / name, SETS[name], args.cases) for name in args.sets]
    table = {"model": f"model {model.model_id}, step {model.provenance.get('steps', '?')}", "weights": str(model.weights_path),
             "threads": args.threads, "rows": rows, "wall_seconds": time.perf_counter() - start,
             "command": " ".join(["python", "benchmarks/refinement.py", *sys.argv[1:]])}
    save_results(args.output / f"refinement_{args.tag or default_tag(args.weights)}", "Second pass for thin classes",
                 f"{len(rows)} set(s)", table, markdown(table), plot)


if __name__ == "__main__":
    main()
