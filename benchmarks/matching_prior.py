"""Dense matching of the reference: how far does copying its labels along encoder features go?

The network segments unseen structures poorly even on their own scan (self-segmentation Dice 0.04-0.46
in benchmarks/results/generalization_*.md) while its encoder features still tell the places of a scan
apart. This benchmark measures a label-propagation prior that uses no training at all: every voxel of
the target's feature map (stride 4: the encoder's stride-4, -8 and -16 maps, each L2-normalised, the
coarser ones upsampled, concatenated) takes its `--top-k` most similar voxels of the reference's, and
the softmax of their cosine similarity / `--temperature` weighs the reference's class masks there
(average-pooled to the same stride); the result is upsampled to the working grid. Columns:

- model: the network's first pass (IrisPredictor.probabilities, one-shot, no second pass), > 0.5;
- match/4: the prior, reference and target both at stride 4; match/8: the reference at stride 8
  (8 times fewer voxels to store and to search), the target at stride 4;
- mean: the average of the model's probability and match/4's.

Pairs as benchmarks/generalization.py picks them: unseen sets (splits.json) self-segmentation on
`--cases` cases and one-shot on cyclic pairs of `--pairs` cases (Cells_Confocal's cells merged into one
class), the unseen-class sets self-segmented with all classes, the in-distribution sets from the
reference `iris-segment evaluate` picks onto the first `--cases` held-out cases. Dice per pair is the
mean over the classes the target holds, on the target's working grid (its truth resampled there, as
tuning scores it), so it reads against the model column of this table, not against the native-grid
Dice of generalization.py.

    python benchmarks/matching_prior.py [--weights FILE] [--sets ...] [--cases 2] [--pairs 3] [--top-k 8] [--temperature 0.01]

Writes benchmarks/results/matching_prior_<tag>.md, .json and .png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import (  # noqa: E402
    DATA, IN_DISTRIBUTION, RESULTS, UNSEEN_SET, all_sets, cyclic_pairs, default_tag, evenly_spaced, merged, save_results,
)

COLUMNS = ("model", "match/4", "match/8", "mean")
DESCRIPTOR_LEVELS = (1, 2, 3)  # encoder stages (strides 4, 8, 16) whose features describe a voxel


def descriptors(features: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
    """(N, C) unit vectors, one per voxel of a `size` grid: the chosen stages, each normalised, concatenated."""
    parts = [F.normalize(F.interpolate(features[level], size=size, mode="trilinear", align_corners=False)
                         if tuple(features[level].shape[2:]) != tuple(size) else features[level], dim=1)
             for level in DESCRIPTOR_LEVELS]
    return F.normalize(torch.cat(parts, 1), dim=1)[0].flatten(1).T


def propagate(target: torch.Tensor, reference: torch.Tensor, masks: torch.Tensor, top_k: int, temperature: float,
              chunk: int = 4096) -> torch.Tensor:
    """(K, N_target): each target voxel's softmax-weighted vote of its top_k nearest reference voxels' masks (K, N_ref)."""
    votes = []
    for start in range(0, target.shape[0], chunk):
        similarity, nearest = (target[start:start + chunk] @ reference.T).topk(min(top_k, reference.shape[0]), dim=1)
        weights = torch.softmax(similarity / temperature, 1)
        votes.append((masks[:, nearest] * weights[None]).sum(-1))
    return torch.cat(votes, 1)


def dice(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total > 0 else float("nan")


def score_pair(predictor, reference, target, top_k: int, temperature: float) -> dict:
    """Dice of each column for one (reference, target) pair, and the prior's seconds."""
    from IrisSegmentLib.segments import complete_segments

    (image, labels), (target_image, target_labels) = reference, target
    task = predictor.encode_reference(image, labels, skip_small=True, check_refinement=False)
    segments = complete_segments(labels.segments, task.label_values)
    _, _, _, pixels, masks = predictor.reference_on_grid(image, labels, task.label_values, segments, task.modality)
    probabilities, grid = predictor.probabilities(target_image, task)
    target_pixels, _ = predictor._working_target(target_image, task.modality, task.spacing)
    truth = predictor._truth_on_grid(target_labels, grid, task.label_values).bool()
    started = time.perf_counter()
    with torch.no_grad():
        ref_features, target_features = predictor.model.encoder(pixels[None]), predictor.model.encoder(target_pixels[None])
        size = tuple(target_features[1].shape[2:])
        queries = descriptors(target_features, size)
        priors = {}
        for column, level in (("match/4", 1), ("match/8", 2)):
            ref_size = tuple(ref_features[level].shape[2:])
            votes = propagate(queries, descriptors(ref_features, ref_size), F.adaptive_avg_pool3d(masks[None], ref_size)[0].flatten(1),
                              top_k, temperature)
            priors[column] = F.interpolate(votes.reshape(1, -1, *size), size=tuple(grid.shape), mode="trilinear", align_corners=False)[0]
    seconds = time.perf_counter() - started
    maps = {"model": probabilities, **priors, "mean": (probabilities + priors["match/4"]) / 2}
    present = [k for k in range(len(task.label_values)) if truth[k].any()]
    return {**{c: float(np.mean([dice(maps[c][k] > 0.5, truth[k]) for k in present])) if present else None for c in COLUMNS},
            "prior_seconds": seconds}


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
                   threads: int) -> dict:
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import load_model

    torch.set_num_threads(threads)
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
            scores = score_pair(predictor, case(reference_id, merge), case(target_id, merge), top_k, temperature)
            rows.append({"set": name, "kind": kinds[name], "what": what, "reference": reference_id, "target": target_id, **scores})
            print(f"  {name} {what} {reference_id} -> {target_id}: " + ", ".join(f"{c} {scores[c]:.3f}" for c in COLUMNS), flush=True)
    note = f"model {model.model_id}, step {model.provenance.get('steps', '?')} ({model.weights_path})"
    return {"model": note, "rows": rows, "top_k": top_k,
            "temperature": temperature, "threads": threads, "wall_seconds": time.perf_counter() - started}


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
    lines.append(f"\nThe prior (both strides) took {np.median(seconds):.1f} s per pair (median) on {table['threads']} thread(s); "
                 f"top-k {table['top_k']}, temperature {table['temperature']}.")
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
    p.add_argument("--top-k", type=int, default=8, help="reference voxels each target voxel votes with (1, 4 and 8 at a sharp --temperature score alike; 64 at 0.1 far lower)")
    p.add_argument("--temperature", type=float, default=0.01, help="softmax temperature of the cosine similarities (16 at 0.05 scored Fetal one-shot 0.285, 8 at 0.01 0.360)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default=None, help="output name matching_prior_<tag> (default: 'shipped' or the weights file's name)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.cases < 1 or args.pairs < 0 or args.top_k < 1 or args.temperature <= 0:
        raise SystemExit("--cases and --top-k must be at least 1, --pairs at least 0, --temperature above 0")
    table = matching_table(args.weights, args.sets, args.data, args.cases, args.pairs, args.top_k, args.temperature, args.threads)
    table["command"] = " ".join(["python", "benchmarks/matching_prior.py", *sys.argv[1:]])
    save_results(args.output / f"matching_prior_{args.tag or default_tag(args.weights)}", "Dense matching prior against the model",
                 "first pass, Dice on the working grid", table, markdown(table), plot)


if __name__ == "__main__":
    main()
