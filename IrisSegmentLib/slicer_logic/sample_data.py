"""The bundled sample pair (Resources/SampleData: two hippocampus MRI crops with manual labels) in Slicer.

The module registers it with Slicer's Sample Data module (`sample_data_source()`: local file URLs with
their checksums, so nothing is downloaded) and its self-test loads it with `load_sample()`, which the
Sample Data button runs too: the reference labels become a segmentation named by their color table
(`reference_labels.ctbl`), as a user would load them. No torch and no Qt here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import slicer

from ..errors import InputError
from . import scene_bridge

CATEGORY = "IrisSegment"
SAMPLE_NAME = "IrisSegmentHippocampus"
SAMPLE_DESCRIPTION = "Hippocampus MRI pair\n(IrisSegment)"
# (file, node name, Slicer file type): what the Sample Data module loads, in order.
FILES = (
    ("reference_image.nii.gz", "IrisSegment reference", "VolumeFile"),
    ("reference_labels.nii.gz", "IrisSegment reference segmentation", "SegmentationFile"),
    ("target_image.nii.gz", "IrisSegment target", "VolumeFile"),
)
REFERENCE_COLORS = "reference_labels.ctbl"
# Scored against the target's own labels (never given to the model).
TARGET_TRUTH = ("target_truth.nii.gz", "target_truth.ctbl")


def sample_folder() -> Path:
    """Resources/SampleData of the source tree, or the copy the Slicer build installs inside the package."""
    package = Path(__file__).resolve().parents[1]
    candidates = [package.parent / "Resources" / "SampleData", package / "Resources" / "SampleData"]
    return next((c for c in candidates if (c / FILES[0][0]).is_file()), candidates[0])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_data_source(thumbnail: str | None = None) -> dict:
    """Keyword arguments of SampleData.SampleDataLogic.registerCustomSampleDataSource for the pair:
    local file URLs (Sample Data copies them into its cache and checks their SHA256)."""
    folder = sample_folder()
    paths = [folder / name for name, _, _ in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"the IrisSegment sample data is missing ({', '.join(missing)}): reinstall the extension.")
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [p.as_uri() for p in paths],
        "fileNames": [name for name, _, _ in FILES],
        "nodeNames": [node for _, node, _ in FILES],
        "loadFileTypes": [kind for _, _, kind in FILES],
        "checksums": [f"SHA256:{_sha256(p)}" for p in paths],
        "thumbnailFileName": thumbnail,
    }


@dataclass
class Sample:
    reference: object  # vtkMRMLScalarVolumeNode
    reference_segmentation: object  # vtkMRMLSegmentationNode, segments named and colored by the .ctbl
    target: object  # vtkMRMLScalarVolumeNode


def _volume(path: Path, name: str):
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), slicer.mrmlScene.GenerateUniqueName(name), 0)
    if node is None:
        raise InputError(f"Slicer could not read {path}.")
    return node


def _segmentation(labels: Path, colors: Path, name: str):
    """A label map file as a segmentation whose segments take the color table's names and colors."""
    color_node = slicer.modules.colors.logic().LoadColorFile(str(colors))
    if color_node is None:
        raise InputError(f"Slicer could not read the color table {colors}.")
    try:
        node = slicer.modules.segmentations.logic().LoadSegmentationFromFile(str(labels), True, slicer.mrmlScene.GenerateUniqueName(name), color_node)
    finally:
        scene_bridge.remove_node(color_node)
    if node is None:
        raise InputError(f"Slicer could not read {labels} as a segmentation.")
    return node


def load_sample() -> Sample:
    """Load the pair into `slicer.mrmlScene`: reference scan, its segmentation (named segments) and the target scan."""
    folder = sample_folder()
    (reference, reference_name, _), (labels, labels_name, _), (target, target_name, _) = FILES
    return Sample(
        reference=_volume(folder / reference, reference_name),
        reference_segmentation=_segmentation(folder / labels, folder / REFERENCE_COLORS, labels_name),
        target=_volume(folder / target, target_name),
    )


def load_target_truth(name: str = "IrisSegment target truth"):
    """The target's manual labels as a segmentation, to score a result (the self-test, the screenshot)."""
    folder = sample_folder()
    labels, colors = TARGET_TRUTH
    return _segmentation(folder / labels, folder / colors, name)
