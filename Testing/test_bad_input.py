"""Every unusable input is an IrisError (InputError, WeightsError, DeviceError) whose message names the problem,
raised before any work is wasted where possible; never a torch traceback, never a partial output file."""
from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from engine_fixtures import case, image_path, labels_path, model, predictor, quick_reference_fit, random_model, require_data, weights_file  # noqa: F401
from IrisSegmentLib.cli import main
from IrisSegmentLib.device import resolve_device
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.errors import DeviceError, InputError, IrisError, WeightsError
from IrisSegmentLib.inference.predictor import IrisPredictor
from IrisSegmentLib.model.serialization import load_tensors, save_tensors
from IrisSegmentLib.model.weights import load_model
from IrisSegmentLib.volume import Volume


def _raises(error_type, *words, call):
    """Run `call`, expect an IrisError subclass `error_type` whose message holds every word (any case)."""
    with pytest.raises(IrisError) as info:
        call()
    assert isinstance(info.value, error_type), f"{type(info.value).__name__}: {info.value}"
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in: {info.value}"
    return info.value


def _cli_fails(capsys, argv: list[str], output: Path, *words: str) -> str:
    """The CLI exits 2 with an `error: ...` line naming the problem, no traceback, and writes nothing."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in: {lines[0]}"
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".") or p.name.endswith(".part")], "temporary file left behind"
    return lines[0]


def _save_nifti(array: np.ndarray, path: Path, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


pytestmark = pytest.mark.usefixtures("quick_reference_fit")


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


# ---------------------------------------------------------------- reference label maps
def test_label_map_without_foreground(predictor, folder, capsys, weights_file):
    image, labels = case("001")
    empty = Volume(np.zeros_like(labels.array), labels.affine, name="empty")
    _raises(InputError, "no labelled voxels", "empty", call=lambda: predictor.encode_reference(image, empty))
    empty_file = _save_nifti(np.zeros(labels.shape, np.uint8), folder.parent / "empty.nii.gz", labels.affine)
    output = folder / "seg.nii.gz"
    _cli_fails(capsys, ["segment", "--reference", str(image_path("001")), str(empty_file), "--target", str(image_path("003")),
                        "--output", str(output), "--weights", str(weights_file)], output, "no labelled voxels")


def test_label_map_without_the_requested_class(predictor):
    image, labels = case("001")
    error = _raises(InputError, "class 3", "not in", call=lambda: predictor.encode_reference(image, labels, classes=[1, 3]))
    assert "hippocampus_anterior" in str(error) and "hippocampus_posterior" in str(error)  # says what it does hold
    _raises(InputError, "'liver'", "not in", call=lambda: predictor.encode_reference(image, labels, classes=["liver"]))
    # A class named by the user but empty in this label map counts as absent.
    only_one = Volume(np.where(labels.array == 1, 1, 0).astype(np.uint8), labels.affine, "one", {2: {"name": "posterior"}})
    _raises(InputError, "posterior", call=lambda: predictor.encode_reference(image, only_one, classes=["posterior"]))


def test_image_and_label_map_of_different_shape(predictor):
    image, labels = case("001")
    cropped = Volume(labels.array[:-1], labels.affine, name="cropped")
    _raises(InputError, "shape", "same voxel grid", call=lambda: predictor.encode_reference(image, cropped))


def test_image_and_label_map_of_same_shape_but_different_geometry(predictor):
    image, labels = case("001")
    shifted = labels.affine.copy()
    shifted[:3, 3] += [5.0, 0.0, 0.0]
    _raises(InputError, "different geometry", "resample", call=lambda: predictor.encode_reference(image, Volume(labels.array, shifted, "shifted")))
    rotated = labels.affine @ np.diag([1.0, -1.0, 1.0, 1.0])
    _raises(InputError, "different geometry", call=lambda: predictor.encode_reference(image, Volume(labels.array, rotated, "mirrored")))


def test_label_map_with_non_integer_or_negative_values(predictor):
    image, labels = case("001")
    _raises(InputError, "non-integer", call=lambda: predictor.encode_reference(image, Volume(labels.array * 0.5, labels.affine)))
    _raises(InputError, "negative", call=lambda: predictor.encode_reference(image, Volume(labels.array.astype(np.int16) - 1, labels.affine)))


# ---------------------------------------------------------------- dimensionality
@pytest.mark.parametrize("shape, words", [((20, 30), ("3D", "2D")), ((10, 12, 14, 3), ("3D", "4D")), ((10, 12, 14, 2, 2), ("3D",))])
def test_volumes_that_are_not_3d(shape, words):
    _raises(InputError, *words, call=lambda: Volume(np.zeros(shape), np.eye(4)))


def test_a_trailing_single_channel_is_accepted():
    assert Volume(np.zeros((10, 12, 14, 1)), np.eye(4)).shape == (10, 12, 14)


@pytest.mark.parametrize("shape, words", [((20, 30), ("2D", "3D")), ((10, 12, 14, 3), ("3 volumes",))])
def test_cli_refuses_2d_and_4d_files(capsys, folder, weights_file, shape, words):
    require_data()
    target = _save_nifti(np.random.default_rng(0).random(shape).astype(np.float32), folder.parent / "bad.nii.gz")
    output = folder / "seg.nii.gz"
    _cli_fails(capsys, ["segment", "--reference", str(image_path("001")), str(labels_path("001")), "--target", str(target),
                        "--output", str(output), "--weights", str(weights_file)], output, "bad.nii.gz", *words)


def test_degenerate_geometry():
    _raises(InputError, "singular", call=lambda: Volume(np.zeros((4, 4, 4)), np.diag([1.0, 0.0, 1.0, 1.0])))
    _raises(InputError, "NaN or infinite", call=lambda: Volume(np.zeros((4, 4, 4)), np.full((4, 4), np.nan)))
    _raises(InputError, "4x4", call=lambda: Volume(np.zeros((4, 4, 4)), np.eye(3)))
    _raises(InputError, "empty", call=lambda: Volume(np.zeros((4, 0, 4)), np.eye(4)))


# ---------------------------------------------------------------- intensities
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_image(predictor, bad, folder, capsys, weights_file):
    image, labels = case("001")
    array = image.array.astype(np.float32)
    array[3, 4, 5] = bad
    broken = Volume(array, image.affine, name="broken")
    _raises(InputError, "NaN or infinite", "broken", call=lambda: predictor.encode_reference(broken, labels))
    task = predictor.encode_reference(image, labels)
    _raises(InputError, "NaN or infinite", call=lambda: predictor.segment(broken, task))
    _raises(InputError, "NaN or infinite", call=lambda: predictor.tune(task, broken, labels, steps=1))
    if np.isnan(bad):
        target = _save_nifti(array, folder.parent / "nan.nii.gz", image.affine)
        output = folder / "seg.nii.gz"
        _cli_fails(capsys, ["segment", "--reference", str(image_path("001")), str(labels_path("001")), "--target", str(target),
                            "--output", str(output), "--weights", str(weights_file)], output, "NaN")


def test_constant_image(predictor):
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    _raises(InputError, "constant", call=lambda: predictor.segment(Volume(np.full(image.shape, 7.0), image.affine), task))


def test_tiny_target_is_refused_clearly(predictor):
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    tiny = Volume(image.array[10:18, 20:28, 10:18], image.affine, name="tiny crop")
    _raises(InputError, "tiny crop", "8.0 mm long", "needs at least", call=lambda: predictor.segment(tiny, task))


# ---------------------------------------------------------------- what the network can see
def _slices(volume: Volume, count: int, spacing) -> Volume:
    """`count` slices of a scan, on a grid of the given voxel size."""
    middle = volume.shape[2] // 2
    return Volume(np.ascontiguousarray(volume.array[:, :, middle : middle + count]), np.diag([*spacing, 1.0]), name=f"{count} slices")


@pytest.mark.parametrize("count, spacing, words", [
    (1, (1.0, 1.0, 1.0), ("1.0 mm long along voxel axis 2", "1 voxel of 1.00 mm")),
    (4, (0.25, 0.25, 10.0), ("8.5 mm long along voxel axis 0", "34 voxels of 0.25 mm")),
    (1, (1.0, 1.0, 10.0), ("10.0 mm long along voxel axis 2", "1 voxel of 10.00 mm")),
])
def test_a_target_too_thin_for_the_network_is_refused(predictor, count, spacing, words):
    """A single slice, or a few: the working grid would be padding around them, and the network finds nothing
    (the shipped model gave all background, exit 0). The least is one voxel of the coarsest features: 16
    working voxels, 12.8 mm at the 0.797 mm working spacing of this reference."""
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    target, _ = case("003")
    thin = _slices(target, count, spacing)
    passes = predictor.decoder_passes  # encoding segments the reference to judge the network on it
    _raises(InputError, *words, "needs at least 12.8 mm", "working spacing of 0.80 mm", call=lambda: predictor.segment(thin, task))
    _raises(InputError, "the reference", call=lambda: predictor.encode_reference(thin, Volume(np.ones(thin.shape, np.uint8), thin.affine)))
    assert predictor.decoder_passes == passes


def test_a_target_just_thick_enough_is_segmented(predictor):
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    target, _ = case("003")
    thick = _slices(target, 5, (1.0, 1.0, 3.0))  # 15 mm along its slices
    assert predictor.segment(thick, task).shape == thick.shape


@pytest.mark.parametrize("dtype, words", [(np.complex64, ("complex-valued", "magnitude")), ("rgb", ("color or vector", "grayscale"))])
def test_complex_and_color_volumes_are_refused(predictor, dtype, words):
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    if dtype == "rgb":
        array = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        array["R"] = image.array
    else:
        array = image.array.astype(dtype)
    odd = Volume(array, image.affine, name="odd")
    _raises(InputError, "odd", *words, call=lambda: predictor.segment(odd, task))
    _raises(InputError, "odd", *words, call=lambda: predictor.encode_reference(odd, labels))
    _raises(InputError, "odd", *words, call=lambda: predictor.tune(task, odd, labels, steps=1))


def test_huge_intensities_segment_as_the_same_scan_at_a_usual_scale(predictor):
    """float32 statistics overflow near 1e18 (the normalised scan came out all zero); MR normalisation does not
    depend on the scale, so a scan at 1e18, or at 1e40 (beyond float32), segments as the scan itself."""
    image, labels = case("001")
    target, _ = case("003")
    task = predictor.encode_reference(image, labels)
    expected = predictor.segment(target, task).array
    assert expected.any()
    for scale in (1e18, 1e40):
        scaled = Volume(target.array.astype(np.float64) * scale, target.affine, name="scaled")
        np.testing.assert_array_equal(predictor.segment(scaled, task).array, expected)
    tiny = Volume(target.array.astype(np.float64) * 1e-30, target.affine, name="tiny")
    np.testing.assert_array_equal(predictor.segment(tiny, task).array, expected)
    big_reference = Volume(image.array.astype(np.float32) * np.float32(1e25), image.affine, name="reference at 1e25")
    torch.testing.assert_close(predictor.encode_reference(big_reference, labels).tokens, task.tokens)


def test_ct_intensities_are_kept_as_they_are(predictor):
    """CT is windowed in Hounsfield units first: no rescaling, however large the outliers."""
    from IrisSegmentLib.inference.predictor import _in_float32_range

    array = np.full((4, 4, 4), -1000.0)
    array[0, 0, 0] = 1e30
    assert _in_float32_range(array, "CT") is array
    assert _in_float32_range(array, "MR") is not array


def test_a_reference_class_too_small_to_encode_is_refused(predictor):
    image, labels = case("001")
    one = labels.array.copy()
    one[one == 2] = 0
    point = np.argwhere(labels.array == 2)[0]
    one[tuple(point)] = 2
    dot = Volume(one, labels.affine, "one voxel", {1: {"name": "big"}, 2: {"name": "dot"}})
    error = _raises(InputError, "'dot' covers", "fewer than 8", "--classes", call=lambda: predictor.encode_reference(image, dot))
    assert "'big'" not in str(error)
    assert predictor.min_class_voxels == 8
    assert predictor.encode_reference(image, dot, classes=["big"]).class_names == ["big"]
    assert predictor.encode_reference(image, dot, skip_small=True).class_names == ["big"]
    assert predictor.skipped_small == ["dot"]
    dots = np.zeros_like(one)
    dots[tuple(point)], dots[tuple(point + [1, 0, 0])] = 2, 3  # two touching voxels; the crop is centred between them
    only_dots = Volume(dots, labels.affine, "two voxels", {2: {"name": "dot"}, 3: {"name": "speck"}})
    _raises(InputError, "every class", "fewer than 8", "whole structures", call=lambda: predictor.encode_reference(image, only_dots, skip_small=True))


def test_an_instance_map_with_more_classes_than_memory_allows_is_a_label_map_asked_to_be_split(predictor):
    """Hundreds of cells are a label map, not a scan (they were refused as 'looks like a scan'); more
    than MAX_REFERENCE_CLASSES at once would take the memory of several GB, so the user picks some."""
    from IrisSegmentLib.inference.predictor import MAX_REFERENCE_CLASSES

    image, _ = case("001")
    cells = np.zeros(image.shape, np.uint16)
    corners = [(i, j, k) for i in range(1, image.shape[0] - 3, 4) for j in range(1, image.shape[1] - 3, 4) for k in range(1, image.shape[2] - 3, 4)]
    assert len(corners) > MAX_REFERENCE_CLASSES
    for value, (i, j, k) in enumerate(corners[: MAX_REFERENCE_CLASSES + 2], start=1):
        cells[i:i + 3, j:j + 3, k:k + 3] = value
    instances = Volume(cells, image.affine, "cells")
    assert not instances.looks_like_image()
    _raises(InputError, f"holds {MAX_REFERENCE_CLASSES + 2} classes", f"at most {MAX_REFERENCE_CLASSES}", "--classes",
            call=lambda: predictor.encode_reference(image, instances))
    assert predictor.encode_reference(image, instances, classes=[1, 2, 3]).label_values == [1, 2, 3]


def test_a_scan_given_as_the_label_map_is_refused(predictor):
    """A uint8 scan read as a label map passes as 100-odd classes (tune took it so); its voxels are not piecewise constant."""
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    assert image.array.dtype == np.uint8 and not labels.looks_like_image() and not image.looks_like_label_map()
    as_labels = Volume(image.array, image.affine, "the scan")
    assert as_labels.looks_like_image() and labels.looks_like_label_map()
    _raises(InputError, "'the scan' looks like a scan", "distinct values", call=lambda: predictor.encode_reference(image, as_labels))
    _raises(InputError, "'the scan' looks like a scan", call=lambda: predictor.tune(task, image, as_labels, steps=1))


def test_a_float_image_as_the_correction_is_an_input_error(predictor):
    """A float volume as the correction: whole numbers (a scan stored as float) raised a TypeError in tune."""
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    whole = Volume(image.array.astype(np.float64), image.affine, "float scan")
    _raises(InputError, "looks like a scan", call=lambda: predictor.tune(task, image, whole, steps=1))
    fractional = Volume(image.array.astype(np.float64) + 0.5, image.affine, "fractional")
    _raises(InputError, "non-integer", call=lambda: predictor.tune(task, image, fractional, steps=1))
    # A float label map of whole numbers is a label map.
    as_float = Volume(labels.array.astype(np.float32), labels.affine, "float labels", labels.segments)
    assert predictor.tune(task, image, as_float, steps=1, views=0).label_values == task.label_values


# ---------------------------------------------------------------- files the CLI cannot read
@pytest.mark.parametrize("name", ["scan.png", "scan.mha", "scan.dcm", "scan"])
def test_cli_unsupported_target_file(capsys, folder, weights_file, name):
    require_data()
    target = folder.parent / name
    target.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    output = folder / "seg.nii.gz"
    _cli_fails(capsys, ["segment", "--reference", str(image_path("001")), str(labels_path("001")), "--target", str(target),
                        "--output", str(output), "--weights", str(weights_file)], output, name, "supported")


def test_cli_corrupt_image_file(capsys, folder, weights_file):
    require_data()
    target = folder.parent / "corrupt.nii.gz"
    target.write_bytes(image_path("003").read_bytes()[:200])
    output = folder / "seg.nii.gz"
    _cli_fails(capsys, ["segment", "--reference", str(image_path("001")), str(labels_path("001")), "--target", str(target),
                        "--output", str(output), "--weights", str(weights_file)], output, "corrupt.nii.gz", "could not read")


# ---------------------------------------------------------------- weights files
def test_weights_file_truncated(tmp_path, weights_file):
    data = weights_file.read_bytes()
    for cut, words in [(len(data) // 2, ("not a valid safetensors", "truncated")), (len(data) - 1, ("truncated",)), (6, ("shorter",)), (20, ("header",))]:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _raises(WeightsError, str(path.name), *words, call=lambda: load_model(path, "cpu"))


def test_weights_file_of_random_bytes(tmp_path):
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(rng.bytes(4096))
    _raises(WeightsError, "noise.safetensors", "not a valid safetensors", call=lambda: load_model(noise, "cpu"))
    # A plausible header length followed by garbage.
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 100) + rng.bytes(300))
    _raises(WeightsError, "garbage.safetensors", "not a valid safetensors", call=lambda: load_model(garbage, "cpu"))


def test_weights_file_from_another_config(tmp_path, weights_file):
    tensors, meta = load_tensors(weights_file)
    other = random_model(0, channels=(8, 16, 32, 128)).config
    path = tmp_path / "mismatch.safetensors"
    save_tensors(path, tensors, {**meta, "config": other.to_json()})
    _raises(WeightsError, "mismatch.safetensors", "do not fit", call=lambda: load_model(path, "cpu"))
    missing = tmp_path / "missing_tensor.safetensors"
    save_tensors(missing, {k: v for k, v in tensors.items() if "decoder" not in k}, meta)
    _raises(WeightsError, "do not fit", call=lambda: load_model(missing, "cpu"))
    broken_config = tmp_path / "broken_config.safetensors"
    save_tensors(broken_config, tensors, {**meta, "config": '{"channels": [8, 16], "mystery": 3}'})
    _raises(WeightsError, "do not fit", call=lambda: load_model(broken_config, "cpu"))


def test_weights_file_of_a_foreign_format(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "foreign.safetensors"
    st_numpy.save_file({"weight": np.ones((3, 3), np.float32)}, str(path))
    _raises(WeightsError, "foreign.safetensors", "not an IrisSegment weights file", call=lambda: load_model(path, "cpu"))
    _raises(WeightsError, "not found", call=lambda: load_model(tmp_path / "nowhere.safetensors", "cpu"))


def test_weights_with_nan_values(tmp_path, weights_file):
    tensors, meta = load_tensors(weights_file)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_tensors(path, tensors, meta)
    _raises(WeightsError, "NaN", call=lambda: load_model(path, "cpu"))


def test_task_file_given_as_weights(tmp_path):
    task = TaskEmbedding(torch.zeros(1, 2, 4), [1], {1: {"name": "a"}}, "CT", 1.0, "x")
    task.save(tmp_path / "task.safetensors")
    _raises(WeightsError, "not an IrisSegment weights file", call=lambda: load_model(tmp_path / "task.safetensors", "cpu"))


# ---------------------------------------------------------------- task files
@pytest.fixture
def task_file(tmp_path, predictor) -> Path:
    task = TaskEmbedding(torch.randn(2, 3, 4), [1, 2], {1: {"name": "a"}, 2: {"name": "b"}}, "MR", 1.0, predictor.model_id)
    path = tmp_path / "task.safetensors"
    task.save(path)
    return path


def test_task_file_corrupt(tmp_path, task_file):
    data = task_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-5])
    _raises(WeightsError, "truncated.safetensors", "truncated", call=lambda: TaskEmbedding.load(truncated))
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(1).bytes(1000))
    _raises(WeightsError, "noise.safetensors", call=lambda: TaskEmbedding.load(noise))
    _raises(WeightsError, "no such file", call=lambda: TaskEmbedding.load(tmp_path / "nowhere.safetensors"))


def test_task_file_foreign(tmp_path, weights_file):
    st_numpy = pytest.importorskip("safetensors.numpy")
    foreign = tmp_path / "foreign.safetensors"
    st_numpy.save_file({"tokens": np.ones((1, 2, 3), np.float32)}, str(foreign))
    _raises(WeightsError, "not an IrisSegment task file", call=lambda: TaskEmbedding.load(foreign))
    _raises(WeightsError, "not an IrisSegment task file", call=lambda: TaskEmbedding.load(weights_file))


def test_task_file_with_broken_metadata_or_values(tmp_path, task_file):
    tensors, meta = load_tensors(task_file)
    cases = {
        "missing_key": (tensors, {k: v for k, v in meta.items() if k != "label_values"}),
        "bad_json": (tensors, {**meta, "segments": "{not json"}),
        "wrong_count": (tensors, {**meta, "label_values": "[1, 2, 3]"}),
        "flat_tokens": ({"tokens": tensors["tokens"][0]}, meta),
        "no_tokens": ({"other": tensors["tokens"]}, meta),
        "nan_tokens": ({"tokens": torch.full_like(tensors["tokens"], float("nan"))}, meta),
        "future_version": (tensors, {**meta, "format_version": "99"}),
    }
    for name, (t, m) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_tensors(path, t, m)
        _raises(WeightsError, f"{name}.safetensors", call=lambda: TaskEmbedding.load(path))


def test_task_asked_for_a_class_it_does_not_have(task_file):
    task = TaskEmbedding.load(task_file)
    assert task.select(["b"]).label_values == [2]
    error = _raises(InputError, "no class 'liver'", call=lambda: task.select(["liver"]))
    assert "1 (a)" in str(error) and "2 (b)" in str(error)
    _raises(InputError, "no class 7", call=lambda: task.select([7]))


def test_task_from_another_model(predictor, tmp_path):
    image, labels = case("001")
    other = IrisPredictor(random_model(1))
    assert other.model_id != predictor.model_id
    foreign_task = other.encode_reference(image, labels)
    foreign_task.save(tmp_path / "other.safetensors")
    loaded = TaskEmbedding.load(tmp_path / "other.safetensors")
    target, target_labels = case("003")
    _raises(InputError, "another model", "re-encode", call=lambda: predictor.segment(target, loaded))
    _raises(InputError, "another model", call=lambda: predictor.tune(loaded, target, target_labels, steps=1))
    _raises(InputError, "another model", call=lambda: predictor.segment_with_retrieval(target, [loaded]))
    own = predictor.encode_reference(image, labels)
    _raises(InputError, "different models", call=lambda: TaskEmbedding.ensemble([own, loaded]))


# ---------------------------------------------------------------- tuning options
def test_tuning_on_labels_without_the_task_classes(predictor):
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    other = Volume(np.where(labels.array > 0, 7, 0).astype(np.uint8), labels.affine, "other classes")
    _raises(InputError, "none of the task's classes", call=lambda: predictor.tune(task, image, other, steps=1))
    _raises(InputError, "at least 1", call=lambda: predictor.tune(task, image, labels, steps=0))
    # cancel: a tune that took the step count would stop at once (and not run for ever) rather than pass
    _raises(InputError, "at most 1000", call=lambda: predictor.tune(task, image, labels, steps=99999999999999999999, cancel=lambda: True))
    assert predictor.references_encoded == 1 and not predictor.tuning_losses  # refused before any work


@pytest.mark.parametrize("top_k", [0, -1, 1.5, True])
def test_retrieval_top_k_below_one_is_refused_before_any_work(predictor, top_k):
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    passes = predictor.decoder_passes
    target, _ = case("003")
    _raises(InputError, "top-k", "at least 1", call=lambda: predictor.segment_with_retrieval(target, [task], top_k=top_k))
    _raises(InputError, "top-k", call=lambda: predictor.retrieve(target, [task], top_k=top_k))
    assert predictor.decoder_passes == passes


# ---------------------------------------------------------------- memory bank
def _bank_model(norms: dict[str, float]):
    model = random_model(0, memory_classes=tuple(norms))
    with torch.no_grad():
        for row, norm in enumerate(norms.values()):
            entry = torch.randn(model.memory_bank.shape[1:])
            model.memory_bank[row] = entry / entry.norm() * norm
    return model


def test_memory_bank_needs_a_class_name():
    predictor = IrisPredictor(_bank_model({"SetA/x": 100.0}))
    for names in ([], None):
        _raises(InputError, "at least one memory-bank class", call=lambda: predictor.memory_bank_task(names))


def test_memory_bank_rows_learned_too_rarely_are_refused():
    """Rows of rarely drawn classes keep an early, much smaller embedding and segment nothing (the shipped
    model's TotalSeg_CT_example rows: 4-16 % of a well-trained row's norm; all background on their own scan)."""
    predictor = IrisPredictor(_bank_model({"SetA/x": 100.0, "SetA/y": 100.0, "SetB/z": 10.0, "SetB/w": 12.0, "SetC/v": 30.0}))
    assert predictor.memory_bank_task(["x", "y", "v"]).class_names == ["x", "y", "v"]  # 30 % of the scale is kept
    error = _raises(InputError, "SetB/z (10 %)", "seen too rarely", "--reference", "usable with these weights come from: SetA, SetC",
                    call=lambda: predictor.memory_bank_task(["x", "z"]))
    assert "SetA/x" not in str(error)
    _raises(InputError, "SetB/z (10 %), SetB/w (12 %)", call=lambda: predictor.memory_bank_task(["z", "w"]))


def test_memory_bank_refuses_the_shipped_model_s_untrained_rows():
    from IrisSegmentLib.model.weights import default_weights_path

    if not default_weights_path().is_file():
        pytest.skip(f"the shipped weights are not at {default_weights_path()}")
    predictor = IrisPredictor(load_model(None, "cpu"))
    _raises(InputError, "TotalSeg_CT_example/liver", "seen too rarely", call=lambda: predictor.memory_bank_task(["TotalSeg_CT_example/liver"]))
    assert predictor.memory_bank_task(["HeadNeck_CT/mandible"]).class_names == ["mandible"]
    _raises(InputError, "CT and MR", call=lambda: predictor.memory_bank_task(["HeadNeck_CT/mandible", "Abdomen_MRI/liver"]))


# ---------------------------------------------------------------- devices
def test_out_of_memory_error_type_for_torch_before_2_5(monkeypatch):
    """torch 2.2 (the last for macOS x86_64, Slicer's build there) has torch.cuda.OutOfMemoryError only."""
    from types import SimpleNamespace

    from IrisSegmentLib import device
    from IrisSegmentLib.inference.predictor import _device_memory

    class CudaOOM(RuntimeError):
        pass

    assert device.out_of_memory_error(SimpleNamespace(cuda=SimpleNamespace(OutOfMemoryError=CudaOOM))) is CudaOOM
    assert device.out_of_memory_error(torch) is getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)  # as in torch < 2.5
    with pytest.raises(DeviceError, match="GPU ran out of memory"):
        with _device_memory():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_requested_without_a_gpu(weights_file, capsys):
    for choice in ("cuda", "cuda:0", "CUDA"):
        _raises(DeviceError, "CUDA", "CPU", call=lambda: resolve_device(choice))
    _raises(DeviceError, "CUDA", call=lambda: load_model(weights_file, "cuda"))
    assert resolve_device("auto") == torch.device("cpu")
    rc = main(["info", "--weights", str(weights_file), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: CUDA was requested" in err and "Traceback" not in err


def test_unknown_device():
    _raises(DeviceError, "unknown device", "'tpu'", call=lambda: resolve_device("tpu"))
    _raises(DeviceError, "unknown device", "'cuda:x'", call=lambda: resolve_device("cuda:x"))  # a torch RuntimeError before


# ---------------------------------------------------------------- cancellation
def test_cancel_raises_and_leaves_the_task_alone(predictor):
    from IrisSegmentLib.errors import Cancelled

    image, labels = case("001")
    _raises(Cancelled, "cancelled", call=lambda: predictor.encode_reference(image, labels, cancel=lambda: True))
    task = predictor.encode_reference(image, labels)
    tokens = task.tokens.clone()
    _raises(Cancelled, "cancelled", call=lambda: predictor.segment(image, task, cancel=lambda: True))
    _raises(Cancelled, "cancelled", call=lambda: predictor.tune(task, image, labels, steps=3, cancel=lambda: True))
    assert torch.equal(task.tokens, tokens)
    assert predictor.references_encoded == 1
