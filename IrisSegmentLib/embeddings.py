"""Task embeddings: what a reference teaches the model, computed once and reused for any target.

One embedding holds, per class, the (T, D) task tokens plus what a user needs to trust and reuse
it: label values, segment names/colors/terminology, modality, working spacing, the probability
threshold that makes a voxel the class, whether the class keeps only its largest connected piece,
the model that made it and where it came from. Stored as safetensors (tensors + JSON metadata),
never pickle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .errors import InputError, WeightsError
from .files import check_writable_folder
from .inference.matching import MatchingMemory
from .segments import class_terminology
from .model.serialization import load_tensors, save_tensors

FORMAT = "iris-segment-task"
MEMORY_PREFIX = "memory_"
FINE_MEMORY_PREFIX = "fine_memory_"
# 2 added the matching memory (its boundary band came later, optional); files of version 1 load without one. 3 keeps
# the band's classes as bits of each key's 2x2x2 working voxels (inference/matching.py) instead of stride-2 shares. 4
# adds each memory key's position, which places the matched votes; earlier files match without placing. A file of 4
# may also hold each reference's working spacing (memory_spacings; older readers skip it), where an ensemble seeks a
# reference's map again when it finds none at its own; files without it do without.
FORMAT_VERSION = "4"
READABLE_VERSIONS = ("1", "2", "3", "4")


def name_key(name: str) -> str:
    """A segment name as classes are matched by name: case, underscores and runs of spaces ignored, so
    "kidney_left", "Kidney left" and "kidney  left" name one class (a .ctbl written by Slicer reads
    underscores back as spaces)."""
    return " ".join(str(name).replace("_", " ").split()).lower()


def class_key(value: int, segment: dict) -> str:
    """How classes of different references are matched: terminology (unless Slicer's generic
    default), else name (see `name_key`), else label value."""
    return class_terminology(segment.get("terminology")) or name_key(segment.get("name") or "") or f"label {value}"


def class_keys(label_values: list[int], segments: dict[int, dict]) -> list[str]:
    """Per label value, the key that matches its class across references (see `class_key`); two
    classes of one reference sharing a key are told apart by label value, so they are never merged."""
    keys: list[str] = []
    for v in label_values:
        key = class_key(v, segments.get(v, {}))
        keys.append(f"{key} (label {v})" if key in keys else key)
    return keys


@dataclass
class TaskEmbedding:
    tokens: torch.Tensor                  # (K, T, D) float32
    label_values: list[int]
    segments: dict[int, dict]
    modality: str
    spacing: float                        # isotropic working spacing (mm) the reference was seen at
    model_id: str
    sources: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)   # references averaged into each class
    thresholds: list[float] = field(default_factory=list)  # per class; 0.5 unless calibrated on references
    keep_largest: list[bool] = field(default_factory=list)  # per class; False (keep every piece) unless calibrated
    # The second, finer pass for small classes (IrisPredictor's refinement): per class the (T, D) tokens of the
    # class seen in a crop around it at `fine_spacings` mm; a spacing of 0 means the class has no finer pass.
    fine_tokens: torch.Tensor | None = None
    fine_spacings: list[float] = field(default_factory=list)
    # Reference matching (inference/matching.py): the references' voxels to match the target against, and per
    # class the share of the matched prior in its probability (0: the network alone; the rest the network's).
    memory: MatchingMemory | None = None
    match_weights: list[float] = field(default_factory=list)
    fine_memory: MatchingMemory | None = None  # the same for the second pass: the crops around the thin classes, at their fine spacing

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3 or self.tokens.shape[0] != len(self.label_values):
            raise ValueError("tokens must be (classes, tokens, dim), one row per label value")
        if not self.counts:
            self.counts = [1] * len(self.label_values)
        if not self.thresholds:
            self.thresholds = [0.5] * len(self.label_values)
        if len(self.thresholds) != len(self.label_values) or not all(0 < t < 1 for t in self.thresholds):
            raise ValueError("thresholds must hold one probability in (0, 1) per label value")
        if not self.keep_largest:
            self.keep_largest = [False] * len(self.label_values)
        if len(self.keep_largest) != len(self.label_values) or not all(isinstance(f, bool) for f in self.keep_largest):
            raise ValueError("keep_largest must hold one true/false flag per label value")
        if self.fine_tokens is None:
            self.fine_tokens = torch.zeros_like(self.tokens)
            self.fine_spacings = [0.0] * len(self.label_values)
        if self.fine_tokens.shape != self.tokens.shape or len(self.fine_spacings) != len(self.label_values) or min(self.fine_spacings, default=0) < 0:
            raise ValueError("fine_tokens must match tokens and fine_spacings hold one spacing (0: none) per label value")
        if not self.match_weights:
            self.match_weights = [0.0] * len(self.label_values)
        if len(self.match_weights) != len(self.label_values) or not all(0 <= w <= 1 for w in self.match_weights):
            raise ValueError("match_weights must hold one share in [0, 1] per label value")
        if self.memory is None and any(self.match_weights):
            raise ValueError("match_weights above 0 need a matching memory")
        for memory in (self.memory, self.fine_memory):
            if memory is not None and memory.masks.shape[0] != len(self.label_values):
                raise ValueError("a matching memory must hold one row per label value")

    @property
    def refined(self) -> list[int]:
        """Rows of the classes that have a finer second pass."""
        return [row for row, spacing in enumerate(self.fine_spacings) if spacing > 0]

    @property
    def class_names(self) -> list[str]:
        return [self.segments.get(v, {}).get("name", f"label {v}") for v in self.label_values]

    def select(self, classes: list[int | str] | None) -> "TaskEmbedding":
        """The embedding restricted to some classes, given by label value or segment name."""
        if not classes:
            return self
        rows = []
        for c in classes:
            matches = [i for i, (v, n) in enumerate(zip(self.label_values, self.class_names)) if str(c) == str(v) or name_key(str(c)) == name_key(n)]
            if not matches:
                raise InputError(f"the task has no class {c!r}; it has: {', '.join(f'{v} ({n})' for v, n in zip(self.label_values, self.class_names))}.")
            rows.append(matches[0])
        values = [self.label_values[i] for i in rows]
        return replace(self, tokens=self.tokens[rows], label_values=values, segments={v: self.segments[v] for v in values if v in self.segments},
                       counts=[self.counts[i] for i in rows], thresholds=[self.thresholds[i] for i in rows],
                       keep_largest=[self.keep_largest[i] for i in rows], fine_tokens=self.fine_tokens[rows],
                       fine_spacings=[self.fine_spacings[i] for i in rows], memory=self.memory.select(rows) if self.memory is not None else None,
                       match_weights=[self.match_weights[i] for i in rows],
                       fine_memory=self.fine_memory.select(rows) if self.fine_memory is not None else None)

    def class_keys(self) -> list[str]:
        return class_keys(self.label_values, self.segments)

    def calibration_note(self) -> str:
        """What calibration on the references changed, in words ('' when nothing did): a user can
        see why two tasks from the same references segment differently."""
        moved = [f"{name} {t:.2f}" for name, t in zip(self.class_names, self.thresholds) if t != 0.5]
        largest = [name for name, flag in zip(self.class_names, self.keep_largest) if flag]
        parts = ([f"thresholds {', '.join(moved)} (others 0.5)"] if moved else []) + ([f"largest piece only: {', '.join(largest)}"] if largest else [])
        return "; ".join(parts)

    def matching_note(self) -> str:
        """The classes that reference matching decides alone, in words ('' when none): those the network
        did not segment its own reference well enough to be trusted with (IrisPredictor._judge_on_reference)."""
        matched = [name for name, share in zip(self.class_names, self.match_weights) if share == 1]
        return f"matched from the reference, as the model does not know them: {', '.join(matched)}" if matched else ""

    @staticmethod
    def ensemble(tasks: list["TaskEmbedding"]) -> "TaskEmbedding":
        """Context ensemble: per class, the mean of the embeddings of every reference holding it
        (weighted by how many references each already averages); thresholds are averaged the same
        way and a class keeps only its largest piece if most references say so. The matching memories are
        pooled (each class matched against the references that hold it) and a class's matching share
        averaged over the references that have a memory (task files of format 1 have none).
        `IrisPredictor.calibrated_ensemble` also fits both to the references."""
        if not tasks:
            raise InputError("no references to combine: add at least one reference.")
        first = tasks[0]
        for t in tasks[1:]:
            if t.model_id != first.model_id:
                raise InputError("these task embeddings come from different models and cannot be combined; re-encode the references with one model.")
            if t.modality != first.modality:
                raise InputError(f"references of different modality ({first.modality} and {t.modality}) cannot be combined: use references of the target's modality.")
        order: list[str] = []
        found: dict[str, list[tuple[TaskEmbedding, int]]] = {}
        rows_of = [{key: row for row, key in enumerate(t.class_keys())} for t in tasks]
        for t, rows in zip(tasks, rows_of):
            for key, row in rows.items():
                if key not in found:
                    order.append(key)
                    found[key] = []
                found[key].append((t, row))
        tokens, values, segments, counts, thresholds, keep_largest, fine_tokens, fine_spacings, match_weights = [], [], {}, [], [], [], [], [], []
        for key in order:
            members = found[key]
            weights = torch.tensor([float(t.counts[r]) for t, r in members])
            stacked = torch.stack([t.tokens[r] for t, r in members])
            tokens.append((stacked * weights[:, None, None]).sum(0) / weights.sum())
            fine = [(t, r) for t, r in members if t.fine_spacings[r] > 0]  # a finer pass if any reference saw the class small
            fine_weights = torch.tensor([float(t.counts[r]) for t, r in fine])
            fine_tokens.append((torch.stack([t.fine_tokens[r] for t, r in fine]) * fine_weights[:, None, None]).sum(0) / fine_weights.sum() if fine else torch.zeros_like(tokens[-1]))
            fine_spacings.append(float(torch.tensor([t.fine_spacings[r] for t, r in fine]).median()) if fine else 0.0)
            share = weights / weights.sum()
            thresholds.append(float(torch.tensor([t.thresholds[r] for t, r in members]) @ share))
            keep_largest.append(bool(torch.tensor([float(t.keep_largest[r]) for t, r in members]) @ share > 0.5))
            matched = [(t, r) for t, r in members if t.memory is not None]
            matched_weights = torch.tensor([float(t.counts[r]) for t, r in matched])
            match_weights.append(float(torch.tensor([t.match_weights[r] for t, r in matched]) @ matched_weights / matched_weights.sum()) if matched else 0.0)
            owner, row = members[0]
            value = owner.label_values[row]
            if value in values:
                raise InputError(f"label value {value} names two different classes across the references; give each class its own value.")
            values.append(value)
            segments[value] = owner.segments.get(value, {"name": f"label {value}"})
            counts.append(int(weights.sum()))
        spacing = float(torch.tensor([t.spacing for t in tasks]).median())
        sources = [s for t in tasks for s in t.sources]

        def pooled(memories: list[MatchingMemory | None]) -> MatchingMemory | None:
            parts = [(m, [rows.get(key) for key in order]) for m, rows in zip(memories, rows_of) if m is not None]
            return MatchingMemory.combine(parts) if parts else None

        return TaskEmbedding(
            torch.stack(tokens), values, segments, first.modality, spacing, first.model_id, sources, counts, thresholds, keep_largest,
            torch.stack(fine_tokens), fine_spacings, pooled([t.memory for t in tasks]), match_weights, pooled([t.fine_memory for t in tasks]),
        )

    def save(self, path: str | Path) -> None:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "label_values": json.dumps(self.label_values),
            "segments": json.dumps({str(k): v for k, v in self.segments.items()}),
            "modality": self.modality,
            "spacing": repr(float(self.spacing)),
            "model_id": self.model_id,
            "sources": json.dumps(self.sources),
            "counts": json.dumps(self.counts),
            "thresholds": json.dumps(self.thresholds),
            "keep_largest": json.dumps(self.keep_largest),
            "fine_spacings": json.dumps(self.fine_spacings),
            "match_weights": json.dumps(self.match_weights),
        }
        tensors = {"tokens": self.tokens.float(), "fine_tokens": self.fine_tokens.float()}
        if self.memory is not None:
            tensors.update(self.memory.tensors(MEMORY_PREFIX))
        if self.fine_memory is not None:
            tensors.update(self.fine_memory.tensors(FINE_MEMORY_PREFIX))
        check_writable_folder(Path(path), "task")
        try:
            save_tensors(path, tensors, meta)
        except OSError as exc:
            raise InputError(f"could not write {path} ({exc.strerror or exc}); nothing was written. Choose a folder you can write to.") from None

    @classmethod
    def load(cls, path: str | Path) -> "TaskEmbedding":
        if Path(path).is_dir():
            raise WeightsError(f"{path} is a folder; give a task file (.safetensors) written by 'iris-segment encode' or Save task in Slicer.")
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise WeightsError(f"{path}: not an IrisSegment task file (format {meta.get('format')!r}); create one with 'iris-segment encode' or Save task in Slicer.")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise WeightsError(f"{path}: task format version {meta.get('format_version')} is not supported by this IrisSegment.")
        try:
            segments = {int(k): v for k, v in json.loads(meta["segments"]).items()}
            task = cls(
                tensors["tokens"].float(), [int(v) for v in json.loads(meta["label_values"])], segments, meta["modality"],
                float(meta["spacing"]), meta["model_id"], list(json.loads(meta["sources"])), [int(c) for c in json.loads(meta["counts"])],
                [float(t) for t in json.loads(meta.get("thresholds", "[]"))],  # files written before calibration: 0.5
                list(json.loads(meta.get("keep_largest", "[]"))),  # files written before island removal: keep every piece
                tensors["fine_tokens"].float() if "fine_tokens" in tensors else None,  # files written before refinement: none
                [float(s) for s in json.loads(meta.get("fine_spacings", "[]"))],
                MatchingMemory.from_tensors(tensors, MEMORY_PREFIX),  # format 1: none
                [float(w) for w in json.loads(meta.get("match_weights", "[]"))],
                MatchingMemory.from_tensors(tensors, FINE_MEMORY_PREFIX),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{path}: the task file is corrupt ({exc}).") from None
        if not (torch.isfinite(task.tokens).all() and torch.isfinite(task.fine_tokens).all()):
            raise WeightsError(f"{path}: the task embeddings hold NaN or infinite values; the file is corrupt.")
        return task
