"""File IO: round trips keep voxels, geometry and segment metadata; Slicer sees what we write (and we see what
Slicer writes) on the same world grid; every unusable file is an InputError that names the file and the problem."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import nrrd
import numpy as np
import pytest
import slicerio

from IrisSegmentLib.errors import InputError
from IrisSegmentLib.io import read_image, read_label_map, write_image, write_label_map
from IrisSegmentLib.volume import Volume
from support import DATA, make_affine, needs_paths, rotation

SHAPE = (5, 6, 7)  # all different, so a transposed array cannot pass for the original
KIDNEY = (
    "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    "~SCT^64033007^Kidney~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^"
)


AFFINES = {
    "oblique": make_affine(rotation(2, 30) @ rotation(0, -20), (0.7, 1.3, 2.5), (12.3, -45.6, 78.9)),
    "mirrored": make_affine(rotation(1, 15), (-0.9, 1.1, 3.0), (-101.5, 7.25, -3.0)),  # negative determinant
    "permuted": make_affine(np.array([[0.0, 0, -1], [-1, 0, 0], [0, 1, 0]]), (1.0, 0.5, 4.0), (90.0, 120.5, -60.0)),
}


def _labels(affine: np.ndarray) -> Volume:
    """Three non-consecutive labels, two named (one with spaces and a terminology), one left for defaults."""
    array = np.zeros(SHAPE, dtype=np.int64)
    array[1:3, 1:4, 2:5] = 1
    array[3, 4, 5] = 4
    array[4, 0:2, 6] = 17
    segments = {
        1: {"name": "right kidney", "color": (0.9, 0.1, 0.2), "terminology": KIDNEY},
        4: {"name": "liver", "color": (0.25, 0.6, 0.3)},
    }
    return Volume(array, affine, segments=segments)


def _onto_grid(array: np.ndarray, affine: np.ndarray, shape: tuple, target_affine: np.ndarray) -> np.ndarray:
    """`array` re-indexed onto a target grid that differs only by axis flips, permutations or a crop."""
    to_target = np.linalg.inv(target_affine) @ affine
    assert np.allclose(to_target, np.rint(to_target), atol=1e-3), "the grids are not aligned voxel for voxel"
    ijk = np.indices(array.shape).reshape(3, -1)
    target = np.rint(to_target[:3, :3] @ ijk + to_target[:3, 3:]).astype(int)
    inside = np.all((target >= 0) & (target < np.array(shape)[:, None]), axis=0)
    values = array.reshape(-1)
    assert not values[~inside].any(), "content outside the target grid"
    result = np.zeros(shape, dtype=array.dtype)
    result[tuple(target[:, inside])] = values[inside]
    return result


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine_name", AFFINES)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_image_round_trip_keeps_voxels_and_geometry(tmp_path: Path, suffix: str, affine_name: str, dtype: type) -> None:
    array = (np.random.default_rng(0).normal(size=SHAPE) * 300).astype(dtype)
    write_image(Volume(array, AFFINES[affine_name]), tmp_path / f"scan_0000{suffix}")
    back = read_image(tmp_path / f"scan_0000{suffix}")
    assert back.name == "scan_0000"
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, AFFINES[affine_name], atol=1e-5)


@pytest.mark.parametrize("affine_name", AFFINES)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".seg.nrrd"])
def test_label_map_round_trip_keeps_labels_geometry_names_and_colors(tmp_path: Path, suffix: str, affine_name: str) -> None:
    original = _labels(AFFINES[affine_name])
    write_label_map(original, tmp_path / f"case{suffix}")
    back = read_label_map(tmp_path / f"case{suffix}")

    assert back.name == "case"
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, atol=1e-5)
    assert sorted(back.segments) == [1, 4, 17]
    assert back.segments[1]["name"] == "right kidney"
    assert back.segments[4]["name"] == "liver"
    if suffix == ".seg.nrrd":
        assert back.segments[17]["name"] == "Segment_17"
        assert back.segments[1]["terminology"] == KIDNEY
        for value in (1, 4):
            assert back.segments[value]["color"] == pytest.approx(original.segments[value]["color"], abs=1e-6)
        assert not (tmp_path / "case.ctbl").exists()
    else:
        # A .ctbl holds one-word names (spaces written as underscores, as Slicer writes them) and 8-bit colors;
        # the exact names come back from IrisSegment's comment line.
        assert back.segments[17]["name"] == "Segment_17"
        assert (tmp_path / "case.ctbl").read_text().splitlines()[2].startswith("1 right_kidney 230 26 51 255")
        for value in (1, 4):
            assert back.segments[value]["color"] == pytest.approx(original.segments[value]["color"], abs=0.5 / 255)
        assert "terminology" not in back.segments[1]


def test_default_colors_are_distinct_and_the_same_in_every_file(tmp_path: Path) -> None:
    array = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 41).astype(np.uint8)  # labels 1..40, no names anywhere
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "a.nii.gz")  # defaults made when reading
    write_label_map(Volume(array, np.eye(4)), tmp_path / "b.seg.nrrd")  # defaults made when writing
    first, second = read_label_map(tmp_path / "a.nii.gz"), read_label_map(tmp_path / "b.seg.nrrd")
    colors = np.array([first.segments[v]["color"] for v in range(1, 41)])
    distances = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(40)
    assert distances.min() > 0.01
    np.testing.assert_allclose([second.segments[v]["color"] for v in range(1, 41)], colors, atol=1e-9)
    assert [first.segments[v]["name"] for v in (1, 40)] == ["Segment_1", "Segment_40"]


def test_float_label_map_reads_as_integers(tmp_path: Path) -> None:
    array = np.zeros(SHAPE, dtype=np.float32)
    array[1, 2, 3], array[4, 5, 6] = 2.0, 300.0
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "float.nii.gz")
    back = read_label_map(tmp_path / "float.nii.gz")
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, array)
    assert sorted(back.segments) == [2, 300]


@pytest.mark.parametrize("space, signs", [
    ("left-posterior-superior", (-1, -1, 1)),
    ("right-anterior-superior", (1, 1, 1)),
    ("left-anterior-superior", (-1, 1, 1)),
    (None, (-1, -1, 1)),  # no 'space': ITK and Slicer take the directions as LPS
])
def test_nrrd_space_is_converted_to_ras(tmp_path: Path, space: str | None, signs: tuple) -> None:
    ras = AFFINES["oblique"]
    in_space = np.diag([*signs, 1.0]) @ ras
    header = {"space directions": in_space[:3, :3].T, "space origin": in_space[:3, 3], "kinds": ["domain"] * 3}
    header.update({"space": space} if space else {"space dimension": 3})
    nrrd.write(str(tmp_path / "x.nrrd"), np.zeros(SHAPE, np.int16), header)
    np.testing.assert_allclose(read_image(tmp_path / "x.nrrd").affine, ras, atol=1e-9)


def test_nrrd_with_spacings_only_reads_as_slicer_does(tmp_path: Path) -> None:
    nrrd.write(str(tmp_path / "x.nrrd"), np.zeros(SHAPE, np.uint8), {"spacings": [0.5, 2.0, 3.0]})
    np.testing.assert_allclose(read_image(tmp_path / "x.nrrd").affine, np.diag([-0.5, -2.0, 3.0, 1.0]))


def test_written_nrrd_is_lps_like_slicer_files(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]
    write_image(Volume(np.zeros(SHAPE, np.float32), affine), tmp_path / "x.nrrd")
    header = nrrd.read_header(str(tmp_path / "x.nrrd"))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space origin"], affine[:3, 3] * [-1, -1, 1])
    np.testing.assert_allclose(header["space directions"], (affine[:3, :3] * [[-1], [-1], [1]]).T)


def test_nrrd_with_a_single_component_axis_reads_as_3d(tmp_path: Path) -> None:
    directions = np.vstack([[np.nan] * 3, np.diag([1.0, 2.0, 3.0])])
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape((1, *SHAPE))
    nrrd.write(str(tmp_path / "x.nrrd"), array, {
        "space": "right-anterior-superior", "space directions": directions, "kinds": ["list", "domain", "domain", "domain"],
    })
    volume = read_image(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(volume.array, array[0])
    np.testing.assert_allclose(volume.affine, np.diag([1.0, 2.0, 3.0, 1.0]))


def test_nan_voxels_are_not_a_file_error(tmp_path: Path) -> None:
    array = np.ones(SHAPE, np.float32)
    array[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "nan.nii.gz")
    assert np.isnan(read_image(tmp_path / "nan.nii.gz").array[0, 0, 0])
    with pytest.raises(InputError, match="integer"):
        read_label_map(tmp_path / "nan.nii.gz")


# --- names from sidecars -----------------------------------------------------------------------------------


def _dataset_case(root: Path, labels: dict, array: np.ndarray) -> Path:
    (root / "Dataset" / "labelsTr").mkdir(parents=True)
    (root / "Dataset" / "dataset.json").write_text(json.dumps({"labels": labels}))
    path = root / "Dataset" / "labelsTr" / "case.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.mark.parametrize("labels", [
    {"background": 0, "liver": 1, "spleen": 2, "left kidney": 4},  # nnU-Net v2: name -> value
    {"0": "background", "1": "liver", "2": "spleen", "4": "left kidney"},  # MSD / nnU-Net v1: value -> name
])
def test_dataset_json_names_the_labels_present(tmp_path: Path, labels: dict) -> None:
    array = np.zeros(SHAPE, np.uint8)
    array[0, 0, 0], array[1, 1, 1], array[2, 2, 2] = 1, 4, 9  # spleen (2) absent, 9 not in dataset.json
    volume = read_label_map(_dataset_case(tmp_path, labels, array))
    assert {value: segment["name"] for value, segment in volume.segments.items()} == {
        1: "liver", 4: "left kidney", 9: "Segment_9",
    }


def test_color_table_beside_the_file_wins_over_dataset_json(tmp_path: Path) -> None:
    array = np.zeros(SHAPE, np.uint8)
    array[0, 0, 0], array[1, 1, 1] = 1, 4
    path = _dataset_case(tmp_path, {"liver": 1, "kidney": 4}, array)
    path.with_name("case.ctbl").write_text("# Slicer color table\n0 Background 0 0 0 0\n1 'liver_lobe' 255 0 127.5 255\n")
    volume = read_label_map(path)
    assert volume.segments[1] == {"name": "liver lobe", "color": pytest.approx((1.0, 0.0, 128 / 255))}
    assert volume.segments[4]["name"] == "kidney"


@pytest.mark.parametrize("sidecar, text, message", [
    ("Dataset/dataset.json", "{not json", "dataset.json: could not be read as JSON"),
    ("Dataset/labelsTr/case.ctbl", "1 liver 300 0 0 255\n", "case.ctbl, line 1: expected 'value name r g b a'"),
])
def test_broken_sidecar_is_an_input_error(tmp_path: Path, sidecar: str, text: str, message: str) -> None:
    path = _dataset_case(tmp_path, {"liver": 1}, np.ones(SHAPE, np.uint8))
    (tmp_path / sidecar).write_text(text)
    with pytest.raises(InputError, match=message):
        read_label_map(path)


# --- .seg.nrrd layers --------------------------------------------------------------------------------------


def _layered_segmentation(path: Path, masks: dict[str, np.ndarray]) -> None:
    """A .seg.nrrd built as Slicer stores segments: overlapping ones go to extra layers."""
    segmentation = slicerio.create_segmentation(SHAPE, np.diag([-1.0, -1.0, 2.0, 1.0]))
    for name, mask in masks.items():
        slicerio.add_segment(segmentation, mask, {"id": name, "name": name, "color": [0.1, 0.5, 0.9]})
    slicerio.write_segmentation(str(path), segmentation)


def test_overlapping_segments_are_refused(tmp_path: Path) -> None:
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[0:3], b[2:5] = True, True
    _layered_segmentation(tmp_path / "x.seg.nrrd", {"tumor": a, "organ": b})
    with pytest.raises(InputError, match=r"segments 'tumor' and 'organ' overlap in 42 voxels"):
        read_label_map(tmp_path / "x.seg.nrrd")


def test_disjoint_segments_in_several_layers_are_merged_with_distinct_labels(tmp_path: Path) -> None:
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[0:2], b[3:5] = True, True
    voxels = np.stack([a, b]).astype(np.uint8)  # both stored as label 1, in layers 0 and 1
    segments = [{"id": n, "name": n, "color": [0.5, 0.5, 0.5], "labelValue": 1, "layer": layer}
                for layer, n in enumerate(["left", "right"])]
    slicerio.write_segmentation(str(tmp_path / "x.seg.nrrd"), {
        "voxels": voxels, "ijkToLPS": np.eye(4), "segments": segments,
    })
    volume = read_label_map(tmp_path / "x.seg.nrrd")
    np.testing.assert_array_equal(volume.array, a * 1 + b * 2)
    assert {v: s["name"] for v, s in volume.segments.items()} == {1: "left", 2: "right"}
    np.testing.assert_allclose(volume.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))


# --- bad input ---------------------------------------------------------------------------------------------


def _nifti(shape: tuple) -> Callable[[Path], None]:
    return lambda path: nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)


def _truncated_gz(path: Path) -> None:
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(30, 30, 30)), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:3000])


def _nrrd(shape: tuple, header: dict) -> Callable[[Path], None]:
    return lambda path: nrrd.write(str(path), np.zeros(shape, np.uint8), header)


def _typed_nifti(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _rgb() -> np.ndarray:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 200
    return rgb


def _huge_nifti(path: Path) -> None:
    """A NIfTI header claiming 4000^3 float32 voxels (238 GiB) in front of 64 voxels of data."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4000, 4000, 4000))
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    data = header.binaryblock + bytes(4) + np.zeros(64, np.float32).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _huge_nrrd(path: Path) -> None:
    import gzip

    text = ("NRRD0004\ntype: float\ndimension: 3\nsizes: 4000 4000 4000\nencoding: gzip\nspace: left-posterior-superior\n"
            "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n")
    path.write_bytes(text.encode() + gzip.compress(np.zeros(64, np.float32).tobytes()))


