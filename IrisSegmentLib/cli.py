"""`iris-segment`: reference-guided 3D segmentation from the command line (nnU-Net/TotalSegmentator habits).

Every user error ends with one line `error: ...` saying what to do and exit code 2; no output file
is written unless the whole job succeeded, and no input (or its color table) is ever written. Option
values, output paths and the inputs' kinds are checked before the work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, IrisError, ModalityMismatch

STRATEGIES = ("one-shot", "ensemble", "retrieval", "memory")
MAX_TUNING_STEPS = 1000  # IrisSegmentLib.inference.predictor.MAX_TUNING_STEPS, without importing torch to parse options
REFERENCE_FIT_STEPS = 40  # predictor.REFERENCE_FIT_STEPS, likewise
FIT_BELOW = 0.5  # predictor.FIT_BELOW, likewise
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")  # inputs that may have a .ctbl color table beside them


class UsageError(IrisError):
    """A command line argparse refuses (unknown option, missing or bad value)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors reported like every other: one `error: ...` line and exit code 2 from main()."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message.rstrip('.')} (see '{self.prog} --help').")


def _whole_number(low: int, high: int | None = None, what: str = "a whole number"):
    """An argparse type: an integer from `low` to `high` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {what} {bounds}")
        return value

    return parse


def _device_choice(text: str) -> str:
    from .device import check_choice
    from .errors import DeviceError

    try:
        return check_choice(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modality_choice(text: str) -> str:
    name = text.strip().upper().replace("MRI", "MR")
    if name not in ("AUTO", "CT", "MR"):
        raise argparse.ArgumentTypeError(f"unknown modality {text!r}: use auto, CT or MR")
    return "auto" if name == "AUTO" else name


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


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return a.resolve() == b.resolve()


def _sidecar(path: Path) -> Path | None:
    """The .ctbl color table that belongs to a NIfTI or NRRD label map (written with it, read with it)."""
    from .files import color_table_path

    suffix = next((s for s in LABEL_SUFFIXES if path.name.lower().endswith(s) and len(path.name) > len(s)), None)
    return None if suffix is None or path.name.lower().endswith(".seg.nrrd") else color_table_path(path, suffix)


def _check_output(path: Path, inputs: list[Path], overwrite: bool, kind: str = "file") -> None:
    """Refuse, before any work, an output that is not of its kind, would replace an input, an input's color table
    or (without --overwrite) any file, or cannot be written. `kind`: "label map", "task" or "file".

    A label map written as NIfTI or NRRD brings its .ctbl color table: the table obeys the same rules."""
    from .files import check_writable_folder, file_format
    from .io.segmentations import WRITE_SUFFIXES

    path = Path(path)
    if kind == "label map":
        file_format(path, WRITE_SUFFIXES, "write a label map as")
    elif kind == "task" and not path.name.lower().endswith(".safetensors"):
        raise InputError(f"output {path}: a task is written as a .safetensors file; name it e.g. {path.name.split('.')[0] or 'task'}.safetensors.")
    if path.is_dir():
        raise InputError(f"output {path} is a folder: give a file name inside it.")
    sidecar = _sidecar(path) if kind == "label map" else None
    for written in filter(None, (path, sidecar)):
        if any(_same_file(written, given) for given in inputs):
            raise InputError(f"output {written} is one of the inputs: choose another output file, inputs are never overwritten.")
    if sidecar is not None:
        owners = [given for given in inputs if _sidecar(given) is not None and _same_file(sidecar, _sidecar(given))]
        if owners and sidecar.exists():
            raise InputError(
                f"writing {path} would replace {sidecar}, the color table that names the labels of the input {owners[0]}: "
                "choose another output name (or a .seg.nrrd), inputs and their color tables are never overwritten."
            )
    if path.exists() and not overwrite:
        raise InputError(f"output {path} exists: choose another name or pass --overwrite.")
    if sidecar is not None and sidecar.exists() and not overwrite:
        raise InputError(
            f"{sidecar} exists and would be replaced by the color table written with {path.name}: "
            "choose another output name, or pass --overwrite to replace both."
        )
    check_writable_folder(path)


def _check_scan(volume, option: str) -> None:
    """A scan given where a label map belongs is refused (and a label map where a scan belongs, by the engine)."""
    if volume.looks_like_label_map():
        raise InputError(
            f"{option} {volume.name!r} looks like a label map, not a scan ({volume.describe_values()}): "
            "give the scan (the image) there"
            + (", and the label map after it." if option == "--reference IMAGE" else "; did you swap it with the label map?")
        )


def _check_labels(volume, option: str) -> None:
    if volume.looks_like_image():
        raise InputError(
            f"{option} {volume.name!r} looks like a scan, not a label map ({volume.describe_values()}): "
            "give the label map there; did you swap the image and the labels?"
        )


def _modality_mismatch(exc: ModalityMismatch) -> InputError:
    return InputError(
        f"the reference is {exc.reference} but the target looks like {exc.target}: use references of the target's modality, "
        "or pass --allow-modality-mismatch to segment anyway (results are then unreliable)."
    )


def _read_references(references: list[list[str]]):
    """(image, labels) per --reference pair, read and checked (kinds, grids) before any encoding."""
    from .io import read_image, read_label_map

    volumes = []
    for image_path, labels_path in references:
        image = read_image(image_path)
        _check_scan(image, "--reference IMAGE")  # first: a label map given as IMAGE is the likelier mistake to name
        labels = read_label_map(labels_path)
        _check_labels(labels, "--reference LABELS")
        labels.check_matches(image)
        volumes.append((image, labels))
    return volumes


def _encode_references(predictor, volumes, classes, modality, fit_steps: int | None = None, matching: bool = True):
    """A task per (image, labels) reference, with its matching memory unless not `matching`; the classes
    the reference's own segmentation gets below FIT_BELOW Dice are matched (with `matching`) or else
    fitted to it for `fit_steps` optimiser steps (None: REFERENCE_FIT_STEPS; 0: none;
    IrisPredictor.fit_to_reference); the volumes also serve ensemble calibration."""
    fit_steps = REFERENCE_FIT_STEPS if fit_steps is None else fit_steps
    tasks = []
    for image, labels in volumes:
        bar = _progress_bar(f"encoding {labels.name}")
        try:
            task = predictor.encode_reference(image, labels, classes, modality, progress=bar, matching=matching)
        finally:
            bar.close()
        if task.matching_note():
            print(f"{labels.name}: {task.matching_note()}")
        if fit_steps:
            bar = _progress_bar(f"fitting to {labels.name}")
            try:
                task = predictor.fit_to_reference(task, image, labels, steps=fit_steps, progress=bar)
            finally:
                bar.close()
        tasks.append(task)
    return tasks


def _check_modalities(target, volumes, tasks, modality: str, allowed: bool) -> None:
    """The modality check segmenting makes, made before encoding: references (or task files) of another modality than the target."""
    from .preprocessing.intensity import resolve_modality

    if allowed:
        return
    found = resolve_modality(target.array, None)
    given = [resolve_modality(image.array, modality) for image, _ in volumes] + [t.modality for t in tasks if t.modality]
    other = next((m for m in given if m != found), None)
    if other is not None:
        raise _modality_mismatch(ModalityMismatch(other, found))


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

    count = len(args.reference or []) + len(args.task or [])
    strategy = args.strategy or ("ensemble" if count > 1 else "one-shot")
    given = bool(args.reference) + bool(args.task)
    if strategy == "memory":
        if given or not args.classes:
            raise InputError("--strategy memory takes --classes NAMES and no --reference/--task.")
        if args.modality != "auto":
            raise InputError("--modality applies to references; --strategy memory takes the modality of the classes' training set.")
    elif not given:
        raise InputError("give a reference (--reference IMAGE LABELS) or a task file (--task FILE), or use --strategy memory --classes NAMES.")
    if strategy == "one-shot" and count > 1:
        raise InputError("one-shot takes one reference; use --strategy ensemble or retrieval for several.")
    if args.fit_reference is not None and not args.reference:
        raise InputError("--fit-reference fits embeddings to their reference scans: give --reference IMAGE LABELS (a task file is fitted when it is encoded).")
    if args.no_matching and not args.reference:
        raise InputError("--no-matching applies to references being encoded: give --reference IMAGE LABELS (a task file keeps what it was encoded with).")
    if args.top_k is not None and strategy != "retrieval":
        raise InputError(f"--top-k applies to --strategy retrieval only (this run is {strategy}).")
    inputs = [Path(args.target), *[Path(p) for pair in args.reference or [] for p in pair], *[Path(p) for p in args.task or []]]
    output = Path(args.output)
    _check_output(output, inputs, args.overwrite, kind="label map")
    files = [TaskEmbedding.load(p).select(args.classes) for p in args.task or []]
    target = read_image(args.target)
    _check_scan(target, "--target")
    volumes = _read_references(args.reference or [])
    _check_modalities(target, volumes, files, args.modality, args.allow_modality_mismatch or strategy == "memory")
    predictor = _predictor(args)
    if strategy == "memory":
        task_or_pool = predictor.memory_bank_task(args.classes)
    else:
        tasks = _encode_references(predictor, volumes, args.classes, args.modality, args.fit_reference, not args.no_matching) + files
        task_or_pool = tasks if strategy == "retrieval" else _ensemble(predictor, tasks, volumes)
    bar = _progress_bar("segmenting")
    try:
        if strategy == "retrieval":
            result = predictor.segment_with_retrieval(target, task_or_pool, top_k=args.top_k or 1, progress=bar, allow_modality_mismatch=args.allow_modality_mismatch,
                                                      refine=not args.no_refine)
        else:
            result = predictor.segment(target, task_or_pool, progress=bar, allow_modality_mismatch=args.allow_modality_mismatch, refine=not args.no_refine)
    except ModalityMismatch as exc:
        raise _modality_mismatch(exc) from None
    finally:
        bar.close()
    write_label_map(result, output, overwrite=args.overwrite)
    print(f"wrote {output} ({', '.join(s['name'] for s in result.segments.values())})")
    _warn_missing(result)


def _warn_missing(result) -> None:
    """Say which classes came out empty: an all-background class is a finding to check, not a silent success."""
    from .segments import present_labels

    found = set(present_labels(result.array))
    missing = [seg["name"] for value, seg in result.segments.items() if value not in found]
    if missing:
        print(f"warning: nothing found in the target for {', '.join(missing)}: check that the target shows "
              "these structures and that the reference matches its anatomy and modality.", file=sys.stderr)


def cmd_encode(args: argparse.Namespace) -> None:
    output = Path(args.output)
    _check_output(output, [Path(p) for pair in args.reference for p in pair], args.overwrite, kind="task")
    volumes = _read_references(args.reference)
    predictor = _predictor(args)
    task = _ensemble(predictor, _encode_references(predictor, volumes, args.classes, args.modality, args.fit_reference, not args.no_matching), volumes)
    task.save(output)
    print(f"wrote {output}: {len(task.label_values)} classes ({', '.join(task.class_names)}) from {len(args.reference)} reference(s)")


def cmd_tune(args: argparse.Namespace) -> None:
    from .embeddings import TaskEmbedding
    from .io import read_image, read_label_map

    output = Path(args.output)
    _check_output(output, [Path(args.task), Path(args.image), Path(args.labels), *[Path(p) for pair in args.reference or [] for p in pair]],
                  args.overwrite, kind="task")
    task = TaskEmbedding.load(args.task)
    image = read_image(args.image)
    _check_scan(image, "--image")
    corrected = read_label_map(args.labels)
    _check_labels(corrected, "--labels")
    corrected.check_matches(image)
    references = _read_references(args.reference or [])
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
    from .files import staged_write

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
    parser = _Parser(prog="iris-segment", description="Reference-guided 3D segmentation (Iris, Gao et al. CVPR 2025).")
    parser.add_argument("--version", action="version", version=f"IrisSegment {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", help="model weights file (default: the bundled model)")
        p.add_argument("--device", default="auto", type=_device_choice, help="auto (CUDA if present), cpu, cuda or cuda:N")

    def reference_options(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"), required=required, help="a segmented scan; repeat for several")
        p.add_argument("--classes", nargs="+", help="label values or segment names to transfer (default: all)")
        p.add_argument("--modality", default="auto", type=_modality_choice, help="auto, CT or MR (intensity normalisation)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        p.add_argument("--fit-reference", type=_whole_number(0, MAX_TUNING_STEPS, "a number of steps"), default=None, metavar="STEPS",
                       help="before use, fit the embeddings of the classes that the reference's own segmentation gets below Dice "
                            f"{FIT_BELOW} (structures the model does not know) to the reference itself, for STEPS optimiser steps "
                            f"(network frozen; 0 to {MAX_TUNING_STEPS}, default {REFERENCE_FIT_STEPS}; 0: off); with reference "
                            "matching such classes are matched instead, so this applies with --no-matching")
        p.add_argument("--no-matching", action="store_true",
                       help="the network alone: no reference matching (by default the reference's voxels are matched onto the target "
                            "along the network's features, which decides the classes the network does not know)")

    seg = sub.add_parser("segment", help="segment a target scan from references, task files or the memory bank")
    reference_options(seg, required=False)
    seg.add_argument("--task", action="append", help="task embedding file from 'encode' or 'tune'; repeat for several")
    seg.add_argument("--target", required=True, help="scan to segment (NIfTI or NRRD)")
    seg.add_argument("--output", required=True, help="label map to write (.nii.gz, .nrrd or .seg.nrrd)")
    seg.add_argument("--strategy", choices=STRATEGIES, help="default: one-shot for one reference, ensemble for several")
    seg.add_argument("--top-k", type=_whole_number(1, what="a number of references"), help="retrieval: references averaged per class (default 1)")
    seg.add_argument("--allow-modality-mismatch", action="store_true", help="segment even if reference and target modality differ")
    seg.add_argument("--no-refine", action="store_true",
                     help="skip the second pass that segments thin structures again at half the working spacing (faster; "
                          "benchmarks/results/refinement_shipped.md has what it gains)")
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
    tune.add_argument("--output", required=True, help="tuned task file to write (.safetensors)")
    tune.add_argument("--reference", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                      help="a scan the task was encoded from: the corrected scan's context is calibrated with the first, and a class "
                           "that tuning makes segment one worse stays untuned (repeat for several; strongly advised)")
    tune.add_argument("--steps", type=_whole_number(1, MAX_TUNING_STEPS, "a number of steps"),
                      help=f"optimiser steps, 1 to {MAX_TUNING_STEPS} (default: the engine's, 10)")
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
    evaluate.add_argument("--references", type=_whole_number(1, what="a number of cases"), default=1, help="K reference cases (ensemble and retrieval use all K)")
    evaluate.add_argument("--strategy", nargs="+", choices=("one-shot", "ensemble", "retrieval", "tune"), default=["one-shot"])
    evaluate.add_argument("--baseline", choices=["registration", "none"], default="registration")
    evaluate.add_argument("--cases", type=_whole_number(1, what="a number of cases"), help="only the first N held-out cases")
    evaluate.add_argument("--tune-steps", type=_whole_number(1, MAX_TUNING_STEPS, "a number of steps"), help="optimiser steps of each tuning (default: the engine's, 10)")
    evaluate.add_argument("--tuning-cases", type=_whole_number(1, what="a number of cases"), default=3,
                          help="tune separately on each of N corrected training cases and report the mean (one case is one draw)")
    evaluate.add_argument("--overlays", type=_whole_number(0, what="a number of cases"), default=3, help="slice overlays for the first N cases")
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
    try:
        args = build_parser().parse_args(argv)
        if args.func is None:  # 'train' not first: its options belong to python -m IrisSegmentLib.training
            raise UsageError("train takes its options after it: iris-segment train --data ... (see python -m IrisSegmentLib.training --help).")
        args.func(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except IrisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: the computer ran out of memory: close other programs, or crop the scan to the region of interest "
              "(Slicer: Crop Volume); nothing was written.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
