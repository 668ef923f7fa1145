"""MRML nodes <-> engine Volumes. Main thread only: every function here reads or writes the scene.

Slicer's arrays are (k, j, i) and its IJKToRAS matrix maps (i, j, k) to the node's local RAS; the engine
wants (i, j, k) arrays and world RAS, so arrays are transposed (and copied, so the worker never reads
VTK memory) and a parent transform is folded into the affine. Segment names, colors and terminology
travel as the engine's segment metadata, so results look like the references they came from.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import slicer
import vtk

from ..errors import InputError
from ..files import color_table_path, staged_write
from ..segments import class_terminology, label_dtype
from ..volume import Volume

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
SEGMENTATION_SUFFIX = ".seg.nrrd"


@functools.lru_cache(maxsize=1)
def default_terminology() -> str:
    """The tag Slicer gives every new segment ("Tissue"): it names no class, so classes are then matched by name."""
    return slicer.vtkSegment().GetTerminology()


def _terminology_meaning(tag: str) -> str:
    """'Kidney' from a terminology tag (its third field is the type, 'SCT^64033007^Kidney')."""
    fields = tag.split("~")
    return fields[2].split("^")[-1] if len(fields) > 2 and fields[2].count("^") == 2 else tag


def world_affine(node) -> np.ndarray:
    """IJK -> world RAS of a volume node, including a linear parent transform."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    affine = slicer.util.arrayFromVTKMatrix(matrix)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(
                f"{node.GetName()!r} is under a non-linear (warping) transform: harden it first "
                "(Data module: right-click the volume > Harden transform)."
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        affine = slicer.util.arrayFromVTKMatrix(to_world) @ affine
    return affine


def check_scalar_volume(node, role: str) -> None:
    """A grayscale 3D scan: not missing, not a label map, segmentation or multi-component volume."""
    if node is None:
        raise InputError(f"Select a {role} volume.")
    name = node.GetName()
    if node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"{name!r} is a segmentation, not a scan: choose the image (a scalar volume, CT or MR) as the {role} volume.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(
            f"{name!r} is a label map, not a scan: choose the image (a scalar volume, CT or MR) as the {role} volume. "
            "To use a label map as a reference, convert it to a segmentation (Data module: right-click > Convert labelmap to segmentation)."
        )
    image = node.GetImageData() if node.IsA("vtkMRMLScalarVolumeNode") else None
    if image is None or node.IsA("vtkMRMLTensorVolumeNode") or image.GetNumberOfScalarComponents() != 1:
        components = image.GetNumberOfScalarComponents() if image is not None else 0
        what = f"a {components}-component (color or vector) volume" if components > 1 else f"a {node.GetClassName()} without a single-channel image"
        raise InputError(
            f"{name!r} is {what}: IrisSegment needs a single-channel 3D scan as the {role} volume "
            "(convert color images with the Vector to Scalar Volume module)."
        )


def volume_from_node(node, role: str) -> Volume:
    """The scan as an engine Volume: (i, j, k) copy of the voxels and the world affine."""
    check_scalar_volume(node, role)
    voxels = slicer.util.arrayFromVolume(node)  # (k, j, i), shares VTK's memory
    try:
        return Volume(np.array(voxels.transpose(2, 1, 0)), world_affine(node), name=node.GetName())
    except InputError as exc:
        raise InputError(f"{role} volume {exc}") from None


def check_segmentation(node, role: str) -> None:
    if node is None:
        raise InputError(f"Select the {role} segmentation.")
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"{node.GetName()!r} is not a segmentation: choose a segmentation node as the {role} segmentation.")


def segment_ids(node) -> list[str]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segment_metadata(segment) -> dict:
    """The engine's metadata of a segment; Slicer's default terminology is left out (it names no class)."""
    metadata = {"name": segment.GetName(), "color": tuple(float(c) for c in segment.GetColor())}
    tag = vtk.reference("")
    if segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and class_terminology(str(tag)):
        metadata["terminology"] = str(tag)
    return metadata


