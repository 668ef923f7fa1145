"""Reference matching against the network, and the ways to combine the two, on the working grid.

The network segments unseen structures poorly even on their own scan while its encoder features still
tell the places of a scan apart; the engine's reference matching (IrisSegmentLib/inference/matching.py)
copies the reference's labels along those features: every target voxel at stride 4 takes its `--top-k`
most similar reference voxels and the softmax of their cosine similarity / `--temperature` weighs the
reference's class masks there. This benchmark chose how. Columns (the network encoded without matching):

- model: the network's first pass (IrisPredictor.probabilities, one-shot, no second pass), > 0.5;
- match/4: matching with every reference voxel at stride 4; match/8: with the reference at stride 8
  (8 times fewer voxels to store and to search); memory: with what a task keeps
  (MatchingMemory.of_reference: stride 4 near the classes, stride 8 elsewhere); placed: memory with its
  votes placed where each class's matched pairs agree on a map to the reference (inference/geometry.py);
- mean: the average of the model's probability and match/4's; max: the larger of the two;
- gated: per class, the model where it segments the reference itself with Dice >= KNOWS (a class it
  knows), match/4 elsewhere; gated-mean: the same with mean in place of the model (what the engine does:
  IrisPredictor._judge_on_reference, judged there on the reference's own grid with both passes).

Pairs as benchmarks/generalization.py picks them: unseen sets (splits.json) self-segmentation on
`--cases` cases and one-shot on cyclic pairs of `--pairs` cases (Cells_Confocal's cells merged into one
class), the unseen-class sets self-segmented with all classes, the in-distribution sets from the
reference `iris-segment evaluate` picks onto the first `--cases` held-out cases. Dice per pair is the
mean over the classes the target holds, on the target's working grid (its truth resampled there, as
tuning scores it), so it reads against the model column of this table, not against the native-grid
Dice of generalization.py.

    python benchmarks/matching_prior.py [--weights FILE] [--sets ...] [--cases 2] [--pairs 3] [--top-k 8] [--temperature 0.01]
                                        [--spatial-weight 0.01]

Writes benchmarks/results/matching_prior_<tag>.md, .json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from IrisSegmentLib.inference.matching import SPATIAL_WEIGHT, TEMPERATURE, TOP_K  # noqa: E402
from generalization import (  # noqa: E402
    DATA, IN_DISTRIBUTION, RESULTS, UNSEEN_SET, all_sets, cyclic_pairs, default_tag, evenly_spaced, merged, save_results,
)

COLUMNS = ("model", "match/4", "match/8", "memory", "placed", "mean", "max", "gated", "gated-mean")
KNOWS = 0.5  # the network's Dice on its own reference from which a class counts as one it knows (the gated columns)


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total > 0 else float("nan")


def score_pair(predictor, reference, target) -> dict:
    """Dice of each column for one (reference, target) pair, and the prior's seconds."""
    from IrisSegmentLib.inference.matching import MatchingMemory, _vote, descriptors
    from IrisSegmentLib.segments import complete_segments

    (image, labels), (target_image, target_labels) = reference, target
    task = predictor.encode_reference(image, labels, skip_small=True, check_refinement=False, matching=False)
    segments = complete_segments(labels.segments, task.label_values)
    view_grid, pixels, masks = predictor.reference_on_grid(image, labels, task.label_values, segments, task.modality)[2][0]
    probabilities, grid = predictor.probabilities(target_image, task)
    target_pixels, _ = predictor._working_target(target_image, task.modality, task.spacing)
    truth = predictor._truth_on_grid(target_labels, grid, task.label_values).bool()
    started = time.perf_counter()
    with torch.no_grad():
        ref_features, target_features = predictor.model.encoder(pixels[None]), predictor.model.encoder(target_pixels[None])
        queries, keys = descriptors(target_features)[0], descriptors(ref_features)[0]
        size = tuple(queries.shape[1:])
        shares = F.adaptive_avg_pool3d(masks[None], tuple(keys.shape[1:]))[0]
        coarse_keys, coarse_shares = F.normalize(F.avg_pool3d(keys[None], 2)[0], dim=0), F.avg_pool3d(shares[None], 2)[0]
        priors = {}
        for column, (k, m) in (("match/4", (keys, shares)), ("match/8", (coarse_keys, coarse_shares))):
            votes = _vote(queries.flatten(1).T, k.flatten(1).T, m.flatten(1))[0]
            priors[column] = F.interpolate(votes.reshape(1, -1, *size), size=tuple(grid.shape), mode="trilinear", align_corners=False)[0]
        memory = MatchingMemory.of_reference(ref_features, masks, view_grid.affine)
        stride4 = replace(memory, band=None)  # the stride-4 vote alone, as in the other columns
        for column, affine in (("memory", None), ("placed", grid.affine)):
            priors[column] = stride4.prior(target_features, tuple(grid.shape), affine=affine)
    seconds = time.perf_counter() - started
    reference_probabilities, reference_grid = predictor.probabilities(image, task)
    reference_truth = predictor._truth_on_grid(labels, reference_grid, task.label_values).bool()
    knows = torch.tensor([dice(reference_probabilities[k] > 0.5, reference_truth[k]) >= KNOWS for k in range(len(task.label_values))])[:, None, None, None]
    mean = (probabilities + priors["match/4"]) / 2
    maps = {"model": probabilities, **priors, "mean": mean, "max": torch.maximum(probabilities, priors["match/4"]),
            "gated": torch.where(knows, probabilities, priors["match/4"]), "gated-mean": torch.where(knows, mean, priors["match/4"])}
    present = [k for k in range(len(task.label_values)) if truth[k].any()]
    return {**{c: float(np.mean([dice(maps[c][k] > 0.5, truth[k]) for k in present])) if present else None for c in COLUMNS},
            "prior_seconds": seconds, "memory_voxels": int(memory.keys.shape[0])}


