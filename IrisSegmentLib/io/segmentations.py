"""Read and write label maps: NIfTI and NRRD (names in a sidecar) and Slicer .seg.nrrd segmentations.

A label map is one integer array (0 = background) plus `Volume.segments`:
{value: {"name": str, "color": (r, g, b) in 0..1, "terminology": Slicer terminology tag (optional)}}.
Every label present gets a name and color, so a reference's classes read the same in the CLI and Slicer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import slicerio
from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string

from ..errors import InputError
from ..segments import complete_segments, label_dtype, present_labels
from ..volume import Volume
from ..files import color_table_path, file_format, file_stem, reading, staged_write
from .images import LPS_TO_RAS, check_nrrd_size, read_voxels, write_voxels
from .sidecars import dataset_label_names, read_color_table, write_color_table

READ_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr")
WRITE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")


def read_label_map(path: str | Path) -> Volume:
    """Read a label map (.seg.nrrd, .nii, .nii.gz, .nrrd, .nhdr) with its segment names and colors.

    .seg.nrrd: every segment (even an empty one) with its name, color and terminology; segments stored in
    several layers are merged, and refused if they overlap, since a label map holds one label per voxel.
    NIfTI/NRRD: the labels present, named from `<stem>.ctbl` beside the file, else from the nnU-Net
    dataset.json two folders up, else `Segment_<value>`.
    Labels come back as uint8/uint16/uint32 whatever the stored type (float label maps are common).
    """
    path = Path(path)
    suffix = file_format(path, READ_SUFFIXES, "read a label map from")
    if suffix == ".seg.nrrd":
        array, affine, segments = _read_seg_nrrd(path)
    else:
        array, affine = read_voxels(path, suffix)
        segments = None
    volume = Volume(array, affine, name=str(path))  # errors then name the full path
    volume.check_label_map()
    volume.array = volume.array.astype(label_dtype(int(volume.array.max())), copy=False)
    present = present_labels(volume.array)
    if segments is None:
        segments = _sidecar_segments(path, suffix, present)
    volume.segments = complete_segments(segments, present)
    volume.name = file_stem(path, suffix)
    return volume


def write_label_map(volume: Volume, path: str | Path, overwrite: bool = False) -> None:
    """Write a label map on its exact grid with its label values, atomically; refuse to replace a file unless `overwrite`.

    .seg.nrrd keeps names, colors and terminology. NIfTI and NRRD cannot hold names, so a Slicer color
    table `<stem>.ctbl` is written beside them (read back by read_label_map and by Slicer).
    """
    path = Path(path)
    suffix = file_format(path, WRITE_SUFFIXES, "write a label map as")
    try:
        volume.check_label_map()
    except InputError as exc:
        raise InputError(f"cannot write {path}: {exc}") from None
    labels = volume.array.astype(label_dtype(int(volume.array.max())), copy=False)
    segments = complete_segments(volume.segments, present_labels(labels))
    if suffix == ".seg.nrrd":
        with staged_write(path, overwrite=overwrite) as (temp,):
            _write_seg_nrrd(labels, volume.affine, segments, temp)
    else:
        with staged_write(path, color_table_path(path, suffix), overwrite=overwrite) as (temp, temp_table):
            write_voxels(labels, volume.affine, temp, suffix)
            write_color_table(segments, temp_table)


def _sidecar_segments(path: Path, suffix: str, present: list[int]) -> dict[int, dict]:
    """Names (and colors) of the present labels: the file's own .ctbl wins over the dataset-wide dataset.json."""
    known: dict[int, dict] = {value: {"name": name} for value, name in dataset_label_names(path).items()}
    table = color_table_path(path, suffix)
    if table.is_file():
        known.update(read_color_table(table))
    return {value: known[value] for value in present if value in known}


def _read_seg_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    """One label map, its IJK->RAS affine and segments from a .seg.nrrd; overlapping segments are refused."""
    with reading(path, "Slicer segmentation (.seg.nrrd)"):
        check_nrrd_size(path)
        segmentation = slicerio.read_segmentation(str(path))
        voxels = segmentation["voxels"]
        layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
        found = segmentation["segments"]
        stored = [int(segment.get("labelValue", 1)) for segment in found]
        # Segments in different layers often share a stored value: then number them 1..n in file order.
        values = stored if len(set(stored)) == len(stored) else list(range(1, len(found) + 1))
        labels = np.zeros(layers.shape[1:], dtype=label_dtype(max(values, default=0)))
        segments: dict[int, dict] = {}
        for segment, stored_value, value in zip(found, stored, values):
            mask = layers[int(segment.get("layer", 0))] == stored_value
            taken = labels[mask]
            if taken.any():
                other = segments[int(taken[taken != 0][0])]["name"]
                shared = int(np.count_nonzero(taken))
                raise InputError(
                    f"{path}: segments {other!r} and {segment.get('name')!r} overlap in {shared} voxel{'s' * (shared > 1)}, "
                    "but a label map holds one label per voxel. Remove the overlap in Slicer (Segment Editor, "
                    "Logical operators > Subtract) or save the segments to separate files."
                )
            labels[mask] = value
            segments[value] = {
                "name": segment.get("name"),
                "color": segment.get("color"),
                "terminology": terminology_entry_to_string(segment["terminology"]) if "terminology" in segment else None,
            }
        affine = LPS_TO_RAS @ np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    return labels, affine, segments


def _write_seg_nrrd(labels: np.ndarray, affine: np.ndarray, segments: dict[int, dict], path: Path) -> None:
    """Write a single-layer Slicer segmentation, one segment per label value."""
    entries = []
    for value, segment in sorted(segments.items()):
        entry = {"id": f"Segment_{value}", "labelValue": value, "name": segment["name"], "color": list(segment["color"])}
        if "terminology" in segment:
            entry["terminology"] = _terminology_entry(segment["terminology"], segment["name"])
        entries.append(entry)
    slicerio.write_segmentation(
        str(path),
        {
            "voxels": labels,
            "ijkToLPS": LPS_TO_RAS @ affine,
            "containedRepresentationNames": ["Binary labelmap"],
            "masterRepresentation": "Binary labelmap",
            "segments": entries,
        },
    )


def _terminology_entry(text: str, name: str) -> dict:
    """slicerio's form of a Slicer terminology tag, refusing text that is not one (7 fields separated by '~')."""
    if text.count("~") != 6:
        raise InputError(
            f"segment {name!r}: terminology {text!r} is not a Slicer terminology entry "
            "(7 fields separated by '~'); fix or remove it."
        )
    return terminology_entry_from_string(text)
