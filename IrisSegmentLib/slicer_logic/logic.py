"""The IrisSegment panel's logic without Qt: references in, a new segmentation out; tune, undo, save, export.

Every action reads the scene into numpy on the main thread (scene_bridge), runs the engine on the
persistent worker thread, and changes the scene only when the main thread collects the finished job
(`Job.poll()` from the panel's QTimer, `Job.result()` in tests and scripts). So an error or Cancel
leaves the scene as it was, and Slicer stays responsive while torch works.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..device import OutOfMemoryError, describe
from ..embeddings import TaskEmbedding, class_key
from ..errors import DeviceError, InputError
from ..inference.predictor import IrisPredictor, scaled
from ..model.weights import load_model
from ..volume import Volume
from . import scene_bridge
from .worker import CancelRequested, Job, Progress, Worker

STRATEGIES = ("one-shot", "ensemble", "retrieval")
UNDO_DEPTH = 5  # results kept for Undo; each is a copy of one segmentation


@dataclass
class Reference:
    """A reference scan and its segmentation; `segment_ids` picks the segments to transfer (None: all)."""

    volume: object
    segmentation: object
    segment_ids: list[str] | None = None


@dataclass
class _UndoState:
    node: object
    content: object  # vtkSegmentation copy
    task: TaskEmbedding | None
    task_key: tuple | None
    task_references: list[Reference]
    tunes: tuple
    untuned: list[str]
    tuned_unchecked: bool
    tuned_uncalibrated: bool


class _ClassValues:
    """One label value per class across all sources of a run (the engine refuses a value naming two classes).

    Task files keep their values; a reference segment takes the value of its class, or the next free one.
    """

    def __init__(self, tasks: list[TaskEmbedding]) -> None:
        self._values: dict[str, int] = {}
        for task in tasks:
            for value in task.label_values:
                self._values.setdefault(class_key(value, task.segments.get(value, {})), value)

    def __call__(self, segment: dict) -> int:
        key = class_key(0, segment)
        if key not in self._values:
            self._values[key] = max(self._values.values(), default=0) + 1
        return self._values[key]


def _digest(*arrays: np.ndarray, text: str = "") -> str:
    """Content hash: a reference is re-encoded only when its voxels, labels or segments changed."""
    digest = hashlib.blake2b(text.encode(), digest_size=16)
    for array in arrays:
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _device_errors(work: Callable[[Progress, CancelRequested], object]) -> Callable[[Progress, CancelRequested], object]:
    """GPU failures as messages a user can act on, whichever engine step raised them."""

    def guarded(progress: Progress, cancel: CancelRequested) -> object:
        try:
            return work(progress, cancel)
        except OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise DeviceError("the GPU ran out of memory: close other programs using the GPU, or choose the CPU (Model > Device) and run again.") from None
        except MemoryError:
            raise DeviceError("the computer ran out of memory: close other programs, or crop the target volume (Crop Volume module).") from None
        except RuntimeError as exc:
            if "CUDA" not in str(exc) and "cuDNN" not in str(exc):
                raise
            first_line = str(exc).strip().splitlines()[0]
            raise DeviceError(
                f"the GPU failed ({first_line}). The installed torch may not match the NVIDIA driver: reinstall torch "
                "from the PyTorch extension (PyTorch Utils module), or choose the CPU (Model > Device)."
            ) from None

    return guarded


class IrisSceneLogic:
    """Segment, tune, undo, save and export against the MRML scene (`slicer.mrmlScene`).

    `predictor` may be injected (tests, scripts); otherwise the model is loaded on the worker thread
    from `weights` (None: the bundled file) on `device` ("auto", "cuda" or "cpu") by the first job.
    One job runs at a time.

    `before_change(node)`, when set, is called on the main thread just before the logic changes the
    content of an existing segmentation node (Segment or Tune into it, Undo): the panel saves the
    Segment Editor's undo state there, so the editor's Undo and IrisSegment's Undo both keep what the
    other did.
    """

    def __init__(self, predictor: IrisPredictor | None = None, weights: str | Path | None = None, device: str = "auto") -> None:
        self.worker = Worker()
        self.predictor = predictor  # set on the worker thread when loaded there; only read elsewhere
        self._settings = (str(weights) if weights else None, device)
        self.task: TaskEmbedding | None = None  # behind the last result: what Tune tunes and Save task saves
        self._task_key: tuple | None = None  # the sources and strategy it came from
        self._task_references: list[Reference] = []  # its references, which Tune checks tuned classes on
        self.untuned: list[str] = []  # classes the last Tune left untuned: tuning made them segment the references worse
        self.tuned_unchecked = False  # the last Tune had no reference of the task left in the scene to check its classes on
        self.tuned_uncalibrated = False  # ... and it joined a scan, so there was none to calibrate the pair on either
        self._tunes: tuple[tuple[tuple[str, str], TaskEmbedding, TaskEmbedding], ...] = ()  # each Tune: (target, output) IDs, task tuned, result
        self.kept_segments: list[str] = []  # segments the last Tune kept in the output: not classes of the task
        self._encoded: dict[str, TaskEmbedding] = {}
        self._undo: list[_UndoState] = []
        self._job: Job | None = None
        self.before_change: Callable[[object], None] | None = None

    # ------------------------------------------------------------------ model and state
    def set_model(self, weights: str | Path | None, device: str) -> None:
        """Use other weights or another device from the next job on.

        Embeddings fit only the weights that made them: other weights drop the task and the encoded
        references. Another device keeps them (the same model, loaded again on that device), so a result
        segmented on the CPU can still be tuned on the GPU."""
        self._check_idle()
        settings = (str(weights) if weights else None, device)
        if settings == self._settings and self.predictor is not None:
            return
        weights_changed = settings[0] != self._settings[0]
        self._settings = settings
        self.predictor = None  # loaded (on the new device) by the next job
        if not weights_changed:
            return
        self._encoded.clear()
        self.task, self._task_key, self._task_references = None, None, []
        self._tunes, self.untuned, self.tuned_unchecked, self.tuned_uncalibrated = (), [], False, False

    @property
    def device_description(self) -> str:
        """Where the model runs, e.g. 'CPU (8 threads)'; '' before it is loaded."""
        return describe(self.predictor.device) if self.predictor is not None else ""

    @property
    def on_cpu(self) -> bool:
        return self.predictor is not None and self.predictor.device.type == "cpu"

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.collected

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def shutdown(self) -> None:
        """Cancel the running job and stop the worker thread (module cleanup)."""
        if self._job is not None:
            self._job.cancel()
        self.worker.shutdown(timeout=10)

    def reset(self) -> None:
        """Forget everything tied to the scene (scene close): the task and its references, the Tune
        history (keyed by node IDs, which a new scene reuses), Undo. A running job is cancelled, so it
        changes nothing when collected. The model and the encoded references (keyed by their content)
        stay."""
        if self._job is not None:
            self._job.cancel()
        self.task, self._task_key, self._task_references = None, None, []
        self._tunes, self._undo = (), []
        self.untuned, self.kept_segments, self.tuned_unchecked, self.tuned_uncalibrated = [], [], False, False

    def start_load_model(self) -> Job:
        """Load the model now (normally the first Segment does it), e.g. to show the device used."""
        self._check_idle()
        return self._submit("Loading the model", lambda progress, cancel: describe(self._predictor(progress).device), lambda description: description)

    # ------------------------------------------------------------------ segment
    def start_segment(
        self,
        target,
        sources: Sequence[Reference | TaskEmbedding],
        strategy: str = "one-shot",
        output=None,
        allow_modality_mismatch: bool = False,
        fit_steps: int = 0,
        matching: bool = True,
    ) -> Job:
        """Segment `target` with the classes of `sources` (references and/or loaded task files).

        The result goes to a new segmentation node, or replaces the content of `output` (kept for Undo);
        the job's result is that node. A task built earlier from the same sources, strategy and
        `fit_steps` is reused as it is, including what Tune taught it. With `fit_steps` (0: off, as in
        the engine's API; the panel's default is 40, like the command line's), the classes each
        reference's own segmentation gets below FIT_BELOW Dice are first fitted to the reference itself
        (IrisPredictor.fit_to_reference): structures the model was not trained on. With `matching` the
        references are also matched onto the target (inference/matching.py), which decides those classes
        instead of fitting.
        """
        self._check_idle()
        if strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
        if not sources:
            raise InputError("Add a reference (a scan and its segmentation) or a task file first.")
        if strategy == "one-shot" and len(sources) > 1:
            raise InputError(f"One-shot takes one reference and {len(sources)} are listed: choose Ensemble or Retrieval to use several.")
        image = scene_bridge.volume_from_node(target, "target")
        references = [s for s in sources if isinstance(s, Reference)]
        files = [s for s in sources if isinstance(s, TaskEmbedding)]
        self._check_output(output, references)
        value_of = _ClassValues(files)
        pairs = []
        for number, reference in enumerate(references, start=1):
            role = f"reference {number}"
            reference_image = scene_bridge.volume_from_node(reference.volume, role)
            scene_bridge.check_segmentation(reference.segmentation, role)
            labels = scene_bridge.labels_from_segmentation(
                reference.segmentation, reference.volume, reference_image, reference.segment_ids, value_of, allow_empty=False
            )
            digest = _digest(reference_image.array, reference_image.affine, labels.array, text=repr((sorted(labels.segments.items()), fit_steps, matching)))
            pairs.append((reference_image, labels, digest))
        key = (strategy, tuple(digest for *_, digest in pairs), tuple(_digest(t.tokens.numpy()) for t in files))
        reused = self.task if key == self._task_key else None
        cached = {digest: self._encoded[digest] for *_, digest in pairs if digest in self._encoded}

        def work(progress: Progress, cancel: CancelRequested) -> tuple[Volume, TaskEmbedding, dict[str, TaskEmbedding]]:
            predictor = self._predictor(progress)
            segment_progress = scaled(progress, 0.3, 1.0)
            if reused is not None:
                return predictor.segment(image, reused, segment_progress, cancel, allow_modality_mismatch), reused, {}
            encoded: dict[str, TaskEmbedding] = {}
            tasks = []
            for n, (reference_image, labels, digest) in enumerate(pairs):
                if digest not in cached and digest not in encoded:
                    step = scaled(progress, 0.3 * n / len(pairs), 0.3 * (n + 1) / len(pairs))
                    encoded[digest] = predictor.encode_reference(reference_image, labels, progress=scaled(step, 0.0, 0.2 if fit_steps else 1.0), cancel=cancel,
                                                                 matching=matching)
                    if fit_steps:
                        encoded[digest] = predictor.fit_to_reference(encoded[digest], reference_image, labels, fit_steps, scaled(step, 0.2, 1.0), cancel)
                tasks.append(cached.get(digest) or encoded[digest])
            tasks += files
            if strategy == "retrieval":
                task = predictor.retrieve(image, tasks, progress=scaled(progress, 0.3, 0.65), cancel=cancel, allow_modality_mismatch=allow_modality_mismatch)
                segment_progress = scaled(progress, 0.65, 1.0)
            elif strategy == "ensemble":
                volumes = [(reference_image, labels) for reference_image, labels, _ in pairs]
                task = predictor.calibrated_ensemble(tasks, volumes, scaled(progress, 0.3, 0.5), cancel)
                segment_progress = scaled(progress, 0.5, 1.0)
            else:
                task = tasks[0]
            return predictor.segment(image, task, segment_progress, cancel, allow_modality_mismatch), task, encoded

        def finish(value: tuple[Volume, TaskEmbedding, dict[str, TaskEmbedding]]):
            result, task, encoded = value
            self._encoded.update(encoded)
            node = self._write(result, target, output)
            self.task, self._task_key, self._task_references = task, key, references
            return node

        return self._submit("Segmenting", work, finish)

    # ------------------------------------------------------------------ tune and undo
    def start_tune(self, target, output, steps: int | None = None, allow_modality_mismatch: bool = False) -> Job:
        """Tune the current task on `output` as corrected by the user (the truth), then segment `target`
        again into `output`. Undo brings back the corrected segmentation and the untuned task.

        The corrected scan joins the task's context (IrisPredictor.tune), so Tune pressed again on the
        same result, after more corrections, starts over from the task the first Tune started from:
        the scan then counts once, with its latest corrections. A scan whose corrections the task
        already holds from an earlier Tune (tuned on A, then B, then A again) does not join again; the
        embeddings are only optimised on its latest corrections."""
        self._check_idle()
        if self.task is None:
            raise InputError("Segment first: Tune improves the task behind the last result, using your corrections of that result.")
        if steps is not None and steps < 1:
            raise InputError("the number of tuning steps must be at least 1.")
        image = scene_bridge.volume_from_node(target, "target")
        scene_bridge.check_segmentation(output, "output")
        scan = (target.GetID(), output.GetID())
        retune = bool(self._tunes) and self._tunes[-1][0] == scan and self._tunes[-1][2] is self.task
        task = self._tunes[-1][1] if retune else self.task
        join = scan not in self._scans_joined(task)
        values = {class_key(v, task.segments.get(v, {})): v for v in task.label_values}
        corrected = scene_bridge.labels_from_segmentation(output, target, image, None, lambda s: values.get(class_key(0, s)), allow_empty=True)
        references = self._reference_volumes(self._task_references, _ClassValues([task]))

        def work(progress: Progress, cancel: CancelRequested) -> tuple[TaskEmbedding, Volume, list[str], bool]:
            predictor = self._predictor(progress)
            tuned = predictor.tune(task, image, corrected, steps=steps, references=references, progress=scaled(progress, 0.0, 0.8), cancel=cancel, join_context=join)
            result = predictor.segment(image, tuned, scaled(progress, 0.8, 1.0), cancel, allow_modality_mismatch)
            return tuned, result, list(predictor.tuning_untuned), predictor.tuning_joined

        def finish(value: tuple[TaskEmbedding, Volume, list[str], bool]):
            tuned, result, untuned, joined = value
            extra = self._extra_segments(output, values)  # as the output is now: the user may have edited it meanwhile
            node = self._write(result, target, output, keep=extra)
            self.kept_segments = [output.GetSegmentation().GetSegment(i).GetName() for i in extra]
            self.task, self.untuned, self._tunes = tuned, untuned, (*self._tunes, (scan, task, tuned))
            self.tuned_unchecked = not references
            self.tuned_uncalibrated = joined and not references
            return node

        return self._submit("Tuning", work, finish)

    @staticmethod
    def _extra_segments(output, values: dict) -> list[str]:
        """IDs of the output's segments that are none of the task's classes (the user added them)."""
        segmentation = output.GetSegmentation()
        return [
            segment_id
            for segment_id in scene_bridge.segment_ids(output)
            if class_key(0, scene_bridge.segment_metadata(segmentation.GetSegment(segment_id))) not in values
        ]

    def _scans_joined(self, task: TaskEmbedding) -> set[tuple[str, str]]:
        """The (target, output) scans whose corrections joined `task`'s context: the Tunes it came from."""
        scans = set()
        for scan, before, after in reversed(self._tunes):
            if after is task:
                scans.add(scan)
                task = before
        return scans

    @staticmethod
    def _reference_volumes(references: list[Reference], value_of) -> list[tuple[Volume, Volume]]:
        """(image, labels) of the references still in the scene and still segmented; Tune checks its
        tuned classes on them, and works without the ones that are gone."""
        volumes = []
        for number, reference in enumerate(references, start=1):
            if reference.volume.GetScene() is None or reference.segmentation.GetScene() is None:
                continue
            try:
                image = scene_bridge.volume_from_node(reference.volume, f"reference {number}")
                labels = scene_bridge.labels_from_segmentation(reference.segmentation, reference.volume, image, reference.segment_ids, value_of, allow_empty=False)
            except InputError:
                continue
            volumes.append((image, labels))
        return volumes

    def undo(self):
        """Restore the segmentation (and task) as they were before the last Segment or Tune into an existing node."""
        self._check_idle()
        if not self._undo:
            raise InputError("Nothing to undo.")
        state = self._undo.pop()
        if state.node.GetScene() is None:
            self._undo.clear()
            raise InputError("The segmentation to restore was deleted; nothing was changed.")
        self._before_change(state.node)
        scene_bridge.restore(state.node, state.content)
        self.task, self._task_key, self._task_references, self._tunes = state.task, state.task_key, state.task_references, state.tunes
        self.untuned, self.tuned_unchecked, self.tuned_uncalibrated = state.untuned, state.tuned_unchecked, state.tuned_uncalibrated
        return state.node

    # ------------------------------------------------------------------ task files
    def save_task(self, path: str | Path) -> Path:
        """Save the current task (tuned if it was) for other scans, this panel or `iris-segment --task`."""
        if self.task is None:
            raise InputError("There is no task to save yet: segment (and tune) first.")
        path = Path(path)
        self.task.save(path)  # an unwritable or missing folder is an InputError that says so
        return path

    @staticmethod
    def load_task(path: str | Path) -> TaskEmbedding:
        """A saved task (from this panel or the command line), to list among the sources of `start_segment`."""
        return TaskEmbedding.load(path)

    # ------------------------------------------------------------------ export
    @staticmethod
    def export_labelmap(output, target=None):
        """A new label map volume of the output's segments on the target's grid (values 1..N in segment
        order). Needs no model: the same as scene_bridge.export_labelmap, which the panel calls without torch."""
        return scene_bridge.export_labelmap(output, target)

    @staticmethod
    def export_file(output, path: str | Path, target=None, overwrite: bool = False) -> list[Path]:
        """Write the output as .seg.nrrd, or as NIfTI/NRRD with a .ctbl of names and colors; returns the files.
        An existing file or sidecar is replaced only with `overwrite`."""
        return scene_bridge.export_file(output, target, path, overwrite)

    # ------------------------------------------------------------------ helpers
    def _predictor(self, progress: Progress) -> IrisPredictor:
        """The model, loaded on first use (on the worker thread: it can take seconds)."""
        if self.predictor is None:
            progress(0.0, "loading the model")
            weights, device = self._settings
            self.predictor = IrisPredictor(load_model(weights, device))
        return self.predictor

    def _submit(self, title: str, work: Callable[[Progress, CancelRequested], object], finish: Callable[[object], object]) -> Job:
        self._job = self.worker.submit(Job(title, _device_errors(work), finish))
        return self._job

    def _check_idle(self) -> None:
        if self.busy:
            raise InputError(f"{self._job.title} is still running: wait for it, or press Cancel.")

    @staticmethod
    def _check_output(output, references: list[Reference]) -> None:
        if output is None:
            return
        scene_bridge.check_segmentation(output, "output")
        if any(r.segmentation is not None and output.GetID() == r.segmentation.GetID() for r in references):
            raise InputError(
                f"the output {output.GetName()!r} is a reference segmentation: choose 'Create new segmentation' as the output; "
                "IrisSegment never overwrites references."
            )

    def _before_change(self, node) -> None:
        if self.before_change is not None:
            self.before_change(node)

    def _write(self, result: Volume, target, output, keep: Sequence[str] = ()):
        """Write into a new node, or into `output` keeping its previous content for Undo (and its `keep`
        segments); on failure the scene is left as it was."""
        if output is None:
            node = scene_bridge.new_segmentation_node(f"{target.GetName()} IrisSegment")
            try:
                scene_bridge.write_segments(result, node, target)
            except BaseException:
                scene_bridge.remove_node(node)
                raise
            return node
        state = _UndoState(output, scene_bridge.snapshot(output), self.task, self._task_key, self._task_references, self._tunes,
                           list(self.untuned), self.tuned_unchecked, self.tuned_uncalibrated)
        self._before_change(output)
        try:
            scene_bridge.write_segments(result, output, target, keep)
        except BaseException:
            scene_bridge.restore(output, state.content)
            raise
        self._undo.append(state)
        del self._undo[:-UNDO_DEPTH]
        return output
