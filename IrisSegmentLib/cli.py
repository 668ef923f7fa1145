"""`iris-segment`: reference-guided 3D segmentation from the command line (nnU-Net/TotalSegmentator habits).

Every user error ends with one line `error: ...` saying what to do and exit code 2; no output file
is written unless the whole job succeeded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, IrisError

STRATEGIES = ("one-shot", "ensemble", "retrieval", "memory")


def _progress_bar(description: str):
    """A tqdm bar driven by the engine's progress(fraction, message) callback."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=description, unit="%", leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction)
        bar.set_postfix_str(message)
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


def _predictor(args: argparse.Namespace):
    from .device import describe
    from .inference.predictor import IrisPredictor
    from .model.weights import load_model

    predictor = IrisPredictor(load_model(args.weights, args.device))
    print(f"model {predictor.model_id} on {describe(predictor.device)}", file=sys.stderr)
    return predictor


def _check_output(path: Path, inputs: list[Path], overwrite: bool, label_map: bool = False) -> None:
    """Refuse, before any work, an output that would overwrite an input or a file, or that cannot be written."""
    if label_map:
        from .io._files import file_format
        from .io.segmentations import WRITE_SUFFIXES

        file_format(path, WRITE_SUFFIXES, "write")
    resolved = path.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise InputError(f"output {path} is one of the inputs: choose another output file, inputs are never overwritten.")
    if path.exists() and not overwrite:
        raise InputError(f"output {path} exists: choose another name or pass --overwrite.")
    if not path.parent.exists():
        raise InputError(f"output folder {path.parent} does not exist: create it first.")


def _encode_references(predictor, references: list[list[str]], classes, modality):
    """(task per reference, (image, labels) per reference): the volumes serve ensemble calibration."""
    from .io import read_image, read_label_map

    tasks, volumes = [], []
    for image_path, labels_path in references:
        volumes.append((read_image(image_path), read_label_map(labels_path)))
        bar = _progress_bar(f"encoding {Path(labels_path).name}")
        try:
            tasks.append(predictor.encode_reference(*volumes[-1], classes, modality, progress=bar))
        finally:
            bar.close()
    return tasks, volumes


def _ensemble(predictor, tasks, volumes):
    """The context ensemble, its thresholds and island removal calibrated on the references when there are several."""
    if len(tasks) < 2:
        return predictor.calibrated_ensemble(tasks, volumes)
    bar = _progress_bar("calibrating the ensemble")
    try:
        task = predictor.calibrated_ensemble(tasks, volumes, progress=bar)
    finally:
        bar.close()
    if volumes:
        print(f"calibrated on the references: {task.calibration_note() or 'threshold 0.5 and every piece kept for all classes'}")
    return task


def cmd_segment(args: argparse.Namespace) -> None:
    from .embeddings import TaskEmbedding
    from .io import read_image, write_label_map

    strategy = args.strategy or ("ensemble" if len(args.reference or []) + len(args.task or []) > 1 else "one-shot")
    given = bool(args.reference) + bool(args.task)
    if strategy == "memory":
        if given or not args.classes:
            raise InputError("--strategy memory takes --classes NAMES and no --reference/--task.")
    elif not given:
        raise InputError("give a reference (--reference IMAGE LABELS) or a task file (--task FILE), or use --strategy memory --classes NAMES.")
    inputs = [Path(args.target), *[Path(p) for pair in args.reference or [] for p in pair], *[Path(p) for p in args.task or []]]
    output = Path(args.output)
    _check_output(output, inputs, args.overwrite, label_map=True)
    target = read_image(args.target)
    predictor = _predictor(args)
    if strategy == "memory":
        task_or_pool = predictor.memory_bank_task(args.classes)
    else:
        tasks, volumes = _encode_references(predictor, args.reference or [], args.classes, args.modality)
        tasks += [TaskEmbedding.load(p).select(args.classes) for p in args.task or []]
        if strategy == "one-shot" and len(tasks) > 1:
            raise InputError("one-shot takes one reference; use --strategy ensemble or retrieval for several.")
        task_or_pool = tasks if strategy == "retrieval" else _ensemble(predictor, tasks, volumes)
    bar = _progress_bar("segmenting")
    try:
        if strategy == "retrieval":
            result = predictor.segment_with_retrieval(target, task_or_pool, top_k=args.top_k, progress=bar, allow_modality_mismatch=args.allow_modality_mismatch)
        else:
            result = predictor.segment(target, task_or_pool, progress=bar, allow_modality_mismatch=args.allow_modality_mismatch)
    finally:
        bar.close()
    write_label_map(result, output, overwrite=args.overwrite)
    print(f"wrote {output} ({', '.join(s['name'] for s in result.segments.values())})")


