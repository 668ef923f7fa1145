"""IrisPredictor: encode references once into task embeddings, then segment, tune and retrieve.

Modelled on segment-anything's predictor: the expensive, reusable part (a reference's task
embedding) is computed once and cached by the caller; every target costs one encoder and one
decoder pass per window, for all classes at once, and one more per crop of the second pass for thin
classes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch

from ..device import OutOfMemoryError
from ..embeddings import TaskEmbedding, class_keys, name_key
from ..errors import Cancelled, DeviceError, InputError, ModalityMismatch
from ..model.iris import IrisModel
from ..model.loss import dice_bce_loss
from ..model.weights import model_id_of
from ..preprocessing.grid import Grid, Overlay, aligned_grid, box_world_bounds, covering_grid, crop_grid, fit_spacing, labels_on_grid, resample, round_up
from ..preprocessing.intensity import foreground_box, normalize, resolve_modality
from ..preprocessing.windows import gaussian_weight, windows
from ..segments import complete_segments, label_dtype, present_labels
from ..volume import Volume
from .calibration import choose_keep_largest, choose_thresholds, dice_by_threshold, island_gains, mask_dice
from .islands import drop_islands
from .matching import MATCH_LEVEL, ClassMap, MatchingMemory, OwnScaleMaps, drawn_at_stride
from .retrieval import ReferencePool
from .views import augmented_views

Progress = Optional[Callable[[float, str], None]]  # Optional, not "| None": a runtime alias, evaluated on Python 3.9 too
Cancel = Optional[Callable[[], bool]]
COLLAPSE = 0.05  # Dice a tuned class may lose on the task's own references before it is kept untuned
TUNING_VIEWS = 2  # fresh augmented views of the corrected scan per tuning step (inference/views.py)
TUNING_STEPS = 10  # optimiser steps of Tune; why 10 and not more: IrisPredictor.tune
REFERENCE_FIT_STEPS = 40  # optimiser steps fitting a task to its own reference (fit_to_reference)
REFERENCE_FIT_RATE = 0.1  # their step size, as a share of the embeddings' RMS (Tune's is 0.025)
FIT_BELOW = 0.5  # fit_to_reference fits only the classes its reference's own segmentation gets below this Dice
# Reference matching's share of a class's probability (inference/matching.py, IrisPredictor._judge_on_reference): all
# of it for a class the network segments its own reference below FIT_BELOW Dice with, this much for the others.
# On the generalization benchmark's pairs (shipped model, one-shot) shares 0 / 0.25 / 0.5 scored held-out HeadNeck
# 0.672 / 0.670 / 0.642, Hippocampus 0.825 / 0.824 / 0.820, Abdomen 0.859 / 0.863 / 0.867, Cells_Confocal (unseen,
# where the network knows some cells) 0.265 / 0.269 / 0.282: a quarter keeps the trained structures where they were.
KNOWN_MATCH_WEIGHT = 0.25
# ... but only for a class the matching can draw at its stride-4 grid with at least this Dice (`drawn_at_stride` on
# the reference): a new patient gets no more of it than that. The references of the held-out sets draw Abdomen's
# organs 0.93-0.97, the hippocampus 0.85-0.88 (0.75 mm working voxels, 3 mm stride-4 voxels) and HeadNeck's organs
# 0.00-0.58 (4.5 mm working voxels). A trade, chosen with the held-out results in view: over every held-out case
# (paired, 95 % bootstrap intervals) Hippocampus +0.0013 (+0.0005 to +0.0021: 0.812 to 0.813), HeadNeck -0.0027
# (-0.005 to -0.0004: 0.587 to 0.584, the brainstem -0.011 although it is drawn 0.11), Abdomen unchanged (0.863).
DRAWN_FOR_KNOWN = 0.9
MATCH_SEED = 0.1  # the least first-pass probability that seeds a matched class's second pass (IrisPredictor._seed_level)
# The most classes one reference may hand the engine at once. Segmenting holds about 35 MB per class on a
# 128^3 working grid (343 classes of one reference: 6.0 GB to encode, 12.2 GB to segment), so 128
# classes (TotalSegmentator's 117 fit) stay near 4.5 GB; an instance map with more cells is segmented
# in parts (--classes).
MAX_REFERENCE_CLASSES = 128
MAX_TUNING_STEPS = 1000  # beyond this a tune runs for hours and, by the measurements in IrisPredictor.tune, fits one patient only
MEMORY_MIN_SCALE = 0.25  # a memory-bank row below this share of a well-trained row's norm is refused (memory_bank_task)
INTENSITY_LIMIT = 2.0**40  # MR intensities beyond this are rescaled before normalising (IrisPredictor._normalized)
# The second pass for small classes (IrisPredictor._fine_crops): a class at most THIN_CLASS working voxels thick along
# some axis is seen again at 1/REFINE_FACTOR of the working spacing, in a crop of its own with REFINE_MARGIN fine
# voxels around it, each side REFINE_MIN_SIDE to REFINE_MAX_SIDE voxels (the training crops are 64 a side).
THIN_CLASS = 16
REFINE_FACTOR = 2.0
REFINE_MARGIN = 8
REFINE_MIN_SIDE = 64
REFINE_MAX_SIDE = 128


TargetBody = tuple[torch.Tensor, np.ndarray, np.ndarray]  # a target normalized, and its body's index box (lo, hi)


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def scaled(progress: Progress, start: float, stop: float) -> Progress:
    """`progress` for one part of a longer job: the part's 0 to 1 is reported as `start` to `stop`."""
    return None if progress is None else lambda fraction, message: progress(start + (stop - start) * fraction, message)


@contextmanager
def _device_memory():
    """Out-of-memory on the GPU becomes an error that says what to do, for every entry point."""
    try:
        yield
    except OutOfMemoryError:  # torch.OutOfMemoryError from torch 2.5, torch.cuda.OutOfMemoryError before
        raise DeviceError("the GPU ran out of memory: close other GPU programs, or choose the CPU.") from None


def _check_steps(steps: int) -> None:
    if not 1 <= steps <= MAX_TUNING_STEPS:
        raise InputError(f"the number of tuning steps must be at least 1 and at most {MAX_TUNING_STEPS} (default {TUNING_STEPS}); got {steps}.")


def _check_cancel(cancel: Cancel) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user; nothing was written.")