def pairs_of(dataset, name: str, kind: str, cases: int, pairs: int) -> list[tuple[str, str, str]]:
    """(what, reference id, target id) as generalization.py picks them."""
    from IrisSegmentLib.evaluation.evaluate import heldout_and_training, pick_references

    if kind == IN_DISTRIBUTION:
        heldout, training = heldout_and_training(dataset)
        reference = pick_references(dataset, training, 1)[0]
        return [("one-shot", reference, target) for target in heldout[:cases]]
    self_pairs = [("self", case, case) for case in evenly_spaced(dataset.case_ids, cases)]
    if kind != UNSEEN_SET:
        return self_pairs
    return self_pairs + [("one-shot", r, t) for r, t in cyclic_pairs(evenly_spaced(dataset.case_ids, pairs))]


def matching_table(weights: Path | None, sets: list[str] | None, data: Path, cases: int, pairs: int, top_k: int, temperature: float,
                   spatial_weight: float, threads: int) -> dict:
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.inference import matching
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import load_model

    torch.set_num_threads(threads)
    matching.TOP_K, matching.TEMPERATURE, matching.SPATIAL_WEIGHT = top_k, temperature, spatial_weight  # the engine's constants, for a sweep
    started = time.perf_counter()
    model = load_model(weights, device="cpu")
    predictor = IrisPredictor(model)
    kinds = all_sets()
    rows = []
    for name in sets or list(kinds):
        dataset = load_dataset(data / name)
        loaded: dict[str, tuple] = {}

        def case(case_id: str, merge: bool):
            if case_id not in loaded:
                loaded[case_id] = read_case(dataset.case(case_id))
            image, labels = loaded[case_id]
            return (image, merged(labels)) if merge else (image, labels)

        for what, reference_id, target_id in pairs_of(dataset, name, kinds[name], cases, pairs):
            merge = name == "Cells_Confocal"
            scores = score_pair(predictor, case(reference_id, merge), case(target_id, merge))
            rows.append({"set": name, "kind": kinds[name], "what": what, "reference": reference_id, "target": target_id, **scores})
            print(f"  {name} {what} {reference_id} -> {target_id}: " + ", ".join(f"{c} {scores[c]:.3f}" for c in COLUMNS), flush=True)
    note = f"model {model.model_id}, step {model.provenance.get('steps', '?')} ({model.weights_path})"
    return {"model": note, "rows": rows, "top_k": top_k, "temperature": temperature, "spatial_weight": spatial_weight,
            "threads": threads, "wall_seconds": time.perf_counter() - started}