BAD_IMAGES = {
    "complex_nifti": ("x.nii", _typed_nifti(np.ones(SHAPE, np.complex64)), "complex-valued voxels .*magnitude"),
    "rgb_nifti": ("x.nii.gz", _typed_nifti(_rgb()), "color or vector voxels .*grayscale"),
    "huge_header_gz": ("x.nii.gz", _huge_nifti, r"4000 x 4000 x 4000 voxels .*more than IrisSegment can load.*crop"),
    "huge_header_truncated": ("x.nii", _huge_nifti, r"4000 x 4000 x 4000 voxels .*holds only 256 bytes.*truncated"),
    "huge_header_nrrd": ("x.nrrd", _huge_nrrd, r"4000 x 4000 x 4000 voxels .*more than IrisSegment can load"),
    "2d_nifti": ("x.nii.gz", _nifti((4, 5)), "is a 2D image"),
    "2d_nrrd": ("x.nrrd", _nrrd((4, 5), {"space": "RAS", "space directions": np.eye(3)[:2]}), "is a 2D image"),
    "4d_nifti": ("x.nii.gz", _nifti((4, 5, 6, 3)), "holds 3 volumes or channels"),
    "rgb_nrrd": ("x.nrrd", _nrrd((3, 4, 5, 6), {"kinds": ["RGB-color", "domain", "domain", "domain"]}),
                 "holds 3 volumes or channels"),
    "truncated_gz": ("x.nii.gz", _truncated_gz, "could not read this NIfTI file .*truncated"),
    "not_nrrd": ("x.nrrd", lambda p: p.write_text("hello"), "could not read this NRRD file"),
    "scanner_space": ("x.nrrd", _nrrd(SHAPE, {"space": "scanner-xyz", "space directions": np.eye(3)}),
                      "NRRD space 'scanner-xyz' is not supported"),
    "unsupported_extension": ("x.mha", lambda p: p.write_text("ObjectType = Image"),
                              r"cannot read an image from this file type; supported: \.nii\.gz, \.nii, \.nrrd, \.nhdr"),
    "segmentation": ("x.seg.nrrd", lambda p: None, r"cannot read an image from '\.seg\.nrrd' files"),
    "missing": ("x.nii.gz", lambda p: None, "file not found"),
    "folder": ("series.nrrd", lambda p: p.mkdir(), "is a folder"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_unusable_image_file_is_an_input_error_naming_it(tmp_path: Path, case: str) -> None:
    name, make, message = BAD_IMAGES[case]
    make(tmp_path / name)
    with pytest.raises(InputError, match=message) as error:
        read_image(tmp_path / name)
    assert str(tmp_path / name) in str(error.value)


def test_huge_header_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size comes from the header: nothing is decompressed or allocated first (a MemoryError before)."""
    def never(*args, **kwargs):
        raise AssertionError("the voxels were read")

    _huge_nifti(tmp_path / "x.nii.gz")
    _huge_nrrd(tmp_path / "y.nrrd")
    _huge_nrrd(tmp_path / "z.seg.nrrd")
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", never)
    monkeypatch.setattr(nrrd.reader, "read_data", never)
    for path, read in [(tmp_path / "x.nii.gz", read_image), (tmp_path / "y.nrrd", read_image), (tmp_path / "z.seg.nrrd", read_label_map)]:
        with pytest.raises(InputError, match=r"4000 x 4000 x 4000 voxels .*more than IrisSegment can load"):
            read(path)


def test_a_volume_at_the_size_limit_is_only_refused_above_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from IrisSegmentLib import files

    write_image(Volume(np.zeros(SHAPE, np.int16), np.eye(4)), tmp_path / "x.nii.gz")
    monkeypatch.setattr(files, "MAX_VOXELS", int(np.prod(SHAPE)))
    assert read_image(tmp_path / "x.nii.gz").shape == SHAPE
    monkeypatch.setattr(files, "MAX_VOXELS", int(np.prod(SHAPE)) - 1)
    with pytest.raises(InputError, match="5 x 6 x 7 voxels"):
        read_image(tmp_path / "x.nii.gz")


def test_corrupt_seg_nrrd_is_an_input_error(tmp_path: Path) -> None:
    write_label_map(_labels(np.eye(4)), tmp_path / "x.seg.nrrd")
    path = tmp_path / "x.seg.nrrd"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="could not read this Slicer segmentation"):
        read_label_map(path)


@pytest.mark.parametrize("segments, message", [
    ({1: {"color": (255, 0, 0)}}, r"color \(255.0, 0.0, 0.0\) must be three numbers in 0..1"),
    ({1: {"terminology": "kidney"}}, "'kidney' is not a Slicer terminology entry"),
])
def test_bad_segment_metadata_is_refused_before_writing(tmp_path: Path, segments: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        write_label_map(Volume(np.ones(SHAPE, np.uint8), np.eye(4), segments=segments), tmp_path / "x.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_non_integer_label_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot write .*x\.nii\.gz: .*non-integer"):
        write_label_map(Volume(np.full(SHAPE, 0.5), np.eye(4)), tmp_path / "x.nii.gz")


def test_unsupported_output_type_and_missing_folder_are_refused(tmp_path: Path) -> None:
    volume = _labels(np.eye(4))
    with pytest.raises(InputError, match=r"supported: \.seg\.nrrd, \.nii\.gz, \.nii, \.nrrd"):
        write_label_map(volume, tmp_path / "x.nhdr")
    with pytest.raises(InputError, match=r"cannot write an image as '\.seg\.nrrd' files; supported: \.nii\.gz"):
        write_image(volume, tmp_path / "x.seg.nrrd")
    with pytest.raises(InputError, match="does not exist; create it first"):
        write_label_map(volume, tmp_path / "missing" / "x.nii.gz")


# --- writing safely ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".seg.nrrd"])
def test_existing_file_is_only_replaced_with_overwrite(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    first = _labels(np.eye(4))
    write_label_map(first, path)
    before = path.read_bytes()
    second = Volume(first.array * 2, np.eye(4))
    with pytest.raises(InputError, match="already exists; .*overwrite=True"):
        write_label_map(second, path)
    assert path.read_bytes() == before
    write_label_map(second, path, overwrite=True)
    np.testing.assert_array_equal(read_label_map(path).array, first.array * 2)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_existing_color_table_is_only_replaced_with_overwrite(tmp_path: Path, suffix: str) -> None:
    """The .ctbl written beside a label map is part of it: an existing one (perhaps another file's names) is kept."""
    table = tmp_path / "x.ctbl"
    table.write_text("0 Background 0 0 0 0\n1 precious 255 0 0 255\n")
    with pytest.raises(InputError, match=r"x\.ctbl already exists .*overwrite=True"):
        write_label_map(_labels(np.eye(4)), tmp_path / f"x{suffix}")
    assert table.read_text() == "0 Background 0 0 0 0\n1 precious 255 0 0 255\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ctbl"]
    write_label_map(_labels(np.eye(4)), tmp_path / f"x{suffix}", overwrite=True)
    assert read_label_map(tmp_path / f"x{suffix}").segments[4]["name"] == "liver"


NAMES = {1: "kidney_left", 2: "front part", 3: "a_b c", 4: "Segment_4", 5: "x  y"}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_color_table_names_round_trip_exactly(tmp_path: Path, suffix: str) -> None:
    array = np.zeros(SHAPE, np.uint8)
    for value in NAMES:
        array[value - 1, 0, 0] = value
    write_label_map(Volume(array, np.eye(4), segments={v: {"name": n} for v, n in NAMES.items()}), tmp_path / f"x{suffix}")
    assert {v: s["name"] for v, s in read_label_map(tmp_path / f"x{suffix}").segments.items()} == NAMES


def test_color_table_edited_after_writing_wins_over_the_exact_names(tmp_path: Path) -> None:
    array = np.zeros(SHAPE, np.uint8)
    array[0, 0, 0], array[1, 0, 0] = 1, 2
    write_label_map(Volume(array, np.eye(4), segments={1: {"name": "kidney_left"}, 2: {"name": "liver_lobe"}}), tmp_path / "x.nii.gz")
    table = tmp_path / "x.ctbl"
    table.write_text(table.read_text().replace("2 liver_lobe", "2 spleen"))  # renamed in Slicer or by hand
    assert {v: s["name"] for v, s in read_label_map(tmp_path / "x.nii.gz").segments.items()} == {1: "kidney_left", 2: "spleen"}
    lines = [line for line in table.read_text().splitlines() if not line.startswith("# IrisSegment names:")]
    table.write_text("\n".join(lines + ["# IrisSegment names: {broken"]) + "\n")  # a damaged names line is ignored
    assert {v: s["name"] for v, s in read_label_map(tmp_path / "x.nii.gz").segments.items()} == {1: "kidney left", 2: "spleen"}


def test_failed_write_leaves_previous_files_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.nrrd"
    write_label_map(_labels(np.eye(4)), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["x.ctbl", "x.nrrd"]

    def disk_full(file: str, *args: object, **kwargs: object) -> None:
        Path(file).write_bytes(b"NRRD0005\npartial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nrrd, "write", disk_full)
    changed = Volume(np.zeros(SHAPE, np.uint8), np.eye(4), segments={1: {"name": "other"}})
    with pytest.raises(InputError, match="could not write .*No space left on device.*nothing was written"):
        write_label_map(changed, path, overwrite=True)
    with pytest.raises(InputError, match="could not write"):
        write_label_map(changed, tmp_path / "new.nrrd")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- Slicer reads what we write, and we read what Slicer writes --------------------------------------------


@pytest.fixture(scope="module")
def slicer():
    """Slicer's own MRML readers and writers (slicer-core, Qt-free), the reference for what Slicer shows."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's Qt-free libraries, the 'test' extra) is not installed")
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    return slicer


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _vtk_voxels(image) -> np.ndarray:
    """Voxels of a vtkImageData as an (i, j, k) array."""
    from vtk.util.numpy_support import vtk_to_numpy

    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    flat = vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1).transpose(2, 1, 0)


def _slicer_read(slicer, path: Path, node_class: str, storage_class: str):
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass(node_class)
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


def _slicer_volume(slicer, path: Path) -> tuple[np.ndarray, np.ndarray]:
    import vtk

    node = _slicer_read(slicer, path, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _vtk_voxels(node.GetImageData()), _numpy_matrix(matrix)


def _slicer_segments(slicer, path: Path) -> dict[str, tuple]:
    """name -> (color, terminology, mask, IJK->RAS of the mask) as Slicer loads a .seg.nrrd."""
    import vtk

    segmentation = _slicer_read(slicer, path, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode").GetSegmentation()
    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        labelmap = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        to_ras = _numpy_matrix(matrix)
        x0, _, y0, _, z0, _ = labelmap.GetExtent()
        to_ras[:3, 3] += to_ras[:3, :3] @ [x0, y0, z0]  # the mask array starts at the extent start
        mask = _vtk_voxels(labelmap) == segment.GetLabelValue()
        found[segment.GetName()] = (segment.GetColor(), segment.GetTerminology(), mask, to_ras)
    return found


@pytest.mark.parametrize("affine_name", AFFINES)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_slicer_reads_our_images_on_the_same_world_grid(slicer, tmp_path: Path, suffix: str, affine_name: str) -> None:
    affine = AFFINES[affine_name]
    array = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    write_image(Volume(array, affine), tmp_path / f"x{suffix}")
    their_array, their_affine = _slicer_volume(slicer, tmp_path / f"x{suffix}")
    np.testing.assert_array_equal(_onto_grid(their_array, their_affine, SHAPE, affine), array)


@pytest.mark.parametrize("affine_name", AFFINES)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_slicer_reads_our_label_maps_and_color_tables(slicer, tmp_path: Path, suffix: str, affine_name: str) -> None:
    ours = _labels(AFFINES[affine_name])
    write_label_map(ours, tmp_path / f"x{suffix}")
    written = read_label_map(tmp_path / f"x{suffix}").segments
    their_array, their_affine = _slicer_volume(slicer, tmp_path / f"x{suffix}")
    np.testing.assert_array_equal(_onto_grid(their_array, their_affine, SHAPE, ours.affine), ours.array)

    table = _slicer_read(slicer, tmp_path / "x.ctbl", "vtkMRMLColorTableNode", "vtkMRMLColorTableStorageNode")
    for value, segment in written.items():
        rgba = [0.0] * 4
        table.GetColor(value, rgba)
        assert table.GetColorName(value) == segment["name"].replace("_", " ")  # Slicer reads every underscore as a space
        assert rgba == pytest.approx([*segment["color"], 1.0], abs=1e-6)


@pytest.mark.parametrize("affine_name", AFFINES)
def test_slicer_reads_our_segmentation(slicer, tmp_path: Path, affine_name: str) -> None:
    ours = _labels(AFFINES[affine_name])
    write_label_map(ours, tmp_path / "x.seg.nrrd")
    theirs = _slicer_segments(slicer, tmp_path / "x.seg.nrrd")
    assert sorted(theirs) == ["Segment_17", "liver", "right kidney"]
    for value, name in [(1, "right kidney"), (4, "liver"), (17, "Segment_17")]:
        color, terminology, mask, to_ras = theirs[name]
        np.testing.assert_array_equal(_onto_grid(mask, to_ras, SHAPE, ours.affine), ours.array == value)
        assert color == pytest.approx(read_label_map(tmp_path / "x.seg.nrrd").segments[value]["color"])
    assert theirs["right kidney"][1] == KIDNEY


def _slicer_write_segmentation(slicer, path: Path, affine: np.ndarray, masks: dict[str, tuple]) -> None:
    """Save masks as Slicer's Segment Editor would: segments that overlap go to separate layers."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(affine.ravel())
    for name, (mask, color) in masks.items():
        segment_id = node.GetSegmentation().AddEmptySegment("", name, color)
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*mask.shape)
        flat = np.ascontiguousarray(mask.transpose(2, 1, 0).ravel().astype(np.uint8))
        image.GetPointData().SetScalars(numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        image.SetImageToWorldMatrix(matrix)
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, node, segment_id)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(node)


def test_we_read_a_slicer_segmentation_on_the_same_world_grid(slicer, tmp_path: Path) -> None:
    affine = AFFINES["mirrored"]
    kidney, spleen = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    kidney[1:3, 2:4, 3:5], spleen[3:5, 4:6, 5:7] = True, True
    _slicer_write_segmentation(slicer, tmp_path / "s.seg.nrrd", affine,
                               {"kidney": (kidney, (1.0, 0.0, 0.0)), "spleen": (spleen, (0.0, 0.5, 1.0))})
    # Slicer saved only the occupied box: the file's grid is a crop of ours.
    assert nrrd.read_header(str(tmp_path / "s.seg.nrrd"))["sizes"].tolist() != list(SHAPE)
    volume = read_label_map(tmp_path / "s.seg.nrrd")
    by_name = {segment["name"]: (value, segment) for value, segment in volume.segments.items()}
    assert sorted(by_name) == ["kidney", "spleen"]
    for name, mask, color in [("kidney", kidney, (1.0, 0.0, 0.0)), ("spleen", spleen, (0.0, 0.5, 1.0))]:
        value, segment = by_name[name]
        assert segment["color"] == pytest.approx(color)
        assert "Tissue" in segment["terminology"]  # Slicer's default terminology survives
        np.testing.assert_array_equal(_onto_grid(volume.array == value, volume.affine, SHAPE, affine), mask)


def test_slicer_segmentation_with_overlap_is_refused(slicer, tmp_path: Path) -> None:
    a, b = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    a[1:3, 1:3, 1:3], b[2:4, 2:4, 2:4] = True, True
    _slicer_write_segmentation(slicer, tmp_path / "s.seg.nrrd", np.eye(4), {"a": (a, (1, 0, 0)), "b": (b, (0, 1, 0))})
    assert nrrd.read_header(str(tmp_path / "s.seg.nrrd"))["dimension"] == 4  # Slicer stored two layers
    with pytest.raises(InputError, match="segments 'a' and 'b' overlap in 1 voxel, "):
        read_label_map(tmp_path / "s.seg.nrrd")


# --- real data ---------------------------------------------------------------------------------------------


@needs_paths(DATA / "HeadNeck_CT")
def test_real_head_neck_case(tmp_path: Path) -> None:
    dataset = DATA / "HeadNeck_CT"
    label_path = sorted((dataset / "labelsTr").glob("*.nii.gz"))[0]
    image_path = dataset / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz")
    image, labels = read_image(image_path), read_label_map(label_path)

    reference = nib.load(image_path)
    np.testing.assert_array_equal(image.array, np.asanyarray(reference.dataobj))
    np.testing.assert_allclose(image.affine, reference.affine)
    labels.check_matches(image)
    names = {value: name for name, value in json.loads((dataset / "dataset.json").read_text())["labels"].items()}
    present = sorted(int(v) for v in np.unique(np.asanyarray(nib.load(label_path).dataobj)) if v)
    assert {v: s["name"] for v, s in labels.segments.items()} == {v: names[v] for v in present}

    write_label_map(labels, tmp_path / "case.seg.nrrd")
    back = read_label_map(tmp_path / "case.seg.nrrd")
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_allclose(back.affine, labels.affine, atol=1e-5)
    assert back.segments == labels.segments