def labels_from_segmentation(
    node, geometry_node, image: Volume, chosen: list[str] | None, value_of: Callable[[dict], int | None], allow_empty: bool
) -> Volume:
    """Segments of `node` as one label map on `geometry_node`'s grid (the grid of `image`).

    `value_of` gives each segment's label value from its metadata (None: leave the segment out). A label
    map holds one class per voxel, so overlapping segments of different classes are refused, as are
    two segments that differ in name but share a terminology (they would be taken for one class).
    """
    name = node.GetName()
    ids = segment_ids(node) if chosen is None else list(chosen)
    if not ids and chosen is not None:
        raise InputError(f"no segment of {name!r} is chosen: tick at least one in its list of segments.")
    if not ids:
        raise InputError(f"segmentation {name!r} has no segments: segment at least one structure in it (Segment Editor), or choose another segmentation.")
    segmentation = node.GetSegmentation()
    labels = np.zeros(image.shape, dtype=np.uint32)
    segments: dict[int, dict] = {}
    for segment_id in ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise InputError(f"segmentation {name!r} has no segment {segment_id!r} (was it deleted?): choose its segments again.")
        metadata = segment_metadata(segment)
        value = value_of(metadata)
        if value is None:
            continue
        if value in segments and segments[value]["name"].lower() != metadata["name"].lower():
            raise InputError(
                f"segments {segments[value]['name']!r} and {metadata['name']!r} of {name!r} have the same terminology "
                f"({_terminology_meaning(metadata.get('terminology', ''))}), so they would be taken for one class: "
                "give them different terminology (double-click the segment's color), or merge them."
            )
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, geometry_node).transpose(2, 1, 0) > 0
        if not mask.any() and not allow_empty:
            raise InputError(
                f"segment {metadata['name']!r} of {name!r} is empty (or lies outside volume {geometry_node.GetName()!r}): "
                "paint it, or leave it out of this reference's segments."
            )
        taken = labels[mask]
        others = taken[(taken != 0) & (taken != value)]
        if others.size:
            raise InputError(
                f"segments {segments[int(others[0])]['name']!r} and {metadata['name']!r} of {name!r} overlap in {others.size} voxels, "
                "but each voxel can hold one class: remove the overlap (Segment Editor: Logical operators > Subtract) or leave one of them out."
            )
        labels[mask] = value
        segments.setdefault(value, metadata)
    top = max(segments, default=0)
    return Volume(labels.astype(label_dtype(top), copy=False), image.affine, name=name, segments=segments)


def remove_node(node) -> None:
    """Remove a helper node with the display, storage and private color nodes made for it."""
    scene = node.GetScene()
    if scene is None:
        return
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] if node.IsA("vtkMRMLDisplayableNode") else []
    helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())] if node.IsA("vtkMRMLStorableNode") else []
    colors = [d.GetColorNode() for d in helpers if d is not None and d.IsA("vtkMRMLDisplayNode")]
    helpers += [c for c in colors if c is not None and not c.GetSingletonTag()]  # never Slicer's shared tables
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)


def new_segmentation_node(name: str):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    return node


def write_segments(labels: Volume, node, target_node, keep: Sequence[str] = ()) -> None:
    """Replace `node`'s segments by one per label value of `labels` (which lies on the target's grid).

    Every class gets its segment, empty where it was not found, so the user can paint it and tune;
    names, colors and terminology come from `labels.segments`. The segments named in `keep` (by ID)
    stay as they are, after the classes: Tune keeps the segments a user added that are not classes.
    """
    values = list(labels.segments)
    kept = [segment_id for segment_id in segment_ids(node) if segment_id in set(keep)]
    node.SetReferenceImageGeometryParameterFromVolumeNode(target_node)
    node.SetAndObserveTransformNodeID(target_node.GetTransformNodeID())
    segmentation = node.GetSegmentation()
    was_modifying = node.StartModify()
    try:
        for segment_id in segment_ids(node):
            if segment_id not in kept:
                segmentation.RemoveSegment(segment_id)
        ids = vtk.vtkStringArray()
        for value in values:
            metadata = labels.segments[value]
            segment_id = segmentation.AddEmptySegment(_free_segment_id(segmentation, f"Segment_{value}"), metadata["name"], list(metadata["color"]))
            if metadata.get("terminology"):
                segment = segmentation.GetSegment(segment_id)
                segment.SetTag(segment.GetTerminologyEntryTagName(), metadata["terminology"])
            ids.InsertNextValue(segment_id)
        for index in range(ids.GetNumberOfValues()):  # the classes first, in their order; kept segments after
            segmentation.SetSegmentIndex(ids.GetValue(index), index)
        # ImportLabelmapToSegmentationNode maps label n to the n-th segment id: renumber the values 1..K.
        lookup = np.zeros(max(values, default=0) + 1, dtype=label_dtype(len(values)))
        lookup[values] = np.arange(1, len(values) + 1)
        consecutive = lookup[labels.array]
        temporary = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "IrisSegment temporary")
        try:
            temporary.CopyOrientation(target_node)
            temporary.SetAndObserveTransformNodeID(target_node.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(temporary, np.ascontiguousarray(consecutive.transpose(2, 1, 0)))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, node, ids):
                raise RuntimeError(f"Slicer could not import the result into {node.GetName()!r}.")
        finally:
            remove_node(temporary)
    finally:
        node.EndModify(was_modifying)


