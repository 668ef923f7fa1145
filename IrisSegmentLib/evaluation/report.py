"""Benchmark report: per-case CSV, markdown summary, Dice bar plot and slice overlays.

Figures use matplotlib's object API with the Agg canvas, never pyplot, so writing a report
neither needs a display nor changes the backend of a host application.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..files import reading
from ..volume import Volume
from .metrics import ClassScore, dice

CSV_COLUMNS = ("dataset", "case", "method", "class", "dice", "hd95_mm", "seconds")


@dataclass(frozen=True)
class ResultRow:
    """One class of one case segmented by one method; ``seconds`` is the whole case's time."""

    dataset: str
    case: str
    method: str
    class_name: str
    dice: float
    hd95_mm: float
    seconds: float


def result_rows(
    dataset: str, case: str, method: str, scores: Mapping[int, ClassScore], label_names: Mapping[int, str], seconds: float
) -> list[ResultRow]:
    """Rows for one case and method, classes named from the dataset (``label_<value>`` if unnamed)."""
    return [
        ResultRow(dataset, case, method, label_names.get(value, f"label_{value}"), score.dice, score.hd95_mm, seconds)
        for value, score in sorted(scores.items())
    ]


def write_csv(rows: Iterable[ResultRow], path: str | Path) -> None:
    """CSV with CSV_COLUMNS; undefined HD95 is written as ``nan``."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(astuple(row) for row in rows)


def _mean_seconds(rows: Sequence[ResultRow]) -> dict[tuple[str, str], tuple[float, int]]:
    """(dataset, method) -> (mean seconds per case, number of cases); each case counted once."""
    per_case = {(r.dataset, r.method, r.case): r.seconds for r in rows}
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (dataset, method, _), seconds in per_case.items():
        grouped[dataset, method].append(seconds)
    return {key: (float(np.mean(values)), len(values)) for key, values in grouped.items()}


def _ordered(values: Iterable[str]) -> list[str]:
    """Unique values in first-seen order, so tables follow the dataset's label order."""
    return list(dict.fromkeys(values))


def summary_markdown(rows: Sequence[ResultRow], baseline: str | None = None, notes: Sequence[str] = ()) -> str:
    """Per dataset: mean Dice and HD95 per class and method, then mean seconds per case and speed-up.

    The speed-up of a method is the baseline's mean seconds over its own; the baseline defaults
    to the slowest method of the dataset. HD95 means skip cases where it is undefined (an empty
    prediction or truth) and say how many were skipped. `notes` close the summary (how times were counted).
    """
    if not rows:
        raise InputError("no results to summarise: the evaluation produced no rows.")
    timing = _mean_seconds(rows)
    lines = ["# Evaluation summary", ""]
    for dataset in _ordered(r.dataset for r in rows):
        subset = [r for r in rows if r.dataset == dataset]
        methods = _ordered(r.method for r in subset)
        classes = _ordered(r.class_name for r in subset)
        lines += [f"## {dataset}", "", "Mean Dice (cases scored):", ""]
        lines += _class_table(subset, methods, classes, "dice")
        lines += ["", "Mean HD95 in mm:", ""]
        lines += _class_table(subset, methods, classes, "hd95_mm")
        if len(methods) > 1:
            lines += ["", *_paired_table(subset, methods)]
        reference = baseline if baseline is not None else max(methods, key=lambda m: timing[dataset, m][0])
        if (dataset, reference) not in timing:
            raise InputError(f"baseline method {reference!r} has no results for {dataset}; methods: {methods}.")
        base_seconds = timing[dataset, reference][0]
        lines += ["", f"| method | cases | mean seconds / case | speed-up vs {reference} |", "|---|---|---|---|"]
        for method in methods:
            seconds, cases = timing[dataset, method]
            ratio = f"{base_seconds / seconds:.1f}x" if seconds > 0 else "n/a"
            lines.append(f"| {method} | {cases} | {seconds:.2f} | {ratio} |")
        lines.append("")
    for note in notes:
        lines += [note, ""]  # a paragraph each
    return "\n".join(lines)