class IrisPredictor:
    def __init__(self, model: IrisModel) -> None:
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.model_id = model.model_id or model_id_of(model.state_dict(), model.config)
        # Counters a caller (or a test, or the benchmark) can read: work actually done.
        self.references_encoded = 0
        self.decoder_passes = 0
        self.skipped_small: list[str] = []  # classes the last encode_reference(skip_small=True) left out
        # What the last `tune` did, for its caller to report (reset when a tune starts).
        self.tuning_joined = False  # the corrected scan joined the task's context
        self.tuning_untuned: list[str] = []  # classes kept untuned by the check on the references
        self.tuning_losses: list[float] = []  # loss after each optimiser step

    # ------------------------------------------------------------------ references
    def encode_reference(
        self,
        image: Volume,
        labels: Volume,
        classes: list[int | str] | None = None,
        modality: str | None = None,
        progress: Progress = None,
        cancel: Cancel = None,
        skip_small: bool = False,
        check_refinement: bool = True,
        matching: bool = True,
    ) -> TaskEmbedding:
        """All chosen classes of one reference -> one task embedding (one encoder pass, and one per crop
        around its thin classes for the second pass: `_encode_fine`).

        With `matching` the task also keeps the reference's matching memory (inference/matching.py),
        and the network segments the reference to judge, per class, how much the matching decides. With
        `check_refinement` a thin class keeps its second pass only where that segments the reference
        itself better than the first pass alone (both: `_judge_on_reference`).

        A class must cover at least `min_class_voxels` voxels of the working grid: the volume of one
        voxel of the encoder's finest feature map. A smaller one (a stray click, a single marked voxel)
        gives an embedding of a point, not of a structure, and is refused; with `skip_small` it is left
        out of the task instead (a reference with hundreds of instances, some of them specks), and
        `skipped_small` names what was left out."""
        task = self._encode(image, labels, classes, modality, progress, cancel, check_size="skip" if skip_small else "refuse", matching=matching)
        if not (matching or check_refinement and task.refined):
            return task
        return self._judge_on_reference(task, image, labels, matching, check_refinement, cancel)

    def _judge_on_reference(
        self, task: TaskEmbedding, image: Volume, labels: Volume, matching: bool, check_refinement: bool, cancel: Cancel,
    ) -> TaskEmbedding:
        """`task` set up by how the network alone segments its own reference (the matching would find the
        reference in itself): Dice on the reference's grid of the first pass and, for thin classes, of both.

        With `check_refinement` a thin class keeps its second pass only where both passes beat the first
        alone. Some structures lose at the finer spacing even there: on HeadNeck_CT's references the
        larynx fell from 0.50 to 0.44, 0.49 to 0.19 and 0.54 to 0.18 and the esophagus to 0, and over the
        51 held-out cases the larynx from 0.416 to 0.305 while the spinal cord rose from 0.610 to 0.665
        (benchmarks/refinement.py).

        With `matching` a class the network segments below FIT_BELOW Dice that way is one it does not
        know: the reference matching decides it alone (share 1), in the second pass too (a thin class is
        matched again at the finer spacing, against the reference's crop: `_encode_fine`). The others get
        KNOWN_MATCH_WEIGHT of the matching's prior where its stride-4 vote can draw them (DRAWN_FOR_KNOWN),
        none elsewhere but where a target matches the reference exactly. Matching everything lost
        HeadNeck's thin organs, which vanish on the matching's stride-4 grid
        (benchmarks/results/matching_prior_shipped.md: 0.070 against the network's 0.618). The network's
        Dice cannot judge a matched class's second pass, so with `check_refinement` the reference is
        segmented once more, matched, to judge it the same way:
        on TotalSeg_CT_example segmented with itself the second pass raised a right rib from 0.08 to 0.65
        but lowered the small bowel from 0.93 to 0.79."""
        first, both = self._reference_dice(task, image, labels, matching=False, cancel=cancel)
        drawn = self._drawn_by_matching(task, labels) if matching else []
        spacings, fine_tokens, shares = list(task.fine_spacings), task.fine_tokens.clone(), list(task.match_weights)
        for row in range(len(task.label_values)):
            helps = both[row] > first[row]
            unknown = matching and max(first[row], both[row]) < FIT_BELOW
            if matching:
                shares[row] = 1.0 if unknown else KNOWN_MATCH_WEIGHT if drawn[row] >= DRAWN_FOR_KNOWN else 0.0
            if row in task.refined and check_refinement and not helps and not unknown:
                spacings[row], fine_tokens[row] = 0.0, 0.0
        task = replace(task, fine_spacings=spacings, fine_tokens=fine_tokens, match_weights=shares)
        matched = [row for row in task.refined if shares[row] == 1]
        if not (check_refinement and matched):
            return task
        first, both = self._reference_dice(task, image, labels, matching=True, cancel=cancel)
        for row in matched:
            if both[row] <= first[row]:
                spacings[row], fine_tokens[row] = 0.0, 0.0
        return replace(task, fine_spacings=spacings, fine_tokens=fine_tokens)

    def _drawn_by_matching(self, task: TaskEmbedding, labels: Volume) -> list[float]:
        """Per class, how well the matching's stride-4 vote can draw it at the task's working spacing
        (`drawn_at_stride`, on a grid around the reference's labelled voxels)."""
        index = np.argwhere(np.isin(labels.array, task.label_values))
        grid = covering_grid(labels.affine, index.min(0), index.max(0), task.spacing, self.config.total_stride)
        return drawn_at_stride(self._truth_on_grid(labels, grid, task.label_values), self.config.stem_stride * 2**MATCH_LEVEL)

    def _reference_dice(self, task: TaskEmbedding, image: Volume, labels: Volume, matching: bool, cancel: Cancel) -> tuple[list[float], list[float]]:
        """Per class, Dice on a task's own reference of the first pass and of both passes (the first's for a
        class without a second pass), on the reference's grid; with or without the matching."""
        probabilities, grid = self.probabilities(image, task, cancel=cancel, matching=matching)
        onto = Grid(image.shape, image.affine)
        first = self._label_map(task, probabilities, grid, onto)
        both = self._label_map(task, probabilities, grid, onto, lambda kept: self._overlays(image, task, kept, grid, None, cancel, matching)) if task.refined else first
        truth = np.asarray(labels.array)
        firsts, boths = [], []
        for row, value in enumerate(task.label_values):
            true = torch.from_numpy(truth == value)
            firsts.append(mask_dice(torch.from_numpy(first == value), true))
            boths.append(mask_dice(torch.from_numpy(both == value), true) if row in task.refined else firsts[-1])
        return firsts, boths

    @property
    def min_class_voxels(self) -> int:
        """The fewest working-grid voxels a reference class may cover: one voxel of the finest feature map."""
        return self.config.stem_stride**3

    def _encode(
        self, image: Volume, labels: Volume, classes: list[int | str] | None, modality: str | None,
        progress: Progress, cancel: Cancel, check_size: str | None, matching: bool,
    ) -> TaskEmbedding:
        """`encode_reference` up to its checks on the reference (the matching memory kept, its share not
        yet judged); `check_size` "refuse" or "skip" (see there), None for a corrected scan joining a task
        (Tune takes its classes as the user left them)."""
        self.skipped_small = []
        image.check_image()
        labels.check_label_map()
        labels.check_matches(image)
        if labels.looks_like_image():
            raise InputError(
                f"label map {labels.name!r} looks like a scan, not a segmentation ({labels.describe_values()}): "
                "give the reference's label map as LABELS, after its IMAGE."
            )
        present = present_labels(labels.array)
        if not present:
            raise InputError(f"reference label map {labels.name!r} has no labelled voxels: segment at least one structure in it.")
        segments = complete_segments(labels.segments, present)
        values = self._resolve_classes(classes, present, segments, labels.name)
        if len(values) > MAX_REFERENCE_CLASSES:
            raise InputError(
                f"reference label map {labels.name!r} holds {len(values)} classes ({labels.describe_values()}); one reference "
                f"can hand the engine at most {MAX_REFERENCE_CLASSES} at once (each costs about 35 MB of memory): choose up to "
                f"{MAX_REFERENCE_CLASSES} of them (--classes, or untick them) and segment the rest in another run. If it is a scan, "
                "not a label map, give it as the IMAGE."
            )
        modality = resolve_modality(image.array, modality)
        _report(progress, 0.1, "preparing the reference")
        normalized, spacing, views = self.reference_on_grid(image, labels, values, segments, modality)
        grid, _, masks = views[0]
        if check_size is not None:
            kept, masks = self._large_enough(masks, values, segments, labels.name, spacing, skip=check_size == "skip")
            views = [(g, pixels, view_masks[[values.index(v) for v in kept]]) for g, pixels, view_masks in views]
            values = kept
        _check_cancel(cancel)
        _report(progress, 0.4, "encoding the reference")
        with torch.no_grad(), _device_memory():
            encoded = [(self.model.encoder(pixels[None]), view_masks, view_grid) for view_grid, pixels, view_masks in (views if matching else views[:1])]
            tokens = self.model.task_tokens(encoded[0][0], encoded[0][1][None])[0]
            memory = MatchingMemory.of_views([MatchingMemory.of_reference(f, m, g.affine) for f, m, g in encoded]) if matching else None
        _report(progress, 0.7, "encoding small classes at a finer spacing")
        fine_tokens, fine_spacings, fine_memory = self._encode_fine(normalized, image, labels, values, masks, grid, cancel, matching)
        self.references_encoded += 1
        _report(progress, 1.0, "reference encoded")
        return TaskEmbedding(
            tokens.float().cpu(), values, {v: segments[v] for v in values}, modality, spacing, self.model_id,
            [labels.name or image.name or "reference"], fine_tokens=fine_tokens, fine_spacings=fine_spacings, memory=memory,
            fine_memory=fine_memory,
        )

    def reference_on_grid(
        self, image: Volume, labels: Volume, values: list[int], segments: dict[int, dict], modality: str,
    ) -> tuple[torch.Tensor, float, list[tuple[Grid, torch.Tensor, torch.Tensor]]]:
        """What the encoder sees of a reference: its normalized image, the working spacing (the body
        fitted to the working size) and its views, each a working grid with the image (1, *grid) and
        one mask per class (K, *grid) there. The first view is a crop of that size centred on the
        classes (the task tokens come from it); the second, where it differs, the grid a target gets
        (`_working_target`: the body), where the reference's matching memory sees the reference framed
        as a target is, voxel for voxel on the reference itself."""
        lo, hi = foreground_box(image.array, modality)
        spacing = fit_spacing(image.affine, lo, hi, self.config.working_size)
        self._check_extent(image, spacing, "reference")
        idx = np.argwhere(np.isin(labels.array, values))
        center_index = (idx.min(0) + idx.max(0)) / 2
        center = image.affine[:3, :3] @ center_index + image.affine[:3, 3]
        grids = [crop_grid(image.affine, image.shape, center, spacing, self.config.working_size, self.config.total_stride)]
        if (idx.min(0) >= lo).all() and (idx.max(0) <= hi).all():
            body = covering_grid(image.affine, lo, hi, spacing, self.config.total_stride, max_size=self.config.working_size)
            if body.shape != grids[0].shape or not np.allclose(body.affine, grids[0].affine):
                grids.append(body)
        normalized = self._normalized(image, modality)
        return normalized, spacing, [(grid, resample(normalized, image.affine, grid), self._class_masks(labels, values, grid, segments)) for grid in grids]

    def _encode_fine(
        self, normalized: torch.Tensor, image: Volume, labels: Volume, values: list[int], masks: torch.Tensor, grid: Grid, cancel: Cancel,
        matching: bool,
    ) -> tuple[torch.Tensor, list[float], MatchingMemory | None]:
        """Each thin class of the reference encoded again in a crop around it at a finer spacing (classes
        close together share a crop): the tokens the second pass of `segment` uses and, with `matching`,
        the crops' matching memory (each crop a reference of its classes). A class that is not thin, or a
        reference whose own voxels are no finer than the working grid's, gets none (spacing 0)."""
        spacings = [0.0] * len(values)
        fine_tokens = torch.zeros((len(values), self.config.tokens_per_class, self.config.token_dim))
        spacing = self._fine_spacing(image, float(grid.spacing[0]))
        if not spacing:
            return fine_tokens, spacings, None
        boxes = {row: box for row, box in enumerate(_world_boxes(masks, grid)) if box is not None and self._thin(box, float(grid.spacing[0]))}
        memories = []
        for crop, rows in self._fine_crops(boxes, spacing):
            _check_cancel(cancel)
            truth = self._truth_on_grid(labels, crop, [values[r] for r in rows])
            with torch.no_grad(), _device_memory():
                features = self.model.encoder(resample(normalized, image.affine, crop)[None])
                tokens = self.model.task_tokens(features, truth[None])[0]
                if matching:
                    memories.append((MatchingMemory.of_reference(features, truth), [rows.index(r) if r in rows else None for r in range(len(values))]))
            for n, row in enumerate(rows):
                fine_tokens[row], spacings[row] = tokens[n].float().cpu(), spacing
        return fine_tokens, spacings, MatchingMemory.combine(memories) if memories else None

    @staticmethod
    def _fine_spacing(volume: Volume, spacing: float) -> float:
        """The second pass's spacing: 1/REFINE_FACTOR of the working spacing, never finer than 3/4 of the
        volume's finest voxel; 0 when that is not finer than the working spacing by a fifth at least."""
        fine = max(spacing / REFINE_FACTOR, 0.75 * float(volume.spacing.min()))
        return fine if fine <= 0.8 * spacing else 0.0

    @staticmethod
    def _thin(box: tuple[np.ndarray, np.ndarray], spacing: float) -> bool:
        """A class whose box is at most THIN_CLASS working voxels along some axis: a few voxels across."""
        return float((box[1] - box[0]).min()) <= THIN_CLASS * spacing

    def _task_crops(self, task: TaskEmbedding, boxes: dict[int, tuple[np.ndarray, np.ndarray] | None]) -> list[tuple[Grid, list[int]]]:
        """The second pass's crops (`_fine_crops`, per fine spacing) around `boxes`, the RAS boxes of some of
        the task's thin classes by row (None: not found)."""
        boxes = {row: box for row, box in boxes.items() if box is not None}
        return [crop for spacing in sorted({task.fine_spacings[r] for r in boxes})
                for crop in self._fine_crops({r: b for r, b in boxes.items() if task.fine_spacings[r] == spacing}, spacing)]

    def _fine_examples(
        self, image: Volume, labels: Volume, task: TaskEmbedding, truth: torch.Tensor, grid: Grid,
    ) -> list[tuple[list[torch.Tensor], torch.Tensor, list[int]]]:
        """(encoder features, masks, task rows) of the crops the second pass sees around the thin classes of
        a labelled scan (`truth`: its masks of every task class on working `grid`): what tuning fits the
        fine tokens on, so the second pass does not undo what tuning taught the first."""
        if not task.refined:
            return []
        crops = self._task_crops(task, dict(zip(task.refined, _world_boxes(truth[task.refined], grid))))
        if not crops:
            return []
        normalized = self._normalized(image, task.modality or resolve_modality(image.array, None))
        examples = []
        for crop, rows in crops:
            with torch.no_grad():
                features = self.model.encoder(resample(normalized, image.affine, crop)[None])
            examples.append((features, self._truth_on_grid(labels, crop, [task.label_values[r] for r in rows])[None], rows))
        return examples

    def _fine_crops(self, boxes: dict[int, tuple[np.ndarray, np.ndarray]], spacing: float) -> list[tuple[Grid, list[int]]]:
        """Crops at `spacing` for the rows of `boxes` (RAS min/max of each class): one around each class not
        yet inside an earlier crop (largest first), holding every class whose box lies inside it with
        REFINE_MARGIN voxels to spare. A class too long for REFINE_MAX_SIDE voxels is left out."""
        margin = REFINE_MARGIN * spacing
        fits = {row: box for row, box in boxes.items() if ((box[1] - box[0]) / spacing + 2 * REFINE_MARGIN <= REFINE_MAX_SIDE).all()}
        pending = sorted(fits, key=lambda row: -float(np.prod(fits[row][1] - fits[row][0])))
        crops = []
        while pending:
            wmin, wmax = fits[pending[0]]
            sides = [min(REFINE_MAX_SIDE, max(REFINE_MIN_SIDE, round_up(e / spacing, self.config.total_stride))) for e in (wmax - wmin) + 2 * margin]
            centred = aligned_grid((wmin + wmax) / 2, spacing, tuple(sides))
            crop = self._on_lattice(centred, spacing, fits[pending[0]], margin) or centred
            rows = [row for row in pending if _holds(crop, fits[row], margin)]
            crops.append((crop, rows))
            pending = [row for row in pending if row not in rows]
        return crops

    def _on_lattice(self, crop: Grid, spacing: float, box: tuple[np.ndarray, np.ndarray], margin: float) -> Grid | None:
        """`crop` moved (by less than the network's total stride) so that its first voxel lies on the RAS
        lattice of total-stride voxels: crops at one spacing then see a structure alike wherever they are
        cut, the reference's crop and the target's included, so the matching finds the same features at the
        same place. Grown by one stride where that still fits REFINE_MAX_SIDE; None where the moved crop no
        longer holds `box` with `margin` to spare."""
        step = spacing * self.config.total_stride
        shape = tuple(min(REFINE_MAX_SIDE, n + self.config.total_stride) for n in crop.shape)
        affine = crop.affine.copy()
        affine[:3, 3] = np.floor((affine[:3, 3] + 1e-6) / step) * step
        moved = Grid(shape, affine)
        return moved if _holds(moved, box, margin) else None

    def _large_enough(
        self, masks: torch.Tensor, values: list[int], segments: dict[int, dict], name: str, spacing: float, skip: bool,
    ) -> tuple[list[int], torch.Tensor]:
        """The classes (values, masks) that cover at least `min_class_voxels` working voxels. A smaller one is
        refused, or with `skip` left out and named in `skipped_small` (refused when none is left)."""
        least = self.min_class_voxels
        sizes = masks.flatten(1).sum(1).tolist()
        keep = [size >= least for size in sizes]
        if all(keep):
            return values, masks
        if skip and any(keep):
            self.skipped_small = [segments[v]["name"] for v, k in zip(values, keep) if not k]
            return [v for v, k in zip(values, keep) if k], masks[torch.tensor(keep)]
        if skip:
            raise InputError(f"every class of reference label map {name!r} covers fewer than {least} voxels of the working grid: label whole structures.")
        small = [f"{segments[v]['name']!r} covers {size:.0f}" for v, size, k in zip(values, sizes, keep) if not k]
        edge = spacing * self.config.stem_stride
        raise InputError(
            f"reference label map {name!r}: class {'; class '.join(small)} voxel(s) of the {spacing:.2f} mm working grid, fewer than "
            f"{least}, the least the model can encode (one voxel of its finest features, {edge:.1f} x {edge:.1f} x {edge:.1f} mm): "
            "label the whole structure, or leave such classes out (--classes, or untick them)."
        )

    def _check_extent(self, volume: Volume, spacing: float, what: str) -> None:
        """Refuse a volume shorter, along one of its axes, than one voxel of the network's coarsest feature map at
        the working spacing: the rest of the working grid would be padding, and the network finds nothing there
        (a single slice, or a few thin slices, segmented to all background). Not more than one: real slabs
        (fetal MR stacks 72-79 mm deep, a CT of 60 mm) are half that of the 128-voxel working cube and
        segment."""
        least = self.config.total_stride * spacing
        lengths = np.asarray(volume.shape) * volume.spacing
        for axis, (count, length) in enumerate(zip(volume.shape, lengths)):
            if length < least - 1e-6:
                raise InputError(
                    f"the {what} {volume.name or what!r} is {length:.1f} mm long along voxel axis {axis} ({count} voxel{'s' * (count != 1)} of "
                    f"{volume.spacing[axis]:.2f} mm); the network needs at least {least:.1f} mm there (one voxel of its coarsest "
                    f"features at the working spacing of {spacing:.2f} mm). IrisSegment segments 3D volumes: give a scan that "
                    "covers more of the anatomy along that axis (more slices, or a larger field of view)."
                )

    def _resolve_classes(self, classes: list[int | str] | None, present: list[int], segments: dict[int, dict], name: str) -> list[int]:
        if not classes:
            return present
        by_name = {name_key(seg["name"]): v for v, seg in segments.items()}
        values = []
        for c in classes:
            value = int(c) if str(c).isdigit() else by_name.get(name_key(str(c)))
            if value not in present:
                listing = ", ".join(f"{v} ({segments[v]['name']})" for v in present)
                raise InputError(f"class {c!r} is not in reference label map {name!r} (empty or absent); it holds: {listing}.")
            values.append(value)
        return list(dict.fromkeys(values))

    def _class_masks(self, labels: Volume, values: list[int], grid: Grid, segments: dict[int, dict]) -> torch.Tensor:
        """Binary masks (K, *grid) of the chosen classes on the working grid (`_truth_on_grid`); a chosen
        class with no voxel there lies outside the grid, which is an error, not a silent loss."""
        masks = self._truth_on_grid(labels, grid, values)
        for k, v in enumerate(values):
            if masks[k].sum() == 0:
                raise InputError(
                    f"class {segments[v]['name']!r} lies outside the {self.config.working_size}-voxel reference crop around the chosen classes: "
                    "encode classes that lie far apart from separate references."
                )
        return masks

    # ------------------------------------------------------------------ targets
    def segment(
        self,
        target: Volume,
        task: TaskEmbedding,
        progress: Progress = None,
        cancel: Cancel = None,
        allow_modality_mismatch: bool = False,
        refine: bool = True,
    ) -> Volume:
        """Every class of the task on the target, in one decoder pass per window; result on the target's grid.

        With `refine`, the task's thin classes (those with fine tokens) found by that pass are segmented
        again at the finer spacing of their fine tokens, in crops around what was found (one decoder pass
        per crop, all classes of the crop at once); inside a crop their probabilities replace the first
        pass's."""
        probabilities, grid = self.probabilities(target, task, scaled(progress, 0.0, 0.85), cancel, allow_modality_mismatch)

        def second_pass(kept: torch.Tensor) -> list[Overlay]:
            overlays = self._overlays(target, task, kept, grid, scaled(progress, 0.85, 0.95), cancel) if refine else []
            _report(progress, 0.95, "mapping the result back to the target grid")
            return overlays

        labels = self._label_map(task, probabilities, grid, Grid(target.shape, target.affine), second_pass)
        _check_cancel(cancel)
        _report(progress, 1.0, "done")
        return Volume(
            labels.astype(label_dtype(max(task.label_values))), target.affine.copy(), name=f"{target.name or 'target'} segmentation",
            segments={v: dict(task.segments.get(v, {})) for v in task.label_values},
        )

    def probabilities(
        self, target: Volume, task: TaskEmbedding, progress: Progress = None, cancel: Cancel = None, allow_modality_mismatch: bool = False,
        matching: bool = True, exact: bool = True,
    ) -> tuple[torch.Tensor, Grid]:
        """Per-class probabilities (K, *grid) on the working grid of the target: the network's, blended per
        class with the reference matching's prior by the task's matching shares (unless not `matching`:
        the network alone, as when judging the network on a reference, which matches itself); without
        `exact`, as if the target were a new patient (`MatchingMemory.match`)."""
        self._check_task(task)
        target.check_image()
        modality = resolve_modality(target.array, None)
        if task.modality and modality != task.modality and not allow_modality_mismatch:
            raise ModalityMismatch(task.modality, modality)
        body = self._target_body(target, task.modality or modality)
        pixels, grid = self._body_on_grid(target, body, task.spacing)
        tokens = task.tokens.to(self.device, torch.float32)[None]
        tiles = windows(grid.shape, self.config.working_size)
        total = torch.zeros((len(task.label_values), *grid.shape), device=self.device)
        weight_sum = torch.zeros(grid.shape, device=self.device)
        memory = task.memory if matching else None
        own_scale = self._own_scale_maps(target, body, task.spacing, memory) if memory is not None else None
        with torch.no_grad():
            for n, tile in enumerate(tiles):
                _check_cancel(cancel)
                _report(progress, 0.1 + 0.8 * n / len(tiles), f"segmenting window {n + 1} of {len(tiles)}")
                with _device_memory():
                    window = grid.tile(tile)
                    found = self._window_probabilities(pixels[(slice(None), *tile)][None], tokens, memory, task.match_weights, exact, window.affine,
                                                       own_scale)
                self.decoder_passes += 1
                weight = gaussian_weight(found.shape[1:], self.device) if len(tiles) > 1 else torch.ones(found.shape[1:], device=self.device)
                total[(slice(None), *tile)] += found * weight
                weight_sum[tile] += weight
        return total / weight_sum.clamp_min(1e-6), grid

    @staticmethod
    def _label_map(
        task: TaskEmbedding, probabilities: torch.Tensor, grid: Grid, onto: Grid, second_pass: Callable[[torch.Tensor], list[Overlay]] | None = None,
    ) -> np.ndarray:
        """The task's decision (islands dropped, per-class thresholds, classes competing) on
        probabilities over working `grid`, as a label map on `onto`: one rule for segmenting and for
        checking a tuned task on its references. `second_pass` makes the overlays of the finer pass
        from the first pass's kept probabilities."""
        probabilities = drop_islands(probabilities, task.thresholds, task.keep_largest)
        overlays = second_pass(probabilities) if second_pass is not None else []
        return labels_on_grid(probabilities, grid.affine, onto, task.label_values, task.thresholds, overlays=overlays)

    def _overlays(
        self, target: Volume, task: TaskEmbedding, kept: torch.Tensor, grid: Grid, progress: Progress, cancel: Cancel, matching: bool = True,
    ) -> list[Overlay]:
        """The second pass: the task's thin classes that the first pass found (`kept`: its probabilities
        with islands dropped) segmented again in crops around them at their fine spacing, islands dropped
        alike. It redraws what the first pass found, not more: a class's probabilities are kept only
        within REFINE_MARGIN fine voxels of the box the first pass found it in. A class the first pass
        found too long for a crop keeps the first pass's result. Without `matching` the network alone
        (`probabilities`). Its matching is not placed (MatchingMemory.match): the first pass, placed,
        already chose where the crops lie."""
        rows = task.refined
        if not rows:
            return []
        boxes = dict(zip(rows, _world_boxes(torch.stack([kept[r] > self._seed_level(task, r, kept[r]) for r in rows]), grid)))
        crops = self._task_crops(task, boxes)
        if not crops:
            return []
        normalized = self._normalized(target, task.modality or resolve_modality(target.array, None))
        overlays = []
        for n, (crop, members) in enumerate(crops):
            _check_cancel(cancel)
            _report(progress, n / len(crops), f"segmenting small structures: crop {n + 1} of {len(crops)}")
            memory = task.fine_memory.select(members) if matching and task.fine_memory is not None else None
            with torch.no_grad(), _device_memory():
                found = self._window_probabilities(resample(normalized, target.affine, crop)[None], task.fine_tokens[members].to(self.device, torch.float32)[None],
                                                   memory, [task.match_weights[r] for r in members])
            self.decoder_passes += 1
            probabilities = torch.zeros_like(found)
            for k, row in enumerate(members):
                margin = REFINE_MARGIN * task.fine_spacings[row]
                lo, hi = crop.index_box(boxes[row][0] - margin, boxes[row][1] + margin)
                near = (k, *(slice(a, b) for a, b in zip(lo, hi)))
                probabilities[near] = found[near]
            probabilities = drop_islands(probabilities, [task.thresholds[r] for r in members], [task.keep_largest[r] for r in members])
            overlays.append(Overlay(members, probabilities, crop))
        return overlays

    def _window_probabilities(
        self, window: torch.Tensor, tokens: torch.Tensor, memory: MatchingMemory | None, shares: list[float], exact: bool = True,
        affine: np.ndarray | None = None, own_scale: OwnScaleMaps | None = None,
    ) -> torch.Tensor:
        """Per-class probabilities (K, *window) of one window (batch of one) for (1, K, T, D) `tokens`: the
        network's, blended per class with `memory`'s matched prior by `shares` (when there is a memory), and
        all the prior where the window sees the reference's own anatomy (an exact match:
        `MatchingMemory.match`, unless not `exact`), whatever the share; the encoder runs once for both. The
        window's index -> RAS `affine` places the matched votes (`own_scale`: `_own_scale_maps`)."""
        features = self.model.encoder(window)
        size = tuple(window.shape[2:])
        found = torch.sigmoid(self.model.decoder(features, tokens, size)[0])
        if memory is None or not (exact or any(shares)):
            return found
        prior, seen = memory.match(features, size, exact, affine, own_scale)
        weight = torch.tensor(shares, device=self.device)[:, None, None, None]
        weight = weight + (1 - weight) * seen[None]
        return (1 - weight) * found + weight * prior

    def _own_scale_maps(self, target: Volume, body: TargetBody, spacing: float, memory: MatchingMemory) -> OwnScaleMaps | None:
        """For an ensemble's placing (MatchingMemory.match): a reference's maps per class found, when first
        asked, with the target (its `body`, `_target_body`) at that reference's own working spacing, where its
        one-shot finds them (best over the windows there); none for a reference encoded at the ensemble's `spacing`, or one whose own
        spacing makes the target too large. A few percent of scale can cost a reference its map: Fetal_Brain_MRI
        fetal_run6's pairs around the brain of fetal_t30_axial1 agree on a map at run6's 3.52 mm (23 pairs) and on
        none at the 3-reference ensemble's 3.26 mm; with run6's map the only right one, that ensemble scored
        0.000 against run6's one-shot 0.687."""
        if memory.spacings is None or memory.positions is None or memory.holds.shape[1] < 2:
            return None
        found: dict[int, dict[int, ClassMap]] = {}

        def maps(reference: int) -> dict[int, ClassMap]:
            if reference in found:
                return found[reference]
            found[reference] = best = {}
            own = float(memory.spacings[reference])  # type: ignore[index]
            if abs(own - spacing) <= 0.01 * spacing:
                return best
            try:
                pixels, grid = self._body_on_grid(target, body, own)
            except InputError:
                return best
            for tile in windows(grid.shape, self.config.working_size):
                window = grid.tile(tile)
                with torch.no_grad(), _device_memory():
                    features = self.model.encoder(pixels[(slice(None), *tile)][None])
                    for row, found_map in memory.maps_of_reference(features, window.shape, window.affine, reference).items():
                        if row not in best or found_map.inliers > best[row].inliers:
                            best[row] = found_map
            return best
        return maps

    @staticmethod
    def _seed_level(task: TaskEmbedding, row: int, probability: torch.Tensor) -> float:
        """Where the first pass must find a thin class for the second pass to look again: above its
        threshold; for a class the matching decides alone, above half its highest first-pass value
        (at least MATCH_SEED) if that is lower. The matching's first pass votes with the class's share
        of each stride-4 voxel, which stays below 0.5 for a structure thinner than half a voxel."""
        threshold = task.thresholds[row]
        if task.match_weights[row] < 1:
            return threshold
        return max(MATCH_SEED, min(threshold, 0.5 * float(probability.max())))

    def _working_target(self, target: Volume, modality: str, spacing: float) -> tuple[torch.Tensor, Grid]:
        """The target's body region on an RAS grid at the task's spacing (the target's own fit when 0)."""
        return self._body_on_grid(target, self._target_body(target, modality), spacing)

    def _target_body(self, target: Volume, modality: str) -> TargetBody:
        """The target normalized and its body's index box: what its working grid at any spacing is cut from."""
        lo, hi = foreground_box(target.array, modality)
        return self._normalized(target, modality), lo, hi

    def _body_on_grid(self, target: Volume, body: TargetBody, spacing: float) -> tuple[torch.Tensor, Grid]:
        """`_working_target` from the target's `body` (`_target_body`)."""
        normalized, lo, hi = body
        spacing = spacing or fit_spacing(target.affine, lo, hi, self.config.working_size)
        self._check_extent(target, spacing, "target")
        grid = covering_grid(target.affine, lo, hi, spacing, self.config.total_stride)
        return resample(normalized, target.affine, grid), grid

    @staticmethod
    def _classes_in(task: TaskEmbedding, labels: Volume) -> list[tuple[int, int]]:
        """(task row, label value) of each task class that a labelled scan holds, matched as ensembles
        match classes (terminology, else name, else value)."""
        present = present_labels(labels.array)
        value_of = dict(zip(class_keys(present, complete_segments(labels.segments, present)), present))
        return [(row, value_of[key]) for row, key in enumerate(task.class_keys()) if key in value_of]

    def _truth_on_grid(self, labels: Volume, grid: Grid, values: list[int]) -> torch.Tensor:
        """Binary masks (K, *grid) of `values` in a label map on a working grid.

        Nearest-neighbour labels; a structure thinner than a working voxel that vanishes that way is
        taken from its linearly resampled mask instead, so it is neither lost when encoding nor taught
        as absent when tuning or fitting. A value the label map does not hold stays empty."""
        source = torch.from_numpy(labels.array.astype(np.int32))[None].to(self.device)
        nearest = resample(source, labels.affine, grid, mode="nearest")[0].round().long()
        masks = torch.stack([(nearest == v).float() for v in values])
        for k, v in enumerate(values):
            if masks[k].sum() == 0:
                soft = resample((source == v).float(), labels.affine, grid)[0]
                if soft.max() > 0:
                    masks[k] = (soft >= 0.5 * soft.max()).float()
        return masks

    def _normalized(self, image: Volume, modality: str) -> torch.Tensor:
        return torch.from_numpy(normalize(_in_float32_range(image.array, modality), modality))[None].to(self.device)

    def _check_task(self, task: TaskEmbedding) -> None:
        if task.model_id != self.model_id:
            raise InputError(
                f"this task was made by another model ({task.model_id}; loaded: {self.model_id}); "
                "re-encode the references with the loaded model."
            )

    # ------------------------------------------------------------------ ensembles
    def calibrated_ensemble(
        self, tasks: list[TaskEmbedding], references: list[tuple[Volume, Volume]], progress: Progress = None, cancel: Cancel = None,
    ) -> TaskEmbedding:
        """Context ensemble of `tasks` with per-class thresholds and island removal fitted
        leave-one-out: each reference is segmented with the ensemble of the other tasks and scored
        against its own labels (inference/calibration.py); islands are judged at the chosen
        thresholds. The references are segmented as new patients (no exact matches: `probabilities`):
        scans of one patient match each other exactly, and Fetal_Brain_MRI's runs of one fetus,
        calibrated with their exact matches, lost a new fetus from 0.75 to 0.11 Dice. references[i] is
        the (image, labels) tasks[i] was encoded from; tasks beyond them (loaded task files) only take
        part in the ensembles."""
        if len(references) > len(tasks):
            raise ValueError("every reference needs the task encoded from it")
        ensemble = TaskEmbedding.ensemble(tasks)
        if len(tasks) < 2:
            return ensemble
        row_of = {key: row for row, key in enumerate(ensemble.class_keys())}
        curves, seen = [], []  # seen: (probabilities, truth, ensemble rows) per held-out reference
        for i, (image, labels) in enumerate(references):
            _check_cancel(cancel)
            _report(progress, 0.9 * i / len(references), f"calibrating on reference {i + 1} of {len(references)}")
            others = TaskEmbedding.ensemble(tasks[:i] + tasks[i + 1:])
            held_out = self._classes_in(others, labels)
            if not held_out:
                continue
            probabilities, grid = self.probabilities(image, replace(others.select([others.label_values[r] for r, _ in held_out]), spacing=ensemble.spacing),
                                                     exact=False)
            probabilities, truth = probabilities.cpu(), self._truth_on_grid(labels, grid, [v for _, v in held_out]).bool().cpu()
            found = dice_by_threshold(probabilities, truth)
            keys = others.class_keys()
            rows = [row_of[keys[r]] for r, _ in held_out]
            curve = torch.full((len(ensemble.label_values), found.shape[1]), float("nan"))
            curve[rows] = found
            curves.append(curve)
            seen.append((probabilities, truth, rows))
        if not curves:
            return ensemble
        thresholds = choose_thresholds(curves, ensemble.thresholds)
        gains = []
        for i, (probabilities, truth, rows) in enumerate(seen):
            _check_cancel(cancel)
            _report(progress, 0.9 + 0.1 * i / len(seen), "checking for stray islands")
            gain = torch.full((len(ensemble.label_values),), float("nan"))
            gain[rows] = island_gains(probabilities, truth, [thresholds[r] for r in rows])
            gains.append(gain)
        _report(progress, 1.0, "ensemble calibrated")
        return replace(ensemble, thresholds=thresholds, keep_largest=choose_keep_largest(gains, ensemble.keep_largest))

    # ------------------------------------------------------------------ tuning
    def tune(
        self,
        task: TaskEmbedding,
        image: Volume,
        corrected: Volume,
        steps: int | None = None,
        learning_rate: float | None = None,
        references: list[tuple[Volume, Volume]] = (),
        progress: Progress = None,
        cancel: Cancel = None,
        views: int = TUNING_VIEWS,
        join_context: bool = True,
    ) -> TaskEmbedding:
        """In-context tuning: the network stays frozen; only the task embeddings are optimised.

        With `join_context` the corrected scan first joins the task's context: it is encoded as one
        more reference of the task's classes it holds (one encoder pass), averaged in as a context
        ensemble does and, with a reference at hand, calibrated on the pair (`join`);
        optimising starts from there. A corrected scan is a labelled scan like any reference, and on
        OpenKBP what transfers to the next patient is the encoder's view of a second patient, not an
        embedding fitted to one. On 20 validation cases (reference pt_100, five corrected patients
        tuned separately) the step-7,000 model lost 0.010 Dice against one-shot when tuned from the
        reference alone, and at step 9,000 tuning from the uncalibrated pair (30 steps) lost 0.015;
        the calibrated pair gains (figures below). On Hippocampus, where one-shot under-segments every
        patient alike, the optimising is what helps (step 7,000: +0.017 from the reference alone,
        +0.000 from the uncalibrated pair without optimising).

        `steps` (default TUNING_STEPS, 10), from benchmarks/tuning.py at step 9,000 (validation cases;
        mean Dice gained over one-shot with 0 / 5 / 10 / 20 / 30 steps, 0 being the calibrated pair
        alone): HeadNeck +0.015 / +0.016 / +0.013 / +0.013 / +0.011 (5 corrected patients),
        Hippocampus +0.014 / +0.013 / +0.017 / +0.016 / +0.016 (5), Abdomen +0.007 / +0.004 / +0.006 /
        +0.004 / +0.004 (3). Past 10 steps the corrected patient is fitted at the next ones' expense;
        the pair alone does as well on HeadNeck and Abdomen, and the optimising earns its time on
        Hippocampus. 10 has the best mean over the three sets (+0.0123; the pair alone +0.0119, 30 steps
        +0.0104) in about 40 % of 30's time.

        They are optimised (Dice + BCE) to reproduce the corrected segmentation of `image` and, at
        every step, of `views` new augmented views of it (inference/views.py), meant to fit the
        structure more than this scan's pose and brightness; each view costs one more encoder and
        decoder pass per step. The fine tokens of thin classes are optimised with them on the crops
        the second pass would see around the corrected classes (one decoder pass per crop and step).
        Returns new embeddings; `self.tuning_joined` says whether the scan joined the context.

        `references` are labelled scans the task must still segment, normally those it was encoded
        from. A class whose tuned embedding segments them worse by more than COLLAPSE Dice learned the
        corrected patient rather than the structure: it keeps its untuned embedding (and threshold),
        that of the joined context.
        The check is repeated on the result until no class loses: a class that still loses although
        untuned is losing its voxels to a tuned neighbour, and the neighbour that took most of them is
        untuned too. The untuned classes are listed in `self.tuning_untuned`. Without the check,
        tuning on one OpenKBP patient cost the larynx of held-out patients 0.327 -> 0.042 Dice (step
        3,250; the tuned esophagus outbid it); checked once but not again, the step-7,000 model still
        lost 0.435 -> 0.257 on the larynx that way.

        The default step size follows the embeddings' scale: 2.5 % of their RMS (about 0.5 for the
        shipped model, whose entries have an RMS near 20). It was chosen on the step-3,250 model by the
        first benchmarks/tuning.py (commit b49c6c6: tuning from the reference alone, scored on held-out
        cases, which the benchmark no longer does): 0.5 gained +0.045 (Hippocampus) and +0.017
        (Abdomen) Dice where 5e-3 gained at most 0.002."""
        self.tuning_joined, self.tuning_untuned, self.tuning_losses = False, [], []
        steps = TUNING_STEPS if steps is None else steps
        _check_steps(steps)
        if views < 0:
            raise InputError("the number of augmented views must be 0 or more.")
        present = self._corrected_classes(task, image, corrected)
        start = 0.15 if join_context else 0.0  # the join: one encoding and two calibration passes
        if join_context:
            joined = self._join(task, image, corrected, present, list(references), scaled(progress, 0.0, start), cancel)
            self.tuning_joined = joined is not None
            if joined is None:
                joined = replace(task, sources=[*task.sources, f"{corrected.name or 'the corrected case'} not joined: its classes do not match the task's by name"])
            task = joined
        pixels, grid = self._working_target(image, task.modality or resolve_modality(image.array, None), task.spacing)
        truth = self._truth_on_grid(corrected, grid, task.label_values)
        tiles = windows(grid.shape, self.config.working_size)

        def encoded(scans: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
            """(encoder features, masks) of every window of every (image, masks) scan."""
            with torch.no_grad():
                return [(self.model.encoder(p[(slice(None), *t)][None]), m[(slice(None), *t)][None]) for p, m in scans for t in tiles]

        with _device_memory():
            corrected_windows = encoded([(pixels, truth)])
            fine_crops = self._fine_examples(image, corrected, task, truth, grid)
        tokens = task.tokens.to(self.device, torch.float32).clone().requires_grad_(True)
        fine_tokens = task.fine_tokens.to(self.device, torch.float32).clone().requires_grad_(True)
        if learning_rate is None:
            learning_rate = 0.025 * float(tokens.detach().pow(2).mean().sqrt())
        optimizer = torch.optim.Adam([tokens, fine_tokens], lr=learning_rate)
        frozen = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            with _device_memory():
                for step in range(steps):
                    _check_cancel(cancel)
                    optimizer.zero_grad()
                    examples = [(f, m, tokens) for f, m in corrected_windows + encoded(augmented_views(pixels, truth, views, seed=step))]
                    examples += [(f, m, fine_tokens[rows]) for f, m, rows in fine_crops]  # the second pass's crops
                    loss = 0.0
                    for features, masks, task_tokens in examples:  # one decoder graph alive at a time; gradients add up
                        part = dice_bce_loss(self.model.decoder(features, task_tokens[None], tuple(masks.shape[2:])), masks) / len(examples)
                        part.backward()
                        loss += float(part.detach())
                    del examples
                    optimizer.step()
                    self.tuning_losses.append(loss)
                    _report(progress, start + (0.9 - start) * (step + 1) / steps, f"tuning step {step + 1} of {steps}: loss {self.tuning_losses[-1]:.4f}")
        finally:
            for p, flag in zip(self.model.parameters(), frozen):
                p.requires_grad_(flag)
        # Fitted to the correction at 0.5, tuned classes leave any calibrated threshold behind; whether
        # a class is one piece is a fact about the structure and stays.
        tuned = replace(task, tokens=tokens.detach().cpu(), fine_tokens=fine_tokens.detach().cpu(), thresholds=[])
        if references:
            _report(progress, 0.9, "checking the tuned classes on the references")
            before, taken_before = self._dice_on(task, references, cancel)
            untuned: list[int] = []
            while True:
                after, taken = self._dice_on(tuned, references, cancel)
                losers = [row for row in before if after[row] < before[row] - COLLAPSE]
                culprits = {row if row not in untuned else self._thief(row, taken - taken_before, untuned) for row in losers} - {None, *untuned}
                if not culprits:
                    break
                for row in sorted(culprits):
                    tuned.tokens[row], tuned.fine_tokens[row] = task.tokens[row], task.fine_tokens[row]
                    tuned.thresholds[row] = task.thresholds[row]
                untuned += sorted(culprits)
            self.tuning_untuned = [task.class_names[row] for row in sorted(untuned)]
        note = f"; untuned: {', '.join(self.tuning_untuned)}" if self.tuning_untuned else ""
        _report(progress, 1.0, "tuned")
        return replace(tuned, sources=[*task.sources, f"tuned on {corrected.name or 'a corrected case'} ({steps} steps{note})"])

    def fit_to_reference(
        self, task: TaskEmbedding, image: Volume, labels: Volume, steps: int = REFERENCE_FIT_STEPS,
        progress: Progress = None, cancel: Cancel = None, below: float | None = FIT_BELOW,
    ) -> TaskEmbedding:
        """The reference is a labelled example too: optimise the task embeddings (network frozen) until
        the reference itself is segmented as its labels say, then segment targets with them.

        For a structure the network never trained on, the encoder's embedding misses it even on its
        own scan; fitting recovers much of it (benchmarks/generalization.py has the table of both
        strategies). Unlike Tune no augmented views and no joining: the encoder features of the
        reference are computed once and every step is one decoder pass per window and per crop of the
        thin classes (whose fine tokens are fitted alike), so the fit takes seconds.

        With `below`, the reference is first segmented with the task as encoded (one pass) and only the
        classes it gets below that Dice are fitted: a class the network already follows keeps its
        embedding, since fitting it to one scan costs about 0.01 Dice on the next ones. None fits every
        class. A class the matching alone decides (matching share 1: `_judge_on_reference`) is never fitted:
        the network has no say in it."""
        _check_steps(steps)
        rows = [row for row, share in enumerate(task.match_weights) if share < 1]  # the rest follow the reference by matching
        if not rows:
            return task
        if below is not None:
            scores, _ = self._dice_on(task, [(image, labels)], cancel)
            rows = [row for row in rows if scores.get(row, 1.0) < below]
            if not rows:
                return task
        part = task.select([task.label_values[row] for row in rows])
        rate = REFERENCE_FIT_RATE * float(part.tokens.float().pow(2).mean().sqrt())
        fitted = self.tune(part, image, labels, steps=steps, learning_rate=rate, progress=progress, cancel=cancel, views=0, join_context=False)
        tokens, fine_tokens, thresholds = task.tokens.clone(), task.fine_tokens.clone(), list(task.thresholds)
        for n, row in enumerate(rows):
            tokens[row], fine_tokens[row], thresholds[row] = fitted.tokens[n], fitted.fine_tokens[n], fitted.thresholds[n]
        names = "" if len(rows) == len(task.label_values) else f": {', '.join(part.class_names)}"
        source = f"fitted to its reference {labels.name or ''} ({steps} steps{names})".replace("  ", " ")
        return replace(task, tokens=tokens, fine_tokens=fine_tokens, thresholds=thresholds, sources=[*task.sources, source])

    def join(
        self, task: TaskEmbedding, image: Volume, corrected: Volume, references: list[tuple[Volume, Volume]] = (),
        progress: Progress = None, cancel: Cancel = None,
    ) -> TaskEmbedding | None:
        """`task` with the corrected scan averaged in as one more reference of the task's classes it
        holds, named as in the task: what Tune starts optimising from. With a reference at hand the
        pair is calibrated as any context ensemble is (thresholds and island rules, leave-one-out: the
        reference segmented with the scan's embeddings and the scan with the task's), except for
        classes the task already averages over several references, which keep their calibration;
        without one the task's island rules stay. The working spacing becomes the finer of the two,
        as for any ensemble of two (what was validated). None for a scan whose classes cannot be
        matched to the task's by name (two classes of one name): it cannot be joined."""
        return self._join(task, image, corrected, self._corrected_classes(task, image, corrected), list(references), progress, cancel)

    def _corrected_classes(self, task: TaskEmbedding, image: Volume, corrected: Volume) -> set[int]:
        """The label values of a corrected segmentation, checked to be one `task` can learn from."""
        self._check_task(task)
        image.check_image()
        corrected.check_label_map()
        corrected.check_matches(image)
        if corrected.looks_like_image():
            raise InputError(
                f"the corrected segmentation {corrected.name!r} looks like a scan, not a label map ({corrected.describe_values()}): "
                "give the scan as the image and its corrected label map as the labels."
            )
        present = set(present_labels(corrected.array))
        if not present & set(task.label_values):
            raise InputError(
                f"the corrected segmentation holds none of the task's classes ({', '.join(task.class_names)}); "
                "tune on a segmentation of this task's classes."
            )
        return present

    def _join(
        self, task: TaskEmbedding, image: Volume, corrected: Volume, present: set[int], references: list[tuple[Volume, Volume]],
        progress: Progress, cancel: Cancel,
    ) -> TaskEmbedding | None:
        """`join` for the corrected scan's checked label values `present` (Tune counts them once)."""
        values = [v for v in task.label_values if v in present]
        named = Volume(corrected.array, corrected.affine, corrected.name, {v: task.segments.get(v, {}) for v in values})
        joining = None if progress is None else lambda fraction, _: progress(fraction, "adding the corrected scan to the task's context")
        scan = self._encode(image, named, values, task.modality or None, scaled(joining, 0.0, 0.4), cancel, check_size=None, matching=task.memory is not None)
        if scan.memory is not None:
            scan = self._judge_on_reference(scan, image, named, matching=True, check_refinement=False, cancel=cancel)
        keys = task.class_keys()
        if scan.class_keys() != [keys[task.label_values.index(v)] for v in values]:
            return None
        if not references:
            return replace(TaskEmbedding.ensemble([task, scan]), keep_largest=list(task.keep_largest))
        joined = self.calibrated_ensemble([task, scan], [references[0], (image, named)], scaled(joining, 0.4, 1.0), cancel)
        several = [row for row, count in enumerate(task.counts) if count > 1]
        for row in several:
            joined.thresholds[row], joined.keep_largest[row] = task.thresholds[row], task.keep_largest[row]
        return joined

    @staticmethod
    def _thief(row: int, gained: torch.Tensor, untuned: list[int]) -> int | None:
        """The still-tuned class that gained the most of `row`'s true voxels (gained[row, j]: voxels of
        row's truth now labelled j), if any did."""
        candidates = [j for j in range(gained.shape[1]) if j != row and j not in untuned and gained[row, j] > 0]
        return max(candidates, key=lambda j: gained[row, j]) if candidates else None

    def _dice_on(self, task: TaskEmbedding, references: list[tuple[Volume, Volume]], cancel: Cancel = None) -> tuple[dict[int, float], torch.Tensor]:
        """Per task row, the mean Dice over the labelled scans that hold the class, of the label map
        `segment` would make (classes compete for a voxel), taken on the working grid; and the (K, K)
        voxel counts over the scans: [r, j] voxels of r's truth labelled as class j."""
        classes = len(task.label_values)
        scores: dict[int, list[float]] = {}
        confusion = torch.zeros(classes, classes)
        row_of_value = torch.full((max(task.label_values) + 1,), classes, dtype=torch.long)  # background: K
        row_of_value[torch.tensor(task.label_values)] = torch.arange(classes)
        for image, labels in references:
            _check_cancel(cancel)
            rows = self._classes_in(task, labels)
            if not rows:
                continue
            probabilities, grid = self.probabilities(image, task)
            row_of_voxel = row_of_value[torch.from_numpy(self._label_map(task, probabilities, grid, grid))]
            truth = self._truth_on_grid(labels, grid, [v for _, v in rows]).bool().cpu()
            for n, (row, _) in enumerate(rows):
                scores.setdefault(row, []).append(mask_dice(row_of_voxel == row, truth[n]))
                confusion[row] += torch.bincount(row_of_voxel[truth[n]], minlength=classes + 1)[:classes]
        return {row: float(np.mean(values)) for row, values in scores.items()}, confusion

    # ------------------------------------------------------------------ retrieval and memory bank
    def retrieve(
        self, target: Volume, pool: ReferencePool | list[TaskEmbedding], top_k: int = 1, progress: Progress = None,
        cancel: Cancel = None, allow_modality_mismatch: bool = False,
    ) -> TaskEmbedding:
        """Object-level retrieval: segment with the pool's ensemble, encode the target's own classes
        from that first result, and return per class the most similar references' embeddings
        (reusable like any task: tune it, save it)."""
        check_top_k(top_k)
        pool = pool if isinstance(pool, ReferencePool) else ReferencePool(pool)
        initial = self.segment(target, pool.ensemble(), scaled(progress, 0.0, 0.8), cancel, allow_modality_mismatch)
        found = present_labels(initial.array)
        if not found:
            return pool.ensemble()
        own = self.encode_reference(target, initial, classes=found, modality=pool.modality or None, cancel=cancel, matching=False)  # tokens to compare
        return pool.closest(own, top_k)

    def segment_with_retrieval(
        self, target: Volume, pool: ReferencePool | list[TaskEmbedding], top_k: int = 1, progress: Progress = None,
        cancel: Cancel = None, allow_modality_mismatch: bool = False, refine: bool = True,
    ) -> Volume:
        """Retrieve the best references per class for this target, then segment with them (`segment`)."""
        check_top_k(top_k)
        task = self.retrieve(target, pool, top_k, scaled(progress, 0.0, 0.5), cancel, allow_modality_mismatch)
        return self.segment(target, task, scaled(progress, 0.5, 1.0), cancel, allow_modality_mismatch, refine)

    @staticmethod
    def _memory_modality(key: str) -> str:
        """CT or MR from the training set's name; '' (any) for classes learned from synthetic images."""
        dataset = key.split("/", 1)[0]
        return "" if dataset.startswith("LabelMaps_") else "CT" if dataset.endswith("_CT") or "_CT_" in dataset else "MR"

    def _check_memory_rows(self, keys: list[str], rows: list[int]) -> None:
        """Refuse memory-bank rows too small to have been learned (see memory_bank_task)."""
        norms = self.model.memory_bank.detach().float().flatten(1).norm(dim=1).cpu()
        by_set: dict[str, list[float]] = {}
        for key, norm in zip(keys, norms.tolist()):
            by_set.setdefault(key.split("/", 1)[0], []).append(norm)
        trained = max(float(np.median(values)) for values in by_set.values())
        if trained <= 0:
            return
        stale = [r for r in rows if norms[r] < MEMORY_MIN_SCALE * trained]
        if stale:
            usable = sorted({k.split("/", 1)[0] for k, n in zip(keys, norms.tolist()) if n >= MEMORY_MIN_SCALE * trained})
            shares = ", ".join(f"{keys[r]} ({100 * float(norms[r]) / trained:.0f} %)" for r in stale)
            raise InputError(
                f"memory-bank class{'es' * (len(stale) > 1)} {shares} {'were' if len(stale) > 1 else 'was'} seen too rarely in training to be "
                f"used: {'their embeddings have' if len(stale) > 1 else 'its embedding has'} that share of the scale of a well-trained class's "
                f"(below {100 * MEMORY_MIN_SCALE:.0f} % the model segments nothing). Segment with a reference of the structure "
                f"instead (--reference IMAGE LABELS); memory-bank classes usable with these weights come from: {', '.join(usable)}."
            )

    def memory_bank_task(self, names: list[str]) -> TaskEmbedding:
        """Classes learned in training, by name ('liver' or 'Abdomen_MRI/liver'), with no reference.

        A row of the bank is an average (EMA, momentum 0.999) of the class's embeddings over training,
        seeded with its first one. A class drawn rarely (the single-case sets) keeps mostly an embedding
        from early in training, when embeddings were several times smaller: on the shipped model the
        rows of TotalSeg_CT_example, TotalSeg_MR_example, Brain_T1 and LabelMaps_Brain have 4-20 % of the
        norm of a well-trained row (Abdomen_MRI, HeadNeck_CT, Hippocampus_MRI) and segment nothing or
        little even on their own training scans (TotalSeg_CT_example liver, spleen, left kidney and aorta:
        Dice 0 on case_001; its own one-shot reference: liver 0.56). Such rows (below MEMORY_MIN_SCALE of
        the norm of a well-trained row: the largest median norm of any one training set's rows) are
        refused with what to do instead; the rows kept on the shipped model are the three sets above,
        LabelMaps_Abdomen, SpinalCord_MRI and Tumor_MRI (36-38 %). A bank with no trained row (all zero)
        gives no scale to compare with and is taken as it is."""
        keys = list(self.config.memory_classes)
        if not keys:
            raise InputError("these weights carry no memory bank; segment with a reference instead.")
        names = list(names or [])
        if not names:
            raise InputError("name at least one memory-bank class (e.g. --classes liver); 'iris-segment info' counts them.")
        rows, segments = [], {}
        for n, name in enumerate(names, start=1):
            matches = [i for i, k in enumerate(keys) if name.lower() in (k.lower(), k.split("/", 1)[1].lower())]
            if len(matches) != 1:
                hint = ", ".join(keys[i] for i in matches) if matches else ", ".join(keys)
                raise InputError(f"{'ambiguous' if matches else 'unknown'} memory-bank class {name!r}; choose one of: {hint}.")
            rows.append(matches[0])
            segments[n] = {"name": keys[matches[0]].split("/", 1)[1]}
        self._check_memory_rows(keys, rows)
        modality = self._memory_modality(keys[rows[0]])
        if len({self._memory_modality(keys[r]) for r in rows} - {""}) > 1:
            raise InputError(
                f"memory-bank classes {', '.join(keys[r] for r in rows)} come from CT and MR training sets: "
                "segment one modality at a time."
            )
        values = list(range(1, len(names) + 1))
        return TaskEmbedding(
            self.model.memory_bank[rows].float().cpu(), values, complete_segments(segments, values), modality, 0.0, self.model_id, ["memory bank"]
        )



def _holds(crop: Grid, box: tuple[np.ndarray, np.ndarray], margin: float) -> bool:
    """Whether the RAS box (min, max) lies inside `crop` with `margin` mm to spare on every side."""
    cmin, cmax = crop.world_bounds()
    return bool((box[0] >= cmin + margin - 1e-6).all() and (box[1] <= cmax - margin + 1e-6).all())


def _world_boxes(masks: torch.Tensor, grid: Grid) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """RAS min/max of each mask (K, *grid.shape) on `grid`; None for an empty one."""
    boxes: list[tuple[np.ndarray, np.ndarray] | None] = []
    for mask in masks.bool():
        if not mask.any():
            boxes.append(None)
            continue
        spans = [torch.nonzero(mask.any(dim=tuple(a for a in range(3) if a != axis))).flatten() for axis in range(3)]
        boxes.append(box_world_bounds(grid.affine, np.array([int(s[0]) for s in spans]), np.array([int(s[-1]) for s in spans])))
    return boxes


def check_top_k(top_k: int) -> None:
    """Retrieval averages the `top_k` most similar references per class: at least one."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InputError(f"top-k must be a whole number of at least 1 (the references averaged per class); got {top_k!r}.")


def _in_float32_range(array: np.ndarray, modality: str) -> np.ndarray:
    """An MR scan whose intensities reach past INTENSITY_LIMIT (or stay below its inverse), scaled by a power of two.

    normalize works in float32: intensities near 1e18 overflow its variance (the scan comes out all zero)
    and past 3.4e38 cannot be held at all. MR normalisation (percentile clip, then z-score) does not
    depend on the scale, and a power-of-two scale is exact, so the result is what the same scan at a
    usual scale gives. CT needs its Hounsfield units as they are (its window clips them first)."""
    if modality == "CT" or array.dtype.kind not in "iuf" or array.size == 0:
        return array
    peak = max(-float(array.min()), float(array.max()))
    if peak == 0 or 1.0 / INTENSITY_LIMIT <= peak <= INTENSITY_LIMIT:
        return array
    return array.astype(np.float64) * 2.0 ** (20 - int(np.floor(np.log2(peak))))