def _free_segment_id(segmentation, wanted: str) -> str:
    """`wanted`, or a variant of it no kept segment uses."""
    segment_id, number = wanted, 1
    while segmentation.GetSegment(segment_id) is not None:
        number += 1
        segment_id = f"{wanted}_{number}"
    return segment_id


def snapshot(node):
    """A deep copy of a segmentation's content (segments, representations, tags), for undo."""
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(node.GetSegmentation())
    return copy


def restore(node, copy) -> None:
    was_modifying = node.StartModify()
    node.GetSegmentation().DeepCopy(copy)
    node.Modified()
    node.EndModify(was_modifying)


def check_exportable(node) -> None:
    check_segmentation(node, "output")
    if not segment_ids(node):
        raise InputError(f"{node.GetName()!r} has no segments to export.")


def export_labelmap(node, reference_node, name: str | None = None):
    """A new label map volume of all segments on the reference volume's grid (values 1..N in segment order).

    Like `export_file`, it needs no model and no torch: the panel's export buttons use it directly."""
    check_exportable(node)
    name = name or f"{node.GetName()} labels"
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", slicer.mrmlScene.GenerateUniqueName(name))
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids(node):
        ids.InsertNextValue(segment_id)
    if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, labelmap, reference_node):
        remove_node(labelmap)
        raise InputError(f"Slicer could not export {node.GetName()!r} to a label map; check it has segments and a reference geometry.")
    return labelmap


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (SEGMENTATION_SUFFIX, *LABELMAP_SUFFIXES):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputError(f"{path}: cannot export as this file type; use {SEGMENTATION_SUFFIX} (keeps names, colors, terminology), {', '.join(LABELMAP_SUFFIXES)}.")


def _write(storage, node, path: Path) -> None:
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise InputError(f"could not write {path}: check the folder is writable and the disk has space.")


def export_paths(path: str | Path) -> list[Path]:
    """The files `export_file` writes for `path`: the file itself, then any sidecar (`<stem>.ctbl`)."""
    path = Path(path)
    suffix = _file_kind(path)
    if suffix == SEGMENTATION_SUFFIX:
        return [path]
    return [path, color_table_path(path, suffix)]


def export_file(node, reference_node, path: str | Path, overwrite: bool = False) -> list[Path]:
    """Write `.seg.nrrd` (names, colors, terminology), or NIfTI/NRRD plus `<stem>.ctbl` with the names
    and colors (read by Slicer and the iris-segment CLI). Returns the files written.

    An existing file, sidecar included, is replaced only with `overwrite`; files appear complete or
    not at all (written under temporary names, then moved into place)."""
    check_exportable(node)
    path, *sidecars = export_paths(path)
    with staged_write(path, *sidecars, overwrite=overwrite) as temps:
        if not sidecars:
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.CropToMinimumExtentOff()  # the full reference grid, so the file pairs with its scan voxel for voxel
            _write(storage, node, temps[0])
        else:
            labelmap = export_labelmap(node, reference_node, f"{node.GetName()} export")
            try:
                storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
                storage.UseCompressionOn()
                _write(storage, labelmap, temps[0])
                _write(slicer.vtkMRMLColorTableStorageNode(), labelmap.GetDisplayNode().GetColorNode(), temps[1])
            finally:
                remove_node(labelmap)
    return [path, *sidecars]