def _class_table(rows: Sequence[ResultRow], methods: list[str], classes: list[str], field: str) -> list[str]:
    """Markdown table of mean ``field`` per class (rows) and method (columns).

    The closing "mean over classes" row uses only the classes every method has a value for, so a
    method whose HD95 is undefined on a hard class (empty prediction) does not look better for it.
    """
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        values[r.class_name, r.method].append(getattr(r, field))
    lines = ["| class | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    means: dict[str, dict[str, float]] = {}
    for name in classes:
        cells = []
        for method in methods:
            scores = np.asarray(values.get((name, method), []), dtype=np.float64)
            defined = scores[np.isfinite(scores)]
            if not defined.size:
                cells.append("n/a")
                continue
            means.setdefault(name, {})[method] = float(defined.mean())
            skipped = scores.size - defined.size
            cells.append(f"{defined.mean():.3f} ({defined.size})" + (f", {skipped} undefined" if skipped else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    common = [per_method for per_method in means.values() if len(per_method) == len(methods)]
    overall = [f"{np.mean([c[m] for c in common]):.3f}" if common else "n/a" for m in methods]
    lines.append("| **mean over classes** | " + " | ".join(overall) + " |")
    return lines


def _paired_table(rows: Sequence[ResultRow], methods: list[str], resamples: int = 2000) -> list[str]:
    """Each method against the first, case by case: whether a difference in mean Dice is more than
    the spread between cases. Per case, the mean Dice over its scored classes; the interval is a
    95 % percentile bootstrap over cases (seeded, so a report is reproducible)."""
    first = methods[0]
    lines = [f"Paired against {first} (per case: mean Dice over its scored classes; 95 % bootstrap interval over cases):", "",
             "| method | cases | mean difference | 95 % interval | cases better / worse |", "|---|---|---|---|---|"]
    for method in methods[1:]:
        differences = _case_differences(rows, method, first)
        cases = differences.size
        if not cases:
            continue
        resampled = np.random.default_rng(0).integers(0, cases, size=(resamples, cases))  # per method: rows don't depend on each other
        means = differences[resampled].mean(1)
        low, high = np.percentile(means, [2.5, 97.5])
        lines.append(f"| {method} | {cases} | {differences.mean():+.3f} | {low:+.3f} to {high:+.3f} | "
                     f"{int((differences > 0).sum())} / {int((differences < 0).sum())} |")
    return lines


def _case_differences(rows: Sequence[ResultRow], method: str, first: str) -> np.ndarray:
    """Per case that both methods segmented, in case order: `method`'s mean Dice over the case's
    scored classes minus `first`'s."""
    per_case: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.method in (method, first):
            per_case[r.method][r.case].append(r.dice)
    cases = sorted(set(per_case[first]) & set(per_case[method]))
    return np.array([np.mean(per_case[method][c]) - np.mean(per_case[first][c]) for c in cases])


def pooled_markdown(rows: Sequence[ResultRow], first: str = "one-shot", resamples: int = 2000) -> str:
    """Each method against `first` over several datasets' reports, paired per case.

    Two means, because the sets differ in size: over all cases (the large sets dominate), and over
    datasets (each set's mean difference weighted alike, so a small set counts as much as a large
    one). Intervals are a 95 % percentile bootstrap stratified by dataset: every resample redraws
    each set's cases from that set, so each keeps its size (seeded, so a report is reproducible).
    They speak for these datasets, and a set of a few cases varies less in resampling than it would
    in new cases, so the interval over datasets is too narrow when a small set carries a third of
    it. A method is pooled over the datasets that have both it and `first`."""
    if not rows:
        raise InputError("no results to pool: the reports hold no rows.")
    datasets = _ordered(r.dataset for r in rows)
    by_set = {d: [r for r in rows if r.dataset == d] for d in datasets}
    missing = [d for d, subset in by_set.items() if first not in {r.method for r in subset}]
    if missing:
        raise InputError(f"method {first!r} is not in the reports of {', '.join(missing)}: pool reports that all hold it.")
    differences = {(d, m): _case_differences(subset, m, first) for d, subset in by_set.items() for m in _ordered(r.method for r in subset) if m != first}
    differences = {key: values for key, values in differences.items() if values.size}
    lines = [f"# Pooled over {len(datasets)} datasets: {', '.join(datasets)}", "",
             f"Paired against {first}, per case (mean Dice over its scored classes); 95 % bootstrap intervals stratified by dataset "
             "(a set of a few cases makes the interval over datasets too narrow).", "",
             "| method | datasets | cases | mean over cases | 95 % interval | mean over datasets | 95 % interval | cases better / worse |",
             "|---|---|---|---|---|---|---|---|"]
    for method in _ordered(m for _, m in differences):
        parts = [values for (_, m), values in differences.items() if m == method]
        rng = np.random.default_rng(0)
        sums, set_means = np.zeros(resamples), np.zeros(resamples)
        for values in parts:
            drawn = values[rng.integers(0, values.size, size=(resamples, values.size))]
            sums += drawn.sum(1)
            set_means += drawn.mean(1) / len(parts)
        every = np.concatenate(parts)
        over_cases = np.percentile(sums / every.size, [2.5, 97.5])
        over_sets = np.percentile(set_means, [2.5, 97.5])
        lines.append(f"| {method} | {len(parts)} | {every.size} | {every.mean():+.3f} | {over_cases[0]:+.3f} to {over_cases[1]:+.3f} | "
                     f"{np.mean([values.mean() for values in parts]):+.3f} | {over_sets[0]:+.3f} to {over_sets[1]:+.3f} | "
                     f"{int((every > 0).sum())} / {int((every < 0).sum())} |")
    lines += ["", "Per dataset (mean difference, cases):", ""]
    lines += [f"- {d}: " + ", ".join(f"{m} {values.mean():+.3f} ({values.size})" for (s, m), values in differences.items() if s == d) for d in datasets]
    return "\n".join(lines) + "\n"


def read_csv(path: str | Path) -> list[ResultRow]:
    """Rows of a report's CSV (write_csv), to pool several reports."""
    path = Path(path)
    with reading(path, "results CSV"), open(path, newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    if not table or tuple(table[0]) != CSV_COLUMNS:
        raise InputError(f"{path} is not an IrisSegment results CSV (expected columns {', '.join(CSV_COLUMNS)}).")
    try:
        return [ResultRow(d, c, m, k, float(dice_), float(hd95_), float(seconds)) for d, c, m, k, dice_, hd95_, seconds in table[1:]]
    except ValueError as exc:
        raise InputError(f"{path}: a row does not hold {len(CSV_COLUMNS)} columns with numbers in dice, hd95_mm and seconds ({exc}).") from None


def write_summary(rows: Sequence[ResultRow], path: str | Path, baseline: str | None = None, notes: Sequence[str] = ()) -> None:
    Path(path).write_text(summary_markdown(rows, baseline, notes), encoding="utf-8")


def _save(figure: Figure, path: str | Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def plot_dice_bars(rows: Sequence[ResultRow], path: str | Path) -> None:
    """Mean Dice per class (with standard deviation), methods side by side; one panel per dataset."""
    if not rows:
        raise InputError("no results to plot: the evaluation produced no rows.")
    datasets = _ordered(r.dataset for r in rows)
    figure = Figure(figsize=(max(6.0, 1.2 * max(len({r.class_name for r in rows if r.dataset == d}) for d in datasets)), 3.6 * len(datasets)))
    for index, dataset in enumerate(datasets, start=1):
        subset = [r for r in rows if r.dataset == dataset]
        methods, classes = _ordered(r.method for r in subset), _ordered(r.class_name for r in subset)
        axes = figure.add_subplot(len(datasets), 1, index)
        width = 0.8 / len(methods)
        for m, method in enumerate(methods):
            per_class = [[r.dice for r in subset if r.method == method and r.class_name == c] for c in classes]
            means = [np.mean(v) if v else np.nan for v in per_class]
            spread = [np.std(v) if v else 0.0 for v in per_class]
            x = np.arange(len(classes)) + (m - (len(methods) - 1) / 2) * width
            axes.bar(x, means, width, yerr=spread, capsize=2, label=method)
        axes.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right")
        axes.set_ylim(0, 1)
        axes.set_ylabel("Dice")
        axes.set_title(dataset)
        axes.legend(fontsize="small")
    figure.tight_layout()
    _save(figure, path)


def _axial_axis(affine: np.ndarray) -> int:
    """Array axis closest to superior-inferior, so overlays show axial slices whatever the storage order."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def plot_overlay(
    image: Volume,
    truth: Volume,
    predictions: Mapping[str, Volume],
    path: str | Path,
    label_names: Mapping[int, str] | None = None,
    title: str = "",
) -> None:
    """Image with truth (green) and prediction (red) contours: one row per class, one column per method.

    Each row shows the axial slice through the centroid of the class in the truth (in the
    predictions if the truth lacks it), cropped around the class; classes absent everywhere are
    left out.
    """
    for method, prediction in predictions.items():
        if not prediction.same_grid(truth, tolerance_mm=1e-2) or not image.same_grid(truth, tolerance_mm=1e-2):
            raise InputError(f"overlay of {method!r}: image, truth and prediction must share one voxel grid.")
    label_names = label_names or {}
    truth_labels = np.asarray(truth.array)
    masks = {method: np.asarray(p.array) for method, p in predictions.items()}
    values = sorted(set(np.unique(truth_labels).tolist()).union(*(np.unique(m).tolist() for m in masks.values())) - {0})
    if not values or not predictions:
        raise InputError("nothing to overlay: no predictions or no labelled voxels in the truth and predictions.")
    axis = _axial_axis(truth.affine)
    in_plane = [a for a in range(3) if a != axis]
    spacing = truth.spacing
    pixels = np.asarray(image.array, dtype=np.float32)
    # Window on the voxels above the minimum: a CT that is mostly air would otherwise show tissue as white.
    foreground = pixels[pixels > pixels.min()]
    low, high = np.percentile(foreground if foreground.size else pixels, [0.5, 99.5])
    methods = list(predictions)
    figure = Figure(figsize=(3.2 * len(methods), 3.2 * len(values)))
    for row, value in enumerate(values):
        truth_mask = truth_labels == value
        union = np.logical_or.reduce([truth_mask] + [m == value for m in masks.values()])
        source = truth_mask if truth_mask.any() else union
        index = int(round(np.argwhere(source)[:, axis].mean()))
        # The panel shows the class's in-plane bounding box (truth and predictions) with as much context again.
        corners = np.argwhere(union)[:, in_plane]
        start, stop = corners.min(0), corners.max(0) + 1
        margin = np.maximum(8, (stop - start) // 2)
        view = [slice(None)] * 3
        view[axis] = index
        for a, first, last, pad in zip(in_plane, start, stop, margin):
            view[a] = slice(max(0, first - pad), min(truth.shape[a], last + pad))
        view = tuple(view)
        for column, method in enumerate(methods):
            predicted = masks[method] == value
            axes = figure.add_subplot(len(values), len(methods), row * len(methods) + column + 1)
            # Transposed so the first in-plane axis runs left to right; aspect from the voxel size.
            axes.imshow(pixels[view].T, cmap="gray", vmin=low, vmax=high, origin="lower",
                        aspect=spacing[in_plane[1]] / spacing[in_plane[0]], interpolation="nearest")
            for mask, color in ((truth_mask, "lime"), (predicted, "red")):
                if mask[view].any():
                    axes.contour(mask[view].T.astype(np.uint8), levels=[0.5], colors=color, linewidths=1.0)
            score = dice(predicted, truth_mask)
            axes.set_title(f"{label_names.get(value, f'label {value}')} | {method} | Dice {score:.2f}", fontsize=8)
            axes.set_axis_off()
    if title:
        figure.suptitle(f"{title} (green: truth, red: prediction)", fontsize=9)
    figure.tight_layout()
    _save(figure, path)


def write_report(rows: Sequence[ResultRow], folder: str | Path, baseline: str | None = None, notes: Sequence[str] = ()) -> dict[str, Path]:
    """CSV, markdown summary and Dice bar plot into ``folder``; returns their paths by kind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "results.csv", "summary": folder / "summary.md", "dice_plot": folder / "dice_per_class.png"}
    write_csv(rows, paths["csv"])
    write_summary(rows, paths["summary"], baseline, notes)
    plot_dice_bars(rows, paths["dice_plot"])
    return paths