def cmd_encode(args: argparse.Namespace) -> None:
    output = Path(args.output)
    _check_output(output, [Path(p) for pair in args.reference for p in pair], args.overwrite)
    predictor = _predictor(args)
    task = _ensemble(predictor, *_encode_references(predictor, args.reference, args.classes, args.modality))
    task.save(output)
    print(f"wrote {output}: {len(task.label_values)} classes ({', '.join(task.class_names)}) from {len(args.reference)} reference(s)")


def cmd_tune(args: argparse.Namespace) -> None:
    from .embeddings import TaskEmbedding
    from .io import read_image, read_label_map

    output = Path(args.output)
    _check_output(output, [Path(args.task), Path(args.image), Path(args.labels), *[Path(p) for pair in args.reference or [] for p in pair]], args.overwrite)
    task = TaskEmbedding.load(args.task)
    image, corrected = read_image(args.image), read_label_map(args.labels)
    references = [(read_image(i), read_label_map(l)) for i, l in args.reference or []]
    predictor = _predictor(args)
    bar = _progress_bar("tuning")
    try:
        tuned = predictor.tune(task, image, corrected, steps=args.steps, references=references, progress=bar)
    finally:
        bar.close()
    tuned.save(output)
    losses = predictor.tuning_losses
    print(f"wrote {output}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    if predictor.tuning_untuned:
        print(f"kept untuned, as tuning made them (or a neighbour whose voxels they took) segment the references worse: {', '.join(predictor.tuning_untuned)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation.evaluate import run

    run(args, _predictor(args))


def cmd_pool(args: argparse.Namespace) -> None:
    from .evaluation.report import pooled_markdown, read_csv
    from .io._files import staged_write

    csvs = [folder / "results.csv" for folder in args.reports]
    _check_output(args.output, csvs, args.overwrite)
    rows, report_of = [], {}  # dataset -> the report (its index) it came from
    for n, path in enumerate(csvs):
        for row in read_csv(path):
            if report_of.setdefault(row.dataset, n) != n:
                raise InputError(f"dataset {row.dataset} is in {csvs[report_of[row.dataset]]} and in {path}: pool one report per dataset.")
            rows.append(row)
    summary = pooled_markdown(rows, args.against)
    with staged_write(args.output, overwrite=args.overwrite) as (temporary,):
        temporary.write_text(summary, encoding="utf-8")
    print(summary)
    print(f"written to {args.output}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .device import describe, resolve_device
    from .model.weights import default_weights_path, load_model

    print(f"IrisSegment {__version__}, torch {torch.__version__}")
    print(f"device: {describe(resolve_device(args.device))} (CUDA available: {torch.cuda.is_available()})")
    model = load_model(args.weights, "cpu")
    print(f"weights: {model.weights_path or default_weights_path()}")
    print(f"model id: {model.model_id}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    for key, value in sorted(model.provenance.items()):
        print(f"  {key}: {value}")
    print(f"memory bank: {len(model.config.memory_classes)} classes")


def cmd_score(args: argparse.Namespace) -> None:
    from .evaluation.metrics import score_labels
    from .io import read_label_map

    prediction, truth = read_label_map(args.prediction), read_label_map(args.truth)
    scores = score_labels(prediction, truth)
    print(f"{'class':<28} {'Dice':>6} {'HD95 mm':>8}")
    for value, score in scores.items():
        name = truth.segments.get(value, prediction.segments.get(value, {})).get("name", f"label {value}")
        print(f"{name:<28} {score.dice:6.3f} {score.hd95_mm:8.2f}")
    if scores:
        print(f"{'mean':<28} {sum(s.dice for s in scores.values()) / len(scores):6.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iris-segment", description="Reference-guided 3D segmentation (Iris, Gao et al. CVPR 2025).")
    parser.add_argument("--version", action="version", version=f"IrisSegment {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", help="model weights file (default: the bundled model)")
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")

    def reference_options(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"), required=required, help="a segmented scan; repeat for several")
        p.add_argument("--classes", nargs="+", help="label values or segment names to transfer (default: all)")
        p.add_argument("--modality", default="auto", help="auto, CT or MR (intensity normalisation)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    seg = sub.add_parser("segment", help="segment a target scan from references, task files or the memory bank")
    reference_options(seg, required=False)
    seg.add_argument("--task", action="append", help="task embedding file from 'encode' or 'tune'; repeat for several")
    seg.add_argument("--target", required=True, help="scan to segment (NIfTI or NRRD)")
    seg.add_argument("--output", required=True, help="label map to write (.nii.gz, .nrrd or .seg.nrrd)")
    seg.add_argument("--strategy", choices=STRATEGIES, help="default: one-shot for one reference, ensemble for several")
    seg.add_argument("--top-k", type=int, default=1, help="retrieval: references averaged per class")
    seg.add_argument("--allow-modality-mismatch", action="store_true", help="segment even if reference and target modality differ")
    model_options(seg)
    seg.set_defaults(func=cmd_segment)

    enc = sub.add_parser("encode", help="encode references once into a reusable task file")
    reference_options(enc, required=True)
    enc.add_argument("--output", required=True, help="task file to write (.safetensors)")
    model_options(enc)
    enc.set_defaults(func=cmd_encode)

    tune = sub.add_parser("tune", help="in-context tuning of a task on a corrected segmentation")
    tune.add_argument("--task", required=True)
    tune.add_argument("--image", required=True, help="the scan that was corrected")
    tune.add_argument("--labels", required=True, help="its corrected label map")
    tune.add_argument("--output", required=True, help="tuned task file to write")
    tune.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                      help="a scan the task was encoded from: the corrected scan's context is calibrated with the first, and a class "
                           "that tuning makes segment one worse stays untuned (repeat for several; strongly advised)")
    tune.add_argument("--steps", type=int, help="optimiser steps (default: the engine's, 10)")
    tune.add_argument("--overwrite", action="store_true")
    model_options(tune)
    tune.set_defaults(func=cmd_tune)

    info = sub.add_parser("info", help="version, device, weights and their provenance")
    model_options(info)
    info.set_defaults(func=cmd_info)

    score = sub.add_parser("score", help="Dice and HD95 per class of a segmentation against a reference standard")
    score.add_argument("--prediction", required=True)
    score.add_argument("--truth", required=True)
    score.set_defaults(func=cmd_score)

    evaluate = sub.add_parser("evaluate", help="model vs registration baseline on a labelled dataset, with a report")
    evaluate.add_argument("--data", type=Path, required=True, help="dataset folder: dataset.json, imagesTr/, labelsTr/")
    evaluate.add_argument("--output", type=Path, required=True, help="report folder")
    evaluate.add_argument("--references", type=int, default=1, help="K reference cases (ensemble and retrieval use all K)")
    evaluate.add_argument("--strategy", nargs="+", choices=("one-shot", "ensemble", "retrieval", "tune"), default=["one-shot"])
    evaluate.add_argument("--baseline", choices=["registration", "none"], default="registration")
    evaluate.add_argument("--cases", type=int, help="only the first N held-out cases")
    evaluate.add_argument("--tune-steps", type=int, help="optimiser steps of each tuning (default: the engine's, 10)")
    evaluate.add_argument("--tuning-cases", type=int, default=3,
                          help="tune separately on each of N corrected training cases and report the mean (one case is one draw)")
    evaluate.add_argument("--overlays", type=int, default=3, help="slice overlays for the first N cases")
    model_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    pool = sub.add_parser("pool", help="several datasets' evaluation reports pooled into one paired comparison")
    pool.add_argument("--reports", type=Path, nargs="+", required=True, help="report folders written by 'evaluate'")
    pool.add_argument("--output", type=Path, required=True, help="markdown file to write")
    pool.add_argument("--against", default="one-shot", help="the method every other is paired against (default: one-shot)")
    pool.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    pool.set_defaults(func=cmd_pool)

    train = sub.add_parser("train", help="episodic training (see python -m IrisSegmentLib.training --help)", add_help=False)
    train.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .training.train import main as train_main

        train_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except IrisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