def summary(table: dict) -> list[tuple[str, str, str, int, dict]]:
    """(set, kind, what, pairs, mean per column) per set and kind of pair."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in table["rows"]:
        groups.setdefault((row["set"], row["kind"], row["what"]), []).append(row)
    return [(s, k, w, len(rows), {c: float(np.mean([r[c] for r in rows if r[c] is not None])) for c in COLUMNS})
            for (s, k, w), rows in groups.items()]


def markdown(table: dict) -> str:
    lines = ["| set | kind | pairs | n | " + " | ".join(COLUMNS) + " |", "|---|---|---|---:|" + "---:|" * len(COLUMNS)]
    for name, kind, what, n, means in summary(table):
        best = max(means.values())
        cells = [f"**{means[c]:.3f}**" if means[c] == best else f"{means[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | {kind} | {what} | {n} | " + " | ".join(cells) + " |")
    seconds = [r["prior_seconds"] for r in table["rows"]]
    kept = [r["memory_voxels"] for r in table["rows"]]
    lines.append(f"\nThe four priors took {np.median(seconds):.1f} s per pair (median) on {table['threads']} thread(s); "
                 f"top-k {table['top_k']}, temperature {table['temperature']}, spatial weight {table.get('spatial_weight', 'n/a')}; a task's memory kept {min(kept)} to {max(kept)} voxels "
                 f"(all of a 128^3 reference at stride 4: 32768).")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(table)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    width = 0.8 / len(COLUMNS)
    for n, column in enumerate(COLUMNS):
        ax.bar(np.arange(len(rows)) + n * width, [r[4][column] for r in rows], width, label=column)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [f"{r[0]}\n{r[2]}" for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("Dice (working grid)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights file (default: the bundled model)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--sets", nargs="+", default=None, help="a subset of generalization.py's sets (default: all)")
    p.add_argument("--cases", type=int, default=2, help="self-segmented cases per set; held-out targets per in-distribution set")
    p.add_argument("--pairs", type=int, default=3, help="cases in the cycle of one-shot pairs per unseen set")
    p.add_argument("--top-k", type=int, default=TOP_K, help="reference voxels each target voxel votes with (1, 4 and 8 at a sharp --temperature score alike; 64 at 0.1 far lower)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="softmax temperature of the cosine similarities (16 at 0.05 scored Fetal one-shot 0.285, 8 at 0.01 0.360)")
    p.add_argument("--spatial-weight", type=float, default=SPATIAL_WEIGHT,
                   help="similarity a placed vote takes off per squared stride-4 voxel of distance (the placed column)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None, help="output name matching_prior_<tag> (default: 'shipped' or the weights file's name)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.cases < 1 or args.pairs < 0 or args.top_k < 1 or args.temperature <= 0 or args.spatial_weight < 0:
        raise SystemExit("--cases and --top-k must be at least 1, --pairs at least 0, --temperature above 0, --spatial-weight not negative")
    table = matching_table(args.weights, args.sets, args.data, args.cases, args.pairs, args.top_k, args.temperature, args.spatial_weight,
                           args.threads)
    table["command"] = " ".join(["python", "benchmarks/matching_prior.py", *sys.argv[1:]])
    save_results(args.output / f"matching_prior_{args.tag or default_tag(args.weights)}", "Dense matching prior against the model",
                 "first pass, Dice on the working grid", table, markdown(table), plot)


if __name__ == "__main__":
    main()
