"""Evaluation datasets in the nnU-Net layout, and the held-out split.

    <Dataset>/dataset.json                   "labels" (name -> value), "channel_names", "file_ending"
    <Dataset>/imagesTr/<case>_0000<ending>   image (channel 0; further channels are ignored)
    <Dataset>/labelsTr/<case><ending>        label map

Label-map-only sets (no imagesTr) serve training but cannot be evaluated, so they are refused here.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import read_image, read_label_map
from ..io.sidecars import parse_label_table
from ..volume import Volume

_LAYOUT = "expected the nnU-Net layout: dataset.json, imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz"


@dataclass(frozen=True)
class EvaluationCase:
    case_id: str
    image_path: Path
    labels_path: Path


@dataclass(frozen=True)
class EvaluationDataset:
    name: str
    folder: Path
    modality: str  # channel 0 name from dataset.json, e.g. "CT" or "MRI"
    label_names: dict[int, str]  # non-zero label value -> name
    cases: list[EvaluationCase]  # sorted by case id

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    def case(self, case_id: str) -> EvaluationCase:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise InputError(f"{self.folder}: no case {case_id!r}; it has {len(self.cases)} cases, e.g. {self.case_ids[:3]}.")


def _label_names(labels: object, json_path: Path) -> dict[int, str]:
    """nnU-Net v2 ("name": value) or v1/MSD ("value": "name") label table, background dropped."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{json_path}: needs a non-empty \"labels\" table (name -> label value); {_LAYOUT}.")
    names, others = parse_label_table(labels)
    if others:
        key, value = others[0]
        raise InputError(
            f"{json_path}: label {key!r} -> {value!r} is not one integer value (region-based labels cannot be "
            "scored per class); give each class its own label value."
        )
    names.pop(0, None)
    return names


def load_dataset(folder: str | Path) -> EvaluationDataset:
    """Index an nnU-Net-layout folder: case ids, file paths and label names (no voxels are read)."""
    folder = Path(folder)
    json_path = folder / "dataset.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found; {_LAYOUT}.")
    if not json_path.is_file():
        raise InputError(f"{folder}: no dataset.json; {_LAYOUT}.")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{json_path}: could not be read as JSON ({exc}); fix the file.") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{json_path}: must hold a JSON object; {_LAYOUT}.")
    images, labels = folder / "imagesTr", folder / "labelsTr"
    for sub in (images, labels):
        if not sub.is_dir():
            raise InputError(f"{folder}: no {sub.name}/ folder (evaluation needs images and label maps); {_LAYOUT}.")
    ending = str(meta.get("file_ending", ".nii.gz"))
    image_suffix = "_0000" + ending
    image_ids = {p.name[: -len(image_suffix)] for p in images.iterdir() if p.name.endswith(image_suffix)}
    label_ids = {p.name[: -len(ending)] for p in labels.iterdir() if p.name.endswith(ending)}
    if image_ids != label_ids:
        unpaired = sorted(image_ids ^ label_ids)
        raise InputError(
            f"{folder}: {len(unpaired)} cases have an image without a label map or the reverse, e.g. {unpaired[:3]}; "
            f"every imagesTr/<case>{image_suffix} needs labelsTr/<case>{ending}."
        )
    if not image_ids:
        raise InputError(f"{folder}: no cases found (no imagesTr/*{image_suffix}); {_LAYOUT}.")
    channels = meta.get("channel_names") or meta.get("modality") or {}
    return EvaluationDataset(
        name=str(meta.get("name") or folder.name),
        folder=folder,
        modality=str(channels.get("0", "")) if isinstance(channels, dict) else "",
        label_names=_label_names(meta.get("labels"), json_path),
        cases=[EvaluationCase(i, images / f"{i}{image_suffix}", labels / f"{i}{ending}") for i in sorted(image_ids)],
    )


def read_case(case: EvaluationCase) -> tuple[Volume, Volume]:
    """Image and label map of a case, checked to lie on the same voxel grid."""
    image = read_image(case.image_path)
    labels = read_label_map(case.labels_path)
    try:
        labels.check_matches(image)
    except InputError as exc:
        raise InputError(f"case {case.case_id}: {exc}") from None
    return image, labels


def split_cases(case_ids: Sequence[str], fraction_heldout: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split, both sorted.

    Ids are sorted, permuted with ``numpy.random.default_rng(seed)`` and the first
    ceil(fraction * n) are held out (at most n - 1, so one reference remains for training);
    the order the ids come in does not matter. This is the rule behind Resources/splits.json
    (fraction 0.25, seed 0).
    """
    if not 0.0 <= fraction_heldout < 1.0:
        raise InputError(f"fraction_heldout must be in [0, 1), got {fraction_heldout}.")
    ids = sorted(case_ids)
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise InputError(f"case ids must be unique; repeated: {duplicates[:5]}.")
    count = min(math.ceil(fraction_heldout * len(ids)), max(len(ids) - 1, 0))
    order = np.random.default_rng(seed).permutation(len(ids))
    heldout = {ids[i] for i in order[:count]}
    return [i for i in ids if i not in heldout], sorted(heldout)
